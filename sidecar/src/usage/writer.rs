//! The writer thread: batches records into transactions, spills what SQLite
//! refuses (see [`super::store`] for the policy), imports the spill file once
//! SQLite takes writes again, and finishes within a bounded time at shutdown.

use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::Instant;

use afr_core::usage::{TokenSource, UsageRecord};
use rusqlite::{params, Connection};

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

/// The writer thread's state.
pub(super) struct Writer {
    conn: Connection,
    batch: Vec<UsageRecord>,
    options: StoreOptions,
    shared: Arc<Shared>,
    /// Set while SQLite refuses writes; batches go to the spill file.
    refusal: Option<Refusal>,
    stats: WriterStats,
}

const INSERT: &str = "INSERT OR IGNORE INTO usage (ts_ms, request_id, key_id, model, provider,
    upstream_model, prompt_tokens, completion_tokens, total_tokens, token_source,
    latency_ms, ttft_ms, status, stream, truncated)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)";

impl Writer {
    /// A writer on `conn`; [`Writer::run`] it on its own thread.
    pub(super) fn new(conn: Connection, options: StoreOptions, shared: Arc<Shared>) -> Self {
        Writer {
            conn,
            batch: Vec::with_capacity(options.max_batch_rows),
            options,
            shared,
            refusal: None,
            stats: WriterStats::default(),
        }
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
                    tracing::info!(count, "usage store: spilled records imported");
                }
                Err(e) => {
                    self.refuse(&e);
                    return;
                }
            }
        }
        if took_writes {
            if self.refusal.take().is_some() {
                tracing::info!("usage store: SQLite takes writes again");
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
                file = %self.shared.spill.path().display(),
                "usage store: SQLite refuses writes; records go to the spill file until it takes them again"
            );
        } else {
            tracing::debug!(error = %reason, "usage store: SQLite still refuses writes");
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
    fn commit(&mut self) -> rusqlite::Result<()> {
        insert_all(&mut self.conn, &self.batch)?;
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
        shared.spill.import(|records| insert_all(conn, records))
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
        if let Err(e) = self.conn.busy_timeout(self.options.shutdown_busy_timeout) {
            tracing::warn!(error = %e, "usage store: cannot shorten the lock wait for shutdown");
        }
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
        // Moves the WAL into the main file (with fsync) so the rows survive
        // a power loss too, and leaves no -wal file behind.
        if let Err(e) = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        {
            tracing::warn!(error = %e, "usage store: WAL checkpoint at shutdown failed");
        }
        Ok(self.stats)
    }
}

/// Inserts `records` in one transaction; rows whose request id is already
/// stored are skipped (a spill file imported again).
fn insert_all(conn: &mut Connection, records: &[UsageRecord]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut insert = tx.prepare_cached(INSERT)?;
        for rec in records {
            insert.execute(params![
                rec.ts_ms,
                rec.request_id,
                rec.key_id,
                rec.model,
                rec.provider,
                rec.upstream_model,
                saturating_i64(rec.prompt_tokens),
                saturating_i64(rec.completion_tokens),
                saturating_i64(rec.total_tokens),
                token_source_str(rec.token_source),
                saturating_i64(rec.latency_ms),
                rec.ttft_ms.map(saturating_i64),
                rec.status,
                rec.stream,
                rec.truncated,
            ])?;
        }
    }
    tx.commit()
}

/// SQLite integers are i64; counts beyond that are clamped, not wrapped.
fn saturating_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The `token_source` column's spelling, the same as the serde form.
pub(super) fn token_source_str(source: TokenSource) -> &'static str {
    match source {
        TokenSource::Provider => "provider",
        TokenSource::Estimated => "estimated",
        TokenSource::None => "none",
    }
}
