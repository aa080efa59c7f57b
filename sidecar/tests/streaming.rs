//! Streaming (design §3–§5): events pass through byte for byte; the gateway
//! asks for usage and strips it again unless the client asked; a provider
//! failure after content ends the stream with an OpenAI error event; a
//! client that goes away cancels the upstream request.

mod common;

use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn single(mock: &Mock, idle: &str) -> Sidecar {
    let body = format!(
        "{}{}{}",
        openai_provider("mock", &mock.base(), ""),
        timeouts("mock", "2s", idle),
        model("m", &[("mock", "up-model")]),
    );
    Sidecar::start(&body)
}

async fn direct(mock: &Mock, body: Value) -> String {
    reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", mock.base()))
        .json(&body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn upstream_body(include_usage: Option<bool>) -> Value {
    let mut body = json!({"model": "up-model", "stream": true, "temperature": 0.7, "max_tokens": 4096,
        "messages": [{"role": "user", "content": "hello there"}]});
    if let Some(u) = include_usage {
        body["stream_options"] = json!({"include_usage": u});
    }
    body
}

#[tokio::test]
async fn stream_with_include_usage_is_passed_through_byte_for_byte() {
    let mock = Mock::start(&["--chunks", "6"]);
    let sidecar = single(&mock, "5s");
    let mut client_body = chat_body("m", true);
    client_body["stream_options"] = json!({"include_usage": true});
    let r = sidecar.chat(client_body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-type"],
        "text/event-stream; charset=utf-8"
    );
    assert!(r.headers().contains_key("x-request-id"));
    let via_gateway = r.text().await.unwrap();
    let straight = direct(&mock, upstream_body(Some(true))).await;
    assert!(
        straight.contains("\"usage\":null"),
        "the mock marks chunks as OpenAI does"
    );
    assert_eq!(normalize(&via_gateway), normalize(&straight));
    assert!(events(&via_gateway).iter().all(|e| e.ends_with("\n\n")));
    assert!(!via_gateway.contains("event:"));
}

#[tokio::test]
async fn include_usage_is_injected_and_stripped_when_the_client_did_not_ask() {
    let mock = Mock::start(&["--chunks", "6"]);
    let sidecar = single(&mock, "5s");
    let via_gateway = sidecar.chat_text(chat_body("m", true)).await;
    let sent = &mock.requests().await[0];
    assert_eq!(
        sent["body"]["stream_options"]["include_usage"], true,
        "the gateway asks for usage"
    );
    assert!(!via_gateway.contains("\"usage\""), "{via_gateway}");
    // Exactly what the provider sends a client that did not ask.
    let straight = direct(&mock, upstream_body(None)).await;
    assert_eq!(normalize(&via_gateway), normalize(&straight));

    // The usage was still recorded from the stripped chunk.
    let metrics = sidecar.metrics().await;
    assert!(
        metrics.contains("afr_tokens_total{model=\"m\",provider=\"mock\",kind=\"completion\"} 6"),
        "{metrics}"
    );
}

#[tokio::test]
async fn include_usage_false_from_the_client_is_treated_as_not_asked() {
    let mock = Mock::start(&["--chunks", "2"]);
    let sidecar = single(&mock, "5s");
    let mut body = chat_body("m", true);
    body["stream_options"] = json!({"include_usage": false});
    let text = sidecar.chat(body).await.text().await.unwrap();
    assert!(!text.contains("\"usage\""), "{text}");
    assert_eq!(
        mock.requests().await[0]["body"]["stream_options"]["include_usage"],
        true
    );
}

#[tokio::test]
async fn each_event_is_forwarded_as_it_arrives() {
    let mock = Mock::start(&["--chunks", "4", "--chunk-interval-ms", "200"]);
    let sidecar = single(&mock, "5s");
    let r = sidecar.chat(chat_body("m", true)).await;
    let start = Instant::now();
    let mut stream = r.bytes_stream();
    let mut arrivals = Vec::new();
    let mut seen = String::new();
    while let Some(chunk) = stream.next().await {
        seen.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        arrivals.push(start.elapsed());
    }
    assert!(seen.ends_with("data: [DONE]\n\n"));
    // Not coalesced into one write at the end: deltas arrive ~200 ms apart.
    assert!(arrivals.len() >= 4, "{arrivals:?}");
    assert!(
        arrivals[arrivals.len() - 1] - arrivals[0] >= Duration::from_millis(400),
        "{arrivals:?}"
    );
}

#[tokio::test]
async fn provider_reset_mid_stream_ends_with_an_error_event() {
    let mock = Mock::start(&["--chunks", "6", "--reset-after-chunks", "2"]);
    let spare = Mock::start(&[]);
    let body = format!(
        "{}{}{}",
        openai_provider("mock", &mock.base(), ""),
        openai_provider("spare", &spare.base(), ""),
        model("m", &[("mock", "up-model"), ("spare", "spare-model")]),
    );
    let sidecar = Sidecar::start(&body);
    let r = sidecar.chat(chat_body("m", true)).await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let evs = events(&text);
    let last = evs.last().unwrap();
    assert!(last.starts_with("data: {\"error\":{"), "{text}");
    let v: Value = serde_json::from_str(last.trim_start_matches("data: ").trim()).unwrap();
    assert!(v["error"]["message"].is_string());
    assert!(!text.contains("[DONE]"));
    assert_eq!(
        text.matches("\"content\":\"").count() - 1,
        2,
        "two deltas then the error: {text}"
    );
    assert!(
        spare.requests().await.is_empty(),
        "never splice a second provider in"
    );
}

#[tokio::test]
async fn provider_error_event_mid_stream_is_forwarded_and_ends_the_stream() {
    let mock = Mock::start(&["--chunks", "6", "--error-after-chunks", "3"]);
    let sidecar = single(&mock, "5s");
    let text = sidecar.chat_text(chat_body("m", true)).await;
    let last = events(&text).pop().unwrap();
    assert!(last.starts_with("data: {\"error\""), "{text}");
    assert!(!text.contains("[DONE]"));
    // Usage and metrics say the stream was interrupted, not a plain 200.
    let usage = sidecar
        .usage_by_model_until(|row| row["truncated"] == 1)
        .await;
    assert_eq!(usage["data"][0]["truncated"], 1, "{usage}");
    let metrics = sidecar.metrics().await;
    assert!(
        metrics.contains("afr_requests_total{model=\"m\",provider=\"mock\",status=\"502\"} 1"),
        "{metrics}"
    );
    assert!(!metrics.contains("status=\"200\""), "{metrics}");
}

#[tokio::test]
async fn idle_timeout_mid_stream_ends_with_an_error_event() {
    let mock = Mock::start(&["--chunks", "5", "--chunk-interval-ms", "1500"]);
    let sidecar = single(&mock, "300ms");
    let start = Instant::now();
    let text = sidecar.chat_text(chat_body("m", true)).await;
    assert!(
        start.elapsed() < Duration::from_millis(1400),
        "{:?}",
        start.elapsed()
    );
    assert!(
        events(&text)
            .last()
            .unwrap()
            .starts_with("data: {\"error\""),
        "{text}"
    );
}

#[tokio::test]
async fn client_disconnect_cancels_the_upstream_request() {
    let mock = Mock::start(&["--chunks", "100", "--chunk-interval-ms", "50"]);
    let sidecar = single(&mock, "5s");
    let r = sidecar.chat(chat_body("m", true)).await;
    let mut stream = r.bytes_stream();
    let _ = stream.next().await;
    let _ = stream.next().await;
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = mock.log().await;
        let req = &log["requests"][0];
        if req["client_disconnected"] == true {
            assert!(req["chunks_sent"].as_u64().unwrap() < 100);
            break;
        }
        assert!(Instant::now() < deadline, "upstream not cancelled: {log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The cut stream still gets its usage row, flagged truncated.
    let usage = sidecar
        .usage_by_model_until(|row| row["truncated"] == 1)
        .await;
    assert_eq!(
        usage["data"][0]["truncated"], 1,
        "no truncated usage row: {usage}"
    );
}

#[tokio::test]
async fn client_gone_before_the_answer_cancels_upstream_and_records_499() {
    let mock = Mock::start(&["--latency-ms", "1500"]);
    let sidecar = single(&mock, "5s");
    let r = sidecar
        .request(reqwest::Method::POST, "/v1/chat/completions")
        .json(&chat_body("m", false))
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(r.is_err(), "the client gave up first");
    let usage = sidecar
        .usage_by_model_until(|row| row["truncated"] == 1)
        .await;
    assert_eq!(
        usage["data"][0]["truncated"], 1,
        "no row for the abandoned request: {usage}"
    );
    assert_eq!(usage["data"][0]["requests"], 1);
    let log = mock.log().await;
    assert_ne!(log["requests"][0]["outcome"], "completed", "{log}");
}

#[tokio::test]
async fn route_dropping_stream_options_still_streams_and_estimates_usage() {
    // For upstreams that reject `stream_options` (some vLLM/Ollama builds, old Azure
    // api-versions) a route declares `drop = ["stream_options"]`; the gateway then
    // counts tokens itself and flags them as estimated.
    let mock = Mock::start(&["--chunks", "6"]);
    let body = format!(
        "{}{}[models.m]\ntier = \"Smart\"\ndescription = \"d\"\n[[models.m.routes]]\nprovider = \"mock\"\nmodel = \"up-model\"\ndrop = [\"stream_options\"]\n",
        openai_provider("mock", &mock.base(), ""),
        timeouts("mock", "2s", "5s"),
    );
    let sidecar = Sidecar::start(&body);
    let text = sidecar.chat_text(chat_body("m", true)).await;
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(!text.contains("\"usage\""), "{text}");
    let sent = &mock.requests().await[0];
    assert!(sent["body"].get("stream_options").is_none(), "{sent}");
    let rows = sidecar
        .usage_by_model_until(|row| row["requests"] == 1)
        .await;
    assert_eq!(rows["data"][0]["requests"], 1, "{rows}");
    assert_eq!(rows["data"][0]["estimated_requests"], 1, "{rows}");
    assert!(
        rows["data"][0]["completion_tokens"].as_u64().unwrap() > 0,
        "{rows}"
    );
    // The prompt is estimated from the body the relay kept a copy of when it
    // let go of hyper's buffer (`Accounting::release_body`).
    assert!(
        rows["data"][0]["prompt_tokens"].as_u64().unwrap() > 0,
        "{rows}"
    );
}
