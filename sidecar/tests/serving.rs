//! `afr serve` front door: the shared secret, `/v1/models`, validation (each
//! bad input gets its 400 with the right `param`), body limits, the
//! non-streaming passthrough and usage rows.

mod common;

use common::*;
use serde_json::{json, Value};

fn one_model() -> (Mock, Sidecar) {
    let mock = Mock::start(&[]);
    let body = format!(
        "{}{}{}",
        openai_provider("mock", &mock.base(), ""),
        model("gpt-4o-mini", &[("mock", "gpt-4o-mini")]),
        model("gpt-5-mini", &[("mock", "gpt-5-mini")]),
    );
    (mock, Sidecar::start(&body))
}

#[tokio::test]
async fn requests_without_the_shared_secret_get_401_and_are_logged() {
    let (mock, sidecar) = one_model();
    for secret in [None, Some("wrong-secret-0123456789abcdef"), Some("")] {
        let mut req = sidecar
            .client
            .post(sidecar.url("/v1/chat/completions"))
            .json(&chat_body("gpt-4o-mini", false));
        if let Some(s) = secret {
            req = req.header("X-Afr-Secret", s);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 401);
        assert!(r.headers().contains_key("x-request-id"));
        assert_eq!(r.headers()["content-type"], "application/json");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(!v["error"]["message"].as_str().unwrap().contains(SECRET));
    }
    assert!(mock.requests().await.is_empty());
    assert!(sidecar.log().contains("X-Afr-Secret"));
    assert!(!sidecar.log().contains(SECRET));
}

#[tokio::test]
async fn models_lists_the_catalogue_in_openai_shape_filtered_by_the_keys_allow_list() {
    let (_mock, sidecar) = one_model();
    let all: Value = sidecar
        .request(reqwest::Method::GET, "/v1/models")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(all["object"], "list");
    let ids: Vec<&str> = all["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["gpt-4o-mini", "gpt-5-mini"]);
    assert_eq!(all["data"][0]["object"], "model");
    assert_eq!(all["data"][0]["tier"], "Smart");
    assert!(all["data"][0]["description"].is_string());
    assert!(all["data"][0]["owned_by"].is_string());

    let some: Value = sidecar
        .request(reqwest::Method::GET, "/v1/models")
        .header("X-Afr-Models", "gpt-5-mini, other")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(some["data"].as_array().unwrap().len(), 1);
    assert_eq!(some["data"][0]["id"], "gpt-5-mini");
}

#[tokio::test]
async fn bad_input_corpus_gets_400_with_the_right_param() {
    let (mock, sidecar) = one_model();
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let corpus: Vec<(Value, Option<&str>)> = vec![
        (json!({"messages": msgs}), Some("model")),
        (json!({"model": 1, "messages": msgs}), Some("model")),
        (json!({"model": "gpt-4o-mini"}), Some("messages")),
        (
            json!({"model": "gpt-4o-mini", "messages": {}}),
            Some("messages"),
        ),
        (
            json!({"model": "gpt-4o-mini", "messages": [{"role": "user"}]}),
            Some("messages[0].content"),
        ),
        (
            json!({"model": "gpt-4o-mini", "messages": msgs, "temperature": 2.1}),
            Some("temperature"),
        ),
        (
            json!({"model": "gpt-4o-mini", "messages": msgs, "temperature": "x"}),
            Some("temperature"),
        ),
        (
            json!({"model": "gpt-4o-mini", "messages": msgs, "max_tokens": 0}),
            Some("max_tokens"),
        ),
        (
            json!({"model": "gpt-4o-mini", "messages": msgs, "max_tokens": 2.5}),
            Some("max_tokens"),
        ),
        (
            json!({"model": "gpt-4o-mini", "messages": msgs, "stream": 1}),
            Some("stream"),
        ),
        (
            json!({"model": "no-such-model", "messages": msgs}),
            Some("model"),
        ),
    ];
    for (body, param) in corpus {
        let r = sidecar.chat(body.clone()).await;
        assert_eq!(r.status(), 400, "{body}");
        assert!(r.headers().contains_key("x-request-id"));
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["param"].as_str(), param, "{body}");
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }
    for raw in ["{", "[1,2]", "", "\u{0}"] {
        let r = sidecar
            .request(reqwest::Method::POST, "/v1/chat/completions")
            .body(raw)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{raw:?}");
        let v: Value = r.json().await.unwrap();
        assert!(v["error"]["param"].is_null());
    }
    // Allowed by the catalogue, not by this key.
    let r = sidecar
        .request(reqwest::Method::POST, "/v1/chat/completions")
        .header("X-Afr-Models", "gpt-5-mini")
        .json(&chat_body("gpt-4o-mini", false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["param"], "model");
    assert!(
        mock.requests().await.is_empty(),
        "nothing invalid reaches the provider"
    );
}

#[tokio::test]
async fn oversized_bodies_get_413() {
    let (mock, sidecar) = one_model();
    let big = "x".repeat(70_000);
    let r = sidecar
        .chat(json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": big}]}))
        .await;
    assert_eq!(r.status(), 413);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains("65536"));
    assert!(mock.requests().await.is_empty());
    // Refused before the body was read, and still one row and one metric.
    let usage = sidecar
        .usage_by_model_until(|row| row["requests"] == 1)
        .await;
    assert_eq!(usage["data"][0]["requests"], 1, "{usage}");
    let metrics = sidecar.metrics().await;
    assert!(
        metrics.contains("afr_requests_total{model=\"\",provider=\"\",status=\"413\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn unknown_paths_and_methods_get_openai_errors() {
    let (_mock, sidecar) = one_model();
    let r = sidecar
        .request(reqwest::Method::GET, "/v1/nothing")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.json::<Value>().await.unwrap()["error"]["message"].is_string());
    let r = sidecar
        .request(reqwest::Method::GET, "/v1/chat/completions")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
}

#[tokio::test]
async fn non_streaming_answers_pass_through_with_defaults_filled_and_unknown_fields_kept() {
    let (mock, sidecar) = one_model();
    let r = sidecar
        .chat(json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "seed": 7, "user": "u1"}))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    assert!(r.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .starts_with("req_"));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert!(v["usage"]["total_tokens"].as_u64().unwrap() > 0);

    let sent = &mock.requests().await[0];
    assert_eq!(sent["body"]["temperature"], 0.7);
    assert_eq!(sent["body"]["max_tokens"], 4096);
    assert_eq!(sent["body"]["seed"], 7);
    assert_eq!(sent["body"]["user"], "u1");
    assert_eq!(sent["body"]["model"], "gpt-4o-mini");
    let headers = sent["headers"].as_object().unwrap();
    assert!(
        !headers.contains_key("x-afr-secret"),
        "the secret never goes upstream"
    );
    assert!(!headers.contains_key("x-afr-key-id"));
}

/// A structured-output body whose schema lists `zeta` before `alpha`, with
/// number literals and escapes a parse-and-reserialise would change, and
/// fields the gateway has never heard of.
const FAITHFUL: &str = "{\"model\": \"gpt-4o-mini\",\n \"messages\":[{\"role\":\"user\",\"content\":\"caf\\u00e9 \\/ \\\"q\\\"\"}],\n \"response_format\":{\"type\":\"json_schema\",\"json_schema\":{\"name\":\"s\",\"strict\":true,\"schema\":{\"type\":\"object\",\"properties\":{\"zeta\":{\"type\":\"string\"},\"alpha\":{\"type\":\"number\"}},\"required\":[\"zeta\",\"alpha\"]}}},\n \"seed\": 123456789012345678901234567890, \"top_p\":1e-7, \"presence_penalty\":-0, \"x_vendor\":{\"b\":1,\"a\":[2.50]}}";

#[tokio::test]
async fn the_provider_gets_the_clients_bytes_with_only_the_gateways_edits() {
    let (mock, sidecar) = one_model();
    assert_eq!(sidecar.chat_raw(FAITHFUL).await.status(), 200);
    let sent = mock.requests().await[0]["raw_body"]
        .as_str()
        .unwrap()
        .to_owned();
    // Byte for byte, plus the two defaults the gateway owns at the end.
    let expected = format!(
        "{},\"temperature\":0.7,\"max_tokens\":4096}}",
        &FAITHFUL[..FAITHFUL.len() - 1]
    );
    assert_eq!(sent, expected);
    assert!(sent.find("\"zeta\"").unwrap() < sent.find("\"alpha\"").unwrap());
}

#[tokio::test]
async fn a_streamed_body_keeps_its_bytes_beside_the_usage_request() {
    let (mock, sidecar) = one_model();
    let body = FAITHFUL.replacen("{", "{\"stream\":true, ", 1);
    let r = sidecar.chat_raw(&body).await;
    assert_eq!(r.status(), 200);
    let _ = r.text().await.unwrap();
    let sent = mock.requests().await[0]["raw_body"]
        .as_str()
        .unwrap()
        .to_owned();
    let expected = format!(
        "{},\"temperature\":0.7,\"max_tokens\":4096,\"stream_options\":{{\"include_usage\":true}}}}",
        &body[..body.len() - 1]
    );
    assert_eq!(sent, expected);
}

#[tokio::test]
async fn a_duplicate_key_the_gateway_reads_is_a_400_and_never_reaches_a_provider() {
    let (mock, sidecar) = one_model();
    let r = sidecar
        .chat_raw(r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"model":"gpt-5-mini"}"#)
        .await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["param"], "model");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    let r = sidecar
        .chat_raw(r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"max_tokens":1,"max_tokens":100000000}"#)
        .await;
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["param"],
        "max_tokens"
    );
    assert!(mock.requests().await.is_empty());
}

#[tokio::test]
async fn usage_rows_are_recorded_and_readable_by_the_key() {
    let (_mock, sidecar) = one_model();
    assert_eq!(
        sidecar.chat(chat_body("gpt-4o-mini", false)).await.status(),
        200
    );
    let r = sidecar.chat(chat_body("gpt-4o-mini", true)).await;
    assert_eq!(r.status(), 200);
    let _ = r.text().await.unwrap();
    let rows = sidecar
        .usage_by_model_until(|row| row["requests"] == 2)
        .await;
    assert_eq!(rows["data"][0]["requests"], 2, "{rows}");
    assert_eq!(rows["data"][0]["model"], "gpt-4o-mini");
    assert!(rows["data"][0]["total_tokens"].as_u64().unwrap() > 0);
    assert_eq!(
        rows["data"][0]["estimated_requests"], 0,
        "stream usage came from the provider"
    );

    let r = sidecar
        .request(reqwest::Method::GET, "/v1/usage?bogus=1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["param"], "bogus");
}

#[tokio::test]
async fn sigterm_drains_and_flushes_usage() {
    let (_mock, mut sidecar) = one_model();
    for _ in 0..20 {
        assert_eq!(
            sidecar.chat(chat_body("gpt-4o-mini", false)).await.status(),
            200
        );
    }
    let status = sidecar.terminate();
    assert!(status.success(), "{status}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_afr"))
        .args(["usage", "--json", "--db"])
        .arg(sidecar.dir.path().join("usage.db"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("\"requests\":20") || text.contains("\"requests\": 20"),
        "{text}"
    );
}

#[tokio::test]
async fn sigterm_cuts_streams_still_open_after_the_grace_and_records_them() {
    // A 10 s stream is still running when SIGTERM's grace (500 ms) ends: the
    // sidecar cuts it, records it as cut short, flushes and exits promptly.
    let mock = Mock::start(&["--chunks", "100", "--chunk-interval-ms", "100"]);
    let body = format!(
        "{}{}",
        openai_provider("mock", &mock.base(), ""),
        model("m", &[("mock", "up")]),
    );
    let mut sidecar = Sidecar::start_with_server(&body, 5, "30s", "shutdown_grace = \"500ms\"");
    let r = sidecar.chat(chat_body("m", true)).await;
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    use futures_util::StreamExt;
    let first = body.next().await.expect("a first chunk").expect("bytes");
    assert!(!first.is_empty());
    let start = std::time::Instant::now();
    let status = sidecar.terminate();
    assert!(status.success(), "{status}");
    assert!(
        start.elapsed() < std::time::Duration::from_secs(5),
        "exited {:?} after SIGTERM",
        start.elapsed()
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_afr"))
        .args(["usage", "--json", "--by", "model", "--db"])
        .arg(sidecar.dir.path().join("usage.db"))
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert_eq!(v["data"][0]["requests"], 1, "{v}");
    assert_eq!(v["data"][0]["truncated"], 1, "{v}");
    assert!(sidecar.log().contains("closing them"), "{}", sidecar.log());
}

/// `[usage] record = false` (the benchmark's governed-lane diagnostic) serves
/// requests and streams but opens no usage store: no database file appears,
/// and shutdown has nothing to flush.
#[tokio::test]
async fn usage_record_false_serves_without_a_usage_store() {
    let mock = Mock::start(&[]);
    let body = format!(
        "{}{}",
        openai_provider("mock", &mock.base(), ""),
        model("gpt-4o-mini", &[("mock", "gpt-4o-mini")]),
    );
    let mut sidecar = Sidecar::start_with_sections(&body, 5, "30s", "", "record = false");
    for stream in [false, true] {
        let r = sidecar.chat(chat_body("gpt-4o-mini", stream)).await;
        assert_eq!(r.status(), 200);
        r.text().await.unwrap();
    }
    let status = sidecar.terminate();
    assert!(status.success(), "{status}");
    let db = sidecar.dir.path().join("usage.db");
    assert!(!db.exists(), "{} was created", db.display());
    assert!(
        sidecar.log().contains("usage recording is off"),
        "{}",
        sidecar.log()
    );
}
