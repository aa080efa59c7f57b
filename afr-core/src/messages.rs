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
use crate::estimate::{self, Tally, Wire};
use crate::splice::{members, ObjectError, ObjectSpans};
use crate::sse::{event_data, event_name, TokenUsage};
use crate::validate::Invalid;
use serde::Deserialize;
use serde_json::Value;

mod turns;

/// A Messages request that passed validation; the body stays with the caller.
#[derive(Debug, Clone, PartialEq)]
pub struct MessagesRequest {
    /// The catalogue model asked for.
    pub model: String,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// The client's `max_tokens` (0 for `count_tokens`, which generates
    /// nothing, and for a request that only warms the prompt cache).
    pub max_tokens: u64,
    /// Where the body's top-level members lie.
    pub spans: ObjectSpans,
    /// The prompt estimate ([`crate::estimate::prompt_tokens`] of the body),
    /// when [`validate_messages_counting`] counted it in validation's pass;
    /// `None` leaves it to be counted when asked for.
    pub prompt_tokens: Option<u64>,
}

impl MessagesRequest {
    /// The body for an Anthropic route: `src` with the route's adaptations
    /// and its upstream model name; every other byte is the client's.
    pub fn upstream_body(&self, src: &[u8], route: &RouteConfig) -> Vec<u8> {
        let mut body = self.spans.edit(src);
        route.adapt(&mut body);
        body.finish()
    }

    /// The most output tokens `route` can bill: `max_tokens` after the
    /// route's adaptations (which apply to a translated body too).
    pub fn output_cap(&self, route: &RouteConfig) -> u64 {
        crate::validate::capped(route, "max_tokens", self.max_tokens)
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
    validate(bytes, count_tokens, false)
}

/// [`validate_messages`] for a request that will reserve its prompt estimate
/// (a key with limits): the estimate is counted in the same pass over the
/// turns (`prompt_tokens`), which was a second full pass of its own.
pub fn validate_messages_counting(
    bytes: &[u8],
    count_tokens: bool,
) -> Result<MessagesRequest, Invalid> {
    validate(bytes, count_tokens, true)
}

fn validate(bytes: &[u8], count_tokens: bool, count: bool) -> Result<MessagesRequest, Invalid> {
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
    // One pass accepts the usual turns; the rest are read as `Value`s below,
    // which decides and words a refusal.
    if let Some((_, raw)) = body.iter().find(|(k, _)| k == "messages") {
        let mut tally = count.then(Tally::default);
        if turns::accepted(raw, tally.as_mut()) {
            // The other prompt members (system, tools) from their raw values;
            // one the count cannot read leaves the estimate to `prompt_tokens`.
            let prompt_tokens = tally.and_then(|mut tally| {
                body.iter()
                    .all(|(key, raw)| key == "messages" || tally.member(Wire::Messages, key, raw))
                    .then(|| tally.tokens(Wire::Messages))
            });
            return finish(bytes, &body, model, count_tokens, get, prompt_tokens);
        }
    }
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
    for (i, m) in messages.iter().enumerate() {
        let param = format!("messages.{i}");
        // Any role the client sends goes to an Anthropic route as sent:
        // `system` inside `messages` (Claude Code's first request of a
        // session carries one) and roles newer than this gateway are the
        // provider's to judge, not ours. A route of the other wire
        // translates the roles it can and names the one it cannot.
        match m.get("role") {
            Some(Value::String(_)) => {}
            None | Some(Value::Null) => {
                return Err(invalid(
                    &format!("{param}.role"),
                    format!("{param}.role: Field required"),
                ))
            }
            Some(_) => {
                return Err(invalid(
                    &format!("{param}.role"),
                    format!("{param}.role: Input should be a valid string"),
                ))
            }
        }
        // `user` and `assistant` turns need their content, as Anthropic
        // says; a `system` message may have none (the beta's
        // `BetaSystemMessageParam`: `content?` beside `clear_at` and
        // `output_config`), and a role the gateway does not know carries
        // whatever its provider expects.
        let needs_content = matches!(
            m.get("role").and_then(Value::as_str),
            Some("user" | "assistant")
        );
        match m.get("content") {
            Some(Value::String(_) | Value::Array(_)) => {}
            _ if !needs_content => {}
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
    finish(bytes, &body, model, count_tokens, get, None)
}

/// Validates the members after `messages` and makes the request.
fn finish(
    bytes: &[u8],
    body: &[(std::borrow::Cow<'_, str>, &serde_json::value::RawValue)],
    model: String,
    count_tokens: bool,
    get: impl Fn(&str) -> Result<Option<Value>, Invalid>,
    prompt_tokens: Option<u64>,
) -> Result<MessagesRequest, Invalid> {
    let mut max_tokens = 0;
    if !count_tokens {
        // 0 is allowed: it populates the prompt cache without generating
        // (the SDK's `MessageCreateParams.max_tokens`), and reserves nothing.
        match get("max_tokens")? {
            Some(Value::Number(n)) if n.as_u64().is_some() => {
                max_tokens = n.as_u64().unwrap_or(0);
            }
            None | Some(Value::Null) => {
                return Err(invalid("max_tokens", "max_tokens: Field required"))
            }
            Some(Value::Number(n)) if n.is_i64() => {
                return Err(invalid(
                    "max_tokens",
                    "max_tokens: Input should be greater than or equal to 0",
                ))
            }
            Some(_) => {
                return Err(invalid(
                    "max_tokens",
                    "max_tokens: Input should be a valid integer",
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
        max_tokens,
        spans: ObjectSpans::new(bytes, body),
        prompt_tokens,
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
pub fn estimate_input_tokens(body: &[u8]) -> u64 {
    estimate::prompt_tokens(body, estimate::Wire::Messages).max(1)
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
    /// The usage the event reported (`message_start`: input and the first
    /// output count; `message_delta`: the final output count, and in current
    /// API versions the input classes again).
    pub usage: Option<AnthropicUsage>,
    /// A `message_delta` with usage: Anthropic's counts are final from here.
    pub final_usage: bool,
    /// Characters of generated output (text, tool input, thinking).
    pub content_chars: usize,
}

/// Anthropic's `usage` object, the one reader of its token classes for every
/// place the gateway meets it (native answers and streams, and the
/// translation to OpenAI's shape). `input_tokens` excludes cache reads and
/// writes; OpenAI's `prompt_tokens` (and [`TokenUsage::prompt_tokens`]) includes them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct AnthropicUsage {
    /// Input tokens neither read from nor written to the cache.
    #[serde(default)]
    pub input_tokens: Option<u64>,
    /// Input tokens written to the cache (5-minute and 1-hour together).
    #[serde(default)]
    pub cache_creation_input_tokens: Option<u64>,
    /// Input tokens read from the cache.
    #[serde(default)]
    pub cache_read_input_tokens: Option<u64>,
    /// The split of `cache_creation_input_tokens` by time to live.
    #[serde(default)]
    pub cache_creation: Option<CacheCreation>,
    /// Output tokens (thinking included), cumulative in a stream.
    #[serde(default)]
    pub output_tokens: Option<u64>,
}

/// `usage.cache_creation`: cache writes by time to live.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct CacheCreation {
    /// Written for five minutes.
    #[serde(default)]
    pub ephemeral_5m_input_tokens: Option<u64>,
    /// Written for an hour.
    #[serde(default)]
    pub ephemeral_1h_input_tokens: Option<u64>,
}

impl AnthropicUsage {
    /// Takes what `later` reports (a later event's counts win, field by field).
    pub fn merge(&mut self, later: &AnthropicUsage) {
        self.input_tokens = later.input_tokens.or(self.input_tokens);
        self.cache_creation_input_tokens = later
            .cache_creation_input_tokens
            .or(self.cache_creation_input_tokens);
        self.cache_read_input_tokens = later
            .cache_read_input_tokens
            .or(self.cache_read_input_tokens);
        self.cache_creation = later.cache_creation.or(self.cache_creation);
        self.output_tokens = later.output_tokens.or(self.output_tokens);
    }

    /// The counts by class. Cache writes without their split (older API
    /// versions) are 5-minute writes, the only kind those versions had.
    pub fn tokens(&self) -> TokenUsage {
        let read = self.cache_read_input_tokens.unwrap_or(0);
        let written = self.cache_creation_input_tokens.unwrap_or(0);
        let (w5, w1) = match self.cache_creation {
            Some(c) => {
                let w1 = c.ephemeral_1h_input_tokens.unwrap_or(0);
                let w5 = c
                    .ephemeral_5m_input_tokens
                    .unwrap_or_else(|| written.saturating_sub(w1));
                (w5, w1)
            }
            None => (written, 0),
        };
        let prompt = self.input_tokens.unwrap_or(0) + read + w5 + w1;
        let completion = self.output_tokens.unwrap_or(0);
        TokenUsage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            cached_tokens: read,
            cache_write_5m: w5,
            cache_write_1h: w1,
            // Thinking is billed as output; Anthropic does not count it apart.
            reasoning_tokens: 0,
        }
    }
}

#[derive(Deserialize)]
struct EventWire {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    message: Option<MessageWire>,
    #[serde(default)]
    usage: Option<AnthropicUsage>,
    #[serde(default)]
    content_block: Option<Value>,
    #[serde(default)]
    delta: Option<Value>,
}

#[derive(Deserialize)]
struct MessageWire {
    #[serde(default)]
    usage: Option<AnthropicUsage>,
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
            info.usage = event.message.and_then(|m| m.usage);
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
            info.final_usage = event.usage.is_some();
            info.usage = event.usage;
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
    usage: Option<AnthropicUsage>,
    complete: bool,
}

impl StreamUsage {
    /// Takes the counts one event reported (later reports win: output is cumulative).
    pub fn update(&mut self, info: &EventInfo) {
        if let Some(u) = &info.usage {
            self.usage
                .get_or_insert_with(AnthropicUsage::default)
                .merge(u);
        }
        self.complete |= info.final_usage;
    }

    /// The counts so far; `None` until the provider reported any.
    pub fn usage(&self) -> Option<TokenUsage> {
        self.usage.map(|u| u.tokens())
    }

    /// Whether the counts are final (`message_delta` reported them): before
    /// it, the output count is `message_start`'s placeholder.
    pub fn is_final(&self) -> bool {
        self.complete
    }
}

/// Token counts of a non-streamed Messages response body.
pub fn response_usage(body: &[u8]) -> Option<TokenUsage> {
    #[derive(Deserialize)]
    struct WithUsage {
        usage: Option<AnthropicUsage>,
    }
    Some(
        serde_json::from_slice::<WithUsage>(body)
            .ok()?
            .usage?
            .tokens(),
    )
}

/// The `event: error` that ends an Anthropic stream the gateway cannot
/// finish (`body_json`: an Anthropic error body).
pub fn error_event(body_json: &str) -> Vec<u8> {
    format!("event: error\ndata: {body_json}\n\n").into_bytes()
}

#[cfg(test)]
#[path = "messages_tests.rs"]
mod tests;
