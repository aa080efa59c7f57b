//! Token-class knobs on every wire (cache reads and writes, reasoning, `n`
//! and `best_of`, no usage, a stream cut after K events) and what the mock
//! says it billed (`billed` in the request log, `GET /_mock/billing`).

mod common;

use std::time::{Duration, Instant};

use common::{chat, events, read_all, Mock};
use serde_json::{json, Value};

async fn post(
    mock: &Mock,
    path: &str,
    headers: &[(&str, &str)],
    body: &Value,
) -> reqwest::Response {
    let mut req = reqwest::Client::new().post(mock.url(path)).json(body);
    if path.starts_with("/v1/messages") {
        req = req.header("anthropic-version", "2023-06-01");
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

/// Prompt 1 + 3 = 4 tokens everywhere below; the reply "Mock reply to: a b c"
/// is 6 deltas.
const TEXT: &str = "a b c";

fn completions(stream: bool) -> Value {
    json!({"model": "gpt-3.5-turbo-instruct", "prompt": TEXT, "stream": stream,
        "stream_options": if stream { json!({"include_usage": true}) } else { Value::Null }})
}

fn responses(stream: bool) -> Value {
    json!({"model": "gpt-4o-mini", "input": TEXT, "stream": stream})
}

fn messages(stream: bool) -> Value {
    json!({"model": "claude-haiku-4-5", "max_tokens": 100, "stream": stream,
        "messages": [{"role": "user", "content": TEXT}]})
}

/// The chat request with the prompt of the other wires (no system message).
fn chat4(stream: bool) -> Value {
    let mut v = chat(stream, stream, TEXT);
    v["messages"] = json!([{"role": "user", "content": TEXT}]);
    v
}

/// The JSON data of a stream's events (`[DONE]` left out).
async fn stream_json(resp: reqwest::Response) -> Vec<(Option<String>, Value)> {
    assert_eq!(resp.status(), 200);
    let (bytes, failed) = read_all(resp).await;
    assert!(!failed);
    events(&bytes)
        .into_iter()
        .filter(|e| e.data != "[DONE]")
        .map(|e| (e.name, serde_json::from_str(&e.data).unwrap()))
        .collect()
}

/// The `usage` of the stream event named `name` (OpenAI: the `"choices":[]` chunk).
fn usage_of<'a>(ev: &'a [(Option<String>, Value)], name: &str) -> &'a Value {
    let (_, v) = ev
        .iter()
        .find(|(n, v)| match n {
            Some(n) => n == name,
            None => v["choices"] == json!([]),
        })
        .unwrap_or_else(|| panic!("no {name} event in {ev:?}"));
    match name {
        "message_start" => &v["message"]["usage"],
        "response.completed" => &v["response"]["usage"],
        _ => &v["usage"],
    }
}

/// The log's entries, once no stream is in flight.
async fn settled_log(mock: &Mock) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = mock.requests().await;
        let busy = log["requests"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["outcome"] == "in_flight");
        if !busy || Instant::now() > deadline {
            return log["requests"].as_array().unwrap().clone();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn cache_read_is_reported_on_every_wire() {
    let mock = Mock::start(&[]);
    let h = [("X-Mock-Cache-Read", "3")];
    // Chat: prompt_tokens includes the reads.
    let r = post(&mock, "/v1/chat/completions", &h, &chat4(false)).await;
    assert_eq!(r.headers()["x-mock-prompt-tokens"], "4");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["usage"]["prompt_tokens"], 4);
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 3);
    let ev = stream_json(post(&mock, "/v1/chat/completions", &h, &chat4(true)).await).await;
    assert_eq!(
        usage_of(&ev, "")["prompt_tokens_details"]["cached_tokens"],
        3
    );
    assert_eq!(usage_of(&ev, "")["prompt_tokens"], 4);
    // Clamped to the prompt.
    let v: Value = post(
        &mock,
        "/v1/chat/completions",
        &[("X-Mock-Cache-Read", "99")],
        &chat4(false),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 4);
    // Text completions.
    let v: Value = post(&mock, "/v1/completions", &h, &completions(false))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["usage"]["prompt_tokens"], 4);
    assert_eq!(
        v["usage"]["prompt_tokens_details"],
        json!({"cached_tokens": 3})
    );
    let ev = stream_json(post(&mock, "/v1/completions", &h, &completions(true)).await).await;
    assert_eq!(
        usage_of(&ev, "")["prompt_tokens_details"]["cached_tokens"],
        3
    );
    // Responses: input_tokens includes them.
    let v: Value = post(&mock, "/v1/responses", &h, &responses(false))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["usage"]["input_tokens"], 4);
    assert_eq!(v["usage"]["input_tokens_details"]["cached_tokens"], 3);
    let ev = stream_json(post(&mock, "/v1/responses", &h, &responses(true)).await).await;
    let u = usage_of(&ev, "response.completed");
    assert_eq!(
        (
            u["input_tokens"].as_u64(),
            u["input_tokens_details"]["cached_tokens"].as_u64()
        ),
        (Some(4), Some(3))
    );
    // Anthropic: input_tokens excludes them.
    let r = post(&mock, "/v1/messages", &h, &messages(false)).await;
    assert_eq!(r.headers()["x-mock-prompt-tokens"], "4");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["usage"]["input_tokens"], 1);
    assert_eq!(v["usage"]["cache_read_input_tokens"], 3);
    assert_eq!(v["usage"]["cache_creation_input_tokens"], 0);
    let ev = stream_json(post(&mock, "/v1/messages", &h, &messages(true)).await).await;
    for name in ["message_start", "message_delta"] {
        let u = usage_of(&ev, name);
        assert_eq!(u["input_tokens"], 1, "{name}");
        assert_eq!(u["cache_read_input_tokens"], 3, "{name}");
    }
}

#[tokio::test]
async fn cache_writes_are_anthropic_only() {
    let mock = Mock::start(&[]);
    let v: Value = post(
        &mock,
        "/v1/messages",
        &[
            ("X-Mock-Cache-Read", "1"),
            ("X-Mock-Cache-Write-5m", "2"),
            ("X-Mock-Cache-Write-1h", "5"),
        ],
        &messages(false),
    )
    .await
    .json()
    .await
    .unwrap();
    // Reads first, then 5m, then 1h, all within the 4 prompt tokens.
    assert_eq!(v["usage"]["input_tokens"], 0);
    assert_eq!(v["usage"]["cache_read_input_tokens"], 1);
    assert_eq!(v["usage"]["cache_creation_input_tokens"], 3);
    assert_eq!(
        v["usage"]["cache_creation"],
        json!({"ephemeral_5m_input_tokens": 2, "ephemeral_1h_input_tokens": 1})
    );
    let h = [
        ("X-Mock-Cache-Write-5m", "1"),
        ("X-Mock-Cache-Write-1h", "2"),
    ];
    let ev = stream_json(post(&mock, "/v1/messages", &h, &messages(true)).await).await;
    let start = usage_of(&ev, "message_start");
    assert_eq!(start["input_tokens"], 1);
    assert_eq!(start["cache_creation_input_tokens"], 3);
    assert_eq!(
        start["cache_creation"],
        json!({"ephemeral_5m_input_tokens": 1, "ephemeral_1h_input_tokens": 2})
    );
    let delta = usage_of(&ev, "message_delta");
    assert_eq!(delta["input_tokens"], 1);
    assert_eq!(delta["cache_creation_input_tokens"], 3);
    // OpenAI wires ignore them.
    let v: Value = post(&mock, "/v1/chat/completions", &h, &chat4(false))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["usage"]["prompt_tokens"], 4);
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let log = settled_log(&mock).await;
    assert_eq!(log[1]["billed"]["cache_write_5m"], 1);
    assert_eq!(log[1]["billed"]["cache_write_1h"], 2);
    assert_eq!(log[1]["billed"]["input"], 4);
    assert_eq!(log[2]["billed"]["cache_write_5m"], 0);
}

#[tokio::test]
async fn reasoning_tokens_are_billed_as_output_on_every_wire() {
    let mock = Mock::start(&["--reasoning-tokens", "10"]);
    let r = post(&mock, "/v1/chat/completions", &[], &chat4(false)).await;
    assert_eq!(r.headers()["x-mock-completion-tokens"], "16");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 16);
    assert_eq!(v["usage"]["total_tokens"], 20);
    assert_eq!(
        v["usage"]["completion_tokens_details"]["reasoning_tokens"],
        10
    );
    let ev = stream_json(post(&mock, "/v1/chat/completions", &[], &chat4(true)).await).await;
    assert_eq!(
        usage_of(&ev, "")["completion_tokens_details"]["reasoning_tokens"],
        10
    );
    let v: Value = post(&mock, "/v1/completions", &[], &completions(false))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 16);
    assert_eq!(
        v["usage"]["completion_tokens_details"],
        json!({"reasoning_tokens": 10})
    );
    let v: Value = post(&mock, "/v1/responses", &[], &responses(false))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["usage"]["output_tokens"], 16);
    assert_eq!(v["usage"]["output_tokens_details"]["reasoning_tokens"], 10);
    assert_eq!(v["usage"]["total_tokens"], 20);
    let ev = stream_json(post(&mock, "/v1/responses", &[], &responses(true)).await).await;
    assert_eq!(usage_of(&ev, "response.completed")["output_tokens"], 16);
    let r = post(
        &mock,
        "/v1/messages",
        &[("X-Mock-Reasoning-Tokens", "3")],
        &messages(false),
    )
    .await;
    assert_eq!(r.headers()["x-mock-completion-tokens"], "9");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["usage"]["output_tokens"], 9);
    let ev = stream_json(post(&mock, "/v1/messages", &[], &messages(true)).await).await;
    assert_eq!(usage_of(&ev, "message_delta")["output_tokens"], 16);
    let log = settled_log(&mock).await;
    assert_eq!(log[0]["billed"]["output"], 16);
    assert_eq!(log[0]["billed"]["reasoning"], 10);
    assert_eq!(log[5]["billed"]["output"], 9);
    assert_eq!(log[5]["billed"]["reasoning"], 3);
    assert_eq!(log[6]["billed"]["output"], 16);
}

#[tokio::test]
async fn n_choices_and_best_of_multiply_the_completion() {
    let mock = Mock::start(&[]);
    let mut body = chat4(false);
    body["n"] = 3.into();
    let r = post(&mock, "/v1/chat/completions", &[], &body).await;
    assert_eq!(r.headers()["x-mock-completion-tokens"], "18");
    let v: Value = r.json().await.unwrap();
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(c["message"]["content"], "Mock reply to: a b c");
    }
    assert_eq!(v["usage"]["completion_tokens"], 18);
    // Streams: every step once per choice index, the usage chunk last.
    body["stream"] = true.into();
    body["stream_options"] = json!({"include_usage": true});
    let ev = stream_json(post(&mock, "/v1/chat/completions", &[], &body).await).await;
    assert_eq!(ev.len(), 3 + 6 * 3 + 3 + 1);
    let idx: Vec<u64> = ev[..ev.len() - 1]
        .iter()
        .map(|(_, v)| v["choices"][0]["index"].as_u64().unwrap())
        .collect();
    assert!(idx.chunks(3).all(|c| c == [0, 1, 2]), "{idx:?}");
    for i in 0..3 {
        let text: String = ev
            .iter()
            .filter(|(_, v)| v["choices"][0]["index"] == i)
            .filter_map(|(_, v)| v["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, "Mock reply to: a b c");
    }
    assert_eq!(ev.last().unwrap().1["usage"]["completion_tokens"], 18);
    // Text completions bill max(n, best_of) candidates.
    let mut body = completions(false);
    body["n"] = 2.into();
    body["best_of"] = 4.into();
    let r = post(&mock, "/v1/completions", &[], &body).await;
    assert_eq!(r.headers()["x-mock-completion-tokens"], "24");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
    assert_eq!(v["choices"][1]["index"], 1);
    assert_eq!(v["usage"]["completion_tokens"], 24);
    let mut body = completions(true);
    body["n"] = 2.into();
    let ev = stream_json(post(&mock, "/v1/completions", &[], &body).await).await;
    assert_eq!(ev.len(), 6 * 2 + 2 + 1);
    assert_eq!(ev.last().unwrap().1["usage"]["completion_tokens"], 12);
    // Invalid values are OpenAI's 400s naming the parameter.
    let mut bad = completions(false);
    bad["n"] = 3.into();
    bad["best_of"] = 2.into();
    let r = post(&mock, "/v1/completions", &[], &bad).await;
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["param"],
        "best_of"
    );
    let mut bad = chat4(false);
    bad["n"] = 0.into();
    let r = post(&mock, "/v1/chat/completions", &[], &bad).await;
    assert_eq!(r.status(), 400);
    let log = settled_log(&mock).await;
    let outputs: Vec<&Value> = log.iter().map(|r| &r["billed"]["output"]).collect();
    assert_eq!(
        outputs,
        [
            &json!(18),
            &json!(18),
            &json!(24),
            &json!(12),
            &Value::Null,
            &Value::Null
        ]
    );
}

#[tokio::test]
async fn omit_usage_answers_200_without_usage_on_every_wire() {
    let mock = Mock::start(&[]);
    let h = [("X-Mock-Omit-Usage", "1")];
    for (path, body) in [
        ("/v1/chat/completions", chat4(false)),
        ("/v1/completions", completions(false)),
        ("/v1/responses", responses(false)),
        ("/v1/messages", messages(false)),
    ] {
        let r = post(&mock, path, &h, &body).await;
        assert_eq!(r.status(), 200, "{path}");
        let v: Value = r.json().await.unwrap();
        assert!(v.get("usage").is_none(), "{path}: {v}");
        assert!(v.get("id").is_some(), "{path}");
    }
    // OpenAI streams: no usage chunk though include_usage asks for one.
    for (path, body) in [
        ("/v1/chat/completions", chat4(true)),
        ("/v1/completions", completions(true)),
    ] {
        let ev = stream_json(post(&mock, path, &h, &body).await).await;
        assert!(ev.iter().all(|(_, v)| v["choices"] != json!([])), "{path}");
        assert!(ev.iter().all(|(_, v)| v["usage"].is_null()), "{path}");
    }
    let ev = stream_json(post(&mock, "/v1/responses", &h, &responses(true)).await).await;
    let (_, done) = ev.last().unwrap();
    assert_eq!(done["type"], "response.completed");
    assert_eq!(done["response"]["status"], "completed");
    assert!(done["response"].get("usage").is_none());
    let ev = stream_json(post(&mock, "/v1/messages", &h, &messages(true)).await).await;
    assert_eq!(
        usage_of(&ev, "message_start")["input_tokens"],
        4,
        "message_start keeps it"
    );
    let (_, md) = ev
        .iter()
        .find(|(n, _)| n.as_deref() == Some("message_delta"))
        .unwrap();
    assert!(md.get("usage").is_none(), "{md}");
    assert_eq!(md["delta"]["stop_reason"], "end_turn");
    // The mock still billed what it generated.
    let log = settled_log(&mock).await;
    assert!(log.iter().all(|r| r["billed"]["output"] == 6), "{log:?}");
}

#[tokio::test]
async fn cut_after_events_ends_every_wire_cleanly() {
    let mock = Mock::start(&[]);
    let azure = "/openai/deployments/gpt4/chat/completions?api-version=2024-10-21";
    for (path, body, k) in [
        ("/v1/chat/completions", chat4(true), 3),
        (azure, chat4(true), 1),
        ("/v1/completions", completions(true), 2),
        ("/v1/responses", responses(true), 5),
        ("/v1/messages", messages(true), 4),
        ("/v1/messages", messages(true), 0),
    ] {
        let k_s = k.to_string();
        let r = post(&mock, path, &[("X-Mock-Cut-After-Events", &k_s)], &body).await;
        assert_eq!(r.status(), 200);
        let (bytes, failed) = read_all(r).await;
        assert!(!failed, "{path}: a clean end of the chunked body, no RST");
        let ev = events(&bytes);
        assert_eq!(ev.len(), k, "{path}: {ev:?}");
        for e in &ev {
            assert_ne!(e.data, "[DONE]");
            assert_ne!(e.name.as_deref(), Some("message_stop"));
            assert_ne!(e.name.as_deref(), Some("error"));
            assert!(
                serde_json::from_str::<Value>(&e.data).is_ok(),
                "whole events only"
            );
        }
    }
    // A K past the end changes nothing.
    let r = post(
        &mock,
        "/v1/chat/completions",
        &[("X-Mock-Cut-After-Events", "100")],
        &chat4(true),
    )
    .await;
    let (bytes, _) = read_all(r).await;
    assert_eq!(events(&bytes).last().unwrap().data, "[DONE]");
    // Cut after the role chunk and 2 deltas: billed for the 2 deltas sent.
    let log = settled_log(&mock).await;
    assert_eq!(log[0]["billed"]["output"], 2);
    assert_eq!(log[0]["chunks_sent"], 2);
    assert_eq!(log[0]["outcome"], "completed");
    // Responses: created, in_progress, item added, part added, 1 delta.
    assert_eq!(log[3]["billed"]["output"], 1);
    assert_eq!(log[5]["billed"]["output"], 0);
    assert_eq!(log[6]["billed"]["output"], 6);
}

#[tokio::test]
async fn billed_in_the_log_and_the_billing_totals() {
    let mock = Mock::start(&["--cache-read", "2"]);
    post(
        &mock,
        "/v1/chat/completions",
        &[("X-Mock-Reasoning-Tokens", "5")],
        &chat4(false),
    )
    .await;
    post(
        &mock,
        "/v1/messages",
        &[("X-Mock-Cache-Write-1h", "1")],
        &messages(false),
    )
    .await;
    let ev = stream_json(post(&mock, "/v1/responses", &[], &responses(true)).await).await;
    assert!(!ev.is_empty());
    post(
        &mock,
        "/v1/embeddings",
        &[],
        &json!({"model": "text-embedding-3-small", "input": "x y"}),
    )
    .await;
    post(
        &mock,
        "/v1/chat/completions",
        &[("X-Mock-Status", "429")],
        &chat4(false),
    )
    .await;
    let log = settled_log(&mock).await;
    assert_eq!(
        log[0]["billed"],
        json!({"input": 4, "cached_input": 2, "cache_write_5m": 0, "cache_write_1h": 0, "output": 11, "reasoning": 5})
    );
    assert_eq!(
        log[1]["billed"],
        json!({"input": 4, "cached_input": 2, "cache_write_5m": 0, "cache_write_1h": 1, "output": 6, "reasoning": 0})
    );
    assert_eq!(log[2]["billed"]["output"], 6);
    assert_eq!(
        log[3]["billed"],
        json!({"input": 2, "cached_input": 0, "cache_write_5m": 0, "cache_write_1h": 0, "output": 0, "reasoning": 0})
    );
    assert_eq!(log[4]["status"], 429);
    assert_eq!(log[4]["billed"], Value::Null);
    let billing: Value = reqwest::get(mock.url("/_mock/billing"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        billing,
        json!({"input": 14, "cached_input": 6, "cache_write_5m": 0, "cache_write_1h": 1, "output": 23, "reasoning": 5, "requests": 4})
    );
    reqwest::Client::new()
        .delete(mock.url("/_mock/requests"))
        .send()
        .await
        .unwrap();
    let billing: Value = reqwest::get(mock.url("/_mock/billing"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        billing,
        json!({"input": 0, "cached_input": 0, "cache_write_5m": 0, "cache_write_1h": 0, "output": 0, "reasoning": 0, "requests": 0})
    );
}

#[tokio::test]
async fn early_ended_streams_bill_the_deltas_sent_plus_reasoning() {
    let mock = Mock::start(&[]);
    let mut two = chat4(true);
    two["n"] = 2.into();
    let h = |k: &'static str, v: &'static str| [(k, v), ("X-Mock-Reasoning-Tokens", "7")];
    // Reset after 3 delta events (two choices: 1.5 steps).
    let r = post(
        &mock,
        "/v1/chat/completions",
        &h("X-Mock-Reset-After-Chunks", "3"),
        &two,
    )
    .await;
    assert!(read_all(r).await.1);
    // The error event after 4.
    let r = post(
        &mock,
        "/v1/messages",
        &h("X-Mock-Error-After-Chunks", "4"),
        &messages(true),
    )
    .await;
    read_all(r).await;
    // A clean end after 1.
    let r = post(
        &mock,
        "/v1/completions",
        &h("X-Mock-End-After-Chunks", "1"),
        &completions(true),
    )
    .await;
    read_all(r).await;
    // A client that leaves after the first bytes of a slow stream.
    let mut r = post(
        &mock,
        "/v1/chat/completions",
        &[
            ("X-Mock-Chunk-Interval-Ms", "200"),
            ("X-Mock-Reasoning-Tokens", "7"),
        ],
        &chat4(true),
    )
    .await;
    r.chunk().await.unwrap();
    drop(r);
    // A stream sent whole bills it all.
    let r = post(
        &mock,
        "/v1/chat/completions",
        &h("X-Mock-Chunks", "4"),
        &two,
    )
    .await;
    read_all(r).await;
    let log = settled_log(&mock).await;
    let outcomes: Vec<&str> = log.iter().map(|r| r["outcome"].as_str().unwrap()).collect();
    assert_eq!(
        outcomes,
        [
            "reset",
            "completed",
            "completed",
            "client_disconnected",
            "completed"
        ]
    );
    let outputs: Vec<u64> = log
        .iter()
        .map(|r| r["billed"]["output"].as_u64().unwrap())
        .collect();
    let sent = log[3]["chunks_sent"].as_u64().unwrap();
    assert!(sent < 6);
    assert_eq!(outputs, [3 + 7, 4 + 7, 1 + 7, sent + 7, 4 * 2 + 7]);
    assert!(log
        .iter()
        .all(|r| r["billed"]["reasoning"] == 7 && r["billed"]["input"] == 4));
}

#[tokio::test]
async fn token_knobs_by_flag_config_and_header() {
    let mock = Mock::start(&["--cache-read", "1", "--omit-usage"]);
    let v: Value = post(&mock, "/v1/messages", &[], &messages(false))
        .await
        .json()
        .await
        .unwrap();
    assert!(v.get("usage").is_none());
    // The header wins over the flag.
    let v: Value = post(
        &mock,
        "/v1/messages",
        &[("X-Mock-Omit-Usage", "0"), ("X-Mock-Cache-Read", "2")],
        &messages(false),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(v["usage"]["cache_read_input_tokens"], 2);
    let c = reqwest::Client::new();
    let cfg: Value = c
        .post(mock.url("/_mock/config"))
        .body(r#"{"cache_read":3,"cache_write_5m":1,"cache_write_1h":0,"reasoning_tokens":2,"cut_after_events":2}"#)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(cfg["cache_read"], 3);
    assert_eq!(cfg["omit_usage"], false);
    let v: Value = post(&mock, "/v1/messages", &[], &messages(false))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["usage"]["cache_read_input_tokens"], 3);
    assert_eq!(v["usage"]["cache_creation_input_tokens"], 1);
    assert_eq!(v["usage"]["output_tokens"], 8);
    let (bytes, _) = read_all(post(&mock, "/v1/messages", &[], &messages(true)).await).await;
    assert_eq!(events(&bytes).len(), 2);
    for (name, value) in [
        ("X-Mock-Cache-Read", "x"),
        ("X-Mock-Cache-Write-5m", "-2"),
        ("X-Mock-Cache-Write-1h", "1h"),
        ("X-Mock-Reasoning-Tokens", "many"),
        ("X-Mock-Omit-Usage", "perhaps"),
        ("X-Mock-Cut-After-Events", "-1"),
    ] {
        let r = post(
            &mock,
            "/v1/chat/completions",
            &[(name, value)],
            &chat4(false),
        )
        .await;
        assert_eq!(r.status(), 400, "{name}");
    }
}

#[tokio::test]
async fn tool_calls_carry_the_token_classes_too() {
    let mock = Mock::start(&[]);
    // Arguments {"q":"a b c"}: an empty piece, then 2 pieces of <= 8 characters.
    let mut body = chat4(false);
    body["n"] = 2.into();
    body["tools"] = json!([{"type": "function", "function": {"name": "f",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]);
    let h = [("X-Mock-Cache-Read", "1"), ("X-Mock-Reasoning-Tokens", "2")];
    let r = post(&mock, "/v1/chat/completions", &h, &body).await;
    assert_eq!(r.headers()["x-mock-completion-tokens"], "8");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
    assert_eq!(v["choices"][1]["finish_reason"], "tool_calls");
    assert_eq!(v["usage"]["completion_tokens"], 3 * 2 + 2);
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 1);
    assert_eq!(
        v["usage"]["completion_tokens_details"]["reasoning_tokens"],
        2
    );
    body["stream"] = true.into();
    body["stream_options"] = json!({"include_usage": true});
    let ev = stream_json(post(&mock, "/v1/chat/completions", &h, &body).await).await;
    assert_eq!(ev.len(), 2 + 3 * 2 + 2 + 1);
    assert_eq!(usage_of(&ev, "")["completion_tokens"], 8);
    let mut m = messages(false);
    m["tools"] = json!([{"name": "f", "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}}]);
    let h = [("X-Mock-Cache-Read", "1"), ("X-Mock-Cache-Write-5m", "2")];
    let v: Value = post(&mock, "/v1/messages", &h, &m)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["stop_reason"], "tool_use");
    assert_eq!(v["usage"]["input_tokens"], 1);
    assert_eq!(v["usage"]["cache_read_input_tokens"], 1);
    assert_eq!(
        v["usage"]["cache_creation"],
        json!({"ephemeral_5m_input_tokens": 2, "ephemeral_1h_input_tokens": 0})
    );
    m["stream"] = true.into();
    let h = [("X-Mock-Cache-Write-5m", "2"), ("X-Mock-Omit-Usage", "1")];
    let ev = stream_json(post(&mock, "/v1/messages", &h, &m).await).await;
    assert_eq!(
        usage_of(&ev, "message_start")["cache_creation_input_tokens"],
        2
    );
    let (_, md) = ev
        .iter()
        .find(|(n, _)| n.as_deref() == Some("message_delta"))
        .unwrap();
    assert!(md.get("usage").is_none());
    let log = settled_log(&mock).await;
    let outputs: Vec<&Value> = log.iter().map(|r| &r["billed"]["output"]).collect();
    assert_eq!(outputs, [&json!(8), &json!(8), &json!(3), &json!(3)]);
}
