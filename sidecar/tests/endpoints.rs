//! `/v1/embeddings`, `/v1/completions` and `/v1/responses` through the
//! sidecar against the mock: byte-faithful passthrough (only `model` changes,
//! plus `include_usage` on a completions stream), failover before the first
//! output, usage rows, catalogue kinds, and `previous_response_id` sent to
//! the provider that created the response.

mod common;

use common::*;
use serde_json::{json, Value};

/// `emb` (kind embedding) and `m` (chat), each routed to `bad` then `good`.
fn catalogue(bad_base: &str, good: &Mock) -> Sidecar {
    let body = format!(
        "{}{}{}{}kind = \"embedding\"\n{}",
        openai_provider("bad", bad_base, ""),
        timeouts("bad", "400ms", "400ms"),
        openai_provider("good", &good.base(), ""),
        // `kind` goes into the [models.emb] table, before its routes.
        model("emb", &[]).trim_end().to_owned() + "\n",
        routes("emb", &[("bad", "bad-emb"), ("good", "good-emb")])
            + &model("m", &[("bad", "bad-model"), ("good", "good-model")]),
    );
    Sidecar::start(&body)
}

fn routes(id: &str, routes: &[(&str, &str)]) -> String {
    routes
        .iter()
        .map(|(p, m)| format!("[[models.{id}.routes]]\nprovider = \"{p}\"\nmodel = \"{m}\"\n"))
        .collect()
}

async fn post(sidecar: &Sidecar, path: &str, body: &str) -> reqwest::Response {
    sidecar
        .request(reqwest::Method::POST, path)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn embeddings_fail_over_and_reach_the_provider_byte_for_byte() {
    let bad = Mock::start(&["--status", "503"]);
    let good = Mock::start(&[]);
    let sidecar = catalogue(&bad.base(), &good);
    let client_body = r#"{"input":["Hello, world!", "again"] ,"model":"emb","encoding_format":"base64","dimensions":8,"x_unknown":1.50}"#;
    let r = post(&sidecar, "/v1/embeddings", client_body).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    assert!(v["data"][0]["embedding"].is_string(), "base64 asked: {v}");
    let served = good.requests().await;
    let last = served.last().unwrap();
    assert_eq!(last["path"], "/v1/embeddings");
    assert_eq!(
        last["raw_body"],
        client_body.replace("\"emb\"", "\"good-emb\""),
        "only the model is the gateway's edit"
    );
    assert_eq!(
        bad.requests().await.len(),
        1,
        "tried first, then failed over"
    );
    let usage = sidecar
        .usage_by_model_until(|row| row["requests"] == 1)
        .await;
    let row = &usage["data"][0];
    assert_eq!(row["model"], "emb");
    assert_eq!(row["prompt_tokens"], 3, "{usage}");
    assert_eq!(row["completion_tokens"], 0);
}

#[tokio::test]
async fn models_serve_only_their_kinds_endpoints() {
    let good = Mock::start(&[]);
    let sidecar = catalogue(&good.base(), &good);
    for (path, body) in [
        (
            "/v1/chat/completions",
            json!({"model":"emb","messages":[{"role":"user","content":"hi"}]}),
        ),
        ("/v1/responses", json!({"model":"emb","input":"hi"})),
        ("/v1/completions", json!({"model":"emb","prompt":"hi"})),
        ("/v1/embeddings", json!({"model":"m","input":"hi"})),
    ] {
        let r = post(&sidecar, path, &body.to_string()).await;
        assert_eq!(r.status(), 400, "{path}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["param"], "model", "{path}: {v}");
        assert_eq!(v["error"]["code"], "model_not_supported", "{path}: {v}");
    }
    assert!(
        good.requests().await.is_empty(),
        "refused before any provider"
    );
    let list: Value = sidecar
        .request(reqwest::Method::GET, "/v1/models")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["data"][0]["id"], "emb");
    assert_eq!(list["data"][0]["kind"], "embedding");
    assert_eq!(list["data"][0]["endpoints"], json!(["embeddings"]));
    assert_eq!(list["data"][1]["kind"], "chat");
    assert_eq!(
        list["data"][1]["endpoints"],
        json!(["chat/completions", "completions", "responses", "messages"])
    );
    let usage = sidecar
        .usage_by_model_until(|row| row["requests"] == 4)
        .await;
    let total: u64 = usage["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["requests"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 4, "one row per refused request: {usage}");
}

#[tokio::test]
async fn a_completions_stream_fails_over_and_loses_the_usage_chunk_it_did_not_ask_for() {
    let bad = Mock::start(&["--status", "500"]);
    let good = Mock::start(&[]);
    let sidecar = catalogue(&bad.base(), &good);
    let plain = post(
        &sidecar,
        "/v1/completions",
        r#"{"model":"m","prompt":"Say this"}"#,
    )
    .await;
    assert_eq!(plain.status(), 200);
    let v: Value = plain.json().await.unwrap();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], "Mock reply to: Say this");

    let body = r#"{"model":"m","prompt":"Say this","stream":true}"#;
    let r = post(&sidecar, "/v1/completions", body).await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(!text.contains("\"usage\""), "{text}");
    let upstream = good.requests().await;
    assert_eq!(
        upstream.last().unwrap()["raw_body"],
        r#"{"model":"good-model","prompt":"Say this","stream":true,"max_tokens":16,"stream_options":{"include_usage":true}}"#
    );
    let usage = sidecar
        .usage_by_model_until(|row| row["requests"] == 2)
        .await;
    let row = &usage["data"][0];
    assert_eq!(
        row["estimated_requests"], 0,
        "tokens from the provider: {usage}"
    );
    assert!(row["completion_tokens"].as_u64().unwrap() >= 8, "{usage}");
}

#[tokio::test]
async fn a_responses_stream_fails_over_before_output_and_ends_with_response_completed() {
    let bad = Mock::start(&[]);
    // The bad provider answers 200 and breaks right after its preamble.
    bad.set(json!({"error_after_chunks": 0})).await;
    let good = Mock::start(&[]);
    let sidecar = catalogue(&bad.base(), &good);
    let body = r#"{"model":"m","input":"Hello there","stream":true}"#;
    let r = post(&sidecar, "/v1/responses", body).await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(names.first(), Some(&"response.created"), "{text}");
    assert_eq!(names.last(), Some(&"response.completed"), "{text}");
    assert!(names.contains(&"response.output_text.delta"));
    assert!(!text.contains("\"error\":{"), "{text}");
    assert_eq!(
        good.requests().await.last().unwrap()["raw_body"],
        body.replace("\"m\"", "\"good-model\"")
            .replace("true}", "true,\"max_output_tokens\":4096}"),
        "a Responses stream is sent as the client wrote it, with the output cap the gateway reserved"
    );
    let usage = sidecar
        .usage_by_model_until(|row| row["requests"] == 1)
        .await;
    let row = &usage["data"][0];
    // 3 from response.completed, and the prompt estimate of the attempt that
    // answered and broke: the provider may have billed it (one request still).
    assert!(row["prompt_tokens"].as_u64().unwrap() > 3, "{usage}");
    assert_eq!(row["requests"], 1, "{usage}");
    assert_eq!(row["errors"], 0, "{usage}");
    assert_eq!(row["unpriced_requests"], 1, "{usage}");

    let plain = post(&sidecar, "/v1/responses", r#"{"model":"m","input":"Hi"}"#).await;
    let v: Value = plain.json().await.unwrap();
    assert_eq!(v["object"], "response");
    assert_eq!(v["output"][0]["content"][0]["text"], "Mock reply to: Hi");
}

/// POST as another key than `post`'s `test-key`.
async fn post_as(sidecar: &Sidecar, key_id: &str, path: &str, body: &str) -> reqwest::Response {
    sidecar
        .client
        .post(sidecar.url(path))
        .header("X-Afr-Secret", SECRET)
        .header("X-Afr-Key-Id", key_id)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
}

/// The `id` of a whole Responses answer, or of a stream's `response.created`.
async fn response_id(r: reqwest::Response) -> String {
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let json = match text.lines().find_map(|l| l.strip_prefix("data: ")) {
        Some(first_event) => {
            serde_json::from_str::<Value>(first_event).unwrap()["response"].clone()
        }
        None => serde_json::from_str::<Value>(&text).unwrap(),
    };
    json["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn previous_response_id_goes_to_the_provider_that_created_it() {
    // The first route fails the opening request, so the second creates it.
    let first = Mock::start(&["--status", "503"]);
    let second = Mock::start(&[]);
    let sidecar = catalogue(&first.base(), &second);
    let opening = post(&sidecar, "/v1/responses", r#"{"model":"m","input":"hi"}"#).await;
    let id = response_id(opening).await;
    assert_eq!(first.requests().await.len(), 1);
    assert_eq!(second.requests().await.len(), 1);
    // The first route is healthy again and would now be tried first.
    first.set(json!({})).await;

    let body =
        format!(r#"{{"model":"m","input":"more","previous_response_id":"{id}","stream":true}}"#);
    let streamed = post(&sidecar, "/v1/responses", &body).await;
    let next = response_id(streamed).await;
    let body = format!(r#"{{"model":"m","input":"again","previous_response_id":"{next}"}}"#);
    let plain = post(&sidecar, "/v1/responses", &body).await;
    let last = response_id(plain).await;
    assert_eq!(
        first.requests().await.len(),
        1,
        "follow-ups never go to the provider that lacks the conversation"
    );
    let served = second.requests().await;
    assert_eq!(served.len(), 3, "the stream's id was remembered too");
    assert_eq!(served[2]["body"]["previous_response_id"], next.as_str());
    assert_ne!(last, next);

    // The creator failing is not failed over: the other provider cannot continue it.
    second.set(json!({"status": 500})).await;
    let body = format!(r#"{{"model":"m","input":"more","previous_response_id":"{last}"}}"#);
    let r = post(&sidecar, "/v1/responses", &body).await;
    assert_eq!(r.status(), 500);
    assert_eq!(first.requests().await.len(), 1);
}

#[tokio::test]
async fn an_unknown_or_foreign_previous_response_id_is_a_400_naming_it() {
    let good = Mock::start(&[]);
    let sidecar = catalogue(&good.base(), &good);
    let id =
        response_id(post(&sidecar, "/v1/responses", r#"{"model":"m","input":"hi"}"#).await).await;
    for (key, previous) in [("test-key", "resp_abc"), ("another-key", id.as_str())] {
        let body = format!(r#"{{"model":"m","input":"more","previous_response_id":"{previous}"}}"#);
        let r = post_as(&sidecar, key, "/v1/responses", &body).await;
        assert_eq!(r.status(), 400, "{key} {previous}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["param"], "previous_response_id", "{v}");
        assert_eq!(v["error"]["code"], "previous_response_not_found", "{v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    }
    assert_eq!(
        good.requests().await.len(),
        1,
        "refused before any provider"
    );
}
