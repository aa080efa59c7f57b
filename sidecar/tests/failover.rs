//! The failover matrix (design §4): each trigger — connect error, first-byte
//! timeout, connection reset, 429, 5xx, upstream credential errors — moves a
//! request to the next route, streaming and not; a 4xx about the request is
//! returned as is and never failed over; when every route fails the client
//! gets 500 naming no secrets.

mod common;

use common::*;
use serde_json::Value;

/// A sidecar whose model `m` routes to `bad` first and a healthy mock second.
fn pair(bad_base: &str) -> (Mock, Sidecar) {
    pair_with(bad_base, &timeouts("bad", "400ms", "400ms"))
}

fn pair_with(bad_base: &str, bad_timeouts: &str) -> (Mock, Sidecar) {
    let good = Mock::start(&[]);
    let body = format!(
        "{}{}{}{}{}",
        openai_provider("bad", bad_base, ""),
        bad_timeouts,
        openai_provider("good", &good.base(), ""),
        model("m", &[("bad", "bad-model"), ("good", "good-model")]),
        "",
    );
    (good, Sidecar::start(&body))
}

async fn assert_served_by_good(sidecar: &Sidecar, good: &Mock, stream: bool, trigger: &str) {
    let r = sidecar.chat(chat_body("m", stream)).await;
    assert_eq!(r.status(), 200, "{trigger} stream={stream}");
    let text = r.text().await.unwrap();
    if stream {
        assert!(text.ends_with("data: [DONE]\n\n"), "{trigger}: {text}");
        assert!(!text.contains("\"error\""), "{trigger}: {text}");
    } else {
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["object"], "chat.completion", "{trigger}");
    }
    let served = good.requests().await;
    assert_eq!(
        served.last().unwrap()["body"]["model"],
        "good-model",
        "{trigger}"
    );
}

#[tokio::test]
async fn fails_over_on_connect_error() {
    let (good, sidecar) = pair(&format!("http://127.0.0.1:{}", closed_port()));
    for stream in [false, true] {
        assert_served_by_good(&sidecar, &good, stream, "connect error").await;
    }
    assert!(sidecar
        .metrics()
        .await
        .contains("afr_failovers_total{model=\"m\",from=\"bad\"} 2"));
}

#[tokio::test]
async fn fails_over_on_status_429_and_5xx() {
    for status in ["429", "500", "502", "503", "529"] {
        let bad = Mock::start(&["--status", status]);
        let (good, sidecar) = pair(&bad.base());
        for stream in [false, true] {
            assert_served_by_good(&sidecar, &good, stream, status).await;
        }
        assert_eq!(bad.requests().await.len(), 2, "{status}");
    }
}

#[tokio::test]
async fn fails_over_on_upstream_credential_errors() {
    // A provider refusing the gateway's own key is not the client's fault.
    for status in ["401", "403"] {
        let bad = Mock::start(&["--status", status]);
        let (good, sidecar) = pair(&bad.base());
        assert_served_by_good(&sidecar, &good, false, status).await;
    }
}

#[tokio::test]
async fn stream_fails_over_on_first_byte_timeout() {
    let bad = Mock::start(&["--latency-ms", "3000"]);
    let (good, sidecar) = pair(&bad.base());
    let start = std::time::Instant::now();
    assert_served_by_good(&sidecar, &good, true, "timeout").await;
    assert!(start.elapsed() < std::time::Duration::from_millis(2500));
}

#[tokio::test]
async fn non_streaming_answer_is_bounded_by_total_not_first_byte() {
    // An OpenAI-style provider sends headers only once the whole completion is
    // generated: a slow answer within `total` is served, not cut off at
    // `first_byte` and paid for twice.
    let slow = Mock::start(&["--latency-ms", "800"]);
    let (good, sidecar) = pair(&slow.base());
    let r = sidecar.chat(chat_body("m", false)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(slow.requests().await.len(), 1);
    assert!(good.requests().await.is_empty(), "not failed over");

    let stuck = Mock::start(&["--latency-ms", "3000"]);
    let total = "[providers.bad.timeouts]\nconnect = \"1s\"\nfirst_byte = \"400ms\"\nidle = \"400ms\"\ntotal = \"500ms\"\n";
    let (good, sidecar) = pair_with(&stuck.base(), total);
    let start = std::time::Instant::now();
    assert_served_by_good(&sidecar, &good, false, "total timeout").await;
    assert!(start.elapsed() < std::time::Duration::from_millis(2500));
}

#[tokio::test]
async fn stream_fails_over_when_it_breaks_before_content() {
    // Headers and the role chunk arrive, then the connection is reset before
    // any content: nothing the client can see has been sent, so fail over.
    // (Late content is not a failure: see tests/thinking.rs.)
    let bad = Mock::start(&["--reset-after-chunks", "0", "--chunks", "3"]);
    let (good, sidecar) = pair(&bad.base());
    let text = sidecar.chat_text(chat_body("m", true)).await;
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert_eq!(
        text.matches("\"role\":\"assistant\"").count(),
        1,
        "one role chunk, from one provider: {text}"
    );
    assert_eq!(good.requests().await.len(), 1);
}

#[tokio::test]
async fn every_route_answering_429_gives_429_with_the_shortest_retry_after() {
    let a = Mock::start(&["--status", "429", "--retry-after", "7"]);
    let b = Mock::start(&["--status", "429", "--retry-after", "3"]);
    let body = format!(
        "{}{}{}",
        openai_provider("a", &a.base(), ""),
        openai_provider("b", &b.base(), ""),
        model("m", &[("a", "x"), ("b", "y")]),
    );
    let sidecar = Sidecar::start_with(&body, 2, "30s");
    for stream in [false, true] {
        let r = sidecar.chat(chat_body("m", stream)).await;
        assert_eq!(r.status(), 429, "stream={stream}");
        assert_eq!(r.headers()["retry-after"], "3");
        assert_eq!(r.headers()["retry-after-ms"], "3000");
        assert!(r.headers().contains_key("x-request-id"));
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["type"], "rate_limit_error", "{v}");
        assert_eq!(v["error"]["code"], "rate_limit_exceeded", "{v}");
    }
    assert_eq!(a.requests().await.len(), 2);
    assert_eq!(b.requests().await.len(), 2);
    // Two failures opened both breakers, each for its provider's Retry-After
    // rather than the 30 s cooldown: the earliest half-opens in 3 s.
    let r = sidecar.chat(chat_body("m", false)).await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "3");
}

#[tokio::test]
async fn a_429_among_other_failures_is_still_a_500() {
    let a = Mock::start(&["--status", "429", "--retry-after", "3"]);
    let b = Mock::start(&["--status", "503"]);
    let body = format!(
        "{}{}{}",
        openai_provider("a", &a.base(), ""),
        openai_provider("b", &b.base(), ""),
        model("m", &[("a", "x"), ("b", "y")]),
    );
    let sidecar = Sidecar::start(&body);
    let r = sidecar.chat(chat_body("m", false)).await;
    assert_eq!(r.status(), 500);
    assert!(r.headers().get("retry-after").is_none());
}

#[tokio::test]
async fn fails_over_on_connection_reset_before_the_answer() {
    let bad = Mock::start(&["--reset-after-chunks", "0"]);
    let (good, sidecar) = pair(&bad.base());
    for stream in [false, true] {
        assert_served_by_good(&sidecar, &good, stream, "reset").await;
    }
}

#[tokio::test]
async fn client_errors_are_returned_not_failed_over() {
    for status in [400u16, 404, 422] {
        let bad = Mock::start(&["--status", &status.to_string()]);
        let (good, sidecar) = pair(&bad.base());
        for stream in [false, true] {
            let r = sidecar.chat(chat_body("m", stream)).await;
            assert_eq!(r.status().as_u16(), status);
            assert!(r.headers().contains_key("x-request-id"));
            let v: Value = r.json().await.unwrap();
            assert!(v["error"]["message"].is_string(), "{v}");
            assert!(v["error"]["type"].is_string(), "{v}");
        }
        assert!(
            good.requests().await.is_empty(),
            "{status} must not fail over"
        );
        assert_eq!(bad.requests().await.len(), 2);
    }
}

#[tokio::test]
async fn all_routes_failing_gives_500_without_secrets() {
    let a = Mock::start(&["--status", "500"]);
    let b = Mock::start(&["--status", "503"]);
    let body = format!(
        "{}{}{}",
        openai_provider("a", &a.base(), "api_key_env = \"AFR_TEST_KEY_A\""),
        openai_provider("b", &b.base(), ""),
        model("m", &[("a", "x"), ("b", "y")]),
    );
    std::env::set_var("AFR_TEST_KEY_A", "sk-very-secret-provider-key");
    let sidecar = Sidecar::start(&body);
    for stream in [false, true] {
        let r = sidecar.chat(chat_body("m", stream)).await;
        assert_eq!(r.status(), 500);
        assert_eq!(r.headers()["content-type"], "application/json");
        let text = r.text().await.unwrap();
        assert!(!text.contains("sk-very-secret"), "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"]["type"], "server_error");
    }
    assert_eq!(a.requests().await.len(), 2);
    assert_eq!(b.requests().await.len(), 2);
    let sent = &a.requests().await[0];
    assert_eq!(
        sent["headers"]["authorization"],
        "Bearer sk-very-secret-provider-key"
    );
    assert!(
        !sidecar.log().contains("sk-very-secret"),
        "provider keys never logged"
    );
    assert!(sidecar.log().contains("every provider failed"));
}

#[tokio::test]
async fn model_without_an_enabled_provider_is_a_500_not_a_retry_forever() {
    // The provider's key variable is unset, so it is disabled at start: that is
    // the operator's configuration, not a breaker that will half-open.
    let mock = Mock::start(&[]);
    let body = format!(
        "{}{}",
        openai_provider(
            "p",
            &mock.base(),
            "api_key_env = \"AFR_TEST_KEY_NEVER_SET\""
        ),
        model("m", &[("p", "x")]),
    );
    let sidecar = Sidecar::start(&body);
    let r = sidecar.chat(chat_body("m", false)).await;
    assert_eq!(r.status(), 500);
    assert!(r.headers().get("retry-after").is_none());
    let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(v["error"]["code"], "no_provider");
    assert!(mock.requests().await.is_empty());
    assert!(sidecar
        .log()
        .contains("no route of this model has an enabled provider"));
}
