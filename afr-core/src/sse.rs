//! Server-Sent Events framing for passthrough, and what the gateway reads
//! from an OpenAI `chat.completion.chunk` (usage, content, errors).
//!
//! Why not an SSE crate: the crates we looked at (`eventsource-stream`,
//! `sse-stream`) decode events into strings and drop the original bytes, but
//! the contract is to forward each upstream event *byte for byte* as soon as
//! its terminating blank line arrives. [`EventFramer`] therefore only finds
//! event boundaries (per the WHATWG grammar: lines end in `\n`, `\r\n` or
//! `\r`; an empty line ends an event) and hands back the raw bytes, and
//! [`event_data`] decodes the `data` field the way the OpenAI SDKs do.

use serde::Deserialize;

/// Largest SSE event the gateway buffers, in bytes. Real events are a few
/// hundred bytes (a delta) to a few kilobytes (Azure's filter annotations); a
/// provider that never sends the blank line must not grow memory without bound.
pub const MAX_EVENT_BYTES: usize = 1 << 20;

/// An event grew past the framer's limit before its terminating blank line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("an SSE event exceeds {limit} bytes")]
pub struct EventTooLarge {
    /// The limit in force.
    pub limit: usize,
}

/// Splits a byte stream into complete SSE events, keeping their exact bytes.
///
/// A `\r` at the very end of the buffered bytes is held back until the next
/// byte shows whether it is half of a `\r\n`; OpenAI-format streams use `\n`.
///
/// Work is linear in the bytes pushed: each byte is scanned once, copied once
/// into its event, and moved at most once more when handed-out bytes are
/// dropped from the front of the buffer (only when they are at least half of
/// it, so a chunk holding many events never shifts its tail per event).
#[derive(Debug)]
pub struct EventFramer {
    buf: Vec<u8>,
    /// Start of the unfinished event: bytes before it were handed out.
    start: usize,
    /// Where scanning resumes; everything from `start` to it belongs to the unfinished event.
    scanned: usize,
    /// Start of the line being scanned.
    line_start: usize,
    /// Largest event accepted.
    max_event: usize,
    /// An event was too large: the stream is unusable from there on.
    failed: bool,
    /// Bytes moved by compaction, for the linear-work test.
    #[cfg(test)]
    moved: usize,
}

impl Default for EventFramer {
    fn default() -> Self {
        EventFramer::with_max_event(MAX_EVENT_BYTES)
    }
}

impl EventFramer {
    /// An empty framer accepting events of up to [`MAX_EVENT_BYTES`].
    pub fn new() -> Self {
        EventFramer::default()
    }

    /// An empty framer accepting events of up to `max_event` bytes.
    pub fn with_max_event(max_event: usize) -> Self {
        EventFramer {
            buf: Vec::new(),
            start: 0,
            scanned: 0,
            line_start: 0,
            max_event,
            failed: false,
            #[cfg(test)]
            moved: 0,
        }
    }

    /// Appends bytes received from upstream (dropped once an event was too large).
    pub fn push(&mut self, bytes: &[u8]) {
        if self.failed {
            return;
        }
        let rest = self.buf.len() - self.start;
        if self.start > 0 && self.start >= rest {
            // Moves `rest` bytes, no more than the `start` bytes dropped for
            // good: compaction costs at most one move per byte ever pushed.
            self.buf.drain(..self.start);
            #[cfg(test)]
            {
                self.moved += rest;
            }
            self.scanned -= self.start;
            self.line_start -= self.start;
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered that do not yet form a complete event.
    pub fn pending(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// The next complete event (including its terminating blank line), if any.
    ///
    /// Fails, and keeps failing, once the unfinished event (or a complete one)
    /// is longer than the framer's limit.
    pub fn next_event(&mut self) -> Result<Option<Vec<u8>>, EventTooLarge> {
        let too_large = EventTooLarge {
            limit: self.max_event,
        };
        if self.failed {
            return Err(too_large);
        }
        let mut i = self.scanned;
        while i < self.buf.len() {
            let end_len = match self.buf[i] {
                b'\n' => 1,
                b'\r' if i + 1 == self.buf.len() => break,
                b'\r' if self.buf[i + 1] == b'\n' => 2,
                b'\r' => 1,
                _ => {
                    i += 1;
                    continue;
                }
            };
            let empty_line = i == self.line_start;
            i += end_len;
            self.line_start = i;
            if empty_line {
                self.scanned = i;
                if i - self.start > self.max_event {
                    self.failed = true;
                    return Err(too_large);
                }
                let event = self.buf[self.start..i].to_vec();
                self.start = i;
                return Ok(Some(event));
            }
        }
        self.scanned = i;
        if self.buf.len() - self.start > self.max_event {
            self.failed = true;
            return Err(too_large);
        }
        Ok(None)
    }
}

/// Whether an event has any `data:` line (a comment-only keep-alive has none).
pub fn has_data(raw: &[u8]) -> bool {
    // Without allocating: this runs on events the gateway only wants to skip.
    raw.split(|&b| b == b'\n' || b == b'\r')
        .any(|line| line == b"data" || line.starts_with(b"data:"))
}

/// The `data` of one raw event, as the OpenAI SDKs decode it: `data:` lines
/// joined with `\n`, one leading space stripped, comments ignored. `None`
/// when the event has no `data` line.
pub fn event_data(raw: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(raw);
    let mut data: Option<String> = None;
    for line in text.split(['\n', '\r']) {
        let (field, value) = match line.find(':') {
            Some(0) => continue,
            Some(pos) => (&line[..pos], &line[pos + 1..]),
            None => (line, ""),
        };
        if field != "data" {
            continue;
        }
        let value = value.strip_prefix(' ').unwrap_or(value);
        match data.as_mut() {
            Some(d) => {
                d.push('\n');
                d.push_str(value);
            }
            None => data = Some(value.to_owned()),
        }
    }
    data
}

/// The `event` field of one raw event, if it has one (Anthropic streams do).
pub fn event_name(raw: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(raw);
    text.split(['\n', '\r']).find_map(|line| {
        let value = line.strip_prefix("event:")?;
        Some(value.strip_prefix(' ').unwrap_or(value).to_owned())
    })
}

/// Token counts from a provider's `usage` object.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct TokenUsage {
    /// Prompt tokens.
    #[serde(default, deserialize_with = "null_as_zero")]
    pub prompt_tokens: u64,
    /// Completion tokens.
    #[serde(default, deserialize_with = "null_as_zero")]
    pub completion_tokens: u64,
    /// Total tokens.
    #[serde(default, deserialize_with = "null_as_zero")]
    pub total_tokens: u64,
    /// Of the prompt tokens, those served from the provider's cache
    /// (`prompt_tokens_details.cached_tokens`), billed at the cached price.
    #[serde(
        default,
        rename = "prompt_tokens_details",
        deserialize_with = "cached_tokens"
    )]
    pub cached_tokens: u64,
    /// Of the prompt tokens, those written to the provider's cache for five
    /// minutes (Anthropic `cache_creation.ephemeral_5m_input_tokens`).
    #[serde(skip)]
    pub cache_write_5m: u64,
    /// Of the prompt tokens, those written to the cache for an hour.
    #[serde(skip)]
    pub cache_write_1h: u64,
    /// Of the completion tokens, those spent reasoning
    /// (`completion_tokens_details.reasoning_tokens`): billed as output,
    /// recorded apart.
    #[serde(
        default,
        rename = "completion_tokens_details",
        deserialize_with = "reasoning_tokens"
    )]
    pub reasoning_tokens: u64,
}

impl TokenUsage {
    /// Prompt tokens billed at the plain input price: neither read from nor
    /// written to the cache.
    pub fn uncached_input(&self) -> u64 {
        self.prompt_tokens
            .saturating_sub(self.cached_tokens)
            .saturating_sub(self.cache_write_5m)
            .saturating_sub(self.cache_write_1h)
    }
}

fn reasoning_tokens<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    struct Details {
        #[serde(default, deserialize_with = "null_as_zero")]
        reasoning_tokens: u64,
    }
    Ok(Option::<Details>::deserialize(deserializer)?.map_or(0, |d| d.reasoning_tokens))
}

fn cached_tokens<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    struct Details {
        #[serde(default, deserialize_with = "null_as_zero")]
        cached_tokens: u64,
    }
    Ok(Option::<Details>::deserialize(deserializer)?.map_or(0, |d| d.cached_tokens))
}

/// Some OpenAI-compatible servers send `"completion_tokens": null` (e.g. for
/// a prompt-only answer); that is zero, not a reason to lose the whole usage.
fn null_as_zero<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    Ok(Option::<u64>::deserialize(deserializer)?.unwrap_or(0))
}

/// What the gateway needs to know about one OpenAI-format stream event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChunkInfo {
    /// `data: [DONE]`.
    pub done: bool,
    /// The chunk's `usage`, when it is an object.
    pub usage: Option<TokenUsage>,
    /// A usage-only chunk (`"choices":[]` and a usage object): the one the
    /// gateway strips when it, not the client, asked for `include_usage`.
    pub usage_only: bool,
    /// Characters of generated content (for estimating tokens of a cut stream).
    pub content_chars: usize,
    /// An `{"error":…}` event.
    pub error: bool,
}

#[derive(Deserialize)]
struct ChunkWire {
    #[serde(default)]
    choices: Option<Vec<ChoiceWire>>,
    #[serde(default)]
    usage: Option<TokenUsage>,
    #[serde(default)]
    error: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
struct ChoiceWire {
    #[serde(default)]
    delta: Option<DeltaWire>,
    /// Legacy `/v1/completions` streams carry their text here.
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct DeltaWire {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    reasoning_content: Option<String>,
    /// Some OpenAI-compatible servers name their reasoning deltas so.
    #[serde(default)]
    reasoning: Option<String>,
    #[serde(default)]
    refusal: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<ToolCallWire>>,
}

#[derive(Deserialize)]
struct ToolCallWire {
    #[serde(default)]
    function: Option<FunctionWire>,
}

#[derive(Deserialize)]
struct FunctionWire {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

impl DeltaWire {
    /// Characters of everything generated in this delta: text, reasoning,
    /// a refusal, tool-call names and arguments.
    fn chars(&self) -> usize {
        let count = |s: &Option<String>| s.as_deref().map_or(0, |s| s.chars().count());
        count(&self.content)
            + count(&self.reasoning_content)
            + count(&self.reasoning)
            + count(&self.refusal)
            + self
                .tool_calls
                .iter()
                .flatten()
                .filter_map(|c| c.function.as_ref())
                .map(|f| count(&f.name) + count(&f.arguments))
                .sum::<usize>()
    }
}

/// Reads one raw OpenAI-format event. Unparseable data yields a default
/// (all-false) answer: the gateway forwards what it does not understand.
pub fn inspect_chunk(raw: &[u8]) -> ChunkInfo {
    let Some(data) = event_data(raw) else {
        return ChunkInfo::default();
    };
    if data.trim() == "[DONE]" {
        return ChunkInfo {
            done: true,
            ..ChunkInfo::default()
        };
    }
    let Ok(chunk) = serde_json::from_str::<ChunkWire>(&data) else {
        return ChunkInfo::default();
    };
    let content_chars = chunk
        .choices
        .iter()
        .flatten()
        .map(|c| {
            c.delta.as_ref().map_or(0, DeltaWire::chars)
                + c.text.as_deref().map_or(0, |s| s.chars().count())
        })
        .sum();
    ChunkInfo {
        done: false,
        usage_only: chunk.usage.is_some() && chunk.choices.as_ref().is_some_and(|c| c.is_empty()),
        usage: chunk.usage,
        content_chars,
        error: chunk.error.is_some(),
    }
}

/// Whether an event's `data` is neither `[DONE]` nor one JSON value: a
/// provider that cut or garbled an event (every wire the gateway relays,
/// OpenAI, Anthropic and Responses, carries one JSON value per event). The
/// gateway must not pass such an event on as if it were content: before the
/// first content it fails over, after it the stream ends with an error event.
///
/// Runs on every relayed event, so the usual one-`data:`-line event is
/// checked in place without copying; `IgnoredAny` validates without building
/// a value.
pub fn is_malformed(raw: &[u8]) -> bool {
    let mut lines = raw
        .split(|&b| b == b'\n' || b == b'\r')
        .filter(|line| line == b"data" || line.starts_with(b"data:"));
    let Some(first) = lines.next() else {
        return false;
    };
    let owned;
    let data: &[u8] = if lines.next().is_none() {
        let value = first.get(5..).unwrap_or_default();
        value.strip_prefix(b" ").unwrap_or(value)
    } else {
        owned = event_data(raw).unwrap_or_default();
        owned.as_bytes()
    };
    if data.trim_ascii() == b"[DONE]" {
        return false;
    }
    serde_json::from_slice::<serde::de::IgnoredAny>(data).is_err()
}

/// `data: [DONE]` (with or without the space), found without parsing JSON.
pub fn is_done(raw: &[u8]) -> bool {
    raw.len() <= 32 && event_data(raw).is_some_and(|d| d.trim() == "[DONE]")
}

/// An `{"error":…}` event, found from its first bytes.
pub fn is_error_event(raw: &[u8]) -> bool {
    let Some(rest) = raw.strip_prefix(b"data:") else {
        return false;
    };
    let rest = rest.strip_prefix(b" ").unwrap_or(rest);
    rest.starts_with(b"{\"error\"")
}

/// The usage-only chunk (`"choices":[]` and a usage object). Cheap for the
/// common case: chunks without a non-null `usage` are rejected by a byte
/// search; only a candidate is parsed.
pub fn is_usage_only(raw: &[u8]) -> bool {
    find(raw, b"\"usage\"").is_some()
        && find(raw, b"\"usage\":null").is_none()
        && inspect_chunk(raw).usage_only
}

/// Whether an event is stream preamble: a chunk that carries no content yet
/// (the role announcement: every delta holds only `role` and empty
/// `content`/`refusal`, no `finish_reason`, no usage; or Azure's prompt-filter
/// annotation with `"choices":[]` and no usage). The gateway holds such
/// events back and may still fail over, because no content has reached the client.
pub fn is_preamble(raw: &[u8]) -> bool {
    let Some(data) = event_data(raw) else {
        // Comments and blank keep-alives carry nothing either.
        return true;
    };
    let Ok(serde_json::Value::Object(chunk)) = serde_json::from_str::<serde_json::Value>(&data)
    else {
        return false;
    };
    if chunk.get("usage").is_some_and(|u| !u.is_null()) || chunk.contains_key("error") {
        return false;
    }
    let Some(choices) = chunk.get("choices").and_then(|c| c.as_array()) else {
        return false;
    };
    // An empty `choices` without usage is an annotation chunk (Azure's
    // `prompt_filter_results` comes first): nothing the client reads as content.
    choices.iter().all(|choice| {
        choice.get("finish_reason").is_none_or(|f| f.is_null())
            && choice
                .get("delta")
                .and_then(|d| d.as_object())
                .is_some_and(|delta| {
                    delta.iter().all(|(k, v)| match k.as_str() {
                        "role" => true,
                        "content" | "refusal" => v.is_null() || v.as_str() == Some(""),
                        _ => v.is_null(),
                    })
                })
    })
}

/// Removes the `"usage":null` member the provider adds to every chunk when
/// `include_usage` is set, for a client that did not ask for it: it then sees
/// the chunks exactly as the provider sends them without `include_usage`
/// (fixture `openai-chat-stream-no-usage.sse`). Inside JSON strings a quote is
/// always escaped, so the unescaped pattern can only be a member.
pub fn strip_null_usage(raw: &[u8]) -> Vec<u8> {
    const PATTERNS: [&[u8]; 3] = [b",\"usage\":null", b"\"usage\":null,", b", \"usage\": null"];
    let mut out = raw.to_vec();
    for pattern in PATTERNS {
        while let Some(pos) = find(&out, pattern) {
            out.drain(pos..pos + pattern.len());
        }
    }
    out
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The `data: {"error":…}` event that ends a stream the gateway cannot finish
/// (no `event:` line: older OpenAI SDKs mis-parse named events).
pub fn error_event(body_json: &str) -> Vec<u8> {
    format!("data: {body_json}\n\n").into_bytes()
}

#[cfg(test)]
#[path = "sse_tests.rs"]
mod tests;
