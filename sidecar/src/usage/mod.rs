//! The usage store (design §5): every request's [`UsageRecord`] lands in an
//! embedded SQLite database (or, for a fleet, one PostgreSQL database:
//! [`postgres`]), written off the request path, and is read back by
//! `afr usage` and `GET /v1/usage` through one query layer.
//!
//! How the sidecar uses it:
//!
//! ```text
//! let store = Store::open(&config.usage.path)?;      // creates or migrates the schema
//! let recorder = store.recorder();                   // Clone + Send + Sync, one per task
//! recorder.record(rec);                              // never blocks; spills past its bound
//! let reader = store.reader();                       // for GET /v1/usage:
//! spawn_blocking(move || http::key_usage(&reader, key_id, query, time_arg::now_ms()))
//! store.shutdown()?;                                 // on SIGTERM/SIGINT: every row in the db or the spill file
//! ```
//!
//! - [`store`]: [`Store`], [`Recorder`], the queue's bound and the spill
//!   policy; `writer`: the thread that batches records into transactions,
//!   through a `RowStore` (SQLite in `schema`, PostgreSQL in [`postgres`]);
//!   `columns`: the row's columns, declared once for both.
//! - [`query`]: [`UsageQuery`] (filters and grouping), [`UsageRow`] (the sums)
//!   and [`UsageReader`], the read side, also used by the CLI without a writer.
//! - [`spill`]: records SQLite refuses (or past the queue's bound) are
//!   appended to a capped file beside the database and imported, exactly
//!   once, when SQLite takes writes again or at the next [`Store::open`].
//! - [`providers`]: each provider's answers, errors and latency by day, for
//!   the operator's dashboard on the admin listener.
//! - [`http`]: `GET /v1/usage`: [`http::key_usage`] (blocking) turns the
//!   caller's key id and query string into the response body, or an error
//!   that knows its HTTP status and `param`.
//! - [`reseed`]: at start-up, what each key spent this UTC day and month and
//!   used in the last two token windows, to seed the reservation ledger.
//! - [`time_arg`]: `24h` / RFC 3339 / date arguments, and the clock.
//! - [`cli`]: `afr usage`.
//!
//! The code uses only `super::` paths so the integration tests can compile the
//! module on its own (the `afr` crate has no library target).
//!
//! [`UsageRecord`]: afr_core::usage::UsageRecord

// This is the store's whole API (flush, query, gauges, key_usage) while the
// binary calls only part of it, and the integration tests compile the module
// without the binary's callers.
#![allow(dead_code)]

pub mod cli;
mod columns;
pub mod http;
pub mod postgres;
pub mod providers;
pub mod query;
pub mod reseed;
mod schema;
pub mod spill;
pub mod store;
pub mod time_arg;
mod writer;

pub use postgres::PostgresTarget;
pub use query::{GroupBy, UsageQuery, UsageReader, UsageRow};
#[allow(unused_imports)] // until `afr serve` names them
pub use store::{Recorder, ShutdownReport, Store, StoreOptions, UsageStats};

use std::path::PathBuf;

/// Everything that can go wrong opening, writing or reading the usage database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite could not open the file.
    #[error("usage store {path}: cannot open: {source}")]
    Open {
        /// The database path.
        path: PathBuf,
        /// SQLite's reason.
        source: rusqlite::Error,
    },
    /// A read-only open found no database (the CLI never creates one).
    #[error("usage store {path}: no such database (has `afr serve` recorded anything yet?)")]
    Missing {
        /// The database path.
        path: PathBuf,
    },
    /// The file was written by a newer `afr` whose schema this one does not know.
    #[error("usage store {path}: schema version {found} is newer than this afr knows ({known})")]
    TooNew {
        /// The database path.
        path: PathBuf,
        /// `PRAGMA user_version` found in the file.
        found: i64,
        /// The newest version this build knows.
        known: i64,
    },
    /// A reader found a file older than this build's schema; only the writer migrates.
    #[error("usage store {path}: schema version {found} is older than this afr's ({known}); start `afr serve` once to migrate it")]
    TooOld {
        /// The database path.
        path: PathBuf,
        /// `PRAGMA user_version` found in the file.
        found: i64,
        /// The version this build reads.
        known: i64,
    },
    /// Creating or migrating the schema failed.
    #[error("usage store {path}: migrating to schema version {version}: {source}")]
    Migrate {
        /// The database path.
        path: PathBuf,
        /// The version being applied.
        version: i64,
        /// SQLite's reason.
        source: rusqlite::Error,
    },
    /// A query failed.
    #[error("usage store: query failed: {0}")]
    Query(#[source] rusqlite::Error),
    /// The writer thread could not be started.
    #[error("usage store: cannot start the writer thread: {0}")]
    Spawn(#[source] std::io::Error),
    /// Shutdown could not write every pending record (they are reported, not silently lost).
    #[error("usage store: {unwritten} record(s) could not be written at shutdown: {reason}")]
    Unflushed {
        /// How many records are not in the database.
        unwritten: usize,
        /// The last SQLite error.
        reason: String,
    },
    /// At shutdown SQLite still refused writes: records wait in the spill
    /// file instead; the next [`Store::open`] imports it.
    #[error(
        "usage store: {unwritten} record(s) could not be written to the database ({reason}); \
         they are in {} and imported at the next start",
        spill.display()
    )]
    Spilled {
        /// How many records are in the spill file rather than the database.
        unwritten: usize,
        /// The last SQLite error.
        reason: String,
        /// The spill file.
        spill: PathBuf,
    },
    /// PostgreSQL: the URL, the schema or a query (messages never carry the URL).
    #[error("usage store (PostgreSQL): {0}")]
    Postgres(String),
    /// The writer thread panicked.
    #[error("usage store: the writer thread panicked")]
    WriterPanicked,
}
