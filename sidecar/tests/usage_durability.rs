//! Usage rows when SQLite refuses writes: another process holds the
//! database's lock while requests flow, while the sidecar shuts down, and
//! while the spill file is full. Every request ends up in the database
//! exactly once, or is counted as dropped in `/metrics`.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn one_model_with_usage(usage_extra: &str) -> (Mock, Sidecar) {
    // Past its log capacity (10 000 by default) the mock keeps only the
    // newest requests, and a quiet machine answers more than that before the
    // SIGKILL test's kill: "served" must count every request.
    let mock = Mock::start(&["--log-capacity", "1000000"]);
    let body = format!(
        "{}{}",
        openai_provider("mock", &mock.base(), ""),
        model("m", &[("mock", "up")]),
    );
    let sidecar = Sidecar::start_with_sections(&body, 5, "30s", "", usage_extra);
    (mock, sidecar)
}

fn db(sidecar: &Sidecar) -> PathBuf {
    sidecar.dir.path().join("usage.db")
}

fn spill(sidecar: &Sidecar) -> PathBuf {
    sidecar.dir.path().join("usage.db-unwritten.jsonl")
}

fn spilled_lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

/// (rows, distinct request ids) in the usage table.
fn rows(db: &Path) -> (i64, i64) {
    let conn = rusqlite::Connection::open(db).expect("open");
    conn.query_row(
        "SELECT COUNT(*), COUNT(DISTINCT request_id) FROM usage",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .expect("count")
}

/// Holds the database's write lock like another process would.
fn lock(db: &Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(db).expect("open");
    conn.execute_batch("BEGIN EXCLUSIVE").expect("lock");
    conn
}

/// Polls `done` for up to 15 s.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn chats(sidecar: &Sidecar, n: usize) {
    for _ in 0..n {
        assert_eq!(sidecar.chat(chat_body("m", false)).await.status(), 200);
    }
}

/// The value of an unlabelled metric line `name value`.
fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test]
async fn rows_spill_while_the_database_is_locked_and_land_exactly_once_after() {
    let (_mock, mut sidecar) = one_model_with_usage("");
    let blocker = lock(&db(&sidecar));
    chats(&sidecar, 20).await;
    // Requests never wait for SQLite; their rows go to the spill file.
    let file = spill(&sidecar);
    until("20 spilled rows", || spilled_lines(&file) == 20).await;
    assert_eq!(rows(&db(&sidecar)).0, 0);
    // The writer counts a batch once its lines are in the file: the counter
    // can trail the file by a moment (CI once read 0 right after the 20 lines).
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut m = sidecar.metrics().await;
    while metric(&m, "afr_usage_spilled_total") != Some(20) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        m = sidecar.metrics().await;
    }
    assert_eq!(metric(&m, "afr_usage_spilled_total"), Some(20), "{m}");
    assert_eq!(metric(&m, "afr_usage_dropped_total"), Some(0), "{m}");

    // Released: the sidecar imports them by itself, and removes the file.
    drop(blocker);
    until("the import", || rows(&db(&sidecar)).0 == 20).await;
    until("the file's removal", || !file.exists()).await;
    chats(&sidecar, 5).await;
    let status = sidecar.terminate();
    assert!(status.success(), "{status}\n{}", sidecar.log());
    assert_eq!(rows(&db(&sidecar)), (25, 25));

    // A restart imports nothing twice.
    sidecar.restart();
    let status = sidecar.terminate();
    assert!(status.success(), "{status}");
    assert_eq!(rows(&db(&sidecar)), (25, 25));
}

#[tokio::test]
async fn sigterm_with_the_database_locked_ends_within_the_grace_and_the_next_start_imports_the_rows(
) {
    let (_mock, mut sidecar) = one_model_with_usage("");
    let blocker = lock(&db(&sidecar));
    chats(&sidecar, 10).await;
    let started = Instant::now();
    let status = sidecar.terminate();
    let took = started.elapsed();
    eprintln!("SIGTERM with the database locked: exited after {took:?}");
    // Kubernetes' default terminationGracePeriodSeconds.
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert!(
        !status.success(),
        "a non-zero exit says rows are not in the database"
    );
    assert!(
        sidecar.log().contains("imported at the next start"),
        "{}",
        sidecar.log()
    );
    assert_eq!(spilled_lines(&spill(&sidecar)), 10);
    assert_eq!(rows(&db(&sidecar)).0, 0);

    drop(blocker);
    sidecar.restart();
    assert!(!spill(&sidecar).exists(), "imported at start, then removed");
    assert_eq!(rows(&db(&sidecar)), (10, 10));
    let status = sidecar.terminate();
    assert!(status.success(), "{status}");
    assert_eq!(rows(&db(&sidecar)), (10, 10));
}

#[tokio::test]
async fn rows_past_the_spill_cap_are_dropped_counted_in_metrics_and_logged_once() {
    let (_mock, sidecar) = one_model_with_usage("spill_max_bytes = 1");
    let _blocker = lock(&db(&sidecar));
    chats(&sidecar, 6).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let m = loop {
        let m = sidecar.metrics().await;
        if metric(&m, "afr_usage_dropped_total") == Some(6) {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "6 dropped rows never in /metrics:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(metric(&m, "afr_usage_spilled_total"), Some(0), "{m}");
    assert!(m.contains("# TYPE afr_usage_dropped counter"), "{m}");
    let log = sidecar.log();
    assert_eq!(
        log.matches("usage records dropped").count(),
        1,
        "at most one line a minute:\n{log}"
    );
}

#[tokio::test]
async fn sigterm_records_every_stream_it_cuts() {
    // Twenty streams still running when the grace (300 ms) ends: each is cut
    // and each gets its row before the store closes.
    let mock = Mock::start(&["--chunks", "100", "--chunk-interval-ms", "100"]);
    let body = format!(
        "{}{}",
        openai_provider("mock", &mock.base(), ""),
        model("m", &[("mock", "up")]),
    );
    let mut sidecar =
        Sidecar::start_with_sections(&body, 5, "30s", "shutdown_grace = \"300ms\"", "");
    let mut bodies = Vec::new();
    for _ in 0..20 {
        let r = sidecar.chat(chat_body("m", true)).await;
        assert_eq!(r.status(), 200);
        let mut body = r.bytes_stream();
        use futures_util::StreamExt;
        body.next().await.expect("a first chunk").expect("bytes");
        bodies.push(body);
    }
    let status = sidecar.terminate();
    assert!(status.success(), "{status}");
    assert_eq!(rows(&db(&sidecar)), (20, 20), "{}", sidecar.log());
    drop(bodies);
}

#[tokio::test]
async fn sigkill_under_load_loses_only_the_last_batch_window() {
    // Eight clients keep chatting; the sidecar is SIGKILLed (no shutdown, no
    // flush). Rows committed before the kill survive it (SQLite's WAL), so
    // what is lost is at most the records still queued: those of requests
    // answered in the last `max_batch_delay` (50 ms) plus the batch being
    // committed. Checked as: every request answered 500 ms before the kill
    // has its row; the rest is measured and printed.
    let (mock, mut sidecar) = one_model_with_usage("");
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (answered, stop) = (answered.clone(), stop.clone());
        let url = sidecar.url("/v1/chat/completions");
        let client = sidecar.client.clone();
        clients.push(tokio::spawn(async move {
            use std::sync::atomic::Ordering::SeqCst;
            while !stop.load(SeqCst) {
                let sent = client
                    .post(&url)
                    .header("x-afr-secret", SECRET)
                    .header("x-afr-key-id", "kill")
                    .json(&chat_body("m", false))
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status() == 200 => {
                        answered.fetch_add(1, SeqCst);
                    }
                    _ => break,
                }
            }
        }));
    }
    until("400 answers", || {
        answered.load(std::sync::atomic::Ordering::SeqCst) >= 400
    })
    .await;
    // Everything answered by now is ten batch delays old at the kill: it
    // must have been committed, while the load goes on up to the kill.
    let early = answered.load(std::sync::atomic::Ordering::SeqCst) as i64;
    tokio::time::sleep(Duration::from_millis(500)).await;
    sidecar.kill();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for c in clients {
        let _ = c.await;
    }
    let acknowledged = answered.load(std::sync::atomic::Ordering::SeqCst) as i64;
    // The mock served every answered request, and perhaps a few whose answer
    // the kill cut.
    let served = mock.requests().await.len() as i64;
    assert!(served >= acknowledged, "{served} < {acknowledged}");
    sidecar.restart();
    let (stored, distinct) = rows(&db(&sidecar));
    let lost = acknowledged - stored;
    eprintln!(
        "SIGKILL after {acknowledged} answered requests ({served} at the mock): {stored} rows stored, {lost} lost"
    );
    assert_eq!(stored, distinct, "no row twice");
    assert!(stored <= served, "a row for a request nobody sent");
    assert!(
        stored >= early,
        "{stored} rows, but {early} requests were answered 500 ms before the kill"
    );
    // The restarted sidecar records again.
    chats(&sidecar, 3).await;
    until("the new rows", || rows(&db(&sidecar)).0 == stored + 3).await;
}
