//! OpenAI (and Azure OpenAI) chat completions: `chat.completion` bodies and
//! `chat.completion.chunk` streams shaped like the recorded fixtures
//! (`openai-chat-completion.json`, `openai-chat-stream.sse`,
//! `openai-chat-stream-no-usage.sse`; Azure's prompt-annotation first chunk
//! from `azure-openai-notes.md`).
//!
//! JSON is written by hand around `serde_json`-escaped strings so the key order
//! matches OpenAI's exactly (a `serde_json::Map` would sort the keys) and a
//! stream costs one small allocation per event.

use bytes::Bytes;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::Response;
use serde_json::Value;

use crate::conn::MockBody;
use crate::faults::{Api, OPENAI_STREAM_ERROR};
use crate::reply::{self, Finish, Reply};
use crate::server::{unix_now, Ctx};
use crate::stream::StreamPlan;
use crate::tools;

const MODELS: &str = include_str!("../../tests/fixtures/openai-models-list.json");
const FINGERPRINT: &str = "fp_afrmock01";
const AZURE_PROMPT_FILTER: &str = r#""prompt_filter_results":[{"prompt_index":0,"content_filter_results":{"hate":{"filtered":false,"severity":"safe"},"jailbreak":{"filtered":false,"detected":false},"self_harm":{"filtered":false,"severity":"safe"},"sexual":{"filtered":false,"severity":"safe"},"violence":{"filtered":false,"severity":"safe"}}}]"#;
const USAGE_DETAILS: &str = r#""prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}"#;

/// The `GET /v1/models` body: the recorded OpenAI list, verbatim.
pub fn models() -> Response<MockBody> {
    let mut resp = Response::new(MockBody::full(Bytes::from_static(MODELS.as_bytes())));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// Checks the fields the mock needs; the error names the offending field.
pub fn validate(body: &Value, azure: bool) -> Result<(), (&'static str, &'static str)> {
    if !azure && !body.get("model").is_some_and(Value::is_string) {
        return Err(("you must provide a model parameter", "model"));
    }
    if !body.get("messages").is_some_and(Value::is_array) {
        return Err(("Missing required parameter: 'messages'.", "messages"));
    }
    Ok(())
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned())
}

fn usage_json(r: &Reply) -> String {
    let (p, c) = (r.prompt_tokens, r.completion_tokens());
    format!(
        r#"{{"prompt_tokens":{p},"completion_tokens":{c},"total_tokens":{},{USAGE_DETAILS}}}"#,
        p + c
    )
}

fn finish_reason(r: &Reply) -> &'static str {
    match r.finish {
        Finish::Stop => "stop",
        Finish::Length => "length",
    }
}

/// Answers a chat completion (already authorized and past fault injection).
pub fn respond(ctx: Ctx, body: &Value, api: Api, deployment: Option<&str>) -> Response<MockBody> {
    let reply = reply::build(body, None, ctx.knobs.chunks);
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .or(deployment)
        .unwrap_or("gpt-4o-mini");
    let id = format!("chatcmpl-afrmock{:016}", ctx.id_seq);
    let created = unix_now();
    let azure = api == Api::Azure;
    let stream = body.get("stream").and_then(Value::as_bool) == Some(true);
    let tool = tools::decide(body, false, reply.prompt_tokens);
    let include_usage = body
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        == Some(true);
    let error_event = Bytes::from_static(OPENAI_STREAM_ERROR.as_bytes());
    let mut resp = if let (Some(call), true) = (&tool, stream) {
        let plan = tools::openai_plan(
            call,
            &id,
            created,
            model,
            ctx.id_seq,
            include_usage,
            error_event,
        );
        ctx.stream_response(plan)
    } else if let Some(call) = &tool {
        ctx.finish(200);
        let mut resp = Response::new(MockBody::full(tools::openai_body(
            call, &id, created, model, ctx.id_seq,
        )));
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        resp
    } else if stream {
        let opts = body.get("stream_options");
        let flag = |k: &str| opts.and_then(|o| o.get(k)).and_then(Value::as_bool);
        let obfuscation = !azure && flag("include_obfuscation") != Some(false);
        let plan = stream_plan(
            &reply,
            &id,
            created,
            model,
            include_usage,
            obfuscation,
            azure,
        );
        ctx.stream_response(plan)
    } else {
        let text = json_str(&reply.text());
        let mut out = format!(
            r#"{{"id":"{id}","object":"chat.completion","created":{created},"model":{},"choices":[{{"index":0,"message":{{"role":"assistant","content":{text},"refusal":null,"annotations":[]}},"logprobs":null,"finish_reason":"{}"}}],"usage":{},"service_tier":"default","system_fingerprint":"{FINGERPRINT}""#,
            json_str(model),
            finish_reason(&reply),
            usage_json(&reply),
        );
        if azure {
            out.push(',');
            out.push_str(AZURE_PROMPT_FILTER);
        }
        out.push('}');
        ctx.finish(200);
        let mut resp = Response::new(MockBody::full(out));
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        resp
    };
    let h = resp.headers_mut();
    let id_header = if azure {
        "apim-request-id"
    } else {
        "x-request-id"
    };
    if let Ok(v) = HeaderValue::from_str(&ctx.request_id) {
        h.insert(id_header, v);
    }
    h.insert("openai-version", HeaderValue::from_static("2020-10-01"));
    h.insert("x-mock-prompt-tokens", reply.prompt_tokens.into());
    let completion = tool.as_ref().map_or(
        reply.completion_tokens(),
        tools::ToolCall::completion_tokens,
    );
    h.insert("x-mock-completion-tokens", completion.into());
    resp
}

fn event(json: String) -> Bytes {
    let mut s = String::with_capacity(json.len() + 8);
    s.push_str("data: ");
    s.push_str(&json);
    s.push_str("\n\n");
    Bytes::from(s)
}

/// The chunk sequence of the fixtures: role chunk, one content delta per
/// piece, the finish chunk, the usage chunk (`"choices":[]`) only with
/// `include_usage`, then `data: [DONE]`. With `include_usage` every other
/// chunk carries `"usage":null`; without it there is no `usage` key.
fn stream_plan(
    reply: &Reply,
    id: &str,
    created: u64,
    model: &str,
    include_usage: bool,
    obfuscation: bool,
    azure: bool,
) -> StreamPlan {
    let prefix = format!(
        r#"{{"id":"{id}","object":"chat.completion.chunk","created":{created},"model":{},"service_tier":"default","system_fingerprint":"{FINGERPRINT}","choices":"#,
        json_str(model)
    );
    let usage_null = if include_usage {
        r#","usage":null"#
    } else {
        ""
    };
    let obf = if obfuscation {
        r#","obfuscation":"afrmock""#
    } else {
        ""
    };
    let chunk = |choices: &str| event(format!("{prefix}{choices}{usage_null}{obf}}}"));
    let mut head = Vec::with_capacity(2);
    if azure {
        head.push(event(format!(
            r#"{{"choices":[],"created":0,"id":"","model":"","object":"",{AZURE_PROMPT_FILTER}}}"#
        )));
    }
    head.push(chunk(
        r#"[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}]"#,
    ));
    let content = reply
        .pieces
        .iter()
        .map(|p| {
            chunk(&format!(
                r#"[{{"index":0,"delta":{{"content":{}}},"logprobs":null,"finish_reason":null}}]"#,
                json_str(p)
            ))
        })
        .collect();
    let mut tail = vec![chunk(&format!(
        r#"[{{"index":0,"delta":{{}},"logprobs":null,"finish_reason":"{}"}}]"#,
        finish_reason(reply)
    ))];
    if include_usage {
        tail.push(event(format!(
            r#"{prefix}[],"usage":{}{obf}}}"#,
            usage_json(reply)
        )));
    }
    tail.push(Bytes::from_static(b"data: [DONE]\n\n"));
    StreamPlan {
        head,
        content,
        tail,
        error_event: Bytes::from_static(OPENAI_STREAM_ERROR.as_bytes()),
        malformed_event: event(format!(
            r#"{prefix}[{{"index":0,"delta":{{"content":"trunc"#
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn events(plan: &StreamPlan) -> Vec<Value> {
        plan.head
            .iter()
            .chain(&plan.content)
            .chain(&plan.tail)
            .map(|b| {
                let s = std::str::from_utf8(b).unwrap();
                assert!(s.starts_with("data: ") && s.ends_with("\n\n"));
                let d = &s[6..s.len() - 2];
                if d == "[DONE]" {
                    Value::Null
                } else {
                    serde_json::from_str(d).unwrap()
                }
            })
            .collect()
    }

    #[test]
    fn chunk_keys_in_fixture_order() {
        let r = reply::build(
            &json!({"messages":[{"role":"user","content":"hi"}]}),
            None,
            None,
        );
        let plan = stream_plan(&r, "chatcmpl-x", 1, "gpt-4o-mini", true, true, false);
        let first = std::str::from_utf8(&plan.head[0]).unwrap();
        assert!(first.starts_with(r#"data: {"id":"chatcmpl-x","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","service_tier":"default","system_fingerprint":"#));
        assert!(first
            .ends_with("\"finish_reason\":null}],\"usage\":null,\"obfuscation\":\"afrmock\"}\n\n"));
        let ev = events(&plan);
        assert_eq!(ev.len(), 1 + 4 + 2 + 1);
        assert_eq!(ev[5]["choices"][0]["finish_reason"], "stop");
        assert_eq!(ev[6]["choices"], json!([]));
        assert_eq!(ev[6]["usage"]["total_tokens"], 2 + 4);
        assert!(ev[..6]
            .iter()
            .all(|e| e["usage"].is_null() && e.get("usage").is_some()));
    }

    #[test]
    fn no_usage_key_without_include_usage() {
        let r = reply::build(
            &json!({"messages":[{"role":"user","content":"hi"}]}),
            None,
            None,
        );
        let plan = stream_plan(&r, "c", 1, "m", false, false, true);
        let ev = events(&plan);
        assert_eq!(ev[0]["choices"], json!([]), "azure annotation chunk first");
        assert!(ev.iter().all(|e| e.get("usage").is_none()));
        assert_eq!(ev.len(), 1 + 1 + 4 + 1 + 1);
    }
}
