//! Translation between OpenAI chat completions and the Anthropic Messages API,
//! both ways and streaming included, as pure functions over bytes and JSON.
//!
//! - [`request_to_anthropic`]: an OpenAI chat request → a Messages request.
//! - [`response_to_openai`]: a Messages response → a `chat.completion` body.
//! - [`StreamTranslator`]: Messages SSE events → `chat.completion.chunk` events.
//! - [`error_to_openai`]: an Anthropic error body → the OpenAI error body,
//!   status kept.
//! - [`request_to_openai`], [`response_to_anthropic`], [`ChatToMessages`]:
//!   the other direction, for `/v1/messages` on OpenAI-compatible routes.
//!
//! Shapes follow the recorded bytes in `tests/fixtures/anthropic-*`, including
//! their quirks (space-padded JSON, `ping` events, usage repeated in
//! `message_delta`). Wire types are private; what leaves this module is JSON
//! in OpenAI's shape with OpenAI's key order.

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::error::ErrorBody;
use crate::sse::TokenUsage;

/// The `anthropic-version` header value every request must carry.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";

/// `max_tokens` sent when the OpenAI request has none (Anthropic requires it);
/// the contract's default (design §3).
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

/// Why a translation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TranslateError {
    /// The client's request cannot be expressed for Anthropic (HTTP 400).
    #[error("{message}")]
    InvalidRequest {
        /// The OpenAI request field at fault.
        param: Option<String>,
        /// What is wrong with it.
        message: String,
    },
    /// Anthropic answered something that is not a Messages response
    /// (a provider failure: retryable, HTTP 502).
    #[error("malformed response from the Anthropic provider: {0}")]
    MalformedResponse(String),
}

impl TranslateError {
    fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        TranslateError::InvalidRequest {
            param: Some(param.into()),
            message: message.into(),
        }
    }

    /// The HTTP status this error is answered with.
    pub fn status(&self) -> u16 {
        match self {
            TranslateError::InvalidRequest { .. } => 400,
            TranslateError::MalformedResponse(_) => 502,
        }
    }

    /// The OpenAI error body for this error.
    pub fn to_error_body(&self) -> ErrorBody {
        match self {
            TranslateError::InvalidRequest { param, message } => {
                let b = ErrorBody::new("invalid_request_error", None, message.clone());
                match param {
                    Some(p) => b.with_param(p.clone()),
                    None => b,
                }
            }
            TranslateError::MalformedResponse(_) => ErrorBody::new(
                "server_error",
                Some("bad_upstream_response"),
                self.to_string(),
            ),
        }
    }
}

// ---------------------------------------------------------------------------
// (1) Request: OpenAI → Anthropic

/// The text of an OpenAI `content`: a string, or its text parts joined.
fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// OpenAI content parts → Anthropic content blocks (text and images).
fn content_blocks(content: &Value, param: &str) -> Result<Value, TranslateError> {
    let Value::Array(parts) = content else {
        return Ok(Value::String(text_of(content)));
    };
    let mut blocks = Vec::with_capacity(parts.len());
    for (i, part) in parts.iter().enumerate() {
        match part.get("type").and_then(Value::as_str) {
            Some("text") => blocks.push(json!({"type": "text", "text": part.get("text").cloned().unwrap_or(Value::String(String::new()))})),
            Some("image_url") => {
                let url = part
                    .pointer("/image_url/url")
                    .and_then(Value::as_str)
                    .ok_or_else(|| TranslateError::invalid(format!("{param}[{i}].image_url.url"), "image_url.url must be a string"))?;
                let source = match url.strip_prefix("data:").and_then(|r| r.split_once(";base64,")) {
                    Some((media_type, data)) => json!({"type": "base64", "media_type": media_type, "data": data}),
                    None => json!({"type": "url", "url": url}),
                };
                blocks.push(json!({"type": "image", "source": source}));
            }
            other => {
                return Err(TranslateError::invalid(
                    format!("{param}[{i}].type"),
                    format!("content part type {} is not supported by this model's provider", other.map_or("(missing)".to_owned(), |t| format!("'{t}'"))),
                ))
            }
        }
    }
    Ok(Value::Array(blocks))
}

/// An assistant message's `tool_calls` → `tool_use` blocks after its text.
fn assistant_blocks(m: &Value, calls: &[Value], param: &str) -> Result<Value, TranslateError> {
    let mut blocks = Vec::new();
    let text = m.get("content").map(text_of).unwrap_or_default();
    if !text.is_empty() {
        blocks.push(json!({"type": "text", "text": text}));
    }
    for (i, call) in calls.iter().enumerate() {
        let f = call.get("function");
        let name = f
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
            .ok_or_else(|| {
                TranslateError::invalid(
                    format!("{param}.tool_calls[{i}].function.name"),
                    "tool call without a function name",
                )
            })?;
        let args = f
            .and_then(|f| f.get("arguments"))
            .and_then(Value::as_str)
            .unwrap_or("{}");
        let input: Value = serde_json::from_str(args).map_err(|_| {
            TranslateError::invalid(
                format!("{param}.tool_calls[{i}].function.arguments"),
                "function arguments must be a JSON object",
            )
        })?;
        blocks.push(json!({"type": "tool_use", "id": call.get("id").cloned().unwrap_or(Value::Null), "name": name, "input": input}));
    }
    Ok(Value::Array(blocks))
}

/// Translates an OpenAI chat completions request into an Anthropic Messages
/// request for `model` (the route's upstream model name).
///
/// `system`/`developer` messages become the top-level `system` (joined by a
/// blank line); `tool` messages become `tool_result` blocks and assistant
/// `tool_calls` become `tool_use` blocks; `max_tokens` (or
/// `max_completion_tokens`, else [`DEFAULT_MAX_TOKENS`]) is always set;
/// `temperature` is clamped to Anthropic's 0–1; `top_p` is sent only without
/// a `temperature` (newer Claude models reject both); `stop` → `stop_sequences`;
/// `stream`, `tools`, `tool_choice` and `user` (→ `metadata.user_id`) carry
/// over. Fields Anthropic has no equivalent for (`n` = 1, penalties, `seed`,
/// `logprobs`, `response_format`, `stream_options`, …) are dropped; `n` > 1
/// is refused.
pub fn request_to_anthropic(req: &Value, model: &str) -> Result<Value, TranslateError> {
    let obj = req
        .as_object()
        .ok_or_else(|| TranslateError::InvalidRequest {
            param: None,
            message: "request body must be a JSON object".to_owned(),
        })?;
    let messages = obj
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| TranslateError::invalid("messages", "messages must be an array"))?;
    let mut system: Vec<String> = Vec::new();
    let mut out_messages = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let param = format!("messages[{i}]");
        let role = m.get("role").and_then(Value::as_str).ok_or_else(|| {
            TranslateError::invalid(format!("{param}.role"), "message role must be a string")
        })?;
        let content = m.get("content").unwrap_or(&Value::Null);
        let msg = match role {
            "system" | "developer" => {
                system.push(text_of(content));
                continue;
            }
            "user" => {
                json!({"role": "user", "content": content_blocks(content, &format!("{param}.content"))?})
            }
            "assistant" => match m.get("tool_calls").and_then(Value::as_array) {
                Some(calls) if !calls.is_empty() => {
                    json!({"role": "assistant", "content": assistant_blocks(m, calls, &param)?})
                }
                _ => json!({"role": "assistant", "content": text_of(content)}),
            },
            "tool" => json!({"role": "user", "content": [{
                "type": "tool_result",
                "tool_use_id": m.get("tool_call_id").cloned().unwrap_or(Value::Null),
                "content": text_of(content),
            }]}),
            other => {
                return Err(TranslateError::invalid(
                    format!("{param}.role"),
                    format!("message role '{other}' is not supported by this model's provider"),
                ))
            }
        };
        out_messages.push(msg);
    }
    if let Some(n) = obj.get("n").and_then(Value::as_u64) {
        if n > 1 {
            return Err(TranslateError::invalid(
                "n",
                "n > 1 is not supported by this model's provider",
            ));
        }
    }
    let max_tokens = obj
        .get("max_tokens")
        .or_else(|| obj.get("max_completion_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(DEFAULT_MAX_TOKENS);
    let mut out = Map::new();
    out.insert("model".into(), Value::String(model.to_owned()));
    out.insert("max_tokens".into(), max_tokens.into());
    if !system.is_empty() {
        out.insert("system".into(), Value::String(system.join("\n\n")));
    }
    out.insert("messages".into(), Value::Array(out_messages));
    if let Some(t) = obj.get("temperature").and_then(Value::as_f64) {
        out.insert("temperature".into(), json!(t.clamp(0.0, 1.0)));
    } else if let Some(p) = obj.get("top_p").filter(|p| p.is_number()) {
        out.insert("top_p".into(), p.clone());
    }
    match obj.get("stop") {
        Some(Value::String(s)) => {
            out.insert("stop_sequences".into(), json!([s]));
        }
        Some(Value::Array(a)) if !a.is_empty() => {
            out.insert("stop_sequences".into(), Value::Array(a.clone()));
        }
        _ => {}
    }
    if let Some(s) = obj.get("stream").filter(|s| s.is_boolean()) {
        out.insert("stream".into(), s.clone());
    }
    if let Some(tools) = obj.get("tools").and_then(Value::as_array) {
        let tools: Vec<Value> = tools
            .iter()
            .filter_map(|t| t.get("function"))
            .map(|f| {
                let mut t = json!({"name": f.get("name").cloned().unwrap_or(Value::Null),
                    "input_schema": f.get("parameters").cloned().unwrap_or(json!({"type": "object"}))});
                if let Some(d) = f.get("description") {
                    t["description"] = d.clone();
                }
                t
            })
            .collect();
        if !tools.is_empty() {
            out.insert("tools".into(), Value::Array(tools));
        }
    }
    let choice = match obj.get("tool_choice") {
        Some(Value::String(s)) if s == "auto" => Some(json!({"type": "auto"})),
        Some(Value::String(s)) if s == "required" => Some(json!({"type": "any"})),
        Some(Value::String(s)) if s == "none" => Some(json!({"type": "none"})),
        Some(v @ Value::Object(_)) => v
            .pointer("/function/name")
            .map(|n| json!({"type": "tool", "name": n})),
        _ => None,
    };
    if let (Some(c), true) = (choice, out.contains_key("tools")) {
        out.insert("tool_choice".into(), c);
    }
    if let Some(u) = obj.get("user").filter(|u| u.is_string()) {
        out.insert("metadata".into(), json!({"user_id": u}));
    }
    Ok(Value::Object(out))
}

// ---------------------------------------------------------------------------
// Anthropic wire types (private)

/// Anthropic's usage object, read in one place (`crate::messages`).
pub(crate) use crate::messages::AnthropicUsage as UsageWire;

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum BlockWire {
    Text {
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
        #[serde(default)]
        input: Value,
    },
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
struct MessageWire {
    id: String,
    model: String,
    #[serde(default)]
    content: Vec<BlockWire>,
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    usage: UsageWire,
}

#[derive(Deserialize)]
struct ErrorWire {
    error: ErrorInner,
}

#[derive(Deserialize)]
struct ErrorInner {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    message: String,
}

// ---------------------------------------------------------------------------
// OpenAI output types (private; field order is OpenAI's)

#[derive(Serialize, Clone, Copy)]
struct CachedTokens {
    cached_tokens: u64,
}

#[derive(Serialize, Clone, Copy)]
struct UsageOut {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
    prompt_tokens_details: CachedTokens,
}

/// Running token counts: Anthropic reports input at `message_start` and the
/// cumulative output at `message_delta`; cache reads and writes are part of
/// OpenAI's `prompt_tokens`.
#[derive(Debug, Default, Clone, Copy)]
struct Tokens(UsageWire);

impl Tokens {
    fn update(&mut self, u: &UsageWire) {
        self.0.merge(u);
    }

    fn out(&self) -> UsageOut {
        let u = self.usage();
        UsageOut {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.total_tokens,
            prompt_tokens_details: CachedTokens {
                cached_tokens: u.cached_tokens,
            },
        }
    }

    fn usage(&self) -> TokenUsage {
        self.0.tokens()
    }
}

/// Anthropic `stop_reason` → OpenAI `finish_reason`.
pub fn finish_reason(stop_reason: &str) -> &'static str {
    match stop_reason {
        "max_tokens" | "model_context_window_exceeded" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        // end_turn, stop_sequence, pause_turn and anything newer.
        _ => "stop",
    }
}

// ---------------------------------------------------------------------------
// (2) Response: Anthropic → OpenAI

/// A translated non-streaming response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenAiResponse {
    /// The `chat.completion` JSON body.
    pub body: String,
    /// Its token counts, for the usage record.
    pub usage: TokenUsage,
}

#[derive(Serialize)]
struct FunctionOut {
    name: String,
    arguments: String,
}

#[derive(Serialize)]
struct ToolCallOut {
    id: String,
    #[serde(rename = "type")]
    kind: &'static str,
    function: FunctionOut,
}

#[derive(Serialize)]
struct MessageOut {
    role: &'static str,
    content: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<ToolCallOut>,
    refusal: Option<()>,
}

#[derive(Serialize)]
struct ChoiceOut {
    index: u32,
    message: MessageOut,
    logprobs: Option<()>,
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct CompletionOut<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [ChoiceOut; 1],
    usage: UsageOut,
}

/// Translates an Anthropic Messages response body into an OpenAI
/// `chat.completion`, stamped with `created` (Unix seconds, from the caller's
/// clock). Text blocks are concatenated; `tool_use` blocks become
/// `tool_calls`; `thinking` and other blocks are left out.
pub fn response_to_openai(body: &[u8], created: u64) -> Result<OpenAiResponse, TranslateError> {
    let msg: MessageWire = serde_json::from_slice(body)
        .map_err(|e| TranslateError::MalformedResponse(e.to_string()))?;
    let mut text = String::new();
    let mut tool_calls = Vec::new();
    for block in msg.content {
        match block {
            BlockWire::Text { text: t } => text.push_str(&t),
            BlockWire::ToolUse { id, name, input } => tool_calls.push(ToolCallOut {
                id,
                kind: "function",
                function: FunctionOut {
                    name,
                    arguments: input.to_string(),
                },
            }),
            BlockWire::Other => {}
        }
    }
    let mut tokens = Tokens::default();
    tokens.update(&msg.usage);
    let content = if text.is_empty() && !tool_calls.is_empty() {
        None
    } else {
        Some(text)
    };
    let out = CompletionOut {
        id: &msg.id,
        object: "chat.completion",
        created,
        model: &msg.model,
        choices: [ChoiceOut {
            index: 0,
            message: MessageOut {
                role: "assistant",
                content,
                tool_calls,
                refusal: None,
            },
            logprobs: None,
            finish_reason: finish_reason(msg.stop_reason.as_deref().unwrap_or("end_turn")),
        }],
        usage: tokens.out(),
    };
    let body = serde_json::to_string(&out)
        .map_err(|e| TranslateError::MalformedResponse(e.to_string()))?;
    Ok(OpenAiResponse {
        body,
        usage: tokens.usage(),
    })
}

// ---------------------------------------------------------------------------
// (4) Errors

/// An Anthropic error translated to OpenAI's shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenAiError {
    /// The HTTP status, as Anthropic sent it (529 stays 529: SDKs treat any
    /// status ≥ 500 as a server error).
    pub status: u16,
    /// The OpenAI error body.
    pub body: ErrorBody,
}

/// Anthropic error `type` → OpenAI `(type, code)`.
fn error_kind(kind: &str, status: u16) -> (&'static str, Option<&'static str>) {
    match kind {
        "invalid_request_error" => ("invalid_request_error", None),
        "request_too_large" => ("invalid_request_error", Some("request_too_large")),
        "authentication_error" => ("invalid_request_error", Some("invalid_api_key")),
        "permission_error" => ("invalid_request_error", Some("permission_denied")),
        "not_found_error" => ("invalid_request_error", Some("not_found")),
        "rate_limit_error" => ("requests", Some("rate_limit_exceeded")),
        "billing_error" => ("insufficient_quota", Some("insufficient_quota")),
        "overloaded_error" => ("server_error", Some("overloaded")),
        "timeout_error" => ("server_error", Some("timeout")),
        "api_error" => ("server_error", None),
        _ if status >= 500 || status == 0 => ("server_error", None),
        _ => ("invalid_request_error", None),
    }
}

fn error_from_wire(data: &[u8], status: u16) -> ErrorBody {
    match serde_json::from_slice::<ErrorWire>(data) {
        Ok(e) => {
            let (kind, code) = error_kind(&e.error.kind, status);
            let message = if e.error.message.is_empty() {
                format!("Anthropic provider error: {}", e.error.kind)
            } else {
                e.error.message
            };
            ErrorBody::new(kind, code, message)
        }
        Err(_) => {
            let (kind, code) = error_kind("", status);
            ErrorBody::new(
                kind,
                code,
                format!("Anthropic provider returned status {status}"),
            )
        }
    }
}

/// Translates an Anthropic error response (`{"type":"error","error":{"type",
/// "message"},"request_id"}`) into the OpenAI error body, keeping the status.
/// A body that is not Anthropic's error shape still gets a body by status.
pub fn error_to_openai(status: u16, body: &[u8]) -> OpenAiError {
    OpenAiError {
        status,
        body: error_from_wire(body, status),
    }
}

// ---------------------------------------------------------------------------
// (3) Streams

mod stream;
pub use stream::{StreamItem, StreamTranslator};

// ---------------------------------------------------------------------------
// (5) The other direction: Messages requests on OpenAI-compatible routes

mod reverse;
pub use reverse::{
    request_to_openai, response_to_anthropic, stop_reason, ChatToMessages, MessagesResponse,
};

#[cfg(test)]
#[path = "anthropic_tests.rs"]
mod tests;
