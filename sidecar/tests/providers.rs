//! The Anthropic and Azure adapters against the mock's Anthropic and Azure
//! modes: request translation, responses and streams in OpenAI shape, error
//! mapping, failover across wire formats.

mod common;

use common::*;
use serde_json::{json, Value};

fn anthropic_provider(name: &str, base: &str) -> String {
    format!("[providers.{name}]\nkind = \"anthropic\"\nbase_url = \"{base}/v1\"\napi_key_env = \"AFR_TEST_ANTHROPIC_KEY\"\n")
}

fn azure_provider(name: &str, base: &str) -> String {
    format!(
        "[providers.{name}]\nkind = \"azure\"\nbase_url = \"{base}\"\napi_version = \"2024-10-21\"\napi_key_env = \"AFR_TEST_AZURE_KEY\"\n"
    )
}

fn sidecar_for(provider: String) -> Sidecar {
    std::env::set_var("AFR_TEST_ANTHROPIC_KEY", "anthropic-test-key");
    std::env::set_var("AFR_TEST_AZURE_KEY", "azure-test-key");
    Sidecar::start(&format!("{provider}{}", model("m", &[("p", "upstream-x")])))
}

fn chunks(text: &str) -> Vec<Value> {
    events(text)
        .iter()
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|d| !d.starts_with("[DONE]"))
        .map(|d| serde_json::from_str(d.trim()).expect("chunk JSON"))
        .collect()
}

fn streamed_text(text: &str) -> String {
    chunks(text)
        .iter()
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

#[tokio::test]
async fn anthropic_non_streaming_is_translated_both_ways() {
    let mock = Mock::start(&[]);
    let sidecar = sidecar_for(anthropic_provider("p", &mock.base()));
    let r = sidecar
        .chat(json!({"model": "m", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]}))
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert!(v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .contains("hello there"));
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 0);

    let sent = &mock.requests().await[0];
    assert_eq!(sent["path"], "/v1/messages");
    assert_eq!(sent["headers"]["x-api-key"], "anthropic-test-key");
    assert_eq!(sent["headers"]["anthropic-version"], "2023-06-01");
    assert_eq!(sent["body"]["model"], "upstream-x");
    assert_eq!(sent["body"]["system"], "be brief");
    assert_eq!(sent["body"]["max_tokens"], 4096);
    assert!(!sidecar.log().contains("anthropic-test-key"));
}

#[tokio::test]
async fn anthropic_translation_keeps_the_clients_schema_property_order() {
    let mock = Mock::start(&[]);
    let sidecar = sidecar_for(anthropic_provider("p", &mock.base()));
    let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object","properties":{"zeta":{"type":"string"},"alpha":{"type":"string"},"mid":{"type":"integer"}}}}}]}"#;
    assert_eq!(sidecar.chat_raw(body).await.status(), 200);
    let sent = mock.requests().await[0]["raw_body"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        sent.contains(r#""properties":{"zeta":{"type":"string"},"alpha":{"type":"string"},"mid":{"type":"integer"}}"#),
        "{sent}"
    );
}

/// A model whose first route is Anthropic and whose second is OpenAI-compatible.
fn anthropic_then_openai(anthropic: &Mock, openai: &Mock) -> Sidecar {
    std::env::set_var("AFR_TEST_ANTHROPIC_KEY", "anthropic-test-key");
    Sidecar::start_with(
        &format!(
            "{}{}{}",
            anthropic_provider("a", &anthropic.base()),
            openai_provider("o", &openai.base(), ""),
            model("m", &[("a", "claude-x"), ("o", "gpt-x")]),
        ),
        1,
        "60s",
    )
}

#[tokio::test]
async fn a_request_a_route_cannot_serve_skips_it_before_dispatch() {
    let anthropic = Mock::start(&[]);
    let openai = Mock::start(&[]);
    let sidecar = anthropic_then_openai(&anthropic, &openai);
    for body in [
        json!({"model": "m", "n": 2, "messages": [{"role": "user", "content": "hi"}]}),
        json!({"model": "m", "messages": [{"role": "function", "name": "f", "content": "{}"}]}),
    ] {
        let r = sidecar.chat(body.clone()).await;
        assert_eq!(r.status(), 200, "{body}");
    }
    assert!(
        anthropic.requests().await.is_empty(),
        "never sent to Anthropic"
    );
    assert_eq!(openai.requests().await.len(), 2);
    // The refusal was no outcome: the Anthropic breaker is still closed and
    // failover counted nothing (its threshold here is one failure).
    assert_eq!(sidecar.chat(chat_body("m", false)).await.status(), 200);
    assert_eq!(anthropic.requests().await.len(), 1);
    assert!(!sidecar.metrics().await.contains("afr_failovers_total{"));
}

#[tokio::test]
async fn a_disabled_route_beside_one_that_cannot_serve_is_still_a_400_not_retry_later() {
    let mock = Mock::start(&[]);
    std::env::set_var("AFR_TEST_ANTHROPIC_KEY", "anthropic-test-key");
    std::env::remove_var("AFR_TEST_NEVER_SET_KEY");
    let sidecar = Sidecar::start(&format!(
        "{}{}{}",
        anthropic_provider("a", &mock.base()),
        openai_provider(
            "o",
            &mock.base(),
            "api_key_env = \"AFR_TEST_NEVER_SET_KEY\"\n"
        ),
        model("m", &[("a", "claude-x"), ("o", "gpt-x")]),
    ));
    let r = sidecar
        .chat(json!({"model": "m", "n": 2, "messages": [{"role": "user", "content": "hi"}]}))
        .await;
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["param"], "n");
    assert!(mock.requests().await.is_empty());
}

#[tokio::test]
async fn a_request_no_route_can_serve_is_a_400_naming_the_field() {
    let mock = Mock::start(&[]);
    let sidecar = sidecar_for(anthropic_provider("p", &mock.base()));
    let r = sidecar
        .chat(json!({"model": "m", "n": 3, "messages": [{"role": "user", "content": "hi"}]}))
        .await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["param"], "n", "{v}");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(mock.requests().await.is_empty());
}

#[tokio::test]
async fn anthropic_streams_become_openai_chunks() {
    let mock = Mock::start(&["--chunks", "5"]);
    let sidecar = sidecar_for(anthropic_provider("p", &mock.base()));
    let r = sidecar.chat(chat_body("m", true)).await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(!text.contains("event:"), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(
        !text.contains("\"usage\""),
        "usage stripped for a client that did not ask: {text}"
    );
    let cs = chunks(&text);
    assert!(cs.iter().all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(cs[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(!streamed_text(&text).is_empty());
    assert!(cs
        .iter()
        .any(|c| c["choices"][0]["finish_reason"] == "stop"));

    // With include_usage the client gets the usage chunk, mapped from Anthropic's counts.
    let mut body = chat_body("m", true);
    body["stream_options"] = json!({"include_usage": true});
    let text = sidecar.chat(body).await.text().await.unwrap();
    let usage = chunks(&text)
        .into_iter()
        .find(|c| c["usage"].is_object())
        .expect("usage chunk");
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 5);
}

#[tokio::test]
async fn anthropic_errors_are_mapped_and_overload_fails_over() {
    let mock = Mock::start(&["--status", "400"]);
    let sidecar = sidecar_for(anthropic_provider("p", &mock.base()));
    let r = sidecar.chat(chat_body("m", false)).await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(v["error"]["message"].is_string());

    let overloaded = Mock::start(&["--status", "529"]);
    let good = Mock::start(&[]);
    std::env::set_var("AFR_TEST_ANTHROPIC_KEY", "anthropic-test-key");
    let body = format!(
        "{}{}{}",
        anthropic_provider("a", &overloaded.base()),
        openai_provider("o", &good.base(), ""),
        model("m", &[("a", "claude"), ("o", "gpt")]),
    );
    let sidecar = Sidecar::start(&body);
    for stream in [false, true] {
        assert_eq!(sidecar.chat(chat_body("m", stream)).await.status(), 200);
    }
    assert_eq!(good.requests().await.len(), 2);
}

#[tokio::test]
async fn anthropic_error_event_mid_stream_ends_the_stream() {
    let mock = Mock::start(&["--chunks", "5", "--error-after-chunks", "2"]);
    let sidecar = sidecar_for(anthropic_provider("p", &mock.base()));
    let text = sidecar.chat_text(chat_body("m", true)).await;
    let last = events(&text).pop().unwrap();
    assert!(last.starts_with("data: {\"error\""), "{text}");
    assert!(!text.contains("event:"));
}

#[tokio::test]
async fn azure_uses_deployment_urls_api_version_and_api_key() {
    let mock = Mock::start(&["--chunks", "3"]);
    let sidecar = sidecar_for(azure_provider("p", &mock.base()));
    let r = sidecar.chat(chat_body("m", false)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap()["object"],
        "chat.completion"
    );
    let text = sidecar.chat_text(chat_body("m", true)).await;
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let sent = &mock.requests().await[0];
    assert_eq!(sent["headers"]["api-key"], "azure-test-key");
    assert!(sent["headers"].get("authorization").is_none());
    let path = sent["path"].as_str().unwrap();
    assert!(
        path.starts_with("/openai/deployments/upstream-x/chat/completions"),
        "{path}"
    );
    let query = sent.get("query").and_then(Value::as_str).unwrap_or(path);
    assert!(query.contains("api-version=2024-10-21"), "{sent}");
}
