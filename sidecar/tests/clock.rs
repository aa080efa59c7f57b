//! The ledger's clocks under a real wall-clock step (design §3, issue 21
//! item 7): `afr serve` runs under libfaketime (Debian's `faketime`,
//! installed by scripts/setup) with only the wall clock faked, read from a
//! file on every call, so the test moves it while the sidecar runs and
//! CLOCK_MONOTONIC keeps running.
//!
//! - A `tpm` window runs on the monotonic clock: a wall clock stepped five
//!   minutes ahead does not hand a full key a fresh window.
//! - A request is charged to the budget period it started in, in the ledger
//!   and in its usage row alike, so a restart (which reseeds the ledger from
//!   the rows) finds the same spend — even for a request whose body arrived
//!   after midnight.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// A sidecar whose wall clock is offset by what `offset` (a file) says, with
/// one model priced at $1000 per million tokens in and out.
fn stepped_sidecar(offset: &Path) -> (Mock, Sidecar) {
    assert!(
        Path::new(LIBFAKETIME).exists(),
        "libfaketime is missing: run scripts/setup (apt install faketime)"
    );
    let mock = Mock::start(&[]);
    let body = format!(
        "{}{}price = {{ input = 1000.0, output = 1000.0 }}\n",
        openai_provider("mock", &mock.base(), ""),
        model("m", &[("mock", "up")]),
    );
    let offset = offset.display().to_string();
    let sidecar = Sidecar::start_with_usage_env(
        &body,
        5,
        "path = \"{dir}/usage.db\"",
        &[
            ("LD_PRELOAD", LIBFAKETIME),
            ("FAKETIME_TIMESTAMP_FILE", &offset),
            ("FAKETIME_NO_CACHE", "1"),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ],
    );
    (mock, sidecar)
}

fn offset_file() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("faketime");
    step(&file, 0);
    (dir, file)
}

/// Moves the sidecar's wall clock to `seconds` from the real one.
fn step(file: &Path, seconds: i64) {
    std::fs::write(file, format!("{seconds:+}\n")).expect("writing the offset");
}

const BODY: &str =
    r#"{"model":"m","max_tokens":20,"messages":[{"role":"user","content":"hello there"}]}"#;

/// One chat request for `key` under `limits`: its status and headers.
async fn chat(sidecar: &Sidecar, key: &str, limits: &str) -> (u16, reqwest::header::HeaderMap) {
    let resp = sidecar
        .client
        .post(sidecar.url("/v1/chat/completions"))
        .header("X-Afr-Secret", SECRET)
        .header("X-Afr-Key-Id", key)
        .header("X-Afr-Limits", limits)
        .header("Content-Type", "application/json")
        .body(BODY)
        .send()
        .await
        .expect("sidecar answered");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let _ = resp.bytes().await;
    (status, headers)
}

fn budget_left(headers: &reqwest::header::HeaderMap) -> f64 {
    headers
        .get("x-afr-budget-remaining-usd")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .expect("x-afr-budget-remaining-usd")
}

#[tokio::test]
async fn a_wall_clock_step_does_not_renew_a_token_window() {
    let (_dir, offset) = offset_file();
    let (_mock, sidecar) = stepped_sidecar(&offset);
    let tpm = "tpm=120";
    let mut admitted = 0;
    while chat(&sidecar, "k", tpm).await.0 == 200 {
        admitted += 1;
        assert!(admitted < 50, "never refused");
    }
    assert!(admitted >= 2, "{admitted}");
    // Five minutes ahead on the wall clock, a moment later in fact.
    step(&offset, 300);
    let (status, headers) = chat(&sidecar, "k", tpm).await;
    assert_eq!(
        status, 429,
        "a wall-clock step renewed the token window: {headers:?}"
    );
    // And it was the token window that refused.
    let remaining: u64 = headers["x-ratelimit-remaining-tokens"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(remaining < 60, "{remaining}");
}

/// Sends the request's head now and its body `delay` later, as a slow
/// client does; returns the status.
async fn slow_chat(sidecar: &Sidecar, key: &str, limits: &str, delay: Duration) -> u16 {
    let mut sock = tokio::net::TcpStream::connect(("127.0.0.1", sidecar.port))
        .await
        .expect("connect");
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Afr-Secret: {SECRET}\r\nX-Afr-Key-Id: {key}\r\nX-Afr-Limits: {limits}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        BODY.len()
    );
    sock.write_all(head.as_bytes()).await.expect("head");
    tokio::time::sleep(delay).await;
    sock.write_all(BODY.as_bytes()).await.expect("body");
    let mut answer = Vec::new();
    sock.read_to_end(&mut answer).await.expect("answer");
    let text = String::from_utf8_lossy(&answer);
    text.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"))
}

#[tokio::test]
async fn a_request_is_charged_to_the_day_it_started_in_by_ledger_and_row_alike() {
    let (_dir, offset) = offset_file();
    let (_mock, mut sidecar) = stepped_sidecar(&offset);
    let budget = "budget=100000000/day";
    // Put the sidecar's wall clock at 23:59:59.0x UTC: wait for the start
    // of a real second, then step to one second before the next midnight.
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    tokio::time::sleep(Duration::from_nanos(u64::from(
        1_000_000_000 - now.subsec_nanos(),
    )))
    .await;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let midnight = (now / 86_400 + 1) * 86_400;
    step(&offset, midnight - now - 1);
    // Its head before midnight, its body after: it started yesterday.
    assert_eq!(
        slow_chat(&sidecar, "k", budget, Duration::from_millis(1_500)).await,
        200
    );
    let (status, first) = chat(&sidecar, "k", budget).await;
    assert_eq!(status, 200);
    let (status, second) = chat(&sidecar, "k", budget).await;
    assert_eq!(status, 200);
    let one = budget_left(&first) - budget_left(&second);
    assert!(one > 0.0, "{one}");

    // A restart reseeds today's spend from the rows: the same as before.
    assert!(sidecar.terminate().success());
    sidecar.restart();
    let (status, third) = chat(&sidecar, "k", budget).await;
    assert_eq!(status, 200, "{}", sidecar.log());
    let after = budget_left(&second) - budget_left(&third);
    assert!(
        (after - one).abs() < 1e-6,
        "today's spend differs across a restart by {:.6} USD: the ledger and the rows disagree on the day of the request that started before midnight",
        after - one
    );
}
