//! [`Store`] owns the database and one writer thread; [`Recorder`] is the
//! cheap handle the request path uses to hand it records.
//!
//! Why a thread and a channel: `record` runs on tokio workers, so it must not
//! wait for SQLite. The queue is bounded by counting it: past
//! [`StoreOptions::max_pending`] records, `record` appends to the spill file
//! instead ([`super::spill`]), so neither memory nor the caller's latency
//! grows with a database that stopped taking writes. Records are grouped into
//! one transaction per batch (up to [`StoreOptions::max_batch_rows`] rows or
//! [`StoreOptions::max_batch_delay`] after the first one), through one cached
//! prepared statement.
//!
//! A batch SQLite refuses (disk full, a lock held past
//! [`StoreOptions::busy_timeout`]) goes to the spill file at once, and so do
//! the batches after it until [`StoreOptions::retry_delay`] passed; then
//! SQLite is tried again and, once it takes a batch, the spill file is
//! imported. Writes are `INSERT OR IGNORE` against a unique request id, so an
//! import repeated after a crash adds nothing.
//!
//! Shutdown closes a gate first, so every record is either in the queue ahead
//! of the shutdown message or refused with a log line: none can slip into the
//! queue after the writer's last look at it. Its last commit and checkpoint
//! wait at most [`StoreOptions::shutdown_busy_timeout`] for a lock; what
//! SQLite still refuses is in the spill file when it returns.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, RwLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use afr_core::usage::{TokenSource, UsageRecord};
use rusqlite::{params, Connection};

use super::query::UsageReader;
use super::spill::{Appended, Spill};
use super::{schema, StoreError, UsageQuery, UsageRow};

/// Tuning of the writer; [`Default`] is what `afr serve` uses unless
/// `[usage]` says otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreOptions {
    /// Most rows in one transaction.
    pub max_batch_rows: usize,
    /// Longest a record waits for its batch to fill before it is written.
    pub max_batch_delay: Duration,
    /// After SQLite refused a batch, how long batches go straight to the
    /// spill file before SQLite is tried again.
    pub retry_delay: Duration,
    /// How long one commit waits for a lock another connection holds.
    pub busy_timeout: Duration,
    /// Records queued for the writer past which new ones are spilled (about
    /// 250 bytes each in memory).
    pub max_pending: u64,
    /// Largest spill file; records past it are dropped and counted.
    pub spill_max_bytes: u64,
    /// How long shutdown's last commit and WAL checkpoint wait for a lock.
    pub shutdown_busy_timeout: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            max_batch_rows: 512,
            max_batch_delay: Duration::from_millis(50),
            retry_delay: Duration::from_secs(1),
            busy_timeout: Duration::from_secs(2),
            max_pending: 100_000,
            spill_max_bytes: 256 * 1024 * 1024,
            shutdown_busy_timeout: Duration::from_secs(1),
        }
    }
}

/// What the writer thread is asked to do, in queue order.
enum Msg {
    Record(UsageRecord),
    /// Write everything queued before this message, then answer.
    Flush(mpsc::SyncSender<Result<(), String>>),
    /// Write everything queued, checkpoint the WAL and stop.
    Shutdown,
}

/// State shared by the store, its recorders and the writer.
#[derive(Debug)]
struct Shared {
    /// `true` while records are accepted. Recorders hold the read side for
    /// one channel send or spill append; shutdown takes the write side once
    /// to close it.
    open: RwLock<bool>,
    /// [`StoreOptions::max_pending`].
    max_pending: u64,
    /// Records queued for the writer.
    accepted: AtomicU64,
    /// Queued records the writer is done with (written, spilled or dropped).
    drained: AtomicU64,
    /// Records committed to the database by this run.
    written: AtomicU64,
    /// Records appended to the spill file by this run.
    spilled: AtomicU64,
    /// Records lost: the spill file was full or could not be written.
    dropped: AtomicU64,
    /// Records refused because the store had shut down.
    refused: AtomicU64,
    /// Whether the "queue full" warning was logged since the queue last
    /// drained below half of its bound.
    warned: AtomicBool,
    spill: Spill,
}

impl Shared {
    fn pending(&self) -> u64 {
        let drained = self.drained.load(Ordering::Acquire);
        self.accepted
            .load(Ordering::Acquire)
            .saturating_sub(drained)
    }

    fn count(&self, appended: Appended) {
        self.spilled.fetch_add(appended.spilled, Ordering::AcqRel);
        self.dropped.fetch_add(appended.dropped, Ordering::AcqRel);
    }
}

/// Counters of a store, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageStats {
    /// Records queued and not yet written or spilled.
    pub pending: u64,
    /// Records committed by this run.
    pub written: u64,
    /// Records appended to the spill file by this run.
    pub spilled: u64,
    /// Records lost because the spill file was full or unwritable.
    pub dropped: u64,
}

/// The usage database: one writer thread plus a read connection.
///
/// Dropping a `Store` without [`Store::shutdown`] still flushes (and logs any
/// failure); call `shutdown` to learn the outcome.
pub struct Store {
    path: PathBuf,
    tx: mpsc::Sender<Msg>,
    writer: Option<JoinHandle<Result<WriterStats, StoreError>>>,
    shared: Arc<Shared>,
    reader: UsageReader,
}

/// Hands records to the writer thread. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::Sender<Msg>,
    shared: Arc<Shared>,
}

/// What [`Store::shutdown`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Rows committed since the store was opened.
    pub written: u64,
    /// Transactions committed since the store was opened.
    pub transactions: u64,
}

/// Totals kept by the writer thread.
#[derive(Debug, Clone, Copy, Default)]
struct WriterStats {
    transactions: u64,
}

impl Store {
    /// Opens or creates the database at `path` (schema created or migrated,
    /// WAL mode), imports a spill file left by an earlier run and starts the
    /// writer thread with [`StoreOptions::default`].
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Self::open_with(path, StoreOptions::default())
    }

    /// [`Store::open`] with explicit options.
    pub fn open_with(path: &Path, options: StoreOptions) -> Result<Store, StoreError> {
        let conn = schema::open_writer(path)?;
        conn.busy_timeout(options.busy_timeout)
            .map_err(|source| StoreError::Open {
                path: path.to_owned(),
                source,
            })?;
        let reader = UsageReader::open(path)?;
        let shared = Arc::new(Shared {
            open: RwLock::new(true),
            max_pending: options.max_pending,
            accepted: AtomicU64::new(0),
            drained: AtomicU64::new(0),
            written: AtomicU64::new(0),
            spilled: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            warned: AtomicBool::new(false),
            spill: Spill::new(path, options.spill_max_bytes),
        });
        let (tx, rx) = mpsc::channel();
        let mut writer = Writer {
            conn,
            batch: Vec::with_capacity(options.max_batch_rows),
            options,
            shared: Arc::clone(&shared),
            refusal: None,
            stats: WriterStats::default(),
        };
        match writer.import_spilled() {
            Ok(0) => {}
            Ok(count) => tracing::info!(
                count,
                "usage store: imported the records an earlier run had to spill"
            ),
            Err(e) => tracing::error!(
                file = %shared.spill.path().display(),
                error = %e,
                "usage store: importing the spill file failed; kept for later"
            ),
        }
        let handle = thread::Builder::new()
            .name("afr-usage-writer".into())
            .spawn(move || writer.run(&rx))
            .map_err(StoreError::Spawn)?;
        Ok(Store {
            path: path.to_owned(),
            tx,
            writer: Some(handle),
            shared,
            reader,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A handle for the request path.
    pub fn recorder(&self) -> Recorder {
        Recorder {
            tx: self.tx.clone(),
            shared: Arc::clone(&self.shared),
        }
    }

    /// A read handle (clone it freely) for `GET /v1/usage`. Its calls block
    /// on SQLite: run them in `tokio::task::spawn_blocking`.
    pub fn reader(&self) -> UsageReader {
        self.reader.clone()
    }

    /// Sums of the rows matching `q`; rows still queued are not seen (see
    /// [`Store::flush`]). Blocking.
    pub fn query(&self, q: &UsageQuery) -> Result<Vec<UsageRow>, StoreError> {
        self.reader.query(q)
    }

    /// Blocks until every record handed to a recorder before this call is
    /// committed, retrying SQLite now if it refused earlier (and importing
    /// the spill file if it takes writes again). Not needed for durability;
    /// useful before a query that must see the rows. An error says how many
    /// records wait in the spill file.
    pub fn flush(&self) -> Result<(), StoreError> {
        let (ack, answer) = mpsc::sync_channel(1);
        self.tx
            .send(Msg::Flush(ack))
            .map_err(|_| StoreError::WriterPanicked)?;
        match answer.recv() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) => Err(StoreError::Unflushed {
                unwritten: usize::try_from(self.shared.spill.records() + self.shared.pending())
                    .unwrap_or(usize::MAX),
                reason,
            }),
            Err(_) => Err(StoreError::WriterPanicked),
        }
    }

    /// Stops taking records, writes every pending one (or spills what SQLite
    /// still refuses), checkpoints the WAL into the database file and joins
    /// the writer thread. When it returns `Ok`, every record whose
    /// [`Recorder::record`] call returned before this call began is in the
    /// database; [`StoreError::Spilled`] says how many wait in the spill
    /// file instead. Records racing with it are either kept or refused with a
    /// log line, never lost silently. Bounded in time even when the database
    /// stays locked (about `busy_timeout` + 2 × `shutdown_busy_timeout`).
    /// Blocking (from async code: `spawn_blocking(move || store.shutdown())`).
    pub fn shutdown(mut self) -> Result<ShutdownReport, StoreError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<ShutdownReport, StoreError> {
        let Some(handle) = self.writer.take() else {
            return Err(StoreError::WriterPanicked);
        };
        // A recorder that panicked holding the gate cannot have left it half
        // written: it only ever reads the flag.
        *self.shared.open.write().unwrap_or_else(|p| p.into_inner()) = false;
        // A send error means the writer is gone already; join tells why.
        let _ = self.tx.send(Msg::Shutdown);
        let stats = handle.join().map_err(|_| StoreError::WriterPanicked)??;
        Ok(ShutdownReport {
            written: self.shared.written.load(Ordering::Acquire),
            transactions: stats.transactions,
        })
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if self.writer.is_some() {
            if let Err(e) = self.stop() {
                tracing::error!(error = %e, "usage store: flush on drop failed");
            }
        }
    }
}

impl Recorder {
    /// Queues `rec` for the writer; never waits for SQLite. Past
    /// [`StoreOptions::max_pending`] queued records it appends `rec` to the
    /// spill file instead (or drops and counts it when that is full). After
    /// [`Store::shutdown`] began, the record is logged and counted in
    /// [`Recorder::refused`] instead.
    pub fn record(&self, rec: UsageRecord) {
        let refused = {
            let open = self.shared.open.read().unwrap_or_else(|p| p.into_inner());
            if !*open {
                Some(rec)
            } else if self.shared.pending() >= self.shared.max_pending {
                self.overflow(rec);
                None
            } else {
                match self.tx.send(Msg::Record(rec)) {
                    Ok(()) => {
                        self.shared.accepted.fetch_add(1, Ordering::AcqRel);
                        None
                    }
                    // Only a writer thread that died drops the receiver early.
                    Err(mpsc::SendError(Msg::Record(rec))) => Some(rec),
                    Err(mpsc::SendError(_)) => None,
                }
            }
        };
        if let Some(rec) = refused {
            self.shared.refused.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                request_id = %rec.request_id,
                key_id = %rec.key_id,
                model = %rec.model,
                total_tokens = rec.total_tokens,
                "usage store is shut down; usage record not stored"
            );
        }
    }

    /// The queue is full: the writer is stuck on SQLite. The record goes to
    /// the spill file (one unsynced append; the writer syncs it later).
    fn overflow(&self, rec: UsageRecord) {
        if !self.shared.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                pending = self.shared.pending(),
                file = %self.shared.spill.path().display(),
                "usage store: the writer's queue is full; spilling new records to a file"
            );
        }
        let appended = self
            .shared
            .spill
            .append(std::slice::from_ref(&rec), false, Instant::now());
        self.shared.count(appended);
    }

    /// Records queued and not yet committed or spilled (a gauge for `/metrics`).
    pub fn pending(&self) -> u64 {
        self.shared.pending()
    }

    /// Records refused because the store had shut down.
    pub fn refused(&self) -> u64 {
        self.shared.refused.load(Ordering::Relaxed)
    }

    /// Records lost because the spill file was full or unwritable.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Acquire)
    }

    /// Records appended to the spill file by this run.
    pub fn spilled(&self) -> u64 {
        self.shared.spilled.load(Ordering::Acquire)
    }

    /// All counters at once.
    pub fn stats(&self) -> UsageStats {
        UsageStats {
            pending: self.pending(),
            written: self.shared.written.load(Ordering::Acquire),
            spilled: self.spilled(),
            dropped: self.dropped(),
        }
    }
}

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
struct Writer {
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
    fn run(mut self, rx: &mpsc::Receiver<Msg>) -> Result<WriterStats, StoreError> {
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
    fn import_spilled(&mut self) -> Result<usize, String> {
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
