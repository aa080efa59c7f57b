//! Fault knobs (headers, CLI, control API) and the request log.

mod common;

use std::time::{Duration, Instant};

use common::{chat, events, read_all, Mock};
use serde_json::{json, Value};

async fn post(mock: &Mock, headers: &[(&str, &str)], body: &Value) -> reqwest::Response {
    let mut req = reqwest::Client::new()
        .post(mock.url("/v1/chat/completions"))
        .json(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn status_header_gives_real_shaped_errors() {
    let mock = Mock::start(&[]);
    for (status, typ) in [
        (429, "tokens"),
        (500, "server_error"),
        (503, "server_error"),
        (400, "invalid_request_error"),
    ] {
        let s = status.to_string();
        let resp = post(&mock, &[("X-Mock-Status", &s)], &chat(false, false, "x")).await;
        assert_eq!(resp.status(), status);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["type"], typ, "{status}");
    }
}

#[tokio::test]
async fn retry_after_knob_sets_the_header_of_injected_errors() {
    let mock = Mock::start(&["--status", "429", "--retry-after", "7"]);
    let resp = post(&mock, &[], &chat(false, false, "x")).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "7");
    let date = "Wed, 21 Oct 2026 07:28:00 GMT";
    let resp = post(
        &mock,
        &[("X-Mock-Retry-After", date)],
        &chat(false, false, "x"),
    )
    .await;
    assert_eq!(resp.headers()["retry-after"], date);
    let healthy = post(&mock, &[("X-Mock-Status", "200")], &chat(false, false, "x")).await;
    assert!(healthy.headers().get("retry-after").is_none());
}

#[tokio::test]
async fn instance_status_and_runtime_config() {
    let mock = Mock::start(&["--status", "503"]);
    assert_eq!(
        post(&mock, &[], &chat(false, false, "x")).await.status(),
        503
    );
    let healthy = post(&mock, &[("X-Mock-Status", "200")], &chat(false, false, "x")).await;
    assert_eq!(
        healthy.status(),
        200,
        "a status below 400 cancels the instance's"
    );
    let c = reqwest::Client::new();
    let r = c
        .post(mock.url("/_mock/config"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        post(&mock, &[], &chat(false, false, "x")).await.status(),
        200
    );
    let r = c
        .post(mock.url("/_mock/config"))
        .body(r#"{"fail_first":2,"fail_status":429}"#)
        .send()
        .await
        .unwrap();
    let cfg: Value = r.json().await.unwrap();
    assert_eq!(cfg["fail_first"], 2);
    let statuses: Vec<u16> = futures_seq(&mock, 3).await;
    assert_eq!(statuses, [429, 429, 200]);
    let bad = c
        .post(mock.url("/_mock/config"))
        .body(r#"{"nope":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
}

async fn futures_seq(mock: &Mock, n: usize) -> Vec<u16> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(
            post(mock, &[], &chat(false, false, "x"))
                .await
                .status()
                .as_u16(),
        );
    }
    out
}

#[tokio::test]
async fn fail_first_flag_and_fail_percent() {
    let mock = Mock::start(&["--fail-first", "1"]);
    assert_eq!(futures_seq(&mock, 2).await, [500, 200]);
    let mut fails = 0;
    for _ in 0..40 {
        let r = post(
            &mock,
            &[("X-Mock-Fail-Percent", "50"), ("X-Mock-Fail-Status", "502")],
            &chat(false, false, "x"),
        )
        .await;
        if r.status() == 502 {
            fails += 1;
        }
    }
    assert!((5..=35).contains(&fails), "{fails}");
}

#[tokio::test]
async fn latency_and_chunk_interval() {
    let mock = Mock::start(&[]);
    let t = Instant::now();
    let r = post(
        &mock,
        &[("X-Mock-Latency-Ms", "150")],
        &chat(false, false, "x"),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert!(t.elapsed() >= Duration::from_millis(150));
    let t = Instant::now();
    let mut r = post(
        &mock,
        &[
            ("X-Mock-Ttft-Ms", "100"),
            ("X-Mock-Chunk-Interval-Ms", "50"),
            ("X-Mock-Chunks", "3"),
        ],
        &chat(true, false, "x"),
    )
    .await;
    let headers_at = t.elapsed();
    let mut arrivals = Vec::new();
    while let Some(c) = r.chunk().await.unwrap() {
        arrivals.push((t.elapsed(), c));
    }
    assert!(headers_at < Duration::from_millis(100), "{headers_at:?}");
    // Each event is its own HTTP chunk: role, 3 deltas, finish, [DONE].
    assert_eq!(arrivals.len(), 6, "{arrivals:?}");
    assert!(arrivals[1].0 >= Duration::from_millis(100));
    assert!(arrivals[3].0 >= Duration::from_millis(200));
}

#[tokio::test]
async fn reset_mid_stream_aborts_the_connection_after_n_chunks() {
    let mock = Mock::start(&[]);
    let r = post(
        &mock,
        &[("X-Mock-Reset-After-Chunks", "2")],
        &chat(true, true, "a b c d"),
    )
    .await;
    assert_eq!(r.status(), 200);
    let (bytes, failed) = read_all(r).await;
    assert!(failed, "the body must end in an error, not cleanly");
    let ev = events(&bytes);
    assert_eq!(ev.len(), 3, "role + 2 deltas");
    // Non-streaming: reset instead of an answer.
    let err = reqwest::Client::new()
        .post(mock.url("/v1/chat/completions"))
        .header("X-Mock-Reset-After-Chunks", "0")
        .json(&chat(false, false, "x"))
        .send()
        .await;
    assert!(err.is_err());
    let log = mock.requests().await;
    let reqs = log["requests"].as_array().unwrap();
    assert_eq!(reqs[0]["outcome"], "reset");
    assert_eq!(reqs[0]["chunks_sent"], 2);
    assert_eq!(reqs[0]["connection_closed_mid_stream"], true);
    assert_eq!(reqs[1]["outcome"], "reset");
}

#[tokio::test]
async fn error_event_and_malformed_sse() {
    let mock = Mock::start(&[]);
    let r = post(
        &mock,
        &[("X-Mock-Error-After-Chunks", "1")],
        &chat(true, false, "a b"),
    )
    .await;
    let (bytes, failed) = read_all(r).await;
    assert!(!failed);
    let ev = events(&bytes);
    assert_eq!(ev.len(), 3);
    let last: Value = serde_json::from_str(&ev[2].data).unwrap();
    assert_eq!(last["error"]["type"], "server_error");
    let r = post(
        &mock,
        &[("X-Mock-Malformed-Sse", "1")],
        &chat(true, false, "a b"),
    )
    .await;
    let (bytes, _) = read_all(r).await;
    let ev = events(&bytes);
    assert!(serde_json::from_str::<Value>(&ev[2].data).is_err());
    assert_eq!(ev.last().unwrap().data, "[DONE]");
    let bad = post(
        &mock,
        &[("X-Mock-Chunks", "many")],
        &chat(false, false, "x"),
    )
    .await;
    assert_eq!(bad.status(), 400);
}

#[tokio::test]
async fn request_log_records_headers_body_and_client_disconnects() {
    let mock = Mock::start(&[]);
    let body = chat(false, false, "logged");
    let r = post(&mock, &[("X-Afr-Key-Id", "k1")], &body).await;
    assert_eq!(r.status(), 200);
    // A stream the client abandons after the first bytes.
    let mut r = post(
        &mock,
        &[("X-Mock-Chunk-Interval-Ms", "100"), ("X-Mock-Chunks", "20")],
        &chat(true, false, "x"),
    )
    .await;
    let _ = r.chunk().await.unwrap();
    drop(r);
    // A non-streaming request abandoned while the mock waits.
    let slow = tokio::time::timeout(
        Duration::from_millis(100),
        post(
            &mock,
            &[("X-Mock-Latency-Ms", "2000")],
            &chat(false, false, "x"),
        ),
    )
    .await;
    assert!(slow.is_err());
    let deadline = Instant::now() + Duration::from_secs(5);
    let log = loop {
        let log = mock.requests().await;
        if log["client_disconnects"] == 2 || Instant::now() > deadline {
            break log;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(log["total"], 3);
    assert_eq!(log["client_disconnects"], 2);
    assert_eq!(log["in_flight_streams"], 0);
    let reqs = log["requests"].as_array().unwrap();
    assert_eq!(reqs[0]["headers"]["x-afr-key-id"], "k1");
    assert_eq!(reqs[0]["body"], body);
    assert_eq!(reqs[0]["outcome"], "completed");
    assert_eq!(reqs[0]["status"], 200);
    assert_eq!(reqs[1]["outcome"], "client_disconnected");
    assert_eq!(reqs[1]["connection_closed_mid_stream"], true);
    assert!(reqs[1]["chunks_sent"].as_u64().unwrap() < 20);
    assert_eq!(reqs[2]["client_disconnected"], true);
    let c = reqwest::Client::new();
    c.delete(mock.url("/_mock/requests")).send().await.unwrap();
    let log = mock.requests().await;
    assert_eq!(log["total"], 0);
    assert_eq!(log["requests"], json!([]));
}

#[tokio::test]
async fn broken_answers_for_the_gateway_fault_matrix() {
    let mock = Mock::start(&[]);
    // A clean end after 2 deltas: no finish chunk, no [DONE], no RST.
    let r = post(
        &mock,
        &[("X-Mock-End-After-Chunks", "2")],
        &chat(true, false, "a b c d"),
    )
    .await;
    let (bytes, failed) = read_all(r).await;
    assert!(!failed, "a clean end, not a reset");
    let ev = events(&bytes);
    assert_eq!(ev.len(), 3, "role + 2 deltas: {ev:?}");
    assert!(ev.iter().all(|e| e.data != "[DONE]"));
    // Reset before any response byte, streaming too.
    for stream in [true, false] {
        let err = reqwest::Client::new()
            .post(mock.url("/v1/chat/completions"))
            .header("X-Mock-Reset-Before-Response", "1")
            .json(&chat(stream, false, "x"))
            .send()
            .await;
        assert!(err.is_err(), "stream={stream}");
    }
    // A non-JSON 200.
    let r = post(
        &mock,
        &[("X-Mock-Non-Json", "true")],
        &chat(false, false, "x"),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/html");
    assert!(serde_json::from_slice::<Value>(&r.bytes().await.unwrap()).is_err());
    // A body of a chosen size, still valid JSON.
    let r = post(
        &mock,
        &[("X-Mock-Body-Bytes", "300000")],
        &chat(false, false, "x"),
    )
    .await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .len(),
        300_000
    );
    let r = post(
        &mock,
        &[("X-Mock-Body-Bytes", "1000")],
        &chat(true, false, "x"),
    )
    .await;
    let (bytes, _) = read_all(r).await;
    let ev = events(&bytes);
    let first: Value = serde_json::from_str(&ev[0].data).unwrap();
    assert_eq!(
        first["choices"][0]["delta"]["content"]
            .as_str()
            .unwrap()
            .len(),
        1000
    );
    assert_eq!(ev.last().unwrap().data, "[DONE]");
}

#[tokio::test]
async fn headers_then_silence_and_drip() {
    let mock = Mock::start(&[]);
    let r = post(
        &mock,
        &[("X-Mock-Stall-After-Headers", "1")],
        &chat(false, false, "x"),
    )
    .await;
    assert_eq!(r.status(), 200);
    let mut r = r;
    let silent = tokio::time::timeout(Duration::from_millis(200), r.chunk()).await;
    assert!(silent.is_err(), "no body byte may come");
    drop(r);
    // Drip: every body byte is its own write.
    let mut r = post(&mock, &[("X-Mock-Drip-Ms", "1")], &chat(false, false, "a")).await;
    let mut pieces = 0;
    let mut body = Vec::new();
    while let Some(c) = r.chunk().await.unwrap() {
        pieces += 1;
        body.extend_from_slice(&c);
    }
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "Mock reply to: a");
    assert!(
        pieces > body.len() / 2,
        "{pieces} pieces for {} bytes",
        body.len()
    );
}

#[tokio::test]
async fn fail_every_makes_a_flapping_provider() {
    let mock = Mock::start(&["--fail-every", "2", "--fail-status", "502"]);
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(
            post(&mock, &[], &chat(false, false, "x"))
                .await
                .status()
                .as_u16(),
        );
    }
    assert_eq!(seen, [502, 200, 502, 200]);
}
