//! Tool calls, deterministic like the text replies.
//!
//! A request that offers tools (and does not forbid them with a `none` tool
//! choice) and whose last turn is the user's own words — not a tool's answer
//! — gets a call of its first tool instead of text, as a model asked "what is
//! the weather" would. The arguments fill every string property of the
//! tool's schema with the last user text (`{}` when it has none). Streams send
//! the arguments as an empty first piece then pieces of at most 8 characters,
//! split anywhere, as in the recorded `anthropic-messages-stream-tool-use.sse`.
//! `completion_tokens` = the number of pieces.

use bytes::Bytes;
use serde_json::{json, Map, Value};

use crate::reply::content_text;
use crate::stream::StreamPlan;
use crate::usage::{Billed, Tokens};

/// The call the mock answers with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    /// The tool's name.
    pub name: String,
    /// The arguments as JSON text.
    pub arguments: String,
    /// The arguments in stream pieces (the first is empty).
    pub pieces: Vec<String>,
    /// Prompt tokens, by the text formula.
    pub prompt_tokens: u64,
}

impl ToolCall {
    /// Completion tokens: one per piece.
    pub fn completion_tokens(&self) -> u64 {
        self.pieces.len() as u64
    }
}

/// The call for `body`, if it asks for one. `anthropic`: a Messages body
/// (tools carry `input_schema`, tool answers are `tool_result` blocks).
pub fn decide(body: &Value, anthropic: bool, prompt_tokens: u64) -> Option<ToolCall> {
    let tool = body.get("tools")?.as_array()?.first()?;
    let choice = body.get("tool_choice");
    let forbidden = if anthropic {
        choice.and_then(|c| c.get("type")).and_then(Value::as_str) == Some("none")
    } else {
        choice.and_then(Value::as_str) == Some("none")
    };
    if forbidden {
        return None;
    }
    let messages = body.get("messages")?.as_array()?;
    let last = messages.last()?;
    let answered = if anthropic {
        last.get("content")
            .and_then(Value::as_array)
            .is_some_and(|blocks| {
                blocks
                    .iter()
                    .any(|b| b.get("type").and_then(Value::as_str) == Some("tool_result"))
            })
    } else {
        // The tool's answer, maybe followed by the user's words, since the
        // assistant turn that called it.
        messages
            .iter()
            .rev()
            .take_while(|m| m.get("role").and_then(Value::as_str) != Some("assistant"))
            .any(|m| m.get("role").and_then(Value::as_str) == Some("tool"))
    };
    if answered || last.get("role").and_then(Value::as_str) != Some("user") {
        return None;
    }
    let (name, schema) = if anthropic {
        (tool.get("name"), tool.get("input_schema"))
    } else {
        let f = tool.get("function");
        (
            f.and_then(|f| f.get("name")),
            f.and_then(|f| f.get("parameters")),
        )
    };
    let text = last.get("content").map(content_text).unwrap_or_default();
    let mut args = Map::new();
    if let Some(props) = schema
        .and_then(|s| s.get("properties"))
        .and_then(Value::as_object)
    {
        for (key, prop) in props {
            if prop.get("type").and_then(Value::as_str) == Some("string") {
                args.insert(key.clone(), Value::String(text.clone()));
            }
        }
    }
    let arguments = Value::Object(args).to_string();
    let chars: Vec<char> = arguments.chars().collect();
    let mut pieces = vec![String::new()];
    pieces.extend(chars.chunks(8).map(|c| c.iter().collect::<String>()));
    Some(ToolCall {
        name: name.and_then(Value::as_str).unwrap_or("tool").to_owned(),
        arguments,
        pieces,
        prompt_tokens,
    })
}

/// How an OpenAI tool-call answer is framed.
pub struct OpenAiCall<'a> {
    /// The completion id.
    pub id: &'a str,
    /// Its `created` time.
    pub created: u64,
    /// The model named.
    pub model: &'a str,
    /// Per-instance sequence number, for the call id.
    pub seq: u64,
    /// Choices (`n`), each the same call.
    pub n: u64,
    /// The `usage` object, `None` with `omit_usage`.
    pub usage: Option<Value>,
}

fn sse(json: &Value) -> Bytes {
    Bytes::from(format!("data: {json}\n\n"))
}

fn anthropic_event(name: &str, json: &Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {json}\n\n"))
}

/// A `chat.completion` whose message (in each of the `n` choices) calls the tool.
pub fn openai_body(call: &ToolCall, m: &OpenAiCall) -> String {
    let choices: Vec<Value> = (0..m.n)
        .map(|i| {
            json!({"index": i, "message": {"role": "assistant", "content": null, "tool_calls": [
                {"id": format!("call_afrmock{:016}", m.seq), "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
            ], "refusal": null}, "logprobs": null, "finish_reason": "tool_calls"})
        })
        .collect();
    let mut v = json!({
        "id": m.id, "object": "chat.completion", "created": m.created, "model": m.model,
        "choices": choices,
    });
    if let Some(usage) = &m.usage {
        v["usage"] = usage.clone();
    }
    v.to_string()
}

/// A `chat.completion.chunk` stream that calls the tool (each chunk once per
/// choice index).
pub fn openai_plan(
    call: &ToolCall,
    m: &OpenAiCall,
    include_usage: bool,
    billed: Billed,
    error_event: Bytes,
) -> StreamPlan {
    let chunk = |choices: Value| {
        let mut c = json!({"id": m.id, "object": "chat.completion.chunk", "created": m.created, "model": m.model, "choices": choices});
        if include_usage {
            c["usage"] = Value::Null;
        }
        sse(&c)
    };
    let head = (0..m.n)
        .map(|i| {
            chunk(
                json!([{"index": i, "delta": {"role": "assistant", "content": null}, "logprobs": null, "finish_reason": null}]),
            )
        })
        .collect();
    let content = call
        .pieces
        .iter()
        .enumerate()
        .flat_map(|(p, piece)| {
            let tc = if p == 0 {
                json!({"index": 0, "id": format!("call_afrmock{:016}", m.seq), "type": "function", "function": {"name": call.name, "arguments": piece}})
            } else {
                json!({"index": 0, "function": {"arguments": piece}})
            };
            (0..m.n)
                .map(|i| chunk(json!([{"index": i, "delta": {"tool_calls": [tc]}, "logprobs": null, "finish_reason": null}])))
                .collect::<Vec<_>>()
        })
        .collect();
    let mut tail: Vec<Bytes> = (0..m.n)
        .map(|i| {
            chunk(
                json!([{"index": i, "delta": {}, "logprobs": null, "finish_reason": "tool_calls"}]),
            )
        })
        .collect();
    if let (true, Some(usage)) = (include_usage, &m.usage) {
        tail.push(sse(&json!({"id": m.id, "object": "chat.completion.chunk", "created": m.created, "model": m.model, "choices": [], "usage": usage})));
    }
    tail.push(Bytes::from_static(b"data: [DONE]\n\n"));
    StreamPlan {
        head,
        content,
        tail,
        error_event,
        malformed_event: Bytes::from_static(
            b"data: {\"id\":\"x\",\"choices\":[{\"delta\":{\"tool_calls\n\n",
        ),
        billed,
        first_delta: 0,
    }
}

fn tool_use_id(seq: u64) -> String {
    format!("toolu_afrmock{seq:016}")
}

/// A Messages response whose content is the tool call (no `usage` with
/// `omit_usage`).
pub fn anthropic_body(
    call: &ToolCall,
    id: &str,
    model: &str,
    seq: u64,
    tokens: &Tokens,
    omit_usage: bool,
) -> String {
    let input: Value = serde_json::from_str(&call.arguments).unwrap_or_else(|_| json!({}));
    let mut v = json!({
        "model": model, "id": id, "type": "message", "role": "assistant",
        "content": [{"type": "tool_use", "id": tool_use_id(seq), "name": call.name, "input": input}],
        "stop_reason": "tool_use", "stop_sequence": null,
    });
    if !omit_usage {
        v["usage"] = tokens.anthropic_value(tokens.completion());
    }
    v.to_string()
}

/// A Messages stream that calls the tool, in the recorded sequence
/// (`message_delta` without `usage` with `omit_usage`).
pub fn anthropic_plan(
    call: &ToolCall,
    id: &str,
    model: &str,
    seq: u64,
    tokens: &Tokens,
    omit_usage: bool,
    error_event: Bytes,
) -> StreamPlan {
    let head = vec![
        anthropic_event(
            "message_start",
            &json!({"type": "message_start", "message": {"model": model, "id": id, "type": "message", "role": "assistant", "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": tokens.anthropic_value(1)}}),
        ),
        anthropic_event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": tool_use_id(seq), "name": call.name, "input": {}}}),
        ),
        Bytes::from_static(b"event: ping\ndata: {\"type\": \"ping\"}\n\n"),
    ];
    let content = call
        .pieces
        .iter()
        .map(|piece| {
            anthropic_event(
                "content_block_delta",
                &json!({"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": piece}}),
            )
        })
        .collect();
    let mut delta = json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null}});
    if !omit_usage {
        delta["usage"] = tokens.anthropic_value(tokens.completion());
    }
    let tail = vec![
        anthropic_event(
            "content_block_stop",
            &json!({"type": "content_block_stop", "index": 0}),
        ),
        anthropic_event("message_delta", &delta),
        anthropic_event("message_stop", &json!({"type": "message_stop"})),
    ];
    StreamPlan {
        head,
        content,
        tail,
        error_event,
        malformed_event: Bytes::from_static(
            b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"input_json\n\n",
        ),
        billed: tokens.billed(),
        first_delta: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offered_tools_are_called_until_answered() {
        let tools = json!([{"name": "get_weather", "input_schema": {"type": "object", "properties": {"location": {"type": "string"}, "days": {"type": "integer"}}}}]);
        let ask =
            json!({"tools": tools, "messages": [{"role": "user", "content": "San Francisco, CA"}]});
        let call = decide(&ask, true, 3).unwrap();
        assert_eq!(call.name, "get_weather");
        assert_eq!(call.arguments, r#"{"location":"San Francisco, CA"}"#);
        assert_eq!(call.pieces[0], "");
        assert_eq!(call.pieces.concat(), call.arguments);
        let answered = json!({"tools": tools, "messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "68F"}]}]});
        assert!(decide(&answered, true, 3).is_none());
        let none = json!({"tools": tools, "tool_choice": {"type": "none"}, "messages": [{"role": "user", "content": "x"}]});
        assert!(decide(&none, true, 3).is_none());
        let openai = json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"properties": {"q": {"type": "string"}}}}}],
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": null}, {"role": "tool", "content": "r"}]});
        assert!(decide(&openai, false, 3).is_none());
        let mut then_user = openai.clone();
        then_user["messages"]
            .as_array_mut()
            .unwrap()
            .push(json!({"role": "user", "content": "thanks"}));
        assert!(decide(&then_user, false, 3).is_none());
        assert!(decide(
            &json!({"messages": [{"role": "user", "content": "x"}]}),
            false,
            3
        )
        .is_none());
    }
}
