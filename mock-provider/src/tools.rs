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
//!
//! That is the default, knob `tools = "first"`. With `tools = "agent"` the
//! mock behaves like a model driving a coding agent: while the last turn is
//! the user's, it calls one tool, the shell-like one if offered ([`pick`]),
//! with arguments made from that tool's schema ([`crate::schema_args`]),
//! so Claude Code, Codex or a chat-completions agent can run it; once the
//! tool's result is sent back it answers with text quoting the result
//! ([`agent_answer`]). This holds on chat, Messages and Responses.

use bytes::Bytes;
use serde_json::{json, Map, Value};

use crate::knobs::ToolsMode;
use crate::reply::content_text;
use crate::schema_args;
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
    /// A call of `name` with `arguments` (JSON text), cut into an empty
    /// first piece then pieces of at most 8 characters.
    fn new(name: &str, arguments: String, prompt_tokens: u64) -> ToolCall {
        let chars: Vec<char> = arguments.chars().collect();
        let mut pieces = vec![String::new()];
        pieces.extend(chars.chunks(8).map(|c| c.iter().collect::<String>()));
        ToolCall {
            name: name.to_owned(),
            arguments,
            pieces,
            prompt_tokens,
        }
    }

    /// Completion tokens: one per piece.
    pub fn completion_tokens(&self) -> u64 {
        self.pieces.len() as u64
    }
}

/// The wire a request came on: where its tools, tool choice and tool
/// results are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wire {
    /// Chat completions: `tools[].function.{name,parameters}`, `tool`
    /// messages.
    Chat,
    /// Anthropic Messages: `tools[].{name,input_schema}`, `tool_result`
    /// blocks.
    Messages,
    /// Responses: `tools[].{name,parameters}` of type `function`,
    /// `function_call_output` input items.
    Responses,
}

/// The call for `body`, if it asks for one, by the `tools` knob.
///
/// Responses in `first` mode get `None`: their call is the recorded one,
/// built with the answer (`endpoints.rs`).
pub fn decide(body: &Value, wire: Wire, prompt_tokens: u64, mode: ToolsMode) -> Option<ToolCall> {
    match (mode, wire) {
        (ToolsMode::Agent, _) => agent_call(body, wire, prompt_tokens),
        (ToolsMode::First, Wire::Responses) => None,
        (ToolsMode::First, _) => first_call(body, wire == Wire::Messages, prompt_tokens),
    }
}

/// `first` mode: a call of the first tool, every string property of its
/// schema set to the last user text, unless a tool answered since the last
/// assistant turn.
fn first_call(body: &Value, anthropic: bool, prompt_tokens: u64) -> Option<ToolCall> {
    let tool = body.get("tools")?.as_array()?.first()?;
    let wire = if anthropic {
        Wire::Messages
    } else {
        Wire::Chat
    };
    if forbidden(body, wire) {
        return None;
    }
    let messages = body.get("messages")?.as_array()?;
    let last = messages.last()?;
    if tool_results(body, wire).is_some() || !last_is_user(body, wire) {
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
    Some(ToolCall::new(
        name.and_then(Value::as_str).unwrap_or("tool"),
        Value::Object(args).to_string(),
        prompt_tokens,
    ))
}

/// `agent` mode: unless a tool answered since the last assistant turn (or
/// the tool choice is `none`), a call of the shell-like tool (see
/// [`pick`]) with arguments valid against its schema.
fn agent_call(body: &Value, wire: Wire, prompt_tokens: u64) -> Option<ToolCall> {
    if forbidden(body, wire) || tool_results(body, wire).is_some() || !last_is_user(body, wire) {
        return None;
    }
    let tools = function_tools(body, wire);
    let (name, schema) = pick(&tools, forced(body, wire))?;
    let arguments = schema_args::generate(schema).to_string();
    Some(ToolCall::new(name, arguments, prompt_tokens))
}

/// `agent` mode, when the last turn is a tool's answer: the text reply
/// quoting it, `The command printed: <its first 200 characters>`.
pub fn agent_answer(body: &Value, wire: Wire, mode: ToolsMode) -> Option<String> {
    if mode != ToolsMode::Agent {
        return None;
    }
    let output = tool_results(body, wire)?.join("\n");
    let output: String = output.chars().take(200).collect();
    Some(if output.trim().is_empty() {
        "The command printed nothing.".to_owned()
    } else {
        format!("The command printed: {output}")
    })
}

/// The tool to call: the one `tool_choice` names; else the first whose name
/// says it runs commands (`shell`, `bash`, `exec`, `command`) and whose
/// schema has a command property (so Claude Code's `Bash`, not its
/// `KillShell` or `BashOutput`; Codex's `exec_command`, not `write_stdin`);
/// else the first whose name says so; else the first.
fn pick<'a>(
    tools: &[(&'a str, Option<&'a Value>)],
    forced: Option<&str>,
) -> Option<(&'a str, Option<&'a Value>)> {
    if let Some(f) = forced {
        if let Some(t) = tools.iter().find(|(n, _)| *n == f) {
            return Some(*t);
        }
    }
    let shell_name = |n: &str| {
        let n = n.to_ascii_lowercase();
        ["shell", "bash", "exec", "command"]
            .iter()
            .any(|w| n.contains(w))
    };
    let has_command = |s: Option<&Value>| {
        s.and_then(|s| s.get("properties"))
            .and_then(Value::as_object)
            .is_some_and(|p| p.keys().any(|k| schema_args::is_command(k)))
    };
    tools
        .iter()
        .find(|(n, s)| shell_name(n) && has_command(*s))
        .or_else(|| tools.iter().find(|(n, _)| shell_name(n)))
        .or_else(|| tools.first())
        .copied()
}

/// The function tools offered, as (name, schema). Anthropic's server and
/// built-in tools (no `input_schema`) and OpenAI's non-function tools
/// (`custom`, `web_search`, `local_shell`, …) are left out.
fn function_tools(body: &Value, wire: Wire) -> Vec<(&str, Option<&Value>)> {
    let tools = body.get("tools").and_then(Value::as_array);
    tools
        .into_iter()
        .flatten()
        .filter_map(|t| {
            let kind = t.get("type").and_then(Value::as_str);
            let (f, schema_key) = match wire {
                Wire::Chat if kind.is_none_or(|k| k == "function") => {
                    (t.get("function")?, "parameters")
                }
                Wire::Responses if kind == Some("function") => (t, "parameters"),
                Wire::Messages if t.get("input_schema").is_some() => (t, "input_schema"),
                _ => return None,
            };
            Some((f.get("name")?.as_str()?, f.get(schema_key)))
        })
        .collect()
}

/// Whether the tool choice is `none`.
fn forbidden(body: &Value, wire: Wire) -> bool {
    let choice = body.get("tool_choice");
    match wire {
        Wire::Messages => {
            choice.and_then(|c| c.get("type")).and_then(Value::as_str) == Some("none")
        }
        _ => choice.and_then(Value::as_str) == Some("none"),
    }
}

/// The tool `tool_choice` names, if it names one.
fn forced(body: &Value, wire: Wire) -> Option<&str> {
    let choice = body.get("tool_choice")?;
    let name = match wire {
        Wire::Chat => choice.pointer("/function/name"),
        Wire::Responses | Wire::Messages => choice.get("name"),
    };
    name.and_then(Value::as_str)
}

/// Whether the conversation ends with the user's turn (a Responses `input`
/// string is one).
fn last_is_user(body: &Value, wire: Wire) -> bool {
    let last = match wire {
        Wire::Responses => match body.get("input") {
            Some(Value::String(_)) => return true,
            Some(Value::Array(items)) => last_turn(items),
            _ => None,
        },
        _ => body
            .get("messages")
            .and_then(Value::as_array)
            .and_then(|m| last_turn(m)),
    };
    last.and_then(|m| m.get("role")).and_then(Value::as_str) == Some("user")
}

/// The last message that is a turn of the conversation: instructions
/// (`system`, `developer`) placed after it do not end it — Claude Code puts
/// a system message after the user's first turn.
fn last_turn(messages: &[Value]) -> Option<&Value> {
    messages.iter().rev().find(|m| {
        !matches!(
            m.get("role").and_then(Value::as_str),
            Some("system" | "developer")
        )
    })
}

/// The texts of the tool results sent since the last assistant turn, or
/// `None` if there are none: `tool` messages (chat; maybe followed by the
/// user's words), `tool_result` blocks of the last message (Messages),
/// `function_call_output` items after the last `function_call` or
/// assistant message (Responses).
fn tool_results(body: &Value, wire: Wire) -> Option<Vec<String>> {
    let role = |m: &Value| m.get("role").and_then(Value::as_str).map(str::to_owned);
    let kind = |m: &Value| m.get("type").and_then(Value::as_str).map(str::to_owned);
    let texts: Vec<String> = match wire {
        Wire::Chat => {
            let messages = body.get("messages")?.as_array()?;
            let mut t: Vec<String> = messages
                .iter()
                .rev()
                .take_while(|m| role(m).as_deref() != Some("assistant"))
                .filter(|m| matches!(role(m).as_deref(), Some("tool" | "function")))
                .map(|m| m.get("content").map(content_text).unwrap_or_default())
                .collect();
            t.reverse();
            t
        }
        Wire::Messages => {
            let last = last_turn(body.get("messages")?.as_array()?)?;
            last.get("content")?
                .as_array()?
                .iter()
                .filter(|b| kind(b).as_deref() == Some("tool_result"))
                .map(|b| b.get("content").map(content_text).unwrap_or_default())
                .collect()
        }
        Wire::Responses => {
            let items = body.get("input")?.as_array()?;
            let mut t: Vec<String> = items
                .iter()
                .rev()
                .take_while(|i| {
                    kind(i).as_deref() != Some("function_call")
                        && role(i).as_deref() != Some("assistant")
                })
                .filter(|i| kind(i).as_deref() == Some("function_call_output"))
                .map(|i| match i.get("output") {
                    Some(Value::String(s)) => s.clone(),
                    // An array of `input_text` (and other) parts.
                    Some(Value::Array(parts)) => parts
                        .iter()
                        .filter_map(|p| p.get("text").and_then(Value::as_str))
                        .collect::<Vec<_>>()
                        .join(" "),
                    _ => String::new(),
                })
                .collect();
            t.reverse();
            t
        }
    };
    (!texts.is_empty()).then_some(texts)
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
        let call = decide(&ask, Wire::Messages, 3, ToolsMode::First).unwrap();
        assert_eq!(call.name, "get_weather");
        assert_eq!(call.arguments, r#"{"location":"San Francisco, CA"}"#);
        assert_eq!(call.pieces[0], "");
        assert_eq!(call.pieces.concat(), call.arguments);
        let answered = json!({"tools": tools, "messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "68F"}]}]});
        assert!(decide(&answered, Wire::Messages, 3, ToolsMode::First).is_none());
        let none = json!({"tools": tools, "tool_choice": {"type": "none"}, "messages": [{"role": "user", "content": "x"}]});
        assert!(decide(&none, Wire::Messages, 3, ToolsMode::First).is_none());
        let openai = json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"properties": {"q": {"type": "string"}}}}}],
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": null}, {"role": "tool", "content": "r"}]});
        assert!(decide(&openai, Wire::Chat, 3, ToolsMode::First).is_none());
        let mut then_user = openai.clone();
        then_user["messages"]
            .as_array_mut()
            .unwrap()
            .push(json!({"role": "user", "content": "thanks"}));
        assert!(decide(&then_user, Wire::Chat, 3, ToolsMode::First).is_none());
        assert!(decide(
            &json!({"messages": [{"role": "user", "content": "x"}]}),
            Wire::Chat,
            3,
            ToolsMode::First
        )
        .is_none());
    }

    /// Claude Code's first request ends with a system message after the
    /// user's turn (and its answer turn with a system message before the
    /// tool result): the user's turn and the tool result still decide.
    #[test]
    fn a_system_message_after_the_last_turn_does_not_end_it() {
        let tools = json!([{"name": "Bash", "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}}]);
        let first = json!({"tools": tools, "messages": [
            {"role": "user", "content": "run it"},
            {"role": "system", "content": [{"type": "text", "text": "# Environment"}]},
        ]});
        let call = decide(&first, Wire::Messages, 3, ToolsMode::Agent).expect("a call");
        assert_eq!(call.arguments, r#"{"command":"echo afr-mock"}"#);
        let chat = json!({"tools": [{"type": "function", "function": {"name": "Bash", "parameters": tools[0]["input_schema"]}}],
            "messages": [{"role": "user", "content": "run it"}, {"role": "system", "content": "# Environment"}]});
        assert!(decide(&chat, Wire::Chat, 3, ToolsMode::Agent).is_some());
        let answered = json!({"tools": tools, "messages": [
            {"role": "user", "content": "run it"},
            {"role": "system", "content": "# Environment"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "Bash", "input": {"command": "echo afr-mock"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "afr-mock"}]},
            {"role": "system", "content": "# Environment"},
        ]});
        assert!(decide(&answered, Wire::Messages, 3, ToolsMode::Agent).is_none());
    }

    #[test]
    fn agent_mode_calls_the_shell_tool_with_valid_arguments() {
        let schema = |req: &str| json!({"type": "object", "properties": {req: {"type": "string"}}, "required": [req], "additionalProperties": false});
        // Claude Code: `Bash` is picked over the tools before it and over
        // `KillShell`, whose schema has no command.
        let claude = json!({"tools": [
            {"name": "Task", "input_schema": schema("prompt")},
            {"name": "KillShell", "input_schema": schema("shell_id")},
            {"name": "Bash", "input_schema": schema("command")},
            {"type": "web_search_20250305", "name": "web_search"}],
            "messages": [{"role": "user", "content": "list the files"}]});
        let call = decide(&claude, Wire::Messages, 3, ToolsMode::Agent).unwrap();
        assert_eq!(
            (call.name.as_str(), call.arguments.as_str()),
            ("Bash", r#"{"command":"echo afr-mock"}"#)
        );
        assert_eq!(call.pieces.concat(), call.arguments);
        // Codex on the Responses API: `exec_command` over `write_stdin`,
        // non-function tools skipped.
        let codex = json!({"tools": [
            {"type": "custom", "name": "apply_patch"},
            {"type": "function", "name": "write_stdin", "parameters": schema("chars")},
            {"type": "function", "name": "exec_command", "parameters": schema("cmd")}],
            "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}]});
        let call = decide(&codex, Wire::Responses, 3, ToolsMode::Agent).unwrap();
        assert_eq!(call.arguments, r#"{"cmd":"echo afr-mock"}"#);
        assert!(decide(&codex, Wire::Responses, 3, ToolsMode::First).is_none());
        // No shell tool: the first function tool; a named tool choice wins.
        let mut chat = json!({"tools": [
            {"type": "function", "function": {"name": "get_weather", "parameters": schema("location")}},
            {"type": "function", "function": {"name": "lookup", "parameters": schema("q")}}],
            "messages": [{"role": "user", "content": "weather?"}]});
        let call = decide(&chat, Wire::Chat, 3, ToolsMode::Agent).unwrap();
        assert_eq!(call.arguments, r#"{"location":"afr-mock"}"#);
        chat["tool_choice"] = json!({"type": "function", "function": {"name": "lookup"}});
        assert_eq!(
            decide(&chat, Wire::Chat, 3, ToolsMode::Agent).unwrap().name,
            "lookup"
        );
        chat["tool_choice"] = json!("none");
        assert!(decide(&chat, Wire::Chat, 3, ToolsMode::Agent).is_none());
    }

    #[test]
    fn agent_mode_answers_a_tool_result_with_text() {
        let tools = json!([{"type": "function", "function": {"name": "shell", "parameters": {}}}]);
        let chat = json!({"tools": tools, "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": null, "tool_calls": []},
            {"role": "tool", "tool_call_id": "c", "content": "afr-mock\n"}]});
        assert!(decide(&chat, Wire::Chat, 3, ToolsMode::Agent).is_none());
        assert_eq!(
            agent_answer(&chat, Wire::Chat, ToolsMode::Agent).unwrap(),
            "The command printed: afr-mock\n"
        );
        assert!(agent_answer(&chat, Wire::Chat, ToolsMode::First).is_none());
        let long = "x".repeat(300);
        let messages = json!({"messages": [{"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "text", "text": long}]}]}]});
        let text = agent_answer(&messages, Wire::Messages, ToolsMode::Agent).unwrap();
        assert_eq!(text.len(), "The command printed: ".len() + 200);
        let responses = json!({"input": [
            {"type": "message", "role": "user", "content": "hi"},
            {"type": "function_call", "call_id": "c", "name": "shell", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c", "output": ""}]});
        assert_eq!(
            agent_answer(&responses, Wire::Responses, ToolsMode::Agent).unwrap(),
            "The command printed nothing."
        );
        // A new user turn after the answer: a new call.
        let again = json!({"tools": [{"type": "function", "name": "shell", "parameters": {}}],
            "input": [{"type": "function_call_output", "call_id": "c", "output": "ok"},
                {"type": "message", "role": "assistant", "content": "done"},
                {"type": "message", "role": "user", "content": "again"}]});
        assert!(agent_answer(&again, Wire::Responses, ToolsMode::Agent).is_none());
        assert_eq!(
            decide(&again, Wire::Responses, 3, ToolsMode::Agent)
                .unwrap()
                .arguments,
            "{}"
        );
    }
}
