//! OpenAI and Azure mode against the recorded fixtures' shapes.

mod common;

use common::{chat, events, key_order, read_all, Mock};
use serde_json::Value;

const COMPLETION: &str = include_str!("../../tests/fixtures/openai-chat-completion.json");
const STREAM: &str = include_str!("../../tests/fixtures/openai-chat-stream.sse");
const STREAM_NO_USAGE: &str = include_str!("../../tests/fixtures/openai-chat-stream-no-usage.sse");

#[tokio::test]
async fn non_stream_has_fixture_shape_and_formula_tokens() {
    let mock = Mock::start(&[]);
    let resp = reqwest::Client::new()
        .post(mock.url("/v1/chat/completions"))
        .json(&chat(false, false, "What is the weather?"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-mock-prompt-tokens"], "8");
    assert_eq!(resp.headers()["x-mock-completion-tokens"], "7");
    let text = resp.text().await.unwrap();
    assert_eq!(key_order(&text), key_order(COMPLETION));
    let v: Value = serde_json::from_str(&text).unwrap();
    let fixture: Value = serde_json::from_str(COMPLETION).unwrap();
    let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&v["usage"]), keys(&fixture["usage"]));
    assert_eq!(
        keys(&v["choices"][0]["message"]),
        keys(&fixture["choices"][0]["message"])
    );
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "gpt-4o-mini");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "Mock reply to: What is the weather?"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    // system "Be brief." = 1+2, user = 1+4; reply = 7 words.
    assert_eq!(v["usage"]["prompt_tokens"], 8);
    assert_eq!(v["usage"]["completion_tokens"], 7);
    assert_eq!(v["usage"]["total_tokens"], 15);
}

#[tokio::test]
async fn stream_with_include_usage_is_framed_like_the_recording() {
    let mock = Mock::start(&[]);
    let resp = reqwest::Client::new()
        .post(mock.url("/v1/chat/completions"))
        .json(&chat(true, true, "Tell me a joke"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.headers()["content-type"],
        "text/event-stream; charset=utf-8"
    );
    let (bytes, failed) = read_all(resp).await;
    assert!(!failed);
    let got = events(&bytes);
    let want = events(STREAM.as_bytes());
    assert!(got.iter().all(|e| e.name.is_none()), "no event: lines");
    assert_eq!(got.last().unwrap().data, "[DONE]");
    assert_eq!(got.last().unwrap().raw, b"data: [DONE]\n\n");
    // role + 7 words + finish + usage + [DONE]
    assert_eq!(got.len(), 1 + 7 + 1 + 1 + 1);
    let chunks: Vec<Value> = got[..got.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(&e.data).unwrap())
        .collect();
    for (i, c) in chunks.iter().enumerate() {
        let fixture_ix = if i + 1 == chunks.len() {
            want.len() - 2
        } else {
            i.min(1)
        };
        assert_eq!(
            key_order(&got[i].data),
            key_order(&want[fixture_ix].data),
            "chunk {i}"
        );
        if i + 1 < chunks.len() {
            assert!(c["usage"].is_null() && c.get("usage").is_some());
        }
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "Mock reply to: Tell me a joke");
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    let usage = &chunks[chunks.len() - 1];
    assert_eq!(usage["choices"], serde_json::json!([]));
    assert_eq!(usage["usage"]["prompt_tokens"], 3 + 5);
    assert_eq!(usage["usage"]["completion_tokens"], 7);
}

#[tokio::test]
async fn stream_without_include_usage_has_no_usage_key() {
    let mock = Mock::start(&[]);
    let resp = reqwest::Client::new()
        .post(mock.url("/v1/chat/completions"))
        .header("X-Mock-Chunks", "3")
        .json(&chat(true, false, "hi"))
        .send()
        .await
        .unwrap();
    let (bytes, _) = read_all(resp).await;
    let got = events(&bytes);
    let want = events(STREAM_NO_USAGE.as_bytes());
    assert_eq!(got.len(), 1 + 3 + 1 + 1);
    for (i, e) in got[..got.len() - 1].iter().enumerate() {
        assert!(!e.data.contains("\"usage\""), "{}", e.data);
        assert_eq!(key_order(&e.data), key_order(&want[i.min(1)].data));
    }
}

#[tokio::test]
async fn max_tokens_cuts_the_reply_with_length() {
    let mock = Mock::start(&[]);
    let mut body = chat(false, false, "one two three four five");
    body["max_tokens"] = 2.into();
    let v: Value = reqwest::Client::new()
        .post(mock.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "Mock reply");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 2);
}

#[tokio::test]
async fn api_key_is_enforced_per_api() {
    let mock = Mock::start(&["--api-key", "sk-test"]);
    let c = reqwest::Client::new();
    let resp = c
        .post(mock.url("/v1/chat/completions"))
        .bearer_auth("wrong")
        .json(&chat(false, false, "x"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_api_key");
    let ok = c
        .post(mock.url("/v1/chat/completions"))
        .bearer_auth("sk-test")
        .json(&chat(false, false, "x"))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let models = c
        .get(mock.url("/v1/models"))
        .bearer_auth("sk-test")
        .send()
        .await
        .unwrap();
    let v: Value = models.json().await.unwrap();
    assert_eq!(v["object"], "list");
    assert!(v["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["id"] == "gpt-4o-mini"));
    // Azure: api-key header and a required api-version.
    let az = mock.url("/openai/deployments/my-gpt/chat/completions");
    let no_ver = c
        .post(&az)
        .header("api-key", "sk-test")
        .json(&chat(false, false, "x"))
        .send()
        .await
        .unwrap();
    assert_eq!(no_ver.status(), 404);
    let bad_key = c
        .post(format!("{az}?api-version=2024-10-21"))
        .header("api-key", "nope")
        .json(&chat(false, false, "x"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad_key.status(), 401);
    let ok: Value = c
        .post(format!("{az}?api-version=2024-10-21"))
        .header("api-key", "sk-test")
        .json(&chat(false, false, "x"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(ok["prompt_filter_results"].is_array());
}

#[tokio::test]
async fn azure_stream_starts_with_the_annotation_chunk() {
    let mock = Mock::start(&[]);
    let resp = reqwest::Client::new()
        .post(mock.url("/openai/deployments/d1/chat/completions?api-version=2024-10-21"))
        .json(&serde_json::json!({"messages":[{"role":"user","content":"hi"}],"stream":true}))
        .send()
        .await
        .unwrap();
    let (bytes, _) = read_all(resp).await;
    let got = events(&bytes);
    let first: Value = serde_json::from_str(&got[0].data).unwrap();
    assert_eq!(first["choices"], serde_json::json!([]));
    assert_eq!(first["id"], "");
    let second: Value = serde_json::from_str(&got[1].data).unwrap();
    assert_eq!(second["model"], "d1");
}

#[tokio::test]
async fn bad_json_is_a_400_in_openai_shape() {
    let mock = Mock::start(&[]);
    let resp = reqwest::Client::new()
        .post(mock.url("/v1/chat/completions"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
}
