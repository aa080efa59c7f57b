//! Anthropic mode against the recorded fixtures' shapes.

mod common;

use common::{events, key_order, read_all, Mock};
use serde_json::{json, Value};

const RESPONSE: &str = include_str!("../../tests/fixtures/anthropic-messages-response.json");
const STREAM: &str = include_str!("../../tests/fixtures/anthropic-messages-stream.sse");
const REQUEST: &str = include_str!("../../tests/fixtures/anthropic-messages-request.json");

fn messages(mock: &Mock) -> reqwest::RequestBuilder {
    reqwest::Client::new()
        .post(mock.url("/v1/messages"))
        .header("x-api-key", "ak")
        .header("anthropic-version", "2023-06-01")
}

#[tokio::test]
async fn non_stream_matches_the_recorded_shape() {
    let mock = Mock::start(&["--api-key", "ak"]);
    let resp = messages(&mock).body(REQUEST).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert_eq!(key_order(&text), key_order(RESPONSE));
    let v: Value = serde_json::from_str(&text).unwrap();
    let f: Value = serde_json::from_str(RESPONSE).unwrap();
    let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&v["usage"]), keys(&f["usage"]));
    assert_eq!(v["content"][0]["text"], "Mock reply to: Hello, world");
    assert_eq!(v["stop_reason"], "end_turn");
    // system "Today's date is 2024-06-01." = 1+4, user = 1+2.
    assert_eq!(v["usage"]["input_tokens"], 8);
    assert_eq!(v["usage"]["output_tokens"], 5);
}

#[tokio::test]
async fn stream_follows_the_recorded_event_sequence() {
    let mock = Mock::start(&[]);
    let mut req: Value = serde_json::from_str(REQUEST).unwrap();
    req["stream"] = true.into();
    req["messages"][0]["content"] = "Weather 20°C?".into();
    let resp = messages(&mock).json(&req).send().await.unwrap();
    assert_eq!(
        resp.headers()["content-type"],
        "text/event-stream; charset=utf-8"
    );
    let (bytes, failed) = read_all(resp).await;
    assert!(!failed);
    let got = events(&bytes);
    let want = events(STREAM.as_bytes());
    let names = |e: &[common::Event]| {
        let mut n: Vec<String> = e.iter().map(|e| e.name.clone().unwrap()).collect();
        n.dedup();
        n
    };
    assert_eq!(names(&got), names(&want));
    for e in &got {
        let v: Value = serde_json::from_str(&e.data).unwrap();
        assert_eq!(Some(v["type"].as_str().unwrap()), e.name.as_deref());
    }
    let text: String = got
        .iter()
        .filter_map(|e| {
            let v: Value = serde_json::from_str(&e.data).ok()?;
            v["delta"]["text"].as_str().map(str::to_owned)
        })
        .collect();
    assert_eq!(text, "Mock reply to: Weather 20°C?");
    let md: Value = serde_json::from_str(&got[got.len() - 2].data).unwrap();
    assert_eq!(md["usage"]["output_tokens"], 5);
    assert_eq!(md["delta"]["stop_reason"], "end_turn");
    // The padding quirk: space before the final brace.
    assert!(got[1].data.ends_with(" }"));
}

#[tokio::test]
async fn errors_and_required_headers() {
    let mock = Mock::start(&["--api-key", "ak"]);
    let c = reqwest::Client::new();
    let no_key = c
        .post(mock.url("/v1/messages"))
        .header("anthropic-version", "2023-06-01")
        .body(REQUEST)
        .send()
        .await
        .unwrap();
    assert_eq!(no_key.status(), 401);
    let v: Value = no_key.json().await.unwrap();
    assert_eq!(v["error"]["type"], "authentication_error");
    let no_version = c
        .post(mock.url("/v1/messages"))
        .header("x-api-key", "ak")
        .body(REQUEST)
        .send()
        .await
        .unwrap();
    assert_eq!(no_version.status(), 400);
    let overloaded = messages(&mock)
        .header("X-Mock-Status", "529")
        .body(REQUEST)
        .send()
        .await
        .unwrap();
    assert_eq!(overloaded.status(), 529);
    assert_eq!(overloaded.headers()["x-should-retry"], "true");
    let v: Value = overloaded.json().await.unwrap();
    assert_eq!(v["error"]["type"], "overloaded_error");
    let odd_role = json!({"model":"claude-haiku-4-5","max_tokens":10,"messages":[{"role":"narrator","content":"x"}]});
    let r = messages(&mock).json(&odd_role).send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.headers()["x-should-retry"], "false");
    let no_max = json!({"model":"claude-haiku-4-5","messages":[{"role":"user","content":"x"}]});
    let v: Value = messages(&mock)
        .json(&no_max)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["error"]["message"], "max_tokens: Field required");
}

#[tokio::test]
async fn stream_error_event_is_the_recorded_one() {
    let mock = Mock::start(&[]);
    let mut req: Value = serde_json::from_str(REQUEST).unwrap();
    req["stream"] = true.into();
    let resp = messages(&mock)
        .header("X-Mock-Error-After-Chunks", "1")
        .json(&req)
        .send()
        .await
        .unwrap();
    let (bytes, _) = read_all(resp).await;
    let got = events(&bytes);
    let last = got.last().unwrap();
    assert_eq!(last.name.as_deref(), Some("error"));
    assert_eq!(
        last.raw,
        include_bytes!("../../tests/fixtures/anthropic-error-stream.sse").as_slice()
    );
}
