//! Anthropic Messages API: `POST /v1/messages` bodies and streams shaped like
//! the recorded fixtures (`anthropic-messages-response.json`,
//! `anthropic-messages-stream.sse`), including the real quirks a parser must
//! survive: an `event:` line on every event, a `ping`, JSON objects padded with
//! spaces before their final `}`, and `message_delta.usage` repeating
//! `input_tokens` next to the cumulative `output_tokens`.

use bytes::Bytes;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::Response;
use serde_json::Value;

use crate::conn::MockBody;
use crate::faults::ANTHROPIC_STREAM_ERROR;
use crate::reply::{self, Finish, Reply};
use crate::server::Ctx;
use crate::stream::StreamPlan;
use crate::tools::{self, Wire};
use crate::usage::{Billed, Tokens};

/// Checks a `count_tokens` body: a Messages body without `max_tokens`.
pub fn validate_count(body: &Value) -> Result<(), (&'static str, &'static str)> {
    if !body.get("model").is_some_and(Value::is_string) {
        return Err(("model: Field required", "model"));
    }
    if body.get("max_tokens").is_some() {
        return Err(("max_tokens: Extra inputs are not permitted", "max_tokens"));
    }
    check_messages(body)
}

/// Answers `count_tokens` with the reply formula's prompt tokens, in the
/// recorded shape (`anthropic-count-tokens-response.json`).
pub fn count_tokens(ctx: Ctx, body: &Value) -> Response<MockBody> {
    let reply = reply::build(body, body.get("system"), None);
    // Counting tokens is free.
    ctx.bill(Billed::default());
    ctx.finish(200);
    let mut resp = Response::new(MockBody::full(format!(
        r#"{{"input_tokens":{}}}"#,
        reply.prompt_tokens
    )));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// Checks what the real API rejects and a translator could get wrong; the
/// error names the offending field.
pub fn validate(body: &Value) -> Result<(), (&'static str, &'static str)> {
    if !body.get("model").is_some_and(Value::is_string) {
        return Err(("model: Field required", "model"));
    }
    match body.get("max_tokens").and_then(Value::as_u64) {
        Some(n) if n >= 1 => {}
        Some(_) => {
            return Err((
                "max_tokens: must be greater than or equal to 1",
                "max_tokens",
            ))
        }
        None => return Err(("max_tokens: Field required", "max_tokens")),
    }
    check_messages(body)
}

fn check_messages(body: &Value) -> Result<(), (&'static str, &'static str)> {
    let Some(messages) = body.get("messages").and_then(Value::as_array) else {
        return Err(("messages: Field required", "messages"));
    };
    for m in messages {
        // A `system` message inside `messages` applies from where it stands
        // (Claude Code's first request of a session carries one).
        match m.get("role").and_then(Value::as_str) {
            Some("user" | "assistant" | "system") => {}
            _ => return Err(("messages: Input tag found using 'role' does not match any of the expected tags: 'user', 'assistant', 'system'", "messages")),
        }
    }
    Ok(())
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned())
}

fn stop_reason(r: &Reply) -> &'static str {
    match r.finish {
        Finish::Stop => "end_turn",
        Finish::Length => "max_tokens",
    }
}

/// Answers a Messages request (already authorized and past fault injection).
pub fn respond(ctx: Ctx, body: &Value) -> Response<MockBody> {
    let mode = ctx.knobs.tools;
    let answer = tools::agent_answer(body, Wire::Messages, mode);
    let reply = reply::build_with(body, body.get("system"), ctx.knobs.chunks, answer);
    let model = json_str(
        body.get("model")
            .and_then(Value::as_str)
            .unwrap_or("claude-haiku-4-5"),
    );
    let id = format!("msg_afrmock{:016}", ctx.id_seq);
    let p = reply.prompt_tokens;
    let stream = body.get("stream").and_then(Value::as_bool) == Some(true);
    let tool = tools::decide(body, Wire::Messages, p, mode);
    let per_choice = tool.as_ref().map_or(
        reply.completion_tokens(),
        tools::ToolCall::completion_tokens,
    );
    let tokens = Tokens::new(&ctx.knobs, p, per_choice, true);
    let omit_usage = ctx.knobs.omit_usage;
    let bare_model = serde_json::from_str::<String>(&model).unwrap_or_default();
    let error_event = Bytes::from_static(ANTHROPIC_STREAM_ERROR.as_bytes());
    let mut resp = if let (Some(call), true) = (&tool, stream) {
        ctx.stream_response(tools::anthropic_plan(
            call,
            &id,
            &bare_model,
            ctx.id_seq,
            &tokens,
            omit_usage,
            error_event,
        ))
    } else if let Some(call) = &tool {
        ctx.bill(tokens.billed());
        ctx.finish(200);
        let mut resp = Response::new(MockBody::full(tools::anthropic_body(
            call,
            &id,
            &bare_model,
            ctx.id_seq,
            &tokens,
            omit_usage,
        )));
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        resp
    } else if stream {
        let plan = stream_plan(&reply, &id, &model, &tokens, omit_usage);
        ctx.stream_response(plan)
    } else {
        let usage = if omit_usage {
            String::new()
        } else {
            format!(r#","usage":{}"#, tokens.anthropic_json(tokens.completion()))
        };
        let out = format!(
            r#"{{"model":{model},"id":"{id}","type":"message","role":"assistant","content":[{{"type":"text","text":{}}}],"stop_reason":"{}","stop_sequence":null{usage}}}"#,
            json_str(&reply.text()),
            stop_reason(&reply),
        );
        ctx.bill(tokens.billed());
        ctx.finish(200);
        let mut resp = Response::new(MockBody::full(out));
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        resp
    };
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&ctx.request_id) {
        h.insert("request-id", v);
    }
    h.insert("x-mock-prompt-tokens", p.into());
    h.insert("x-mock-completion-tokens", tokens.completion().into());
    resp
}

/// One event, with Anthropic's space padding before the data's final `}`.
fn event(name: &str, json: &str, pad: usize) -> Bytes {
    let (body, last) = json.split_at(json.len().saturating_sub(1));
    Bytes::from(format!("event: {name}\ndata: {body}{:pad$}{last}\n\n", ""))
}

/// The recorded sequence. `message_start` always carries the usage (input
/// and cache tokens, `output_tokens: 1`); `message_delta` repeats it with
/// the final `output_tokens`, unless `omit_usage`.
fn stream_plan(
    reply: &Reply,
    id: &str,
    model: &str,
    tokens: &Tokens,
    omit_usage: bool,
) -> StreamPlan {
    let head = vec![
        event(
            "message_start",
            &format!(
                r#"{{"type":"message_start","message":{{"model":{model},"id":"{id}","type":"message","role":"assistant","content":[],"stop_reason":null,"stop_sequence":null,"usage":{}}}}}"#,
                tokens.anthropic_json(1)
            ),
            3,
        ),
        event(
            "content_block_start",
            r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
            11,
        ),
        Bytes::from_static(b"event: ping\ndata: {\"type\": \"ping\"}\n\n"),
    ];
    let content = reply
        .pieces
        .iter()
        .enumerate()
        .map(|(i, piece)| {
            event(
                "content_block_delta",
                &format!(
                    r#"{{"type":"content_block_delta","index":0,"delta":{{"type":"text_delta","text":{}}}}}"#,
                    json_str(piece)
                ),
                1 + i % 9,
            )
        })
        .collect();
    let usage = if omit_usage {
        String::new()
    } else {
        format!(r#","usage":{}"#, tokens.anthropic_delta_json())
    };
    let tail = vec![
        event(
            "content_block_stop",
            r#"{"type":"content_block_stop","index":0}"#,
            6,
        ),
        event(
            "message_delta",
            &format!(
                r#"{{"type":"message_delta","delta":{{"stop_reason":"{}","stop_sequence":null}}{usage}}}"#,
                stop_reason(reply)
            ),
            7,
        ),
        event("message_stop", r#"{"type":"message_stop"}"#, 15),
    ];
    StreamPlan {
        head,
        content,
        tail,
        error_event: Bytes::from_static(ANTHROPIC_STREAM_ERROR.as_bytes()),
        malformed_event: Bytes::from_static(
            b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"trunc\n\n",
        ),
        billed: tokens.billed(),
        first_delta: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn stream_has_fixture_sequence_and_padding() {
        let body =
            json!({"system":"Be brief.","messages":[{"role":"user","content":"It is 20°C"}]});
        let r = reply::build(&body, body.get("system"), None);
        let t = Tokens::new(
            &crate::knobs::Knobs::default(),
            r.prompt_tokens,
            r.completion_tokens(),
            true,
        );
        let plan = stream_plan(&r, "msg_x", "\"claude-haiku-4-5\"", &t, false);
        let all: Vec<&Bytes> = plan
            .head
            .iter()
            .chain(&plan.content)
            .chain(&plan.tail)
            .collect();
        let names: Vec<&str> = all
            .iter()
            .map(|b| {
                let s = std::str::from_utf8(b).unwrap();
                s.lines().next().unwrap().strip_prefix("event: ").unwrap()
            })
            .collect();
        assert_eq!(names[..3], ["message_start", "content_block_start", "ping"]);
        assert_eq!(
            names[names.len() - 3..],
            ["content_block_stop", "message_delta", "message_stop"]
        );
        assert_eq!(names.len(), 3 + 6 + 3);
        let s = std::str::from_utf8(all[1]).unwrap();
        assert!(s.contains("\"\"}           }\n\n"), "{s}");
        let md = std::str::from_utf8(all[all.len() - 2]).unwrap();
        let data: Value =
            serde_json::from_str(md.lines().nth(1).unwrap().strip_prefix("data: ").unwrap())
                .unwrap();
        assert_eq!(data["usage"]["output_tokens"], 6);
        assert_eq!(data["usage"]["input_tokens"], 3 + 4);
    }

    #[test]
    fn validation_names_the_field() {
        let ok = json!({"model":"m","max_tokens":5,"messages":[{"role":"user","content":"x"}]});
        assert!(validate(&ok).is_ok());
        let mut bad = ok.clone();
        bad.as_object_mut().unwrap().remove("max_tokens");
        assert_eq!(validate(&bad).unwrap_err().1, "max_tokens");
        let mid = json!({"model":"m","max_tokens":5,"messages":[{"role":"user","content":"x"},{"role":"system","content":"y"}]});
        assert!(validate(&mid).is_ok(), "a system message inside messages");
        let bad =
            json!({"model":"m","max_tokens":5,"messages":[{"role":"narrator","content":"x"}]});
        assert_eq!(validate(&bad).unwrap_err().1, "messages");
    }
}
