//! The database schema and its migrations, versioned by `PRAGMA user_version`.
//!
//! A migration is appended to [`MIGRATIONS`], never edited: version N is the
//! state after the first N entries ran. Opening a file with a newer version
//! fails instead of guessing.

use std::path::Path;
use std::time::Duration;

use afr_core::usage::UsageRecord;
use rusqlite::{Connection, OpenFlags};

use super::columns;
use super::writer::RowStore;
use super::StoreError;

/// Ordered migrations; index 0 takes a fresh file to version 1.
const MIGRATIONS: &[&str] = &[
    // v1: one row per request, columns as in `afr_core::usage::UsageRecord`.
    "CREATE TABLE usage (
        id                INTEGER PRIMARY KEY,
        ts_ms             INTEGER NOT NULL,
        request_id        TEXT    NOT NULL,
        key_id            TEXT    NOT NULL,
        model             TEXT    NOT NULL,
        provider          TEXT    NOT NULL,
        upstream_model    TEXT    NOT NULL,
        prompt_tokens     INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        total_tokens      INTEGER NOT NULL,
        token_source      TEXT    NOT NULL,
        latency_ms        INTEGER NOT NULL,
        ttft_ms           INTEGER,
        status            INTEGER NOT NULL,
        stream            INTEGER NOT NULL,
        truncated         INTEGER NOT NULL
    );
    CREATE INDEX usage_key_ts ON usage (key_id, ts_ms);
    CREATE INDEX usage_ts ON usage (ts_ms);",
    // v2: one row per request id, so importing a spill file twice (a crash
    // between the import's commit and the file's removal) cannot count a
    // request twice; writes use INSERT OR IGNORE. A v1 file may already hold
    // duplicates (a spill file imported twice): the first row of each stays.
    // Empty ids (a record that lost its request) are not deduplicated.
    "DELETE FROM usage WHERE request_id <> '' AND id NOT IN
        (SELECT MIN(id) FROM usage WHERE request_id <> '' GROUP BY request_id);
    CREATE UNIQUE INDEX usage_request_id ON usage (request_id) WHERE request_id <> '';",
    // v3: cost in nano-dollars at the route's price; NULL when the route had
    // no price (unknown, not free). Older rows stay NULL.
    "ALTER TABLE usage ADD COLUMN cost_nanos INTEGER;",
    // v4: the token classes each priced apart (design §3): cache reads,
    // 5-minute and 1-hour cache writes (all part of prompt_tokens) and
    // reasoning (part of completion_tokens). Older rows read 0.
    "ALTER TABLE usage ADD COLUMN cached_tokens INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE usage ADD COLUMN cache_write_5m_tokens INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE usage ADD COLUMN cache_write_1h_tokens INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE usage ADD COLUMN reasoning_tokens INTEGER NOT NULL DEFAULT 0;",
];

/// The schema version this build writes.
pub(super) const VERSION: i64 = MIGRATIONS.len() as i64;

/// How long a connection waits on another's lock (a CLI reader, a checkpoint)
/// before SQLite reports `SQLITE_BUSY`.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens (creating if needed) the database for writing: WAL journal,
/// `synchronous=NORMAL` (a commit survives a crash of the process; the
/// checkpoint at shutdown makes it survive power loss too), schema migrated.
pub(super) fn open_writer(path: &Path) -> Result<Connection, StoreError> {
    let open_err = |source| StoreError::Open {
        path: path.to_owned(),
        source,
    };
    let mut conn = Connection::open(path).map_err(open_err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
    // journal_mode answers with a row, so it is read rather than executed.
    conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))
        .map_err(open_err)?;
    conn.execute_batch("PRAGMA synchronous = NORMAL;")
        .map_err(open_err)?;
    migrate(&mut conn, path)?;
    Ok(conn)
}

/// Opens an existing database for reading only; never creates a file.
pub(super) fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    if !path.exists() {
        return Err(StoreError::Missing {
            path: path.to_owned(),
        });
    }
    let open_err = |source| StoreError::Open {
        path: path.to_owned(),
        source,
    };
    // Read-write without create lets SQLite use the WAL index even when the
    // writer is not running; an operator without write access still gets a
    // plain read-only connection.
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .or_else(|_| {
        Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
    })
    .map_err(open_err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
    conn.execute_batch("PRAGMA query_only = ON;")
        .map_err(open_err)?;
    let found = user_version(&conn).map_err(open_err)?;
    if found > VERSION {
        return Err(StoreError::TooNew {
            path: path.to_owned(),
            found,
            known: VERSION,
        });
    }
    if found < VERSION {
        return Err(StoreError::TooOld {
            path: path.to_owned(),
            found,
            known: VERSION,
        });
    }
    Ok(conn)
}

/// The writer's SQLite connection.
pub(super) struct SqliteRows {
    conn: Connection,
    insert: String,
}

impl SqliteRows {
    /// Writes through `conn` (from [`open_writer`]).
    pub(super) fn new(conn: Connection) -> Self {
        SqliteRows {
            conn,
            insert: columns::sqlite_insert(),
        }
    }
}

impl RowStore for SqliteRows {
    fn engine(&self) -> &'static str {
        "SQLite"
    }

    /// One transaction through one cached prepared statement.
    fn insert_all(&mut self, records: &[UsageRecord]) -> Result<(), String> {
        let run = |conn: &mut Connection| -> rusqlite::Result<()> {
            let tx = conn.transaction()?;
            {
                let mut insert = tx.prepare_cached(&self.insert)?;
                for rec in records {
                    insert.execute(rusqlite::params_from_iter(columns::row(rec)))?;
                }
            }
            tx.commit()
        };
        run(&mut self.conn).map_err(|e| e.to_string())
    }

    fn shorten_waits(&mut self, wait: Duration) {
        if let Err(e) = self.conn.busy_timeout(wait) {
            tracing::warn!(error = %e, "usage store: cannot shorten the lock wait for shutdown");
        }
    }

    /// Moves the WAL into the main file (with fsync) so the rows survive a
    /// power loss too, and leaves no -wal file behind.
    fn close(&mut self) {
        if let Err(e) = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        {
            tracing::warn!(error = %e, "usage store: WAL checkpoint at shutdown failed");
        }
    }
}

fn user_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("PRAGMA user_version", [], |row| row.get(0))
}

/// Applies every migration past the file's `user_version`, each in its own
/// transaction together with the version bump.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let found = user_version(conn).map_err(|source| StoreError::Open {
        path: path.to_owned(),
        source,
    })?;
    if found > VERSION {
        return Err(StoreError::TooNew {
            path: path.to_owned(),
            found,
            known: VERSION,
        });
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(found.max(0) as usize) {
        let version = index as i64 + 1;
        let migrate_err = |source| StoreError::Migrate {
            path: path.to_owned(),
            version,
            source,
        };
        let tx = conn.transaction().map_err(migrate_err)?;
        tx.execute_batch(sql).map_err(migrate_err)?;
        tx.pragma_update(None, "user_version", version)
            .map_err(migrate_err)?;
        tx.commit().map_err(migrate_err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_file_gets_current_version_and_reopens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("u.db");
        let conn = open_writer(&path).expect("open");
        assert_eq!(user_version(&conn).expect("version"), VERSION);
        drop(conn);
        let conn = open_writer(&path).expect("reopen");
        assert_eq!(user_version(&conn).expect("version"), VERSION);
        open_reader(&path).expect("reader");
    }

    #[test]
    fn newer_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("u.db");
        let conn = open_writer(&path).expect("open");
        conn.pragma_update(None, "user_version", VERSION + 1)
            .expect("bump");
        drop(conn);
        assert!(matches!(open_writer(&path), Err(StoreError::TooNew { .. })));
        assert!(matches!(open_reader(&path), Err(StoreError::TooNew { .. })));
    }

    #[test]
    fn v1_file_with_duplicate_request_ids_keeps_the_first_of_each() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("u.db");
        let conn = Connection::open(&path).expect("open");
        conn.execute_batch(MIGRATIONS[0]).expect("v1");
        conn.pragma_update(None, "user_version", 1)
            .expect("version");
        let insert = |id: &str, tokens: i64| {
            conn.execute(
                "INSERT INTO usage (ts_ms, request_id, key_id, model, provider, upstream_model,
                 prompt_tokens, completion_tokens, total_tokens, token_source, latency_ms,
                 status, stream, truncated)
                 VALUES (1, ?1, 'k', 'm', 'p', 'u', 0, 0, ?2, 'none', 0, 200, 0, 0)",
                rusqlite::params![id, tokens],
            )
            .expect("insert");
        };
        // A spill file imported twice by v1, and two rows without an id.
        for (id, tokens) in [
            ("a", 1),
            ("b", 2),
            ("a", 3),
            ("b", 4),
            ("c", 5),
            ("", 6),
            ("", 7),
        ] {
            insert(id, tokens);
        }
        drop(conn);
        let conn = open_writer(&path).expect("migrate");
        let rows: Vec<(String, i64)> = conn
            .prepare("SELECT request_id, total_tokens FROM usage ORDER BY id")
            .expect("prepare")
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        let expected: Vec<(String, i64)> = [("a", 1), ("b", 2), ("c", 5), ("", 6), ("", 7)]
            .iter()
            .map(|(id, t)| (id.to_string(), *t))
            .collect();
        assert_eq!(rows, expected);
        // The index now refuses a second row for an id.
        let again = conn.execute(
            "INSERT INTO usage (ts_ms, request_id, key_id, model, provider, upstream_model,
             prompt_tokens, completion_tokens, total_tokens, token_source, latency_ms,
             status, stream, truncated)
             VALUES (1, 'a', 'k', 'm', 'p', 'u', 0, 0, 0, 'none', 0, 200, 0, 0)",
            [],
        );
        assert!(again.is_err());
    }

    #[test]
    fn reader_never_creates() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("absent.db");
        assert!(matches!(
            open_reader(&path),
            Err(StoreError::Missing { .. })
        ));
        assert!(!path.exists());
    }
}
