//! Validation of Anthropic Messages API bodies (`POST /v1/messages` and
//! `/v1/messages/count_tokens`) and the reading of Anthropic stream events
//! the gateway needs to relay them (where content starts, where the stream
//! ends, its usage).
//!
//! As for chat completions ([`crate::validate`]), the gateway reads a
//! borrowed view of the client's bytes and an Anthropic provider gets them
//! back with only the gateway's edits spliced in (the upstream model name,
//! the route's adaptations): field order, numbers, `cache_control` markers
//! and fields the gateway does not know reach Anthropic untouched.

use crate::config::RouteConfig;
use crate::splice::{members, ObjectError, ObjectSpans};
use crate::sse::{event_data, event_name, TokenUsage};
use crate::validate::Invalid;
use serde::Deserialize;
use serde_json::Value;

/// A Messages request that passed validation; the body stays with the caller.
#[derive(Debug, Clone, PartialEq)]
pub struct MessagesRequest {
    /// The catalogue model asked for.
    pub model: String,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// Characters of prompt text (system, messages, tools), for estimates.
    pub prompt_chars: usize,
    /// Where the body's top-level members lie.
    pub spans: ObjectSpans,
}

impl MessagesRequest {
    /// The body for an Anthropic route: `src` with the route's adaptations
    /// and its upstream model name; every other byte is the client's.
    pub fn upstream_body(&self, src: &[u8], route: &RouteConfig) -> Vec<u8> {
        let mut body = self.spans.edit(src);
        route.adapt(&mut body);
        body.finish()
    }
}

fn invalid(param: &str, message: impl Into<String>) -> Invalid {
    Invalid {
        param: Some(param.to_owned()),
        message: message.into(),
        code: None,
    }
}

fn object_error(e: ObjectError) -> Invalid {
    match e {
        ObjectError::Syntax(e) => Invalid {
            param: None,
            message: format!("The request body is not valid JSON: {e}"),
            code: None,
        },
        ObjectError::NotObject => Invalid {
            param: None,
            message: "The request body must be a JSON object.".into(),
            code: None,
        },
        ObjectError::Duplicate(key) => invalid(
            &key,
            format!("{key}: the key appears more than once; send it once."),
        ),
    }
}

/// Validates a Messages body. `count_tokens`: the body of
/// `/v1/messages/count_tokens`, which has no `max_tokens` and never streams.
/// Messages follow Anthropic's wording (`field: problem`), since the
/// Anthropic SDKs show it as is.
pub fn validate_messages(bytes: &[u8], count_tokens: bool) -> Result<MessagesRequest, Invalid> {
    let body = members(bytes).map_err(object_error)?;
    let get = |key: &str| -> Result<Option<Value>, Invalid> {
        body.iter()
            .find(|(k, _)| k == key)
            .map(|(_, raw)| {
                serde_json::from_str::<Value>(raw.get())
                    .map_err(|e| invalid(key, format!("{key}: cannot be read ({e})")))
            })
            .transpose()
    };
    let model = match get("model")? {
        Some(Value::String(s)) if !s.is_empty() => s,
        Some(Value::String(_)) => return Err(invalid("model", "model: must not be empty")),
        None | Some(Value::Null) => return Err(invalid("model", "model: Field required")),
        Some(_) => return Err(invalid("model", "model: Input should be a valid string")),
    };
    let messages = match get("messages")? {
        Some(Value::Array(list)) => list,
        None | Some(Value::Null) => return Err(invalid("messages", "messages: Field required")),
        Some(_) => {
            return Err(invalid(
                "messages",
                "messages: Input should be a valid list",
            ))
        }
    };
    let mut prompt_chars = 0;
    for (i, m) in messages.iter().enumerate() {
        let param = format!("messages.{i}");
        match m.get("role").and_then(Value::as_str) {
            Some("user" | "assistant") => {}
            Some("system") => return Err(invalid(&format!("{param}.role"), format!("{param}.role: Unexpected role \"system\". The Messages API accepts a top-level `system` parameter, not \"system\" as an input message role."))),
            _ => return Err(invalid(&format!("{param}.role"), format!("{param}.role: Input should be 'user' or 'assistant'"))),
        }
        match m.get("content") {
            Some(c @ (Value::String(_) | Value::Array(_))) => prompt_chars += text_chars(c),
            _ => {
                return Err(invalid(
                    &format!("{param}.content"),
                    format!(
                        "{param}.content: Field required (a string or a list of content blocks)"
                    ),
                ))
            }
        }
    }
    for key in ["system", "tools"] {
        if let Some(v) = get(key)? {
            prompt_chars += text_chars(&v);
        }
    }
    if !count_tokens {
        match get("max_tokens")? {
            Some(Value::Number(n)) if n.as_u64().is_some_and(|v| v >= 1) => {}
            None | Some(Value::Null) => {
                return Err(invalid("max_tokens", "max_tokens: Field required"))
            }
            Some(_) => {
                return Err(invalid(
                    "max_tokens",
                    "max_tokens: Input should be an integer greater than or equal to 1",
                ))
            }
        }
    }
    let stream = match get("stream")? {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) if !count_tokens => b,
        Some(Value::Bool(_)) => {
            return Err(invalid("stream", "stream: Extra inputs are not permitted"))
        }
        Some(_) => return Err(invalid("stream", "stream: Input should be a valid boolean")),
    };
    Ok(MessagesRequest {
        model,
        stream,
        prompt_chars,
        spans: ObjectSpans::new(bytes, &body),
    })
}

/// Characters of every string inside `v` (text, tool inputs, schemas): a
/// rough size of the prompt for estimates, never sent anywhere.
pub fn text_chars(v: &Value) -> usize {
    match v {
        Value::String(s) => s.chars().count(),
        Value::Array(items) => items.iter().map(text_chars).sum(),
        Value::Object(map) => map.values().map(text_chars).sum(),
        _ => 0,
    }
}

/// Estimated input tokens of a Messages body (about four characters per
/// token), for `count_tokens` through a route whose provider cannot count.
pub fn estimate_input_tokens(prompt_chars: usize) -> u64 {
    prompt_chars.div_ceil(4).max(1) as u64
}

/// What the gateway reads from one Anthropic stream event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventInfo {
    /// `message_stop`: the stream is complete.
    pub done: bool,
    /// An `error` event: the provider failed mid-stream.
    pub error: bool,
    /// Carries nothing the client reads as output yet (`message_start`,
    /// `ping`, an empty text block's start, comments).
    pub preamble: bool,
    /// Input tokens reported (`message_start`, and `message_delta` in
    /// current API versions), cache reads and writes included.
    pub input_tokens: Option<u64>,
    /// Cumulative output tokens reported.
    pub output_tokens: Option<u64>,
    /// Characters of generated output (text, tool input, thinking).
    pub content_chars: usize,
}

#[derive(Deserialize, Default)]
struct UsageWire {
    input_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    output_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct EventWire {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    message: Option<MessageWire>,
    #[serde(default)]
    usage: Option<UsageWire>,
    #[serde(default)]
    content_block: Option<Value>,
    #[serde(default)]
    delta: Option<Value>,
}

#[derive(Deserialize)]
struct MessageWire {
    #[serde(default)]
    usage: Option<UsageWire>,
}

impl UsageWire {
    fn input(&self) -> Option<u64> {
        self.input_tokens.map(|i| {
            i + self.cache_creation_input_tokens.unwrap_or(0)
                + self.cache_read_input_tokens.unwrap_or(0)
        })
    }
}

/// Reads one raw Anthropic SSE event. Data that does not parse reads as
/// content (never as preamble or the end), so it is forwarded, not held.
pub fn inspect_event(raw: &[u8]) -> EventInfo {
    let Some(data) = event_data(raw) else {
        return EventInfo {
            preamble: true,
            ..EventInfo::default()
        };
    };
    if event_name(raw).as_deref() == Some("error") {
        return EventInfo {
            error: true,
            ..EventInfo::default()
        };
    }
    let Ok(event) = serde_json::from_str::<EventWire>(&data) else {
        return EventInfo::default();
    };
    let mut info = EventInfo::default();
    match event.kind.as_str() {
        "message_start" => {
            info.preamble = true;
            if let Some(u) = event.message.and_then(|m| m.usage) {
                info.input_tokens = u.input();
                info.output_tokens = u.output_tokens;
            }
        }
        "ping" => info.preamble = true,
        "content_block_start" => {
            // A tool call's start names the tool: that is output already.
            let block = event.content_block.unwrap_or(Value::Null);
            let empty = |k: &str| {
                block
                    .get(k)
                    .and_then(Value::as_str)
                    .is_none_or(str::is_empty)
            };
            info.preamble = match block.get("type").and_then(Value::as_str) {
                Some("text") => empty("text"),
                Some("thinking") => empty("thinking"),
                _ => false,
            };
        }
        "content_block_delta" => {
            let delta = event.delta.unwrap_or(Value::Null);
            info.content_chars = ["text", "partial_json", "thinking"]
                .iter()
                .filter_map(|k| delta.get(*k).and_then(Value::as_str))
                .map(|s| s.chars().count())
                .sum();
        }
        "message_delta" => {
            if let Some(u) = event.usage {
                info.input_tokens = u.input();
                info.output_tokens = u.output_tokens;
            }
        }
        "message_stop" => info.done = true,
        "error" => info.error = true,
        _ => {}
    }
    info
}

/// Token counts of an Anthropic stream, from its events in order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamUsage {
    input: Option<u64>,
    output: Option<u64>,
}

impl StreamUsage {
    /// Takes the counts one event reported (later reports win: output is cumulative).
    pub fn update(&mut self, info: &EventInfo) {
        self.input = info.input_tokens.or(self.input);
        self.output = info.output_tokens.or(self.output);
    }

    /// The counts so far; `None` until the provider reported any.
    pub fn usage(&self) -> Option<TokenUsage> {
        if self.input.is_none() && self.output.is_none() {
            return None;
        }
        let (p, c) = (self.input.unwrap_or(0), self.output.unwrap_or(0));
        Some(TokenUsage {
            prompt_tokens: p,
            completion_tokens: c,
            total_tokens: p + c,
            // Not read from this wire: billed at the full input price.
            cached_tokens: 0,
        })
    }
}

/// Token counts of a non-streamed Messages response body.
pub fn response_usage(body: &[u8]) -> Option<TokenUsage> {
    #[derive(Deserialize)]
    struct WithUsage {
        usage: Option<UsageWire>,
    }
    let u = serde_json::from_slice::<WithUsage>(body).ok()?.usage?;
    let mut s = StreamUsage::default();
    s.update(&EventInfo {
        input_tokens: u.input(),
        output_tokens: u.output_tokens,
        ..EventInfo::default()
    });
    s.usage()
}

/// The `event: error` that ends an Anthropic stream the gateway cannot
/// finish (`body_json`: an Anthropic error body).
pub fn error_event(body_json: &str) -> Vec<u8> {
    format!("event: error\ndata: {body_json}\n\n").into_bytes()
}

#[cfg(test)]
#[path = "messages_tests.rs"]
mod tests;
