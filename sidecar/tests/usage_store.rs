//! The usage store end to end on a real SQLite file and a real PostgreSQL
//! cluster: many threads recording, shutdown flushing what is pending,
//! reopening, and the sums queries return. The tests in [`both`] run once per
//! backend (`sqlite::name`, `postgres::name`); the lock tests are SQLite's
//! (PostgreSQL's outage tests are in `usage_postgres.rs`).

#[allow(unused_imports)]
#[path = "../src/usage/mod.rs"]
mod usage;
// The usage module names `crate::tls` (its PostgreSQL TLS), as in the binary.
#[allow(dead_code)]
#[path = "../src/tls.rs"]
mod tls;

mod pg;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use afr_core::usage::{TokenSource, UsageRecord};
use usage::store::StoreOptions;
use usage::{GroupBy, PostgresTarget, Store, StoreError, UsageQuery, UsageReader};

/// A fresh, empty usage database of one backend.
enum TestDb {
    Sqlite {
        dir: tempfile::TempDir,
    },
    Postgres {
        /// For the spill file.
        dir: tempfile::TempDir,
        url: String,
    },
}

impl TestDb {
    fn sqlite() -> TestDb {
        TestDb::Sqlite {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn postgres() -> TestDb {
        TestDb::Postgres {
            dir: tempfile::tempdir().expect("tempdir"),
            url: pg::shared().database(),
        }
    }

    /// The SQLite file, or the base of the PostgreSQL store's spill file.
    fn path(&self) -> std::path::PathBuf {
        match self {
            TestDb::Sqlite { dir } | TestDb::Postgres { dir, .. } => dir.path().join("usage.db"),
        }
    }

    fn target(url: &str) -> PostgresTarget {
        PostgresTarget::from_url(url, "AFR_TEST_POSTGRES_URL").expect("url")
    }

    fn open(&self) -> Store {
        self.open_with(StoreOptions::default())
    }

    fn open_with(&self, options: StoreOptions) -> Store {
        match self {
            TestDb::Sqlite { .. } => Store::open_with(&self.path(), options).expect("open"),
            TestDb::Postgres { url, .. } => {
                Store::open_postgres(Self::target(url), &self.path(), options).expect("open")
            }
        }
    }

    /// A reader of its own, as `afr usage` opens one.
    fn reader(&self) -> UsageReader {
        match self {
            TestDb::Sqlite { .. } => UsageReader::open(&self.path()).expect("reader"),
            TestDb::Postgres { url, .. } => {
                UsageReader::postgres(Self::target(url)).expect("reader")
            }
        }
    }

    /// Distinct request ids stored.
    fn distinct_request_ids(&self) -> u64 {
        let sql = "SELECT COUNT(DISTINCT request_id) FROM usage";
        match self {
            TestDb::Sqlite { .. } => {
                let conn = rusqlite::Connection::open(self.path()).expect("raw open");
                let n: i64 = conn.query_row(sql, [], |r| r.get(0)).expect("distinct");
                n as u64
            }
            TestDb::Postgres { url, .. } => pg::shared()
                .psql(pg::db_name(url), sql)
                .parse()
                .expect("a count"),
        }
    }
}

/// Runs each named test once per backend: `sqlite::NAME` and `postgres::NAME`.
macro_rules! both {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[test] fn $name() { super::$name(&super::TestDb::sqlite()) } )*
        }
        mod postgres {
            $( #[test] fn $name() { super::$name(&super::TestDb::postgres()) } )*
        }
    };
}

both!(
    many_threads_record_exactly_n_rows,
    shutdown_flushes_a_batch_still_waiting,
    shutdown_under_load_writes_or_refuses_every_record,
    a_spill_file_left_by_a_crash_is_imported_once_even_twice,
    dropping_the_store_flushes_too,
    rows_survive_reopening_the_writer,
    queries_filter_and_group,
    recorders_work_from_tokio_tasks_and_http_renders,
);

/// 2026-11-25T10:00:00Z
const T0: i64 = 1_795_600_800_000;
const DAY: i64 = 86_400_000;

fn record(i: u64, key: &str, model: &str, ts_ms: i64) -> UsageRecord {
    UsageRecord {
        ts_ms,
        request_id: format!("req-{key}-{i}"),
        key_id: key.to_owned(),
        model: model.to_owned(),
        provider: "mock".to_owned(),
        upstream_model: format!("{model}-upstream"),
        prompt_tokens: 10,
        completion_tokens: 20,
        total_tokens: 30,
        token_source: TokenSource::Provider,
        latency_ms: 5,
        ttft_ms: Some(1),
        status: 200,
        stream: i.is_multiple_of(2),
        truncated: false,
        cost_nanos: None,
        ..UsageRecord::default()
    }
}

fn total(reader: &UsageReader, q: &UsageQuery) -> u64 {
    reader
        .query(q)
        .expect("query")
        .iter()
        .map(|r| r.requests)
        .sum()
}

fn many_threads_record_exactly_n_rows(db: &TestDb) {
    const THREADS: u64 = 8;
    const PER_THREAD: u64 = 2_500;
    let store = db.open();
    let recorder = store.recorder();
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let recorder = recorder.clone();
            thread::spawn(move || {
                let key = format!("key-{t}");
                for i in 0..PER_THREAD {
                    recorder.record(record(i, &key, "gpt-4o-mini", T0));
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("worker");
    }
    let report = store.shutdown().expect("shutdown");
    assert_eq!(report.written, THREADS * PER_THREAD);
    assert!(report.transactions >= 1);
    assert_eq!(recorder.pending(), 0);

    let reader = db.reader();
    let rows = reader
        .query(&UsageQuery {
            group_by: vec![GroupBy::Key],
            ..UsageQuery::default()
        })
        .expect("query");
    assert_eq!(rows.len(), THREADS as usize);
    for row in &rows {
        assert_eq!(row.requests, PER_THREAD);
        assert_eq!(row.total_tokens, PER_THREAD * 30);
    }
    // Every request id landed once: no loss, no duplicate.
    assert_eq!(db.distinct_request_ids(), THREADS * PER_THREAD);
    if let TestDb::Sqlite { dir } = db {
        // The shutdown checkpoint leaves no WAL content behind.
        let wal = dir.path().join("usage.db-wal");
        assert!(!wal.exists() || std::fs::metadata(&wal).expect("wal").len() == 0);
    }
}

fn shutdown_flushes_a_batch_still_waiting(db: &TestDb) {
    // The batch would wait an hour and hold a million rows: only shutdown
    // can write it.
    let options = StoreOptions {
        max_batch_rows: 1_000_000,
        max_batch_delay: Duration::from_secs(3600),
        ..StoreOptions::default()
    };
    let store = db.open_with(options);
    let recorder = store.recorder();
    for i in 0..1_000 {
        recorder.record(record(i, "k", "m", T0));
    }
    assert_eq!(total(&store.reader(), &UsageQuery::default()), 0);
    assert_eq!(recorder.pending(), 1_000);
    let started = Instant::now();
    let report = store.shutdown().expect("shutdown");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(report.written, 1_000);
    assert_eq!(report.transactions, 1);
    assert_eq!(total(&db.reader(), &UsageQuery::default()), 1_000);
}

fn shutdown_under_load_writes_or_refuses_every_record(db: &TestDb) {
    let store = db.open();
    let recorder = store.recorder();
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..4)
        .map(|t| {
            let recorder = recorder.clone();
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                let key = format!("key-{t}");
                let mut sent = 0u64;
                // Keeps recording across the shutdown until told to stop.
                while !stop.load(Ordering::Relaxed) && sent < 1_000_000 {
                    recorder.record(record(sent, &key, "m", T0));
                    sent += 1;
                }
                sent
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(100));
    let report = store.shutdown().expect("shutdown");
    // Make sure some records raced with the shutdown and were refused.
    while recorder.refused() == 0 && !workers.iter().all(|w| w.is_finished()) {
        thread::yield_now();
    }
    stop.store(true, Ordering::Relaxed);
    let sent: u64 = workers.into_iter().map(|w| w.join().expect("worker")).sum();
    let stored = total(&db.reader(), &UsageQuery::default());
    // Four threads outpace the writer, so the queue may pass its bound: those
    // records went through the spill file and were imported before the end.
    assert_eq!(stored, report.written + recorder.spilled());
    assert_eq!(recorder.dropped(), 0);
    assert!(!usage::spill::spill_path(&db.path()).exists());
    assert_eq!(
        stored + recorder.refused(),
        sent,
        "every record written or refused"
    );
    assert_eq!(recorder.pending(), 0);
}

/// Options for a database another connection locks: short lock waits so the
/// tests do not wait seconds for each refusal.
fn lockable() -> StoreOptions {
    StoreOptions {
        busy_timeout: Duration::from_millis(10),
        retry_delay: Duration::from_millis(20),
        shutdown_busy_timeout: Duration::from_millis(10),
        ..StoreOptions::default()
    }
}

/// Request ids of the records in the spill file.
fn spilled_ids(db: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(usage::spill::spill_path(db))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            serde_json::from_str::<UsageRecord>(l)
                .expect("a record per line")
                .request_id
        })
        .collect()
}

/// Holds the database's write lock like another process would.
fn lock(path: &std::path::Path) -> rusqlite::Connection {
    let blocker = rusqlite::Connection::open(path).expect("blocker");
    blocker.execute_batch("BEGIN EXCLUSIVE").expect("lock");
    blocker
}

#[test]
fn a_locked_database_spills_at_runtime_and_takes_every_row_back_once_released() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("usage.db");
    let store = Store::open_with(&path, lockable()).expect("open");
    let recorder = store.recorder();
    let blocker = lock(&path);
    for i in 0..10 {
        recorder.record(record(i, "k", "m", T0));
    }
    let err = store.flush().expect_err("locked");
    assert!(
        matches!(err, StoreError::Unflushed { unwritten: 10, .. }),
        "{err}"
    );
    // Not kept in memory: on disk, synced, while the lock lasts.
    assert_eq!(recorder.pending(), 0);
    assert_eq!(spilled_ids(&path).len(), 10);
    assert_eq!(recorder.spilled(), 10);
    blocker.execute_batch("ROLLBACK").expect("unlock");
    store.flush().expect("flush after unlock");
    assert!(
        !usage::spill::spill_path(&path).exists(),
        "imported, then removed"
    );
    assert_eq!(total(&store.reader(), &UsageQuery::default()), 10);

    // Still locked at shutdown: the rows wait in the spill file.
    let blocker = lock(&path);
    recorder.record(record(10, "k", "m", T0));
    recorder.record(record(11, "k", "m", T0));
    let err = store.shutdown().expect_err("locked at shutdown");
    assert!(
        matches!(err, StoreError::Spilled { unwritten: 2, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("2 record(s)"), "{err}");
    assert_eq!(spilled_ids(&path), ["req-k-10", "req-k-11"]);
    blocker.execute_batch("ROLLBACK").expect("unlock");
    drop(blocker);

    // The next start imports them and removes the file: each row once.
    let store = Store::open(&path).expect("reopen");
    assert!(!usage::spill::spill_path(&path).exists());
    assert_eq!(total(&store.reader(), &UsageQuery::default()), 12);
    let report = store.shutdown().expect("shutdown");
    assert_eq!(
        report.written, 0,
        "imported rows are not this run's records"
    );
}

#[test]
fn a_spill_file_imported_twice_keeps_one_row_each() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("usage.db");
    let spill = usage::spill::spill_path(&path);
    let store = Store::open_with(&path, lockable()).expect("open");
    let blocker = lock(&path);
    for i in 0..5 {
        store.recorder().record(record(i, "k", "m", T0));
    }
    assert!(store.shutdown().is_err(), "locked: spilled");
    drop(blocker);
    let saved = std::fs::read(&spill).expect("spill file");

    // A crash after the import committed, before the file was removed: the
    // next start finds the same file again.
    drop(Store::open(&path).expect("first import"));
    assert!(!spill.exists());
    std::fs::write(&spill, &saved).expect("put it back");
    let store = Store::open(&path).expect("second import");
    assert!(!spill.exists());
    assert_eq!(total(&store.reader(), &UsageQuery::default()), 5);
}

fn a_spill_file_left_by_a_crash_is_imported_once_even_twice(db: &TestDb) {
    let spill = usage::spill::spill_path(&db.path());
    // What a run that could not reach the database left behind.
    let lines: String = (0..5)
        .map(|i| serde_json::to_string(&record(i, "k", "m", T0)).expect("json") + "\n")
        .collect();
    std::fs::write(&spill, &lines).expect("spill file");
    drop(db.open());
    assert!(!spill.exists(), "imported, then removed");
    // A crash after the import committed, before the file was removed: the
    // next start finds the same file again.
    std::fs::write(&spill, &lines).expect("put it back");
    let store = db.open();
    assert!(!spill.exists());
    assert_eq!(total(&store.reader(), &UsageQuery::default()), 5);
    assert_eq!(db.distinct_request_ids(), 5);
}

#[test]
fn past_its_bound_the_queue_spills_and_past_the_cap_records_are_dropped_and_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("usage.db");
    let line = serde_json::to_string(&record(100, "k", "m", T0))
        .expect("json")
        .len() as u64
        + 1;
    let options = StoreOptions {
        max_batch_rows: 1,
        // The writer waits on the lock for as long as the test holds it.
        busy_timeout: Duration::from_secs(60),
        max_pending: 10,
        spill_max_bytes: line * 20,
        ..StoreOptions::default()
    };
    let store = Store::open_with(&path, options).expect("open");
    let recorder = store.recorder();
    let blocker = lock(&path);
    let started = Instant::now();
    for i in 100..200 {
        recorder.record(record(i, "k", "m", T0));
    }
    // The writer is stuck on the lock: only the bound's worth is in memory,
    // the spill file took about 20 (lines differ by a byte or so), and the
    // rest was dropped.
    assert!(recorder.pending() <= 10, "{}", recorder.pending());
    assert!(
        (19..=21).contains(&recorder.spilled()),
        "{}",
        recorder.spilled()
    );
    assert!(recorder.dropped() >= 60, "{}", recorder.dropped());
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "record never waits for SQLite"
    );
    blocker.execute_batch("ROLLBACK").expect("unlock");
    drop(blocker);
    let dropped = recorder.dropped();
    store.shutdown().expect("shutdown");
    assert_eq!(recorder.stats().dropped, dropped);
    let reader = UsageReader::open(&path).expect("reopen");
    assert_eq!(
        total(&reader, &UsageQuery::default()) + dropped,
        100,
        "every record is in the database or counted as dropped"
    );
}

#[test]
fn shutdown_with_the_database_locked_for_good_is_bounded_and_keeps_every_row() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("usage.db");
    // The default lock waits, as `afr serve` runs.
    let store = Store::open(&path).expect("open");
    let recorder = store.recorder();
    let _blocker = lock(&path);
    for i in 0..1_000 {
        recorder.record(record(i, "k", "m", T0));
    }
    let started = Instant::now();
    let err = store.shutdown().expect_err("locked");
    let took = started.elapsed();
    let o = StoreOptions::default();
    // At most: a commit already waiting, the last one, then spilling.
    let bound = o.busy_timeout + o.shutdown_busy_timeout * 2 + Duration::from_secs(3);
    assert!(took < bound, "shutdown took {took:?}");
    assert!(matches!(err, StoreError::Spilled { .. }), "{err}");
    assert_eq!(spilled_ids(&path).len(), 1_000);
}

fn dropping_the_store_flushes_too(db: &TestDb) {
    let options = StoreOptions {
        max_batch_delay: Duration::from_secs(3600),
        ..StoreOptions::default()
    };
    let store = db.open_with(options);
    let recorder = store.recorder();
    for i in 0..10 {
        recorder.record(record(i, "k", "m", T0));
    }
    drop(store);
    assert_eq!(total(&db.reader(), &UsageQuery::default()), 10);
    // The store is gone: a late record is refused and counted, not a panic.
    recorder.record(record(99, "k", "m", T0));
    assert_eq!(recorder.refused(), 1);
    assert_eq!(recorder.pending(), 0);
}

fn rows_survive_reopening_the_writer(db: &TestDb) {
    for round in 0..3 {
        let store = db.open();
        store.recorder().record(record(round, "k", "m", T0));
        store.shutdown().expect("shutdown");
    }
    let store = db.open();
    assert_eq!(total(&store.reader(), &UsageQuery::default()), 3);
}

fn queries_filter_and_group(db: &TestDb) {
    let store = db.open();
    let rec = store.recorder();
    rec.record(record(1, "a", "small", T0 - DAY));
    rec.record(record(2, "a", "small", T0));
    rec.record(record(3, "a", "large", T0 + 1));
    let mut failed = record(4, "b", "small", T0 + 2);
    failed.status = 502;
    failed.prompt_tokens = 0;
    failed.completion_tokens = 0;
    failed.total_tokens = 0;
    failed.token_source = TokenSource::None;
    failed.provider = String::new();
    rec.record(failed);
    let mut cut = record(5, "b", "small", T0 + 3);
    cut.token_source = TokenSource::Estimated;
    cut.truncated = true;
    rec.record(cut);
    store.flush().expect("flush");

    let by_key_model = store
        .query(&UsageQuery {
            group_by: vec![GroupBy::Key, GroupBy::Model],
            ..UsageQuery::default()
        })
        .expect("query");
    let summary: Vec<(&str, &str, u64, u64)> = by_key_model
        .iter()
        .map(|r| {
            (
                r.key_id.as_deref().unwrap_or("?"),
                r.model.as_deref().unwrap_or("?"),
                r.requests,
                r.total_tokens,
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("a", "large", 1, 30),
            ("a", "small", 2, 60),
            ("b", "small", 2, 30)
        ]
    );
    let b = &by_key_model[2];
    assert_eq!((b.errors, b.estimated_requests, b.truncated), (1, 1, 1));

    let days = store
        .query(&UsageQuery {
            key_id: Some("a".into()),
            model: Some("small".into()),
            group_by: vec![GroupBy::Model, GroupBy::Day],
            ..UsageQuery::default()
        })
        .expect("days");
    let days: Vec<(&str, u64)> = days
        .iter()
        .map(|r| (r.day.as_deref().unwrap_or("?"), r.requests))
        .collect();
    assert_eq!(days, vec![("2026-11-24", 1), ("2026-11-25", 1)]);

    let window = UsageQuery {
        since_ms: Some(T0),
        until_ms: Some(T0 + 2),
        ..UsageQuery::default()
    };
    assert_eq!(total(&store.reader(), &window), 2);

    let providers = store
        .query(&UsageQuery {
            group_by: vec![GroupBy::Provider],
            ..UsageQuery::default()
        })
        .expect("providers");
    assert_eq!(providers[0].provider.as_deref(), Some(""));
    assert_eq!(providers[1].provider.as_deref(), Some("mock"));
    assert!(store
        .query(&UsageQuery {
            key_id: Some("nobody".into()),
            ..UsageQuery::default()
        })
        .expect("empty")
        .is_empty());
    store.shutdown().expect("shutdown");
}

fn recorders_work_from_tokio_tasks_and_http_renders(db: &TestDb) {
    let store = db.open();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let recorder = Arc::new(store.recorder());
    runtime.block_on(async {
        let tasks: Vec<_> = (0..100)
            .map(|i| {
                let recorder = Arc::clone(&recorder);
                tokio::spawn(async move { recorder.record(record(i, "k", "m", T0)) })
            })
            .collect();
        for t in tasks {
            t.await.expect("task");
        }
    });
    store.flush().expect("flush");
    let reader = store.reader();
    let body = runtime
        .block_on(async {
            tokio::task::spawn_blocking(move || {
                usage::http::key_usage(&reader, "k", "?since=2026-11-25&by=model,day", T0)
            })
            .await
        })
        .expect("join")
        .expect("key usage");
    assert_eq!(body["data"][0]["requests"], 100);
    assert_eq!(body["data"][0]["day"], "2026-11-25");
    assert_eq!(body["since"], "2026-11-25T00:00:00Z");
    let err = usage::http::key_usage(&store.reader(), "k", "by=key", T0).expect_err("by=key");
    assert_eq!((err.status(), err.param()), (400, Some("by")));
    store.shutdown().expect("shutdown");
}

#[test]
fn open_reports_the_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("no/such/dir/usage.db");
    let err = Store::open(&path).err().expect("must fail");
    assert!(matches!(err, StoreError::Open { .. }));
    assert!(err.to_string().contains("no/such/dir/usage.db"), "{err}");
}

/// Write throughput, recorded from `AFR_BENCH_THREADS` threads (4), into
/// SQLite or, with `AFR_BENCH_BACKEND=postgres`, the test cluster. Run with
/// `cargo test --release -p afr-sidecar --test usage_store -- --ignored --nocapture`.
#[test]
#[ignore = "benchmark"]
fn write_throughput() {
    let threads: u64 = std::env::var("AFR_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let per_thread = 400_000 / threads.max(1);
    let backend = std::env::var("AFR_BENCH_BACKEND").unwrap_or_else(|_| "sqlite".into());
    let db = match backend.as_str() {
        "postgres" => TestDb::postgres(),
        _ => TestDb::sqlite(),
    };
    let store = db.open();
    let recorder = store.recorder();
    let started = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let recorder = recorder.clone();
            thread::spawn(move || {
                let key = format!("key-{t}");
                for i in 0..per_thread {
                    recorder.record(record(i, &key, "gpt-4o-mini", T0 + i as i64));
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("worker");
    }
    let enqueued = started.elapsed();
    let report = store.shutdown().expect("shutdown");
    let elapsed = started.elapsed();
    let n = threads * per_thread;
    // A burst faster than SQLite passes the queue's bound: the rest goes
    // through the spill file and is imported before shutdown returns.
    assert_eq!(report.written + recorder.spilled(), n);
    assert_eq!(recorder.dropped(), 0);
    assert_eq!(total(&db.reader(), &UsageQuery::default()), n);
    println!(
        "usage store ({backend}): {n} rows in {:.2?} = {:.0} rows/s stored ({} transactions, {} rows via the spill file, {:.0} ns/record() call)",
        elapsed,
        n as f64 / elapsed.as_secs_f64(),
        report.transactions,
        recorder.spilled(),
        enqueued.as_nanos() as f64 / n as f64 * threads as f64,
    );
}
