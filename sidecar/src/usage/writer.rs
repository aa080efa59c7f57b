//! The writer thread: batches records into transactions, spills what the
//! database refuses (see [`super::store`] for the policy), imports the spill
//! file once the database takes writes again, and finishes within a bounded
//! time at shutdown. The database is a [`RowStore`]: SQLite
//! ([`super::schema::SqliteRows`]) or PostgreSQL ([`super::postgres::PgRows`]).

use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::Instant;

use afr_core::usage::UsageRecord;

use super::store::{Msg, Shared, StoreOptions, WriterStats};
use super::StoreError;

/// What ended a round of collecting records.
enum Control {
    /// The batch is full, its delay passed, or a retry of SQLite is due.
    Write,
    Flush(mpsc::SyncSender<Result<(), String>>),
    Shutdown,
}

/// SQLite refused a write: why, and when to try it again.
struct Refusal {
    reason: String,
    retry_at: Instant,
}

/// A database the writer puts rows into.
pub(super) trait RowStore: Send {
    /// The engine's name for log lines ("SQLite", "PostgreSQL").
    fn engine(&self) -> &'static str;
    /// Stores `records` all or none; rows whose request id is already stored
    /// are skipped (a spill file imported again), which makes every import
    /// exactly once.
    fn insert_all(&mut self, records: &[UsageRecord]) -> Result<(), String>;
    /// From now on waits at most `wait` for the database (shutdown must end
    /// inside the orchestrator's grace period).
    fn shorten_waits(&mut self, wait: std::time::Duration);
    /// Makes the committed rows durable beyond a crash of the machine, once
    /// everything is written (SQLite: the WAL checkpoint).
    fn close(&mut self);
}

/// The writer thread's state.
pub(super) struct Writer {
    conn: Box<dyn RowStore>,
    batch: Vec<UsageRecord>,
    options: StoreOptions,
    shared: Arc<Shared>,
    /// Set while SQLite refuses writes; batches go to the spill file.
    refusal: Option<Refusal>,
    stats: WriterStats,
}

impl Writer {
    /// A writer on `conn`; [`Writer::run`] it on its own thread.
    pub(super) fn new(conn: Box<dyn RowStore>, options: StoreOptions, shared: Arc<Shared>) -> Self {
        Writer {
            conn,
            batch: Vec::with_capacity(options.max_batch_rows),
            options,
            shared,
            refusal: None,
            stats: WriterStats::default(),
        }
    }

    /// Starts as if the database had just refused a write (it was
    /// unreachable at open): batches spill, and it is retried after
    /// [`StoreOptions::retry_delay`], importing the spill file once it answers.
    pub(super) fn refuse_from_start(&mut self) {
        self.refusal = Some(Refusal {
            reason: "the database was unreachable at start".to_owned(),
            retry_at: Instant::now() + self.options.retry_delay,
        });
    }

    /// Serves the queue until shutdown.
    pub(super) fn run(mut self, rx: &mpsc::Receiver<Msg>) -> Result<WriterStats, StoreError> {
        loop {
            let control = self.collect(rx);
            if let (Control::Flush(_), Some(refusal)) = (&control, &mut self.refusal) {
                // Someone is waiting: try SQLite again now.
                refusal.retry_at = Instant::now();
            }
            self.write();
            match control {
                Control::Write => {}
                Control::Flush(ack) => {
                    // The asker may have given up waiting; nothing to do then.
                    let _ = ack.send(self.outcome());
                }
                Control::Shutdown => return self.finish(rx),
            }
        }
    }

    /// Gathers records until the batch is full, its delay passed, a retry of
    /// a refusing SQLite is due, or a control message arrives.
    fn collect(&mut self, rx: &mpsc::Receiver<Msg>) -> Control {
        let first = match &self.refusal {
            // Even without traffic, a refusing database is retried (and the
            // spill file imported) once it takes writes again.
            Some(refusal) => {
                rx.recv_timeout(refusal.retry_at.saturating_duration_since(Instant::now()))
            }
            None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
        };
        let mut msg = match first {
            Ok(msg) => msg,
            Err(mpsc::RecvTimeoutError::Timeout) => return Control::Write,
            // Every sender is gone, the store included: nothing more can come.
            Err(mpsc::RecvTimeoutError::Disconnected) => return Control::Shutdown,
        };
        let deadline = Instant::now() + self.options.max_batch_delay;
        loop {
            match msg {
                Msg::Record(rec) => self.batch.push(rec),
                Msg::Flush(ack) => return Control::Flush(ack),
                Msg::Shutdown => return Control::Shutdown,
            }
            if self.batch.len() >= self.options.max_batch_rows {
                return Control::Write;
            }
            msg = match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(msg) => msg,
                Err(mpsc::RecvTimeoutError::Timeout) => return Control::Write,
                Err(mpsc::RecvTimeoutError::Disconnected) => return Control::Shutdown,
            };
        }
    }

    /// Commits the batch, or spills it while SQLite refuses writes; once
    /// SQLite takes writes again, imports the spill file.
    fn write(&mut self) {
        let now = Instant::now();
        if self.refusal.as_ref().is_some_and(|r| now < r.retry_at) {
            self.spill_batch();
            return;
        }
        let mut took_writes = false;
        if !self.batch.is_empty() {
            if let Err(e) = self.commit() {
                self.refuse(&e);
                self.spill_batch();
                return;
            }
            took_writes = true;
        }
        if self.shared.spill.records() > 0 {
            match self.import_spilled() {
                Ok(count) => {
                    took_writes |= count > 0;
                    tracing::info!(
                        count,
                        engine = self.conn.engine(),
                        "usage store: spilled records imported"
                    );
                }
                Err(e) => {
                    self.refuse(&e);
                    return;
                }
            }
        }
        if took_writes {
            if self.refusal.take().is_some() {
                tracing::info!(
                    engine = self.conn.engine(),
                    "usage store: the database takes writes again"
                );
            }
        } else if let Some(refusal) = &mut self.refusal {
            // Nothing was written, so nothing proved the refusal over: keep
            // it (and spilling) until a write succeeds.
            refusal.retry_at = now + self.options.retry_delay;
        }
    }

    /// `Err` while records wait in the spill file.
    fn outcome(&self) -> Result<(), String> {
        match (self.shared.spill.records(), &self.refusal) {
            (0, _) => Ok(()),
            (_, Some(refusal)) => Err(refusal.reason.clone()),
            (n, None) => Err(format!("{n} record(s) wait in the spill file")),
        }
    }

    /// Notes that SQLite refused a write; logs the first refusal of a run of them.
    fn refuse(&mut self, error: &dyn std::fmt::Display) {
        let reason = error.to_string();
        if self.refusal.is_none() {
            tracing::error!(
                error = %reason,
                engine = self.conn.engine(),
                file = %self.shared.spill.path().display(),
                "usage store: the database refuses writes; records go to the spill file until it takes them again"
            );
        } else {
            tracing::debug!(error = %reason, "usage store: the database still refuses writes");
        }
        self.refusal = Some(Refusal {
            reason,
            retry_at: Instant::now() + self.options.retry_delay,
        });
    }

    /// Moves the batch to the spill file (synced: these records are in no
    /// other place).
    fn spill_batch(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let appended = self.shared.spill.append(&self.batch, true, Instant::now());
        self.shared.count(appended);
        self.shared
            .drained
            .fetch_add(self.batch.len() as u64, Ordering::AcqRel);
        self.batch.clear();
    }

    /// One transaction for the whole batch; the batch is cleared only once
    /// the commit succeeded.
    fn commit(&mut self) -> Result<(), String> {
        self.conn.insert_all(&self.batch)?;
        let rows = self.batch.len() as u64;
        self.batch.clear();
        self.stats.transactions += 1;
        self.shared.written.fetch_add(rows, Ordering::AcqRel);
        self.shared.drained.fetch_add(rows, Ordering::AcqRel);
        if self.shared.pending() < self.shared.max_pending / 2 {
            self.shared.warned.store(false, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Imports the spill file (records of an earlier run, or of this one
    /// while SQLite refused writes); it is removed only after the commit.
    pub(super) fn import_spilled(&mut self) -> Result<usize, String> {
        let shared = Arc::clone(&self.shared);
        let conn = &mut self.conn;
        shared.spill.import(|records| conn.insert_all(records))
    }

    /// Drains the queue, makes one bounded attempt at SQLite, spills what it
    /// refuses, checkpoints the WAL.
    fn finish(mut self, rx: &mpsc::Receiver<Msg>) -> Result<WriterStats, StoreError> {
        let mut acks = Vec::new();
        while let Ok(msg) = rx.try_recv() {
            match msg {
                Msg::Record(rec) => self.batch.push(rec),
                Msg::Flush(ack) => acks.push(ack),
                Msg::Shutdown => {}
            }
        }
        // Shutdown must end inside the orchestrator's grace period even when
        // another process holds the database's lock for good.
        self.conn.shorten_waits(self.options.shutdown_busy_timeout);
        if let Some(refusal) = &mut self.refusal {
            // One last try: the lock may be gone by now.
            refusal.retry_at = Instant::now();
        }
        self.write();
        if let Err(e) = self.shared.spill.sync() {
            tracing::error!(error = %e, "usage store: syncing the spill file failed");
        }
        let outcome = self.outcome();
        for ack in acks {
            let _ = ack.send(outcome.clone());
        }
        if let Err(reason) = outcome {
            return Err(StoreError::Spilled {
                unwritten: usize::try_from(self.shared.spill.records()).unwrap_or(usize::MAX),
                reason,
                spill: self.shared.spill.path().to_owned(),
            });
        }
        if self.refusal.is_some() {
            // Every record was written or dropped (and counted); a
            // checkpoint would only wait for the lock again.
            return Ok(self.stats);
        }
        self.conn.close();
        Ok(self.stats)
    }
}
