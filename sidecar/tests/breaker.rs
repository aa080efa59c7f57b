//! Circuit breakers through the real binary (the state machine itself is
//! tested with a synthetic clock in afr-core): open after N failures, 503 with
//! Retry-After while every route is open, a single half-open probe, close on
//! success, reopen on failure.

mod common;

use common::*;
use std::time::Duration;

#[tokio::test]
async fn breaker_opens_gives_503_then_half_opens_and_closes() {
    let mock = Mock::start(&["--status", "500"]);
    let body = format!(
        "{}{}",
        openai_provider("p", &mock.base(), ""),
        model("m", &[("p", "x")])
    );
    let sidecar = Sidecar::start_with(&body, 2, "700ms");

    for _ in 0..2 {
        assert_eq!(sidecar.chat(chat_body("m", false)).await.status(), 500);
    }
    // Open: the provider is skipped without a call.
    let r = sidecar.chat(chat_body("m", false)).await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    assert!(r.headers().contains_key("x-request-id"));
    assert_eq!(mock.requests().await.len(), 2);
    assert!(sidecar
        .metrics()
        .await
        .contains("afr_breaker_state{provider=\"p\"} 2"));

    // Half-open probe fails: open again.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(sidecar.chat(chat_body("m", true)).await.status(), 500);
    assert_eq!(mock.requests().await.len(), 3);
    assert_eq!(sidecar.chat(chat_body("m", false)).await.status(), 503);

    // Half-open probe succeeds: closed.
    mock.set(serde_json::json!({})).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(sidecar.chat(chat_body("m", false)).await.status(), 200);
    assert_eq!(sidecar.chat(chat_body("m", true)).await.status(), 200);
    assert_eq!(mock.requests().await.len(), 5);
    assert!(sidecar
        .metrics()
        .await
        .contains("afr_breaker_state{provider=\"p\"} 0"));
}

#[tokio::test]
async fn open_breaker_is_skipped_for_the_next_route() {
    let bad = Mock::start(&["--status", "503"]);
    let good = Mock::start(&[]);
    let body = format!(
        "{}{}{}",
        openai_provider("bad", &bad.base(), ""),
        openai_provider("good", &good.base(), ""),
        model("m", &[("bad", "x"), ("good", "y")]),
    );
    let sidecar = Sidecar::start_with(&body, 3, "30s");
    for _ in 0..6 {
        assert_eq!(sidecar.chat(chat_body("m", false)).await.status(), 200);
    }
    assert_eq!(
        bad.requests().await.len(),
        3,
        "open after 3 failures, then skipped"
    );
    assert_eq!(good.requests().await.len(), 6);
}

#[tokio::test]
async fn client_4xx_does_not_count_against_the_breaker() {
    let mock = Mock::start(&["--status", "400"]);
    let body = format!(
        "{}{}",
        openai_provider("p", &mock.base(), ""),
        model("m", &[("p", "x")])
    );
    let sidecar = Sidecar::start_with(&body, 2, "30s");
    for _ in 0..5 {
        assert_eq!(sidecar.chat(chat_body("m", false)).await.status(), 400);
    }
    assert_eq!(mock.requests().await.len(), 5);
}

#[tokio::test]
async fn half_open_probe_to_a_silent_provider_is_bounded_by_first_byte() {
    // A provider that accepts TCP and never answers must not hold the breaker
    // half-open (every other request refused) for `total`, even when the probe
    // is a non-streaming request, which `total` bounds otherwise.
    let mock = Mock::start(&["--status", "500"]);
    let body = format!(
        "{}[providers.p.timeouts]\nconnect = \"1s\"\nfirst_byte = \"500ms\"\nidle = \"500ms\"\ntotal = \"60s\"\n{}",
        openai_provider("p", &mock.base(), ""),
        model("m", &[("p", "x")])
    );
    let sidecar = Sidecar::start_with(&body, 1, "2s");
    assert_eq!(sidecar.chat(chat_body("m", false)).await.status(), 500);
    mock.set(serde_json::json!({"latency_ms": 600_000})).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;

    let probe = tokio::time::timeout(Duration::from_secs(20), sidecar.chat(chat_body("m", false)))
        .await
        .expect("the probe is bounded by first_byte, not total");
    assert_eq!(probe.status(), 500);
    assert_eq!(mock.requests().await.len(), 2);
    // Reopened by the failed probe, not stuck half-open.
    assert!(sidecar
        .metrics()
        .await
        .contains("afr_breaker_state{provider=\"p\"} 2"));
    assert_eq!(sidecar.chat(chat_body("m", false)).await.status(), 503);
}
