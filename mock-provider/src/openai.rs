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
use crate::tools::{self, OpenAiCall, Wire};
use crate::usage::{self, Tokens};

const MODELS: &str = include_str!("../../tests/fixtures/openai-models-list.json");
const FINGERPRINT: &str = "fp_afrmock01";
const AZURE_PROMPT_FILTER: &str = r#""prompt_filter_results":[{"prompt_index":0,"content_filter_results":{"hate":{"filtered":false,"severity":"safe"},"jailbreak":{"filtered":false,"detected":false},"self_harm":{"filtered":false,"severity":"safe"},"sexual":{"filtered":false,"severity":"safe"},"violence":{"filtered":false,"severity":"safe"}}}]"#;
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
    usage::choices(body, false).map(|_| ())
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned())
}

fn finish_reason(r: &Reply) -> &'static str {
    match r.finish {
        Finish::Stop => "stop",
        Finish::Length => "length",
    }
}

/// How a chat answer is framed, besides its reply.
struct Shape<'a> {
    id: &'a str,
    created: u64,
    model: &'a str,
    /// Choices (`n`), each the same reply.
    n: u64,
    tokens: Tokens,
    /// Report the usage (no `omit_usage`).
    usage: bool,
    /// Streams: `stream_options.include_usage`.
    include_usage: bool,
    obfuscation: bool,
    azure: bool,
}

/// Answers a chat completion (already authorized and past fault injection).
pub fn respond(ctx: Ctx, body: &Value, api: Api, deployment: Option<&str>) -> Response<MockBody> {
    let mode = ctx.knobs.tools;
    let answer = tools::agent_answer(body, Wire::Chat, mode);
    let reply = reply::build_with(body, None, ctx.knobs.chunks, answer);
    let (n, _) = usage::choices(body, false).unwrap_or((1, 1));
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .or(deployment)
        .unwrap_or("gpt-4o-mini");
    let id = format!("chatcmpl-afrmock{:016}", ctx.id_seq);
    let created = unix_now();
    let azure = api == Api::Azure;
    let stream = body.get("stream").and_then(Value::as_bool) == Some(true);
    let tool = tools::decide(body, Wire::Chat, reply.prompt_tokens, mode);
    let per_choice = tool.as_ref().map_or(
        reply.completion_tokens(),
        tools::ToolCall::completion_tokens,
    );
    let tokens = Tokens::new(&ctx.knobs, reply.prompt_tokens, per_choice, false).with_choices(n);
    let omit_usage = ctx.knobs.omit_usage;
    let include_usage = body
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        == Some(true);
    let call_meta = || OpenAiCall {
        id: &id,
        created,
        model,
        seq: ctx.id_seq,
        n,
        usage: (!omit_usage)
            .then(|| serde_json::from_str(&tokens.plain_json()).unwrap_or(Value::Null)),
    };
    let error_event = Bytes::from_static(OPENAI_STREAM_ERROR.as_bytes());
    let mut resp = if let (Some(call), true) = (&tool, stream) {
        let plan = tools::openai_plan(
            call,
            &call_meta(),
            include_usage,
            tokens.billed(),
            error_event,
        );
        ctx.stream_response(plan)
    } else if let Some(call) = &tool {
        ctx.bill(tokens.billed());
        ctx.finish(200);
        let mut resp = Response::new(MockBody::full(tools::openai_body(call, &call_meta())));
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        resp
    } else {
        let opts = body.get("stream_options");
        let flag = |k: &str| opts.and_then(|o| o.get(k)).and_then(Value::as_bool);
        let shape = Shape {
            id: &id,
            created,
            model,
            n,
            tokens,
            usage: !omit_usage,
            include_usage,
            obfuscation: !azure && flag("include_obfuscation") != Some(false),
            azure,
        };
        if stream {
            ctx.stream_response(stream_plan(&reply, &shape))
        } else {
            ctx.bill(tokens.billed());
            ctx.finish(200);
            let mut resp = Response::new(MockBody::full(completion_body(&reply, &shape)));
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            resp
        }
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
    h.insert("x-mock-prompt-tokens", tokens.prompt.into());
    h.insert("x-mock-completion-tokens", tokens.completion().into());
    resp
}

/// A `chat.completion` body: `n` copies of the reply, then the usage
/// (left out with `omit_usage`).
fn completion_body(reply: &Reply, s: &Shape) -> String {
    let text = json_str(&reply.text());
    let choices: Vec<String> = (0..s.n)
        .map(|i| {
            format!(
                r#"{{"index":{i},"message":{{"role":"assistant","content":{text},"refusal":null,"annotations":[]}},"logprobs":null,"finish_reason":"{}"}}"#,
                finish_reason(reply)
            )
        })
        .collect();
    let usage = if s.usage {
        format!(r#","usage":{}"#, s.tokens.chat_json())
    } else {
        String::new()
    };
    let mut out = format!(
        r#"{{"id":"{}","object":"chat.completion","created":{},"model":{},"choices":[{}]{usage},"service_tier":"default","system_fingerprint":"{FINGERPRINT}""#,
        s.id,
        s.created,
        json_str(s.model),
        choices.join(","),
    );
    if s.azure {
        out.push(',');
        out.push_str(AZURE_PROMPT_FILTER);
    }
    out.push('}');
    out
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
/// `include_usage` (and no `omit_usage`), then `data: [DONE]`. With
/// `include_usage` every other chunk carries `"usage":null`; without it there
/// is no `usage` key. With `n` choices each of the role, delta and finish
/// chunks is sent once per choice index, as OpenAI does.
fn stream_plan(reply: &Reply, s: &Shape) -> StreamPlan {
    let prefix = format!(
        r#"{{"id":"{}","object":"chat.completion.chunk","created":{},"model":{},"service_tier":"default","system_fingerprint":"{FINGERPRINT}","choices":"#,
        s.id,
        s.created,
        json_str(s.model)
    );
    let usage_null = if s.include_usage {
        r#","usage":null"#
    } else {
        ""
    };
    let obf = if s.obfuscation {
        r#","obfuscation":"afrmock""#
    } else {
        ""
    };
    let chunk = |choices: &str| event(format!("{prefix}{choices}{usage_null}{obf}}}"));
    let mut head = Vec::with_capacity(2);
    if s.azure {
        head.push(event(format!(
            r#"{{"choices":[],"created":0,"id":"","model":"","object":"",{AZURE_PROMPT_FILTER}}}"#
        )));
    }
    for i in 0..s.n {
        head.push(chunk(&format!(
            r#"[{{"index":{i},"delta":{{"role":"assistant","content":"","refusal":null}},"logprobs":null,"finish_reason":null}}]"#
        )));
    }
    let content = reply
        .pieces
        .iter()
        .flat_map(|p| {
            let piece = json_str(p);
            (0..s.n)
                .map(|i| {
                    chunk(&format!(
                        r#"[{{"index":{i},"delta":{{"content":{piece}}},"logprobs":null,"finish_reason":null}}]"#
                    ))
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let mut tail: Vec<Bytes> = (0..s.n)
        .map(|i| {
            chunk(&format!(
                r#"[{{"index":{i},"delta":{{}},"logprobs":null,"finish_reason":"{}"}}]"#,
                finish_reason(reply)
            ))
        })
        .collect();
    if s.include_usage && s.usage {
        tail.push(event(format!(
            r#"{prefix}[],"usage":{}{obf}}}"#,
            s.tokens.chat_json()
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
        billed: s.tokens.billed(),
        first_delta: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::knobs::Knobs;
    use serde_json::json;

    fn shape(r: &Reply, include_usage: bool, obfuscation: bool, azure: bool) -> Shape<'static> {
        Shape {
            id: "chatcmpl-x",
            created: 1,
            model: "gpt-4o-mini",
            n: 1,
            tokens: Tokens::new(
                &Knobs::default(),
                r.prompt_tokens,
                r.completion_tokens(),
                false,
            ),
            usage: true,
            include_usage,
            obfuscation,
            azure,
        }
    }

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
        let plan = stream_plan(&r, &shape(&r, true, true, false));
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
        let plan = stream_plan(&r, &shape(&r, false, false, true));
        let ev = events(&plan);
        assert_eq!(ev[0]["choices"], json!([]), "azure annotation chunk first");
        assert!(ev.iter().all(|e| e.get("usage").is_none()));
        assert_eq!(ev.len(), 1 + 1 + 4 + 1 + 1);
    }

    #[test]
    fn n_choices_repeat_every_chunk_per_index() {
        let r = reply::build(
            &json!({"messages":[{"role":"user","content":"hi"}]}),
            None,
            None,
        );
        let mut s = shape(&r, true, false, false);
        s.n = 3;
        s.tokens = s.tokens.with_choices(3);
        let plan = stream_plan(&r, &s);
        let ev = events(&plan);
        // 3 role chunks, 4 pieces × 3, 3 finish chunks, usage, [DONE].
        assert_eq!(ev.len(), 3 + 12 + 3 + 1 + 1);
        let idx: Vec<u64> = ev[3..15]
            .iter()
            .map(|e| e["choices"][0]["index"].as_u64().unwrap())
            .collect();
        assert_eq!(idx, [0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2]);
        assert_eq!(ev[18]["usage"]["completion_tokens"], 12);
        let body: Value = serde_json::from_str(&completion_body(&r, &s)).unwrap();
        assert_eq!(body["choices"].as_array().unwrap().len(), 3);
        assert_eq!(body["choices"][2]["index"], 2);
        s.usage = false;
        let body: Value = serde_json::from_str(&completion_body(&r, &s)).unwrap();
        assert!(body.get("usage").is_none());
        let ev = events(&stream_plan(&r, &s));
        assert!(ev.iter().all(|e| e.get("choices") != Some(&json!([]))));
    }
}
