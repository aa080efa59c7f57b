//! Reasoning models (design §4): a provider that answered 200 and thinks
//! before its first content is not failed over, not held against its
//! breaker and bounded by its own `first_content` timeout; meanwhile the
//! client has its headers (the stream commits after `server.stream_hold`)
//! and an SSE keep-alive comment through every silence longer than
//! `server.stream_keepalive`, so a load balancer's idle timeout cannot cut it.
//!
//! The scale is shrunk so the tests run in seconds: a 90 s think behind a
//! 60 s first_byte becomes 3 s behind 1 s, with a 300 ms hold and 1 s keep-alives.

mod common;

use common::*;
use futures_util::StreamExt;
use serde_json::Value;

const PACING: &str = "stream_hold = \"300ms\"\nstream_keepalive = \"1s\"";
const KEEP_ALIVE: &str = ": keep-alive\n\n";

/// `thinker` first, a healthy mock second; one failure would open a breaker.
fn pair(thinker: &Mock, first_content: &str, pacing: &str) -> (Mock, Sidecar) {
    let good = Mock::start(&[]);
    let body = format!(
        "{}[providers.think.timeouts]\nconnect = \"1s\"\nfirst_byte = \"1s\"\nfirst_content = \"{first_content}\"\nidle = \"1s\"\ntotal = \"30s\"\n{}{}",
        openai_provider("think", &thinker.base(), ""),
        openai_provider("good", &good.base(), ""),
        model("m", &[("think", "reasoner"), ("good", "good-model")]),
    );
    (good, Sidecar::start_with_server(&body, 1, "30s", pacing))
}

/// Everything a client reads, as received.
async fn read_stream(r: reqwest::Response) -> String {
    let mut body = r.bytes_stream();
    let mut text = Vec::new();
    while let Some(chunk) = body.next().await {
        text.extend_from_slice(&chunk.expect("stream chunk"));
    }
    String::from_utf8(text).expect("utf-8")
}

fn is_content(event: &str) -> bool {
    event.contains("\"content\":\"") && !event.contains("\"content\":\"\"")
}

#[tokio::test]
async fn a_thinking_model_is_not_failed_over_and_the_client_hears_from_the_gateway_meanwhile() {
    let thinker = Mock::start(&["--ttft-ms", "3000", "--chunks", "3"]);
    let (good, sidecar) = pair(&thinker, "10m", PACING);

    let r = sidecar.chat(chat_body("m", true)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-type"],
        "text/event-stream; charset=utf-8"
    );
    // The client has its headers while the provider is still thinking.
    let log = thinker.log().await;
    assert_eq!(
        log["requests"][0]["chunks_sent"], 0,
        "headers came only with content: {log}"
    );
    let text = read_stream(r).await;

    let events = events(&text);
    let first_content = events.iter().position(|e| is_content(e)).expect("content");
    assert!(events[0].contains("\"role\":\"assistant\""), "{text}");
    let keep_alives: Vec<usize> = (0..events.len())
        .filter(|&i| events[i] == KEEP_ALIVE)
        .collect();
    assert!(
        !keep_alives.is_empty(),
        "no keep-alive through a 3 s silence: {text}"
    );
    assert!(
        keep_alives.iter().all(|&i| i < first_content),
        "keep-alives only in the silence: {text}"
    );
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");

    // Without the keep-alives the client got the provider's bytes exactly.
    let relayed = text.replace(KEEP_ALIVE, "");
    let straight = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", thinker.base()))
        .header("X-Mock-Ttft-Ms", "0")
        .json(
            &serde_json::json!({"model": "reasoner", "stream": true, "temperature": 0.7,
            "max_tokens": 4096, "messages": [{"role": "user", "content": "hello there"}]}),
        )
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(normalize(&relayed), normalize(&straight));

    assert_eq!(
        thinker.requests().await.len(),
        2,
        "one upstream call (+ the direct one)"
    );
    assert!(good.requests().await.is_empty(), "not failed over");
    let metrics = sidecar.metrics().await;
    assert!(
        metrics.contains("afr_breaker_state{provider=\"think\"} 0"),
        "{metrics}"
    );
    assert!(!metrics.contains("afr_failovers_total{"), "{metrics}");
    // Time to first token is when the content came, not when the stream committed.
    let ttft: f64 = metrics
        .lines()
        .find(|l| l.starts_with("afr_time_to_first_token_seconds_sum{"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .expect("a ttft sample");
    assert!(ttft >= 3.0, "ttft {ttft} s is before the 3 s think ended");
    let usage = sidecar
        .usage_by_model_until(|row| row["requests"] == 1)
        .await;
    assert_eq!(usage["data"][0]["requests"], 1, "{usage}");
    assert_eq!(usage["data"][0]["truncated"], 0, "{usage}");
    assert_eq!(usage["data"][0]["completion_tokens"], 3, "{usage}");
}

#[tokio::test]
async fn first_content_expiry_after_commit_ends_the_stream_without_failover_or_breaker_verdict() {
    let thinker = Mock::start(&["--ttft-ms", "3000", "--chunks", "3"]);
    let (good, sidecar) = pair(&thinker, "1500ms", PACING);

    for round in 0..2 {
        let r = sidecar.chat(chat_body("m", true)).await;
        assert_eq!(r.status(), 200);
        let text = read_stream(r).await;
        let events = events(&text);
        let last: Value = serde_json::from_str(
            events
                .last()
                .and_then(|e| e.strip_prefix("data: "))
                .expect("a data event"),
        )
        .expect("an error event");
        assert_eq!(last["error"]["code"], "timeout", "{text}");
        assert!(
            last["error"]["message"]
                .as_str()
                .unwrap()
                .contains("1s 500ms"),
            "{text}"
        );
        assert!(!events.iter().any(|e| is_content(e)), "{text}");
        assert!(events.contains(&KEEP_ALIVE.to_owned()), "{text}");
        // With failures = 1, a verdict against the provider would open its
        // breaker and send the second round to `good`.
        assert_eq!(thinker.requests().await.len(), round + 1);
    }
    assert!(good.requests().await.is_empty(), "not failed over");
    assert!(sidecar
        .metrics()
        .await
        .contains("afr_breaker_state{provider=\"think\"} 0"));
    let usage = sidecar
        .usage_by_model_until(|row| row["requests"] == 2)
        .await;
    assert_eq!(usage["data"][0]["requests"], 2, "{usage}");
    assert_eq!(usage["data"][0]["truncated"], 2, "{usage}");
}

#[tokio::test]
async fn first_content_expiry_before_commit_is_a_504_not_a_failover() {
    let thinker = Mock::start(&["--ttft-ms", "3000", "--chunks", "3"]);
    // A hold longer than first_content: nothing was sent when it expires.
    let (good, sidecar) = pair(
        &thinker,
        "1s",
        "stream_hold = \"5s\"\nstream_keepalive = \"1s\"",
    );
    let r = sidecar.chat(chat_body("m", true)).await;
    assert_eq!(r.status(), 504);
    assert_eq!(r.headers()["x-should-retry"], "false");
    assert!(r.headers().contains_key("x-request-id"));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "server_error", "{v}");
    assert_eq!(v["error"]["code"], "timeout", "{v}");
    assert!(good.requests().await.is_empty(), "not failed over");
    assert_eq!(thinker.requests().await.len(), 1);
    assert!(sidecar
        .metrics()
        .await
        .contains("afr_breaker_state{provider=\"think\"} 0"));
    let usage = sidecar
        .usage_by_model_until(|row| row["requests"] == 1)
        .await;
    assert_eq!(usage["data"][0]["requests"], 1, "{usage}");
}

#[tokio::test]
async fn a_stream_committed_by_the_hold_is_no_verdict_on_the_provider() {
    let thinker = Mock::start(&[]);
    let good = Mock::start(&[]);
    let body = format!(
        "{}{}{}",
        openai_provider("think", &thinker.base(), ""),
        openai_provider("good", &good.base(), ""),
        model("m", &[("think", "reasoner"), ("good", "good-model")]),
    );
    // Two consecutive failures open the breaker.
    let sidecar = Sidecar::start_with_server(&body, 2, "30s", PACING);
    let breaker_open = || async {
        sidecar
            .metrics()
            .await
            .contains("afr_breaker_state{provider=\"think\"} 2")
    };

    thinker.set(serde_json::json!({"status": 500})).await;
    assert_eq!(sidecar.chat(chat_body("m", true)).await.status(), 200);
    // Answered, then silent past the hold: committed before any content.
    thinker.set(serde_json::json!({"ttft_ms": 1000})).await;
    let text = read_stream(sidecar.chat(chat_body("m", true)).await).await;
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(!breaker_open().await);
    // Had the hold-commit counted as a success, this failure would be the
    // first in a row again and the breaker would stay closed.
    thinker.set(serde_json::json!({"status": 500})).await;
    assert_eq!(sidecar.chat(chat_body("m", true)).await.status(), 200);
    assert!(breaker_open().await, "{}", sidecar.metrics().await);
}
