//! OpenAI's other endpoints: `/v1/embeddings`, `/v1/completions` (legacy
//! text completions) and `/v1/responses`, shaped like the recorded fixtures
//! (`openai-embeddings-response*.json`, `openai-completions-*`,
//! `openai-responses-*`; see tests/fixtures/README.md): same keys in the same
//! order, typed `event:` lines on Responses streams, no `[DONE]` there.
//!
//! Text replies come from [`reply::build`] (the last user text, echoed), so
//! token counts follow the same formula as chat completions. A Responses
//! request with `tools` is answered with a call of its first function tool
//! (with the `agent` tools knob, as [`crate::tools`] decides).

use bytes::Bytes;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::Response;
use serde_json::{json, Value};

use crate::conn::MockBody;
use crate::faults::OPENAI_STREAM_ERROR;
use crate::knobs::ToolsMode;
use crate::reply::{self, content_text, Finish, Reply};
use crate::server::{unix_now, Ctx};
use crate::stream::StreamPlan;
use crate::tools::{self, Wire};
use crate::usage::{self, Billed, Tokens};

/// Dimensions of a mock embedding when the request sets none (text-embedding-3-small's).
const DEFAULT_DIMENSIONS: usize = 1536;
/// Arguments of the mock's function calls, in the recorded stream's pieces.
const CALL_ARGUMENT_PIECES: [&str; 8] = [
    "{\"",
    "location",
    "\":\"",
    "San",
    " Francisco",
    ",",
    " CA",
    "\"}",
];

fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned())
}

fn json_response(out: String, ctx: &Ctx) -> Response<MockBody> {
    ctx.finish(200);
    let mut resp = Response::new(MockBody::full(out));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// The provider headers, and the mock's token headers (prompt, completion).
fn with_headers(
    mut resp: Response<MockBody>,
    ctx: &Ctx,
    (prompt, completion): (u64, u64),
) -> Response<MockBody> {
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&ctx.request_id) {
        h.insert("x-request-id", v);
    }
    h.insert("openai-version", HeaderValue::from_static("2020-10-01"));
    h.insert("x-mock-prompt-tokens", prompt.into());
    h.insert("x-mock-completion-tokens", completion.into());
    resp
}

/// Checks the field each endpoint requires; the error names it.
pub fn validate(path: &str, body: &Value) -> Result<(), (&'static str, &'static str)> {
    if !body.get("model").is_some_and(Value::is_string) {
        return Err(("you must provide a model parameter", "model"));
    }
    if path.ends_with("/embeddings") && body.get("input").is_none() {
        return Err(("Missing required parameter: 'input'.", "input"));
    }
    if path.ends_with("completions") {
        usage::choices(body, true)?;
    }
    Ok(())
}

/// A reply to `text` as if it were the last user message.
/// `answer`, when given, is said instead of `Mock reply to: …`.
fn reply_to(
    text: &str,
    max_tokens: Option<u64>,
    chunks: Option<u32>,
    answer: Option<String>,
) -> Reply {
    let mut body = json!({"messages": [{"role": "user", "content": text}]});
    if let Some(max) = max_tokens {
        body["max_tokens"] = max.into();
    }
    reply::build_with(&body, None, chunks, answer)
}

/// The inputs of an embeddings request, as texts (token ids as their numbers).
fn embedding_inputs(input: &Value) -> Vec<String> {
    match input {
        Value::Array(items) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect(),
        Value::String(s) => vec![s.clone()],
        other => vec![other.to_string()],
    }
}

/// A deterministic unit-scale vector for `text`.
fn vector(text: &str, dims: usize) -> Vec<f32> {
    let mut seed: u64 = 1469598103934665603;
    for b in text.bytes() {
        seed = (seed ^ u64::from(b)).wrapping_mul(1099511628211);
    }
    (0..dims)
        .map(|i| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(i as u64 | 1);
            ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) / 10.0
        })
        .collect()
}

/// Standard base64 of `bytes` (RFC 4648 with padding), as OpenAI encodes
/// vectors: a dozen lines instead of a dependency for the mock.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `POST /v1/embeddings` (or an Azure deployment's).
pub fn embeddings(ctx: Ctx, body: &Value, deployment: Option<&str>) -> Response<MockBody> {
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .or(deployment)
        .unwrap_or("text-embedding-3-small");
    let dims = body
        .get("dimensions")
        .and_then(Value::as_u64)
        .map_or(DEFAULT_DIMENSIONS, |d| d as usize);
    let base64_format = body.get("encoding_format").and_then(Value::as_str) == Some("base64");
    let inputs = embedding_inputs(body.get("input").unwrap_or(&Value::Null));
    let mut prompt_tokens = 0u64;
    let data: Vec<String> = inputs
        .iter()
        .enumerate()
        .map(|(index, text)| {
            prompt_tokens += text.split_whitespace().count().max(1) as u64;
            let v = vector(text, dims);
            let embedding = if base64_format {
                let bytes: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
                json_str(&base64(&bytes))
            } else {
                let floats: Vec<String> = v.iter().map(|f| format!("{f}")).collect();
                format!("[{}]", floats.join(","))
            };
            format!(r#"{{"object":"embedding","index":{index},"embedding":{embedding}}}"#)
        })
        .collect();
    let out = format!(
        r#"{{"object":"list","data":[{}],"model":{},"usage":{{"prompt_tokens":{prompt_tokens},"total_tokens":{prompt_tokens}}}}}"#,
        data.join(","),
        json_str(model)
    );
    ctx.bill(Billed::input(prompt_tokens));
    with_headers(json_response(out, &ctx), &ctx, (prompt_tokens, 0))
}

fn event(json: String) -> Bytes {
    Bytes::from(format!("data: {json}\n\n"))
}

/// `POST /v1/completions`: a `text_completion` body with `n` choices, or
/// its chunks (each once per choice index) ending with `[DONE]` (a usage
/// chunk with `"choices":[]` first when asked). The usage bills
/// `max(n, best_of)` choices, as OpenAI does.
pub fn completions(ctx: Ctx, body: &Value, deployment: Option<&str>) -> Response<MockBody> {
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .or(deployment)
        .unwrap_or("davinci-002");
    let prompt = body
        .get("prompt")
        .map(|p| match p {
            Value::String(s) => s.clone(),
            other => content_text(other),
        })
        .unwrap_or_default();
    let reply = reply_to(
        &prompt,
        body.get("max_tokens").and_then(Value::as_u64),
        ctx.knobs.chunks,
        None,
    );
    let (n, billed_choices) = usage::choices(body, true).unwrap_or((1, 1));
    let id = format!("cmpl-afrmock{:016}", ctx.id_seq);
    let created = unix_now();
    let finish = match reply.finish {
        Finish::Stop => "stop",
        Finish::Length => "length",
    };
    let tokens = Tokens::new(
        &ctx.knobs,
        reply.prompt_tokens,
        reply.completion_tokens(),
        false,
    )
    .with_choices(billed_choices);
    let counts = (tokens.prompt, tokens.completion());
    let usage = (!ctx.knobs.omit_usage).then(|| tokens.plain_json());
    let model = json_str(model);
    if body.get("stream").and_then(Value::as_bool) != Some(true) {
        let text = json_str(&reply.text());
        let choices: Vec<String> = (0..n)
            .map(|i| {
                format!(
                    r#"{{"text":{text},"index":{i},"logprobs":null,"finish_reason":"{finish}"}}"#
                )
            })
            .collect();
        let usage = usage.map_or(String::new(), |u| format!(r#","usage":{u}"#));
        let out = format!(
            r#"{{"id":"{id}","object":"text_completion","created":{created},"model":{model},"choices":[{}]{usage}}}"#,
            choices.join(",")
        );
        ctx.bill(tokens.billed());
        return with_headers(json_response(out, &ctx), &ctx, counts);
    }
    let include_usage = body
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        == Some(true);
    let chunk = |text: &str, index: u64, finish: &str| {
        event(format!(
            r#"{{"id":"{id}","object":"text_completion","created":{created},"choices":[{{"text":{},"index":{index},"logprobs":null,"finish_reason":{finish}}}],"model":{model}}}"#,
            json_str(text)
        ))
    };
    let content = reply
        .pieces
        .iter()
        .flat_map(|p| (0..n).map(|i| chunk(p, i, "null")).collect::<Vec<_>>())
        .collect();
    let mut tail: Vec<Bytes> = (0..n)
        .map(|i| chunk("", i, &format!("\"{finish}\"")))
        .collect();
    if let (true, Some(usage)) = (include_usage, &usage) {
        tail.push(event(format!(
            r#"{{"id":"{id}","object":"text_completion","created":{created},"choices":[],"model":{model},"usage":{usage}}}"#
        )));
    }
    tail.push(Bytes::from_static(b"data: [DONE]\n\n"));
    let plan = StreamPlan {
        head: Vec::new(),
        content,
        tail,
        error_event: Bytes::from_static(OPENAI_STREAM_ERROR.as_bytes()),
        malformed_event: event(format!(r#"{{"id":"{id}","choices":[{{"text":"trunc"#)),
        billed: tokens.billed(),
        first_delta: 0,
    };
    with_headers(ctx.stream_response(plan), &ctx, counts)
}

/// The text of a Responses `input`: a string, or the text parts of its items.
fn responses_input(input: &Value) -> String {
    match input {
        Value::String(s) => s.clone(),
        Value::Array(items) => items
            .iter()
            .filter_map(|item| item.get("content"))
            .map(|content| match content {
                Value::Array(parts) => parts
                    .iter()
                    .filter_map(|p| p.get("text").and_then(Value::as_str))
                    .collect::<Vec<_>>()
                    .join(" "),
                other => content_text(other),
            })
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

/// The output of one Responses answer: a message, or a function call.
enum Output {
    Message {
        id: String,
        text: String,
        pieces: Vec<String>,
    },
    Call {
        id: String,
        call_id: String,
        name: String,
        /// The arguments (JSON text), and in their delta pieces.
        arguments: String,
        pieces: Vec<String>,
    },
}

impl Output {
    fn item(&self, done: bool) -> String {
        let status = if done { "completed" } else { "in_progress" };
        match self {
            Output::Message { id, text, .. } => {
                let content = if done {
                    format!(
                        r#"[{{"type":"output_text","annotations":[],"logprobs":[],"text":{}}}]"#,
                        json_str(text)
                    )
                } else {
                    "[]".to_owned()
                };
                format!(
                    r#"{{"id":"{id}","type":"message","status":"{status}","content":{content},"role":"assistant"}}"#
                )
            }
            Output::Call {
                id,
                call_id,
                name,
                arguments,
                ..
            } => {
                let arguments = if done {
                    json_str(arguments)
                } else {
                    "\"\"".to_owned()
                };
                format!(
                    r#"{{"id":"{id}","type":"function_call","status":"{status}","arguments":{arguments},"call_id":"{call_id}","name":{}}}"#,
                    json_str(name)
                )
            }
        }
    }
}

/// `POST /v1/responses`: a `response` object, or its typed event stream.
pub fn responses(ctx: Ctx, body: &Value) -> Response<MockBody> {
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("gpt-4o-mini");
    let input = responses_input(body.get("input").unwrap_or(&Value::Null));
    let reply = reply_to(
        &input,
        body.get("max_output_tokens").and_then(Value::as_u64),
        ctx.knobs.chunks,
        tools::agent_answer(body, Wire::Responses, ctx.knobs.tools),
    );
    let seq = ctx.id_seq;
    // Ids carry the instance (its process id) as a real provider's are
    // unique across its fleet, and a follow-up naming another instance's
    // response is refused as OpenAI refuses an id it never stored: tests
    // see a gateway that sends `previous_response_id` to the wrong provider.
    let instance = std::process::id();
    let id = format!("resp_afrmock{instance:08}{seq:08}");
    if let Some(previous) = body.get("previous_response_id").and_then(Value::as_str) {
        let own = format!("resp_afrmock{instance:08}");
        if previous.starts_with("resp_afrmock") && !previous.starts_with(&own) {
            ctx.finish(400);
            let message = format!("Previous response with id '{previous}' not found.");
            return crate::faults::invalid_request(
                crate::faults::Api::OpenAi,
                &message,
                Some("previous_response_id"),
                &ctx.request_id,
            );
        }
    }
    let created = unix_now();
    // `first` mode: the first function tool, called every time with the
    // recorded arguments. `agent` mode: `tools::decide`, whose pieces start
    // with an empty one, which Responses streams do not send.
    let tool = match ctx.knobs.tools {
        ToolsMode::First => body
            .get("tools")
            .and_then(Value::as_array)
            .and_then(|tools| {
                tools
                    .iter()
                    .find(|t| t.get("type").and_then(Value::as_str) == Some("function"))
            })
            .and_then(|t| t.get("name").and_then(Value::as_str))
            .map(|name| {
                (
                    name.to_owned(),
                    CALL_ARGUMENT_PIECES.concat(),
                    CALL_ARGUMENT_PIECES.map(str::to_owned).to_vec(),
                )
            }),
        ToolsMode::Agent => {
            tools::decide(body, Wire::Responses, reply.prompt_tokens, ToolsMode::Agent).map(
                |call| {
                    let pieces = call.pieces[1..].to_vec();
                    (call.name, call.arguments, pieces)
                },
            )
        }
    };
    let output = match tool {
        Some((name, arguments, pieces)) => Output::Call {
            id: format!("fc_afrmock{seq:016}"),
            call_id: format!("call_afrmock{seq:012}"),
            name,
            arguments,
            pieces,
        },
        None => Output::Message {
            id: format!("msg_afrmock{seq:016}"),
            text: reply.text(),
            pieces: reply.pieces.clone(),
        },
    };
    let output_tokens = match &output {
        Output::Message { pieces, .. } | Output::Call { pieces, .. } => pieces.len(),
    } as u64;
    let tokens = Tokens::new(&ctx.knobs, reply.prompt_tokens, output_tokens, false);
    let counts = (tokens.prompt, tokens.completion());
    // `response.completed` (and the body) carry the usage unless `omit_usage`.
    let usage = if ctx.knobs.omit_usage {
        None
    } else {
        Some(tokens.responses_json())
    };
    let previous = body
        .get("previous_response_id")
        .and_then(Value::as_str)
        .map_or("null".to_owned(), json_str);
    let instructions = body
        .get("instructions")
        .and_then(Value::as_str)
        .map_or("null".to_owned(), json_str);
    let store = body.get("store").and_then(Value::as_bool).unwrap_or(true);
    // `usage`: its JSON, or `None` to leave the member out.
    let response = |status: &str, output_json: &str, usage: Option<&str>| {
        let usage = usage.map_or(String::new(), |u| format!(r#""usage":{u},"#));
        format!(
            r#"{{"id":"{id}","object":"response","created_at":{created},"status":"{status}","background":false,"error":null,"incomplete_details":null,"instructions":{instructions},"max_output_tokens":null,"max_tool_calls":null,"model":{},"output":[{output_json}],"parallel_tool_calls":true,"previous_response_id":{previous},"prompt_cache_key":null,"reasoning":{{"effort":null,"summary":null}},"safety_identifier":null,"service_tier":"default","store":{store},"temperature":1.0,"text":{{"format":{{"type":"text"}},"verbosity":"medium"}},"tool_choice":"auto","tools":[],"top_logprobs":0,"top_p":1.0,"truncation":"disabled",{usage}"user":null,"metadata":{{}}}}"#,
            json_str(model)
        )
    };
    if body.get("stream").and_then(Value::as_bool) != Some(true) {
        let out = response("completed", &output.item(true), usage.as_deref());
        ctx.bill(tokens.billed());
        return with_headers(json_response(out, &ctx), &ctx, counts);
    }
    let mut n = 0u64;
    let mut typed = |kind: &str, rest: String| {
        let e = format!(
            "event: {kind}\ndata: {{\"type\":\"{kind}\",\"sequence_number\":{n}{rest}}}\n\n"
        );
        n += 1;
        Bytes::from(e)
    };
    let head = vec![
        typed(
            "response.created",
            format!(
                r#","response":{}"#,
                response("in_progress", "", Some("null"))
            ),
        ),
        typed(
            "response.in_progress",
            format!(
                r#","response":{}"#,
                response("in_progress", "", Some("null"))
            ),
        ),
    ];
    let mut content = vec![typed(
        "response.output_item.added",
        format!(r#","output_index":0,"item":{}"#, output.item(false)),
    )];
    let mut tail = Vec::new();
    match &output {
        Output::Message {
            id: item,
            text,
            pieces,
        } => {
            content.push(typed(
                "response.content_part.added",
                format!(r#","item_id":"{item}","output_index":0,"content_index":0,"part":{{"type":"output_text","annotations":[],"logprobs":[],"text":""}}"#),
            ));
            for piece in pieces {
                content.push(typed(
                    "response.output_text.delta",
                    format!(r#","item_id":"{item}","output_index":0,"content_index":0,"delta":{},"logprobs":[],"obfuscation":"afrmock""#, json_str(piece)),
                ));
            }
            tail.push(typed(
                "response.output_text.done",
                format!(r#","item_id":"{item}","output_index":0,"content_index":0,"text":{},"logprobs":[]"#, json_str(text)),
            ));
            tail.push(typed(
                "response.content_part.done",
                format!(r#","item_id":"{item}","output_index":0,"content_index":0,"part":{{"type":"output_text","annotations":[],"logprobs":[],"text":{}}}"#, json_str(text)),
            ));
        }
        Output::Call {
            id: item,
            arguments,
            pieces,
            ..
        } => {
            for piece in pieces {
                content.push(typed(
                    "response.function_call_arguments.delta",
                    format!(r#","item_id":"{item}","output_index":0,"delta":{},"obfuscation":"afrmock""#, json_str(piece)),
                ));
            }
            tail.push(typed(
                "response.function_call_arguments.done",
                format!(
                    r#","item_id":"{item}","output_index":0,"arguments":{}"#,
                    json_str(arguments)
                ),
            ));
        }
    }
    // The item (and content part) events before the deltas bill nothing:
    // one delta event per output token.
    let first_delta = content.len() - output_tokens as usize;
    tail.push(typed(
        "response.output_item.done",
        format!(r#","output_index":0,"item":{}"#, output.item(true)),
    ));
    tail.push(typed(
        "response.completed",
        format!(
            r#","response":{}"#,
            response("completed", &output.item(true), usage.as_deref())
        ),
    ));
    let plan = StreamPlan {
        head,
        content,
        tail,
        // The recorded mid-stream error (openai-responses-stream-error.sse).
        error_event: Bytes::from_static(
            b"event: error\ndata: {\"type\":\"error\",\"sequence_number\":2,\"error\":{\"type\":\"server_error\",\"code\":\"server_error\",\"message\":\"The server had an error while processing your request. Sorry about that!\",\"param\":null}}\n\n",
        ),
        malformed_event: Bytes::from_static(
            b"event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"trunc",
        ),
        billed: tokens.billed(),
        first_delta,
    };
    with_headers(ctx.stream_response(plan), &ctx, counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        for (input, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), encoded);
        }
    }

    #[test]
    fn vectors_are_deterministic_and_sized() {
        assert_eq!(vector("a", 8), vector("a", 8));
        assert_ne!(vector("a", 8), vector("b", 8));
        assert_eq!(vector("a", 256).len(), 256);
    }
}
