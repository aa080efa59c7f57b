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

use afr_core::usage::UsageRecord;

use super::postgres::{PgRows, PostgresTarget};
use super::query::UsageReader;
use super::spill::{Appended, Spill};
use super::writer::Writer;
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
// Nearly every message is a record, so boxing it would only add an
// allocation per request; the rare Flush and Shutdown cost the space.
#[allow(clippy::large_enum_variant)]
pub(super) enum Msg {
    Record(UsageRecord),
    /// Write everything queued before this message, then answer.
    Flush(mpsc::SyncSender<Result<(), String>>),
    /// Write everything queued, checkpoint the WAL and stop.
    Shutdown,
}

/// State shared by the store, its recorders and the writer.
#[derive(Debug)]
pub(super) struct Shared {
    /// `true` while records are accepted. Recorders hold the read side for
    /// one channel send or spill append; shutdown takes the write side once
    /// to close it.
    pub(super) open: RwLock<bool>,
    /// [`StoreOptions::max_pending`].
    pub(super) max_pending: u64,
    /// Records queued for the writer.
    pub(super) accepted: AtomicU64,
    /// Queued records the writer is done with (written, spilled or dropped).
    pub(super) drained: AtomicU64,
    /// Records committed to the database by this run.
    pub(super) written: AtomicU64,
    /// Records appended to the spill file by this run.
    pub(super) spilled: AtomicU64,
    /// Records lost: the spill file was full or could not be written.
    pub(super) dropped: AtomicU64,
    /// Records refused because the store had shut down.
    pub(super) refused: AtomicU64,
    /// Whether the "queue full" warning was logged since the queue last
    /// drained below half of its bound.
    pub(super) warned: AtomicBool,
    pub(super) spill: Spill,
}

impl Shared {
    pub(super) fn pending(&self) -> u64 {
        let drained = self.drained.load(Ordering::Acquire);
        self.accepted
            .load(Ordering::Acquire)
            .saturating_sub(drained)
    }

    pub(super) fn count(&self, appended: Appended) {
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
pub(super) struct WriterStats {
    pub(super) transactions: u64,
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
        let rows = Box::new(schema::SqliteRows::new(conn));
        Self::start(path, rows, reader, options, true)
    }

    /// A store writing to the PostgreSQL database `target`, with its spill
    /// file beside `spill_base` (`<spill_base>-unwritten.jsonl`). It connects
    /// and migrates the schema now; a database that cannot be reached is
    /// not an error: records spill until it can be (logged), exactly as when
    /// it goes away later. A schema newer than this build is an error.
    /// `options.busy_timeout` bounds connecting and each statement.
    pub fn open_postgres(
        target: PostgresTarget,
        spill_base: &Path,
        options: StoreOptions,
    ) -> Result<Store, StoreError> {
        let target = target.with_timeout(options.busy_timeout);
        let mut rows = PgRows::new(target.clone())?;
        let reachable = match rows.prepare()? {
            Ok(()) => true,
            Err(reason) => {
                tracing::error!(
                    env = target.env(),
                    error = %reason,
                    "usage store: PostgreSQL is unavailable; records spill to a file until it is back"
                );
                false
            }
        };
        let reader = UsageReader::postgres(target)?;
        Self::start(spill_base, Box::new(rows), reader, options, reachable)
    }

    fn start(
        path: &Path,
        rows: Box<dyn super::writer::RowStore>,
        reader: UsageReader,
        options: StoreOptions,
        import_now: bool,
    ) -> Result<Store, StoreError> {
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
        let mut writer = Writer::new(rows, options, Arc::clone(&shared));
        // An unreachable database is the writer's to retry; the file stays.
        if import_now {
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
        } else {
            writer.refuse_from_start();
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

    /// The database file (PostgreSQL: the base of the spill file's name).
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
