//! The `tools = "agent"` knob over HTTP on every wire, streamed or not: a
//! call of the agent's shell tool with arguments valid against its schema,
//! then, once the tool's result is sent back, a text answer quoting it; the
//! usage of each answer is what the mock billed.

mod common;

use std::time::{Duration, Instant};

use common::{events, read_all, Mock};
use serde_json::{json, Value};

/// What the agent mode runs.
const COMMAND: &str = "echo afr-mock";
/// What the tool printed, as the agents send it back.
const OUTPUT: &str = "afr-mock\n";
/// The answer to it: 4 words, 4 completion tokens.
const ANSWER: &str = "The command printed: afr-mock";

/// Posts `body` with the agent mode by header (unless `header` is false).
async fn post(mock: &Mock, path: &str, body: &Value, header: bool) -> reqwest::Response {
    let mut req = reqwest::Client::new().post(mock.url(path)).json(body);
    if path == "/v1/messages" {
        req = req.header("anthropic-version", "2023-06-01");
    }
    if header {
        req = req.header("X-Mock-Tools", "agent");
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200);
    resp
}

/// `x-mock-completion-tokens`, and the body as JSON.
async fn body(resp: reqwest::Response) -> (u64, Value) {
    let completion = header_tokens(&resp);
    (completion, resp.json().await.unwrap())
}

fn header_tokens(resp: &reqwest::Response) -> u64 {
    resp.headers()["x-mock-completion-tokens"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// `x-mock-completion-tokens`, and the stream's events as (name, JSON),
/// `[DONE]` left out.
async fn stream(resp: reqwest::Response) -> (u64, Vec<(Option<String>, Value)>) {
    let completion = header_tokens(&resp);
    let (bytes, failed) = read_all(resp).await;
    assert!(!failed);
    let ev = events(&bytes)
        .into_iter()
        .filter(|e| e.data != "[DONE]")
        .map(|e| (e.name, serde_json::from_str(&e.data).unwrap()))
        .collect();
    (completion, ev)
}

/// The `billed.output` of each logged request, in order, once no stream is
/// in flight.
async fn billed_outputs(mock: &Mock) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = mock.requests().await;
        let entries = log["requests"].as_array().unwrap();
        if entries.iter().all(|r| r["outcome"] == "completed") || Instant::now() > deadline {
            return entries
                .iter()
                .map(|r| r["billed"]["output"].as_u64().unwrap())
                .collect();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Codex's `shell` tool on chat completions: `command` is an argv.
fn chat_tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "update_plan", "parameters": {"type": "object",
            "properties": {"plan": {"type": "array", "items": {"type": "object", "additionalProperties": false,
                "properties": {"step": {"type": "string"}, "status": {"type": "string", "enum": ["pending", "in_progress", "completed"]}},
                "required": ["step", "status"]}}},
            "required": ["plan"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "shell", "parameters": {"type": "object",
            "properties": {"command": {"type": "array", "items": {"type": "string"}},
                "workdir": {"type": "string"}, "timeout_ms": {"type": "number"}},
            "required": ["command"], "additionalProperties": false}}}
    ])
}

fn chat_ask(stream: bool) -> Value {
    json!({"model": "gpt-4o-mini", "stream": stream, "stream_options": {"include_usage": true},
        "tools": chat_tools(),
        "messages": [{"role": "system", "content": "You are a coding agent."}, {"role": "user", "content": "list the files"}]})
}

/// The ask, the assistant's call and the tool's answer.
fn chat_answered(stream: bool, call_id: &str, arguments: &str) -> Value {
    let mut v = chat_ask(stream);
    let m = v["messages"].as_array_mut().unwrap();
    m.push(json!({"role": "assistant", "content": null, "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": "shell", "arguments": arguments}}]}));
    m.push(json!({"role": "tool", "tool_call_id": call_id, "content": OUTPUT}));
    v
}

/// Pieces of at most 8 characters after an empty one.
fn pieces(arguments: &str) -> u64 {
    1 + arguments.len().div_ceil(8) as u64
}

#[tokio::test]
async fn chat_completions_call_the_shell_then_answer_its_output() {
    let mock = Mock::start(&[]);
    let argv = json!({"command": ["bash", "-lc", COMMAND]});
    // Not streamed.
    let (tokens, v) = body(post(&mock, "/v1/chat/completions", &chat_ask(false), true).await).await;
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "shell");
    let arguments = call["function"]["arguments"].as_str().unwrap();
    assert_eq!(serde_json::from_str::<Value>(arguments).unwrap(), argv);
    assert_eq!(v["usage"]["completion_tokens"], pieces(arguments));
    assert_eq!(tokens, pieces(arguments));
    let answered = chat_answered(false, call["id"].as_str().unwrap(), arguments);
    let (tokens, v) = body(post(&mock, "/v1/chat/completions", &answered, true).await).await;
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["choices"][0]["message"]["content"], ANSWER);
    assert!(v["choices"][0]["message"].get("tool_calls").is_none());
    assert_eq!((tokens, &v["usage"]["completion_tokens"]), (4, &json!(4)));
    // Streamed: the call's argument deltas, then the answer's text deltas.
    let (tokens, ev) =
        stream(post(&mock, "/v1/chat/completions", &chat_ask(true), true).await).await;
    let deltas: Vec<&Value> = ev
        .iter()
        .filter_map(|(_, v)| v["choices"][0]["delta"]["tool_calls"][0].as_object())
        .map(|tc| &tc["function"]["arguments"])
        .collect();
    let arguments: String = deltas.iter().map(|a| a.as_str().unwrap()).collect();
    assert_eq!(serde_json::from_str::<Value>(&arguments).unwrap(), argv);
    let finish: Vec<&Value> = ev
        .iter()
        .map(|(_, v)| &v["choices"][0]["finish_reason"])
        .filter(|f| f.is_string())
        .collect();
    assert_eq!(finish, [&json!("tool_calls")]);
    let usage = &ev.last().unwrap().1["usage"];
    assert_eq!(usage["completion_tokens"], deltas.len() as u64);
    assert_eq!(tokens, deltas.len() as u64);
    let answered = chat_answered(true, "call_1", &arguments);
    let (tokens, ev) = stream(post(&mock, "/v1/chat/completions", &answered, true).await).await;
    let text: String = ev
        .iter()
        .filter_map(|(_, v)| v["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, ANSWER);
    assert!(ev
        .iter()
        .any(|(_, v)| v["choices"][0]["finish_reason"] == "stop"));
    assert_eq!(ev.last().unwrap().1["usage"]["completion_tokens"], 4);
    assert_eq!(tokens, 4);
    // What the mock billed is what it reported.
    let p = pieces(&argv.to_string());
    assert_eq!(billed_outputs(&mock).await, [p, 4, p, 4]);
}

/// Claude Code's `Bash` tool, after another with a required property.
fn claude_tools() -> Value {
    json!([
        {"name": "Task", "input_schema": {"type": "object", "properties": {"description": {"type": "string"}, "prompt": {"type": "string"}},
            "required": ["description", "prompt"], "additionalProperties": false}},
        {"name": "Bash", "input_schema": {"type": "object", "properties": {
            "command": {"type": "string"}, "timeout": {"type": "number"}, "description": {"type": "string"}},
            "required": ["command"], "additionalProperties": false, "$schema": "http://json-schema.org/draft-07/schema#"}}
    ])
}

fn messages_ask(stream: bool) -> Value {
    json!({"model": "claude-sonnet-4-5", "max_tokens": 32000, "stream": stream, "tools": claude_tools(),
        "system": [{"type": "text", "text": "You are Claude Code."}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "list the files"}]}]})
}

fn messages_answered(stream: bool, id: &str) -> Value {
    let mut v = messages_ask(stream);
    let m = v["messages"].as_array_mut().unwrap();
    m.push(json!({"role": "assistant", "content": [{"type": "tool_use", "id": id, "name": "Bash", "input": {"command": COMMAND}}]}));
    m.push(json!({"role": "user", "content": [{"type": "tool_result", "tool_use_id": id, "content": OUTPUT, "is_error": false}]}));
    v
}

#[tokio::test]
async fn messages_call_bash_then_answer_its_output() {
    let mock = Mock::start(&[]);
    let input = json!({"command": COMMAND});
    let p = pieces(&input.to_string());
    let (tokens, v) = body(post(&mock, "/v1/messages", &messages_ask(false), true).await).await;
    assert_eq!(v["stop_reason"], "tool_use");
    let block = &v["content"][0];
    assert_eq!(
        (&block["type"], &block["name"], &block["input"]),
        (&json!("tool_use"), &json!("Bash"), &input)
    );
    assert_eq!((tokens, &v["usage"]["output_tokens"]), (p, &json!(p)));
    let answered = messages_answered(false, block["id"].as_str().unwrap());
    let (tokens, v) = body(post(&mock, "/v1/messages", &answered, true).await).await;
    assert_eq!(v["stop_reason"], "end_turn");
    assert_eq!(v["content"], json!([{"type": "text", "text": ANSWER}]));
    assert_eq!((tokens, &v["usage"]["output_tokens"]), (4, &json!(4)));
    // Streamed.
    let (tokens, ev) = stream(post(&mock, "/v1/messages", &messages_ask(true), true).await).await;
    let deltas: Vec<&str> = ev
        .iter()
        .filter_map(|(_, v)| v["delta"]["partial_json"].as_str())
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&deltas.concat()).unwrap(),
        input
    );
    let (_, start) = ev
        .iter()
        .find(|(n, _)| n.as_deref() == Some("content_block_start"))
        .unwrap();
    assert_eq!(start["content_block"]["name"], "Bash");
    let (_, md) = ev
        .iter()
        .find(|(n, _)| n.as_deref() == Some("message_delta"))
        .unwrap();
    assert_eq!(md["delta"]["stop_reason"], "tool_use");
    assert_eq!((tokens, &md["usage"]["output_tokens"]), (p, &json!(p)));
    assert_eq!(deltas.len() as u64, p);
    let answered = messages_answered(true, "toolu_1");
    let (tokens, ev) = stream(post(&mock, "/v1/messages", &answered, true).await).await;
    let text: String = ev
        .iter()
        .filter_map(|(_, v)| v["delta"]["text"].as_str())
        .collect();
    assert_eq!(text, ANSWER);
    let (_, md) = ev
        .iter()
        .find(|(n, _)| n.as_deref() == Some("message_delta"))
        .unwrap();
    assert_eq!(md["delta"]["stop_reason"], "end_turn");
    assert_eq!((tokens, &md["usage"]["output_tokens"]), (4, &json!(4)));
    assert_eq!(billed_outputs(&mock).await, [p, 4, p, 4]);
}

/// Codex's Responses tools: `apply_patch` (custom), `exec_command`,
/// `write_stdin`.
fn responses_tools() -> Value {
    json!([
        {"type": "custom", "name": "apply_patch", "description": "Use the `apply_patch` tool to edit files.",
            "format": {"type": "grammar", "syntax": "lark", "definition": "start: patch"}},
        {"type": "function", "name": "exec_command", "strict": false, "parameters": {"type": "object", "properties": {
            "cmd": {"type": "string"}, "workdir": {"type": "string"}, "yield_time_ms": {"type": "number"},
            "max_output_tokens": {"type": "number"}, "login": {"type": "boolean"}},
            "required": ["cmd"], "additionalProperties": false}},
        {"type": "function", "name": "write_stdin", "strict": false, "parameters": {"type": "object", "properties": {
            "session_id": {"type": "number"}, "chars": {"type": "string"}},
            "required": ["session_id"], "additionalProperties": false}}
    ])
}

fn responses_ask(stream: bool) -> Value {
    json!({"model": "gpt-5-codex", "stream": stream, "store": false, "tools": responses_tools(),
        "tool_choice": "auto", "instructions": "You are Codex.",
        "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "list the files"}]}]})
}

fn responses_answered(stream: bool, call_id: &str, arguments: &str) -> Value {
    let mut v = responses_ask(stream);
    let input = v["input"].as_array_mut().unwrap();
    input.push(json!({"type": "function_call", "name": "exec_command", "arguments": arguments, "call_id": call_id}));
    input.push(json!({"type": "function_call_output", "call_id": call_id, "output": OUTPUT}));
    v
}

#[tokio::test]
async fn responses_call_exec_command_then_answer_its_output() {
    // The knob set for the instance, not per request.
    let mock = Mock::start(&[]);
    let r = reqwest::Client::new()
        .post(mock.url("/_mock/config"))
        .json(&json!({"tools": "agent"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let config: Value = reqwest::get(mock.url("/_mock/config"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(config["tools"], "agent");
    let args = json!({"cmd": COMMAND});
    // Responses streams send no empty first piece.
    let p = pieces(&args.to_string()) - 1;
    let (tokens, v) = body(post(&mock, "/v1/responses", &responses_ask(false), false).await).await;
    let [item] = v["output"].as_array().unwrap().as_slice() else {
        panic!("one output item: {v}");
    };
    assert_eq!(
        (&item["type"], &item["name"], &item["status"]),
        (
            &json!("function_call"),
            &json!("exec_command"),
            &json!("completed")
        )
    );
    let arguments = item["arguments"].as_str().unwrap();
    assert_eq!(serde_json::from_str::<Value>(arguments).unwrap(), args);
    assert_eq!((tokens, &v["usage"]["output_tokens"]), (p, &json!(p)));
    let answered = responses_answered(false, item["call_id"].as_str().unwrap(), arguments);
    let (tokens, v) = body(post(&mock, "/v1/responses", &answered, false).await).await;
    let item = &v["output"][0];
    assert_eq!(item["type"], "message");
    assert_eq!(item["content"][0]["text"], ANSWER);
    assert_eq!((tokens, &v["usage"]["output_tokens"]), (4, &json!(4)));
    // Streamed, as the recorded function-call stream.
    let (tokens, ev) =
        stream(post(&mock, "/v1/responses", &responses_ask(true), false).await).await;
    let names: Vec<&str> = ev.iter().map(|(n, _)| n.as_deref().unwrap()).collect();
    let mut expected = vec![
        "response.created",
        "response.in_progress",
        "response.output_item.added",
    ];
    expected.extend(vec!["response.function_call_arguments.delta"; p as usize]);
    expected.extend([
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]);
    assert_eq!(names, expected);
    let deltas: String = ev.iter().filter_map(|(_, v)| v["delta"].as_str()).collect();
    assert_eq!(serde_json::from_str::<Value>(&deltas).unwrap(), args);
    let done = &ev[ev.len() - 3].1;
    assert_eq!(done["arguments"].as_str().unwrap(), deltas);
    let completed = &ev.last().unwrap().1["response"];
    assert_eq!(
        completed["output"][0]["arguments"].as_str().unwrap(),
        deltas
    );
    assert_eq!(
        (tokens, &completed["usage"]["output_tokens"]),
        (p, &json!(p))
    );
    let answered = responses_answered(true, "call_1", &deltas);
    let (tokens, ev) = stream(post(&mock, "/v1/responses", &answered, false).await).await;
    let text: String = ev
        .iter()
        .filter(|(n, _)| n.as_deref() == Some("response.output_text.delta"))
        .filter_map(|(_, v)| v["delta"].as_str())
        .collect();
    assert_eq!(text, ANSWER);
    let completed = &ev.last().unwrap().1["response"];
    assert_eq!(completed["status"], "completed");
    assert_eq!(
        (tokens, &completed["usage"]["output_tokens"]),
        (4, &json!(4))
    );
    assert_eq!(billed_outputs(&mock).await, [p, 4, p, 4]);
}

#[tokio::test]
async fn the_default_mode_is_unchanged_and_bad_values_are_refused() {
    let mock = Mock::start(&[]);
    // Without the knob: the first tool, its string properties set to the
    // user's words (here none are required).
    let (_, v) = body(post(&mock, "/v1/chat/completions", &chat_ask(false), false).await).await;
    let call = &v["choices"][0]["message"]["tool_calls"][0]["function"];
    assert_eq!(call["name"], "update_plan");
    assert_eq!(call["arguments"], "{}");
    // The header overrides the instance's agent mode back to `first`.
    let mock = Mock::start(&["--tools", "agent"]);
    let (_, v) = body(post(&mock, "/v1/chat/completions", &chat_ask(false), false).await).await;
    assert_eq!(
        v["choices"][0]["message"]["tool_calls"][0]["function"]["name"],
        "shell"
    );
    let r = reqwest::Client::new()
        .post(mock.url("/v1/chat/completions"))
        .header("X-Mock-Tools", "first")
        .json(&chat_ask(false))
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["choices"][0]["message"]["tool_calls"][0]["function"]["name"],
        "update_plan"
    );
    let r = reqwest::Client::new()
        .post(mock.url("/v1/chat/completions"))
        .header("X-Mock-Tools", "clever")
        .json(&chat_ask(false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = reqwest::Client::new()
        .post(mock.url("/_mock/config"))
        .json(&json!({"tools": "clever"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}
