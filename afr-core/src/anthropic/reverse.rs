//! The other direction: an Anthropic Messages request served by an
//! OpenAI-compatible route. The request becomes a chat completions request;
//! the `chat.completion` answer becomes a Messages response, and a
//! `chat.completion.chunk` stream becomes Anthropic's typed events
//! ([`ChatToMessages`]), tool use included.
//!
//! Mapping (requests): top-level `system` → a `system` message;
//! `tool_result` blocks → `tool` messages (before the rest of their user
//! turn); `tool_use` blocks → `tool_calls`; images → `image_url` parts;
//! `stop_sequences` → `stop`; `tools[].input_schema` → `function.parameters`;
//! `tool_choice` any/tool/none → required/function/none;
//! `metadata.user_id` → `user` (up to 64 characters). Streams always ask for
//! `stream_options.include_usage`, which the translator consumes. Fields
//! Anthropic-only (`top_k`, `thinking`, `cache_control`, …) are dropped;
//! server tools (no `input_schema`) and documents are refused.

use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::TranslateError;
use crate::error::ErrorBody;
use crate::sse::{event_data, TokenUsage};

/// The text of an Anthropic `content` or `system`: a string, or its text blocks joined.
fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
            .filter_map(|b| b.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

fn image_part(block: &Value, param: &str) -> Result<Value, TranslateError> {
    let source = block.get("source").unwrap_or(&Value::Null);
    let url = match source.get("type").and_then(Value::as_str) {
        Some("base64") => format!(
            "data:{};base64,{}",
            source
                .get("media_type")
                .and_then(Value::as_str)
                .unwrap_or("image/png"),
            source.get("data").and_then(Value::as_str).unwrap_or("")
        ),
        Some("url") => source
            .get("url")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned(),
        _ => {
            return Err(TranslateError::invalid(
                format!("{param}.source"),
                "image source must be base64 or url for this model's provider",
            ))
        }
    };
    Ok(json!({"type": "image_url", "image_url": {"url": url}}))
}

/// One Anthropic message → one or more chat messages.
fn message(m: &Value, i: usize, out: &mut Vec<Value>) -> Result<(), TranslateError> {
    let role = m.get("role").and_then(Value::as_str).unwrap_or("");
    let content = m.get("content").unwrap_or(&Value::Null);
    match role {
        "user" | "assistant" => {}
        // A system message inside `messages` applies from where it stands:
        // chat completions keep it there. Only its text can be carried.
        "system" => {
            if let Value::Array(blocks) = content {
                if let Some((j, b)) = blocks
                    .iter()
                    .enumerate()
                    .find(|(_, b)| b.get("type").and_then(Value::as_str) != Some("text"))
                {
                    let kind = b.get("type").and_then(Value::as_str).unwrap_or("(missing)");
                    return Err(TranslateError::invalid(
                        format!("messages.{i}.content.{j}.type"),
                        format!("messages.{i}.content.{j}.type: a '{kind}' block in a system message cannot be translated for this model's provider (OpenAI chat completions: system messages hold text)"),
                    ));
                }
            }
            out.push(json!({"role": "system", "content": text_of(content)}));
            return Ok(());
        }
        other => {
            return Err(TranslateError::invalid(
                format!("messages.{i}.role"),
                format!("messages.{i}.role: role '{other}' cannot be translated for this model's provider (OpenAI chat completions); send it to an Anthropic model"),
            ))
        }
    }
    let Value::Array(blocks) = content else {
        out.push(json!({"role": role, "content": text_of(content)}));
        return Ok(());
    };
    let mut parts = Vec::new();
    let mut calls = Vec::new();
    for (j, block) in blocks.iter().enumerate() {
        let param = format!("messages.{i}.content.{j}");
        match block.get("type").and_then(Value::as_str) {
            Some("text") => parts.push(
                json!({"type": "text", "text": block.get("text").cloned().unwrap_or(json!(""))}),
            ),
            Some("image") if role == "user" => parts.push(image_part(block, &param)?),
            Some("tool_result") if role == "user" => {
                // Tool answers come first: a chat `tool` message must follow
                // the assistant turn that called the tool.
                let text = text_of(block.get("content").unwrap_or(&Value::Null));
                let text = if block.get("is_error").and_then(Value::as_bool) == Some(true) {
                    format!("Error: {text}")
                } else {
                    text
                };
                out.push(json!({"role": "tool", "tool_call_id": block.get("tool_use_id").cloned().unwrap_or(Value::Null), "content": text}));
            }
            Some("tool_use") if role == "assistant" => calls.push(json!({
                "id": block.get("id").cloned().unwrap_or(Value::Null),
                "type": "function",
                "function": {
                    "name": block.get("name").cloned().unwrap_or(Value::Null),
                    "arguments": block.get("input").unwrap_or(&json!({})).to_string(),
                },
            })),
            // Reasoning of an earlier turn: only its own provider can read it back.
            Some("thinking" | "redacted_thinking") if role == "assistant" => {}
            other => {
                return Err(TranslateError::invalid(
                    format!("{param}.type"),
                    format!(
                    "{param}.type: content block type {} is not supported by this model's provider",
                    other.map_or("(missing)".to_owned(), |t| format!("'{t}'"))
                ),
                ))
            }
        }
    }
    if role == "assistant" {
        let text = text_of(&Value::Array(parts));
        let mut msg = json!({"role": "assistant", "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { Value::String(text) }});
        if !calls.is_empty() {
            msg["tool_calls"] = Value::Array(calls);
        }
        out.push(msg);
    } else if !parts.is_empty() {
        out.push(json!({"role": "user", "content": parts}));
    }
    Ok(())
}

/// Translates a Messages request into a chat completions request for
/// `model` (the route's upstream model name). The body was validated by
/// [`crate::messages::validate_messages`].
pub fn request_to_openai(req: &Value, model: &str) -> Result<Value, TranslateError> {
    let obj = req
        .as_object()
        .ok_or_else(|| TranslateError::InvalidRequest {
            param: None,
            message: "request body must be a JSON object".to_owned(),
        })?;
    let mut messages = Vec::new();
    if let Some(system) = obj.get("system") {
        let text = text_of(system);
        if !text.is_empty() {
            messages.push(json!({"role": "system", "content": text}));
        }
    }
    for (i, m) in obj
        .get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        message(m, i, &mut messages)?;
    }
    // `max_tokens: 0` asks Anthropic to fill its prompt cache and generate
    // nothing; chat completions have no such request.
    if obj.get("max_tokens").and_then(Value::as_u64) == Some(0) {
        return Err(TranslateError::invalid(
            "max_tokens",
            "max_tokens: 0 (prompt caching without output) cannot be translated for this model's provider (OpenAI chat completions); send it to an Anthropic model",
        ));
    }
    let mut out = Map::new();
    out.insert("model".into(), Value::String(model.to_owned()));
    out.insert("messages".into(), Value::Array(messages));
    for key in ["max_tokens", "temperature", "top_p"] {
        if let Some(v) = obj.get(key).filter(|v| v.is_number()) {
            out.insert(key.into(), v.clone());
        }
    }
    if let Some(stop) = obj.get("stop_sequences").and_then(Value::as_array) {
        if !stop.is_empty() {
            out.insert("stop".into(), Value::Array(stop.clone()));
        }
    }
    if obj.get("stream").and_then(Value::as_bool) == Some(true) {
        out.insert("stream".into(), Value::Bool(true));
        out.insert("stream_options".into(), json!({"include_usage": true}));
    }
    if let Some(tools) = obj.get("tools").and_then(Value::as_array) {
        let mut functions = Vec::with_capacity(tools.len());
        for (i, t) in tools.iter().enumerate() {
            let Some(schema) = t.get("input_schema") else {
                return Err(TranslateError::invalid(
                    format!("tools.{i}"),
                    format!(
                        "tools.{i}: server tools ({}) are not supported by this model's provider",
                        t.get("type")
                            .and_then(Value::as_str)
                            .unwrap_or("no input_schema")
                    ),
                ));
            };
            let mut f = json!({"name": t.get("name").cloned().unwrap_or(Value::Null)});
            if let Some(d) = t.get("description") {
                f["description"] = d.clone();
            }
            f["parameters"] = schema.clone();
            functions.push(json!({"type": "function", "function": f}));
        }
        if !functions.is_empty() {
            out.insert("tools".into(), Value::Array(functions));
        }
    }
    if let Some(choice) = obj.get("tool_choice") {
        let mapped = match choice.get("type").and_then(Value::as_str) {
            Some("auto") => Some(json!("auto")),
            Some("any") => Some(json!("required")),
            Some("none") => Some(json!("none")),
            Some("tool") => Some(
                json!({"type": "function", "function": {"name": choice.get("name").cloned().unwrap_or(Value::Null)}}),
            ),
            _ => None,
        };
        if let (Some(c), true) = (mapped, out.contains_key("tools")) {
            out.insert("tool_choice".into(), c);
        }
        if choice
            .get("disable_parallel_tool_use")
            .and_then(Value::as_bool)
            == Some(true)
            && out.contains_key("tools")
        {
            out.insert("parallel_tool_calls".into(), Value::Bool(false));
        }
    }
    // OpenAI-compatible servers bound `user` (64 characters is the tightest
    // seen); Claude Code's ids are longer: such an id is dropped, not refused.
    if let Some(user) = req
        .pointer("/metadata/user_id")
        .filter(|u| u.as_str().is_some_and(|u| u.chars().count() <= 64))
    {
        out.insert("user".into(), user.clone());
    }
    Ok(Value::Object(out))
}

/// OpenAI `finish_reason` → Anthropic `stop_reason`.
pub fn stop_reason(finish_reason: &str) -> &'static str {
    match finish_reason {
        "length" => "max_tokens",
        "tool_calls" | "function_call" => "tool_use",
        "content_filter" => "refusal",
        _ => "end_turn",
    }
}

/// OpenAI's usage object, read by [`TokenUsage`]'s own deserializer.
type UsageWire = TokenUsage;

/// Anthropic's usage object for OpenAI's `usage`: `input_tokens` excludes
/// cache reads, which OpenAI's `prompt_tokens` includes.
fn anthropic_usage(u: &TokenUsage) -> Value {
    let cached = u.cached_tokens.min(u.prompt_tokens);
    json!({
        "input_tokens": u.prompt_tokens - cached,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
        "output_tokens": u.completion_tokens,
    })
}

/// OpenAI's usage with its total filled in when a server left it out.
fn completed(mut u: TokenUsage) -> TokenUsage {
    if u.total_tokens == 0 {
        u.total_tokens = u.prompt_tokens + u.completion_tokens;
    }
    u
}

#[derive(Deserialize)]
struct FunctionWire {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

#[derive(Deserialize)]
struct ToolCallWire {
    #[serde(default)]
    index: Option<u64>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<FunctionWire>,
}

#[derive(Deserialize)]
struct ChatMessageWire {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<ToolCallWire>>,
}

#[derive(Deserialize)]
struct ChoiceWire {
    #[serde(default)]
    message: Option<ChatMessageWire>,
    #[serde(default)]
    delta: Option<ChatMessageWire>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct CompletionWire {
    #[serde(default)]
    id: String,
    #[serde(default)]
    model: String,
    #[serde(default)]
    choices: Vec<ChoiceWire>,
    #[serde(default)]
    usage: Option<UsageWire>,
}

/// A tool call's arguments as Anthropic's `input` object. Arguments that are
/// not a JSON object (a model's broken JSON) become `{}` rather than failing
/// an answer the client already paid for.
fn tool_input(arguments: Option<&str>) -> Value {
    match arguments.map(serde_json::from_str::<Value>) {
        Some(Ok(v @ Value::Object(_))) => v,
        _ => json!({}),
    }
}

/// A message id in Anthropic's form, from the provider's completion id.
fn message_id(id: &str) -> String {
    if id.starts_with("msg_") {
        id.to_owned()
    } else {
        format!("msg_{}", id.trim_start_matches("chatcmpl-"))
    }
}

/// A translated non-streaming answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessagesResponse {
    /// The Messages response JSON body.
    pub body: String,
    /// Its token counts, for the usage record; `None` when the provider's
    /// answer carried no `usage` (the gateway then estimates).
    pub usage: Option<TokenUsage>,
}

/// Translates a `chat.completion` body into a Messages response.
pub fn response_to_anthropic(body: &[u8]) -> Result<MessagesResponse, TranslateError> {
    let c: CompletionWire = serde_json::from_slice(body)
        .map_err(|e| TranslateError::MalformedResponse(e.to_string()))?;
    let choice = c
        .choices
        .first()
        .ok_or_else(|| TranslateError::MalformedResponse("no choices".into()))?;
    let mut content = Vec::new();
    if let Some(m) = &choice.message {
        if let Some(text) = m.content.as_deref().filter(|t| !t.is_empty()) {
            content.push(json!({"type": "text", "text": text}));
        }
        for call in m.tool_calls.iter().flatten() {
            let f = call.function.as_ref();
            content.push(json!({
                "type": "tool_use",
                "id": call.id.clone().unwrap_or_default(),
                "name": f.and_then(|f| f.name.clone()).unwrap_or_default(),
                "input": tool_input(f.and_then(|f| f.arguments.as_deref())),
            }));
        }
    }
    let usage = c.usage.unwrap_or_default();
    let out = json!({
        "id": message_id(&c.id),
        "type": "message",
        "role": "assistant",
        "model": c.model,
        "content": content,
        "stop_reason": stop_reason(choice.finish_reason.as_deref().unwrap_or("stop")),
        "stop_sequence": null,
        "usage": anthropic_usage(&usage),
    });
    Ok(MessagesResponse {
        body: out.to_string(),
        usage: c.usage.map(completed),
    })
}

/// The Anthropic error body for an OpenAI-shaped error (a provider's
/// mid-stream `{"error":…}` event).
fn error_json(data: &str) -> String {
    #[derive(Deserialize)]
    struct Wrap {
        error: Inner,
    }
    #[derive(Deserialize)]
    struct Inner {
        #[serde(default)]
        message: Option<String>,
    }
    let message = serde_json::from_str::<Wrap>(data)
        .ok()
        .and_then(|w| w.error.message)
        .unwrap_or_else(|| "The provider failed while streaming the response.".to_owned());
    ErrorBody::new("server_error", None, message).to_anthropic_json(500)
}

/// The block being streamed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    Text,
    /// A tool call, by its OpenAI `index`.
    Tool(u64),
}

/// Turns a `chat.completion.chunk` stream into Anthropic Messages events
/// (`message_start`, `content_block_*`, `message_delta`, `message_stop`),
/// each framed with its `event:` line as Anthropic sends them.
#[derive(Debug, Default)]
pub struct ChatToMessages {
    started: bool,
    ended: bool,
    /// The open block and its Anthropic index.
    open: Option<(usize, Block)>,
    next_index: usize,
    stop_reason: Option<&'static str>,
    usage: Option<UsageWire>,
}

fn frame(name: &str, data: &Value) -> String {
    format!("event: {name}\ndata: {data}\n\n")
}

impl ChatToMessages {
    /// A translator for one stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the stream has ended (complete or failed).
    pub fn is_finished(&self) -> bool {
        self.ended
    }

    /// Translates one raw OpenAI SSE event into zero or more Anthropic events.
    pub fn push_raw(&mut self, raw: &[u8]) -> Vec<String> {
        if self.ended {
            return Vec::new();
        }
        let Some(data) = event_data(raw) else {
            return Vec::new(); // a keep-alive comment
        };
        if data.trim() == "[DONE]" {
            return self.complete();
        }
        if data.trim_start().starts_with("{\"error\"") {
            self.ended = true;
            return vec![format!("event: error\ndata: {}\n\n", error_json(&data))];
        }
        let chunk: CompletionWire = match serde_json::from_str(&data) {
            Ok(c) => c,
            Err(e) => return self.fail(&format!("malformed event from the provider: {e}")),
        };
        let mut out = Vec::new();
        if !self.started {
            self.started = true;
            out.push(frame(
                "message_start",
                &json!({"type": "message_start", "message": {
                    "id": message_id(&chunk.id), "type": "message", "role": "assistant",
                    "model": chunk.model, "content": [], "stop_reason": null, "stop_sequence": null,
                    "usage": {"input_tokens": 0, "output_tokens": 0},
                }}),
            ));
        }
        if let Some(u) = chunk.usage {
            self.usage = Some(u);
        }
        for choice in &chunk.choices {
            if let Some(delta) = &choice.delta {
                if let Some(text) = delta.content.as_deref().filter(|t| !t.is_empty()) {
                    let index = self.open_block(
                        Block::Text,
                        &mut out,
                        || json!({"type": "text", "text": ""}),
                    );
                    out.push(frame("content_block_delta", &json!({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}})));
                }
                for call in delta.tool_calls.iter().flatten() {
                    let tool = call.index.unwrap_or(0);
                    let f = call.function.as_ref();
                    let is_new = self.open.map(|(_, b)| b) != Some(Block::Tool(tool));
                    let index = if is_new {
                        let (id, name) = (
                            call.id.clone().unwrap_or_default(),
                            f.and_then(|f| f.name.clone()).unwrap_or_default(),
                        );
                        self.open_block(
                            Block::Tool(tool),
                            &mut out,
                            || json!({"type": "tool_use", "id": id, "name": name, "input": {}}),
                        )
                    } else {
                        self.open.map_or(0, |(i, _)| i)
                    };
                    if let Some(args) = f
                        .and_then(|f| f.arguments.as_deref())
                        .filter(|a| !a.is_empty())
                    {
                        out.push(frame("content_block_delta", &json!({"type": "content_block_delta", "index": index, "delta": {"type": "input_json_delta", "partial_json": args}})));
                    }
                }
            }
            if let Some(reason) = &choice.finish_reason {
                self.stop_reason = Some(stop_reason(reason));
            }
        }
        out
    }

    /// The upstream body ended. Before `[DONE]` that is a cut stream: it ends
    /// with an `error` event, never a silent truncation.
    pub fn finish(&mut self) -> Vec<String> {
        if self.ended {
            return Vec::new();
        }
        self.fail("the provider ended the stream before it was complete")
    }

    fn fail(&mut self, message: &str) -> Vec<String> {
        self.ended = true;
        let body = ErrorBody::new("server_error", None, message).to_anthropic_json(500);
        vec![format!("event: error\ndata: {body}\n\n")]
    }

    /// Opens `block` (closing the one before) unless it is open; its index.
    fn open_block(
        &mut self,
        block: Block,
        out: &mut Vec<String>,
        start: impl FnOnce() -> Value,
    ) -> usize {
        if let Some((index, open)) = self.open {
            if open == block {
                return index;
            }
            out.push(Self::stop(index));
        }
        let index = self.next_index;
        self.next_index += 1;
        self.open = Some((index, block));
        out.push(frame(
            "content_block_start",
            &json!({"type": "content_block_start", "index": index, "content_block": start()}),
        ));
        index
    }

    fn stop(index: usize) -> String {
        frame(
            "content_block_stop",
            &json!({"type": "content_block_stop", "index": index}),
        )
    }

    fn complete(&mut self) -> Vec<String> {
        self.ended = true;
        let mut out = Vec::new();
        if !self.started {
            return self.fail("the provider's stream had no content");
        }
        if let Some((index, _)) = self.open.take() {
            out.push(Self::stop(index));
        }
        let usage = anthropic_usage(&self.usage.unwrap_or_default());
        out.push(frame(
            "message_delta",
            &json!({"type": "message_delta",
                "delta": {"stop_reason": self.stop_reason.unwrap_or("end_turn"), "stop_sequence": null},
                "usage": usage}),
        ));
        out.push(frame("message_stop", &json!({"type": "message_stop"})));
        out
    }
}
