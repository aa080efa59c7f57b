//! [`Store`] owns the database and one writer thread; [`Recorder`] is the
//! cheap handle the request path uses to hand it records.
//!
//! Why a thread and an unbounded channel: `record` runs on tokio workers, so it
//! must neither wait for SQLite nor for a full queue (a bounded channel would
//! either block a worker or drop a record, and design §5 allows neither). The
//! queue is bounded by watching it instead: [`Recorder::pending`] is a gauge
//! for `/metrics`, and a warning is logged when it passes [`PENDING_WARN`]. It
//! stays tiny in practice: one writer commits hundreds of thousands of rows a
//! second, far more than the gateway serves. Records are grouped into one
//! transaction per batch (up to [`StoreOptions::max_batch_rows`] rows or
//! [`StoreOptions::max_batch_delay`] after the first one), through one cached
//! prepared statement. A batch SQLite refuses (disk full, lock held too long)
//! stays in memory and is retried; it is never discarded while the store runs.
//!
//! Shutdown closes a gate first, so every record is either in the queue ahead
//! of the shutdown message (and written) or refused with a log line: none can
//! slip into the queue after the writer's last look at it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, RwLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use afr_core::usage::{TokenSource, UsageRecord};
use rusqlite::{params, Connection};

use super::query::UsageReader;
use super::{schema, spill, StoreError, UsageQuery, UsageRow};

/// Queued records past which a warning is logged (about 25 MB of records):
/// the database is not keeping up, or refuses writes.
pub const PENDING_WARN: u64 = 100_000;

/// Tuning of the writer; [`Default`] is what `afr serve` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreOptions {
    /// Most rows in one transaction.
    pub max_batch_rows: usize,
    /// Longest a record waits for its batch to fill before it is written.
    pub max_batch_delay: Duration,
    /// Pause before retrying a batch SQLite refused.
    pub retry_delay: Duration,
    /// How long one commit waits for a lock another connection holds.
    pub busy_timeout: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            max_batch_rows: 512,
            max_batch_delay: Duration::from_millis(50),
            retry_delay: Duration::from_secs(1),
            busy_timeout: Duration::from_secs(5),
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
    /// `true` while records are accepted. Recorders hold the read side only
    /// for one channel send; shutdown takes the write side once to close it.
    open: RwLock<bool>,
    /// Records queued.
    accepted: AtomicU64,
    /// Rows committed.
    written: AtomicU64,
    /// Records refused because the store had shut down.
    refused: AtomicU64,
    /// Whether the [`PENDING_WARN`] warning was logged since the queue last
    /// drained below half of it.
    warned: AtomicBool,
}

impl Shared {
    fn pending(&self) -> u64 {
        let written = self.written.load(Ordering::Acquire);
        self.accepted
            .load(Ordering::Acquire)
            .saturating_sub(written)
    }
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
    /// WAL mode) and starts the writer thread with [`StoreOptions::default`].
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Self::open_with(path, StoreOptions::default())
    }

    /// [`Store::open`] with explicit batching options.
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
            accepted: AtomicU64::new(0),
            written: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            warned: AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::channel();
        let mut writer = Writer {
            path: path.to_owned(),
            conn,
            batch: Vec::with_capacity(options.max_batch_rows),
            options,
            shared: Arc::clone(&shared),
            retry_at: None,
            last_error: None,
            stats: WriterStats::default(),
        };
        writer.import_spilled();
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
    /// committed. Not needed for durability (the writer commits on its own
    /// within [`StoreOptions::max_batch_delay`]); useful before a query that
    /// must see them.
    pub fn flush(&self) -> Result<(), StoreError> {
        let (ack, answer) = mpsc::sync_channel(1);
        self.tx
            .send(Msg::Flush(ack))
            .map_err(|_| StoreError::WriterPanicked)?;
        match answer.recv() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) => Err(StoreError::Unflushed {
                unwritten: usize::try_from(self.shared.pending()).unwrap_or(usize::MAX),
                reason,
            }),
            Err(_) => Err(StoreError::WriterPanicked),
        }
    }

    /// Stops taking records, writes every pending one, checkpoints the WAL
    /// into the database file and joins the writer thread. When it returns
    /// `Ok`, every record whose [`Recorder::record`] call returned before
    /// this call began is durable; records racing with it are either written
    /// or refused with a log line, never lost silently. Call it once the
    /// server stopped taking requests. Blocking (from async code:
    /// `spawn_blocking(move || store.shutdown())`).
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
    /// Queues `rec` for the writer. Never waits for SQLite or for queue
    /// space, never drops a record while the store runs; after
    /// [`Store::shutdown`] began, the record is logged and counted in
    /// [`Recorder::refused`] instead.
    pub fn record(&self, rec: UsageRecord) {
        let refused = {
            let open = self.shared.open.read().unwrap_or_else(|p| p.into_inner());
            if !*open {
                Some(rec)
            } else {
                match self.tx.send(Msg::Record(rec)) {
                    Ok(()) => {
                        self.shared.accepted.fetch_add(1, Ordering::AcqRel);
                        let pending = self.shared.pending();
                        if pending >= PENDING_WARN
                            && !self.shared.warned.swap(true, Ordering::Relaxed)
                        {
                            tracing::warn!(
                                pending,
                                "usage store: records are queueing up; is the database writable?"
                            );
                        }
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

    /// Records queued and not yet committed (a gauge for `/metrics`).
    pub fn pending(&self) -> u64 {
        self.shared.pending()
    }

    /// Records refused because the store had shut down.
    pub fn refused(&self) -> u64 {
        self.shared.refused.load(Ordering::Relaxed)
    }
}

/// What ended a round of collecting records.
enum Control {
    /// The batch is full or its delay passed.
    Write,
    Flush(mpsc::SyncSender<Result<(), String>>),
    Shutdown,
}

/// The writer thread's state.
struct Writer {
    /// The database file (the spill file sits beside it).
    path: PathBuf,
    conn: Connection,
    batch: Vec<UsageRecord>,
    options: StoreOptions,
    shared: Arc<Shared>,
    /// Set after a failed commit: no new attempt before this instant.
    retry_at: Option<Instant>,
    last_error: Option<String>,
    stats: WriterStats,
}

const INSERT: &str = "INSERT INTO usage (ts_ms, request_id, key_id, model, provider,
    upstream_model, prompt_tokens, completion_tokens, total_tokens, token_source,
    latency_ms, ttft_ms, status, stream, truncated)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)";

/// How often shutdown retries a batch SQLite refuses before giving up.
const SHUTDOWN_ATTEMPTS: u32 = 5;

impl Writer {
    fn run(mut self, rx: &mpsc::Receiver<Msg>) -> Result<WriterStats, StoreError> {
        loop {
            let control = self.collect(rx);
            if matches!(control, Control::Flush(_)) {
                // Someone is waiting: retry a refused batch now.
                self.retry_at = None;
            }
            self.try_write();
            match control {
                Control::Write => {}
                Control::Flush(ack) => {
                    let answer = match &self.last_error {
                        Some(e) if !self.batch.is_empty() => Err(e.clone()),
                        _ => Ok(()),
                    };
                    // The asker may have given up waiting; nothing to do then.
                    let _ = ack.send(answer);
                }
                Control::Shutdown => return self.finish(rx),
            }
        }
    }

    /// Gathers records until the batch is full, its delay passed, or a
    /// control message arrives.
    fn collect(&mut self, rx: &mpsc::Receiver<Msg>) -> Control {
        // An empty batch waits for work; a batch kept from a failed commit
        // only waits until its retry is due.
        let first = match self.retry_at {
            Some(at) if !self.batch.is_empty() => {
                rx.recv_timeout(at.saturating_duration_since(Instant::now()))
            }
            _ => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
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

    /// Commits the batch unless a retry is not yet due; on failure keeps it.
    fn try_write(&mut self) {
        if self.batch.is_empty() || self.retry_at.is_some_and(|at| Instant::now() < at) {
            return;
        }
        match self.commit() {
            Ok(()) => {
                if self.last_error.take().is_some() {
                    tracing::info!("usage store: writing again");
                }
                self.retry_at = None;
            }
            Err(e) => {
                tracing::error!(
                    error = %e,
                    pending = self.batch.len(),
                    "usage store: commit failed; keeping the batch and retrying"
                );
                self.last_error = Some(e.to_string());
                self.retry_at = Some(Instant::now() + self.options.retry_delay);
            }
        }
    }

    /// One transaction for the whole batch; the batch is cleared only once
    /// the commit succeeded.
    fn commit(&mut self) -> rusqlite::Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut insert = tx.prepare_cached(INSERT)?;
            for rec in &self.batch {
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
        tx.commit()?;
        let rows = self.batch.len() as u64;
        self.batch.clear();
        self.stats.transactions += 1;
        self.shared.written.fetch_add(rows, Ordering::AcqRel);
        if self.shared.pending() < PENDING_WARN / 2 {
            self.shared.warned.store(false, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Imports the records an earlier shutdown saved to the spill file. A
    /// failure is logged and leaves the file for the next start.
    fn import_spilled(&mut self) {
        let records = match spill::read_spilled(&self.path) {
            Ok(records) if records.is_empty() => return,
            Ok(records) => records,
            Err(e) => {
                tracing::error!(error = %e, "usage store: cannot read the spill file");
                return;
            }
        };
        let count = records.len();
        self.batch = records;
        let outcome = self.commit();
        // Imported rows are not this run's: keep the counters about records.
        self.shared.written.store(0, Ordering::Release);
        self.stats = WriterStats::default();
        match outcome.map_err(|e| e.to_string()).and_then(|()| {
            spill::remove_spilled(&self.path).map_err(|e| format!("removing it: {e}"))
        }) {
            Ok(()) => tracing::info!(
                count,
                "usage store: imported records saved at the last shutdown"
            ),
            Err(e) => {
                self.batch.clear();
                tracing::error!(error = %e, "usage store: importing the spill file failed; kept for the next start");
            }
        }
    }

    /// Drains the queue, commits with a few retries, checkpoints the WAL.
    fn finish(mut self, rx: &mpsc::Receiver<Msg>) -> Result<WriterStats, StoreError> {
        let mut acks = Vec::new();
        while let Ok(msg) = rx.try_recv() {
            match msg {
                Msg::Record(rec) => self.batch.push(rec),
                Msg::Flush(ack) => acks.push(ack),
                Msg::Shutdown => {}
            }
        }
        let mut attempts = 0;
        while !self.batch.is_empty() {
            match self.commit() {
                Ok(()) => self.last_error = None,
                Err(e) => {
                    attempts += 1;
                    tracing::error!(error = %e, attempts, "usage store: final commit failed");
                    self.last_error = Some(e.to_string());
                    if attempts >= SHUTDOWN_ATTEMPTS {
                        break;
                    }
                    thread::sleep(self.options.retry_delay.min(Duration::from_millis(200)));
                }
            }
        }
        let outcome = match self.last_error.take() {
            Some(reason) if !self.batch.is_empty() => Err(reason),
            _ => Ok(()),
        };
        for ack in acks {
            let _ = ack.send(outcome.clone());
        }
        if let Err(reason) = outcome {
            let unwritten = self.batch.len();
            return Err(match spill::spill(&self.path, &self.batch) {
                Ok(spill) => StoreError::Spilled {
                    unwritten,
                    reason,
                    spill,
                },
                Err(e) => StoreError::Unflushed {
                    unwritten,
                    reason: format!("{reason}; saving them to a file failed too: {e}"),
                },
            });
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
