//! Relaying a committed stream to the client: each upstream event is sent as
//! soon as it arrives, bytes unchanged, and read by the stream's usage meter
//! on the way; the relay finishes the request's accounting when it is dropped
//! (the stream over, or the client gone).
//!
//! When the gateway (not the client) asked for `include_usage`, the usage-only
//! chunk is dropped and the `"usage":null` members removed, so the client sees
//! exactly what the provider sends without `include_usage`. A client that asked
//! for it gets every byte unchanged.
//!
//! A failure after the stream committed ends it with `data: {"error":{...}}`
//! (never a silent truncation); so does an event that is not JSON (cut or
//! garbled by the provider), which is not passed on. A stream that committed before its first
//! content (a reasoning model thinking) waits for it up to `first_content`;
//! through any silence longer than `server.stream_keepalive` the client gets
//! an SSE comment, which the SDKs skip and which the meter never sees.
//! Dropping the body (client disconnect) drops the upstream
//! stream, which cancels the request.

use crate::providers::{EventStream, ProviderError};
use crate::serve::accounting::{Accounting, CLIENT_CLOSED};
use crate::serve::error::{Body, GatewayError};
use crate::serve::state::Gateway;
use afr_core::attempt::{Attempt, Expiry, Wake};
use afr_core::breaker::{Admission, Outcome};
use afr_core::endpoint::responses_event;
use afr_core::error::ErrorShape;
use afr_core::messages::{inspect_event, StreamUsage};
use afr_core::sse::{
    error_event, has_data, inspect_chunk, is_done, is_error_event, is_malformed, is_preamble,
    is_usage_only, strip_null_usage, TokenUsage,
};
use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderValue, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The comment sent through a silence on a committed stream: SSE clients
/// (the OpenAI SDKs among them) drop lines starting with `:`.
const KEEP_ALIVE: &[u8] = b": keep-alive\n\n";

/// The format of a stream's events, as the client reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    /// `chat.completion.chunk` (or `/v1/completions` `text_completion`)
    /// events ending with `data: [DONE]`.
    OpenAi,
    /// Anthropic's Messages events (`event:` lines, ending `message_stop`).
    Anthropic,
    /// The Responses API's typed `event: response.*` events, ending with
    /// `response.completed` (no `[DONE]`).
    Responses,
}

impl Wire {
    /// A provider's error event (ends the stream).
    pub fn is_error(self, raw: &[u8]) -> bool {
        match self {
            Wire::OpenAi => is_error_event(raw),
            Wire::Anthropic => inspect_event(raw).error,
            Wire::Responses => responses_event(raw).error,
        }
    }

    /// An event carrying no output yet (failover is still clean after it).
    pub fn is_preamble(self, raw: &[u8]) -> bool {
        match self {
            Wire::OpenAi => is_preamble(raw),
            Wire::Anthropic => inspect_event(raw).preamble,
            Wire::Responses => responses_event(raw).preamble,
        }
    }

    /// An event the client acts on (after it, no failover).
    pub fn is_content(self, raw: &[u8]) -> bool {
        match self {
            Wire::OpenAi | Wire::Anthropic => has_data(raw) && !self.is_preamble(raw),
            Wire::Responses => !self.is_preamble(raw),
        }
    }

    /// The stream's last event.
    fn is_done(self, raw: &[u8]) -> bool {
        match self {
            Wire::OpenAi => is_done(raw),
            Wire::Anthropic => inspect_event(raw).done,
            Wire::Responses => responses_event(raw).done,
        }
    }

    /// For the usage meter of the OpenAI-format wires: (last event, usage,
    /// characters of content). Anthropic's usage spans events and is read
    /// by the meter itself.
    /// The response id comes with the Responses API's final usage (the
    /// conversation a follow-up continues).
    fn inspect(self, raw: &[u8]) -> (bool, Option<TokenUsage>, usize, Option<String>) {
        match self {
            Wire::Responses => {
                let e = responses_event(raw);
                let id = e.usage.and(e.response_id);
                (e.done, e.usage, e.content_chars, id)
            }
            Wire::OpenAi | Wire::Anthropic => {
                let info = inspect_chunk(raw);
                (info.done, info.usage, info.content_chars, None)
            }
        }
    }

    /// The event that ends a stream with the gateway's `error`.
    fn error_event(self, error: &GatewayError) -> Bytes {
        let body = error.body();
        Bytes::from(match self {
            Wire::OpenAi | Wire::Responses => error_event(&body.to_json()),
            Wire::Anthropic => afr_core::messages::error_event(
                &ErrorShape::Anthropic.render(error.status().as_u16(), &body),
            ),
        })
    }
}

/// A stream that committed: its first content event arrived, or its
/// provider answered and the hold ended.
pub struct StreamStart {
    /// Shared state (breakers, metrics, usage).
    pub gateway: Arc<Gateway>,
    /// The provider committed to.
    pub provider: String,
    /// The events received before committing (preamble and, if it came, the
    /// first content event).
    pub first: Vec<Bytes>,
    /// Whether the last of `first` is the first content event (already
    /// classified while holding: not parsed again here).
    pub content_held: bool,
    /// The rest.
    pub events: EventStream,
    /// Whether the gateway added `include_usage` (strip it again).
    pub strip_usage: bool,
    /// The events' format.
    pub wire: Wire,
    /// The attempt's timeouts and pacing.
    pub attempt: Attempt,
    /// The request's accounting, finished when the relay is dropped.
    pub usage: Accounting,
    /// Gateway request id.
    pub request_id: String,
}

/// What waiting on the upstream gave.
enum Next {
    Event(Bytes),
    KeepAlive,
    Failed(ProviderError),
    /// The provider answered but sent no content in time (not its failure).
    NoContent(Expiry),
}

struct Relay {
    gateway: Arc<Gateway>,
    provider: String,
    first: std::collections::VecDeque<Bytes>,
    events: Option<EventStream>,
    strip_usage: bool,
    wire: Wire,
    attempt: Attempt,
    content_held: bool,
    content_seen: bool,
    /// When the last upstream event arrived (idle is measured from it).
    last_event: Instant,
    /// When the client was last sent anything (keep-alives are measured from it).
    last_sent: Instant,
    /// The request's accounting (taken when the relay is dropped).
    usage: Option<Accounting>,
    /// What the events say the provider billed.
    meter: Meter,
    /// The stream ended with the gateway's error event: the status to record.
    failed: Option<u16>,
    request_id: String,
    done: bool,
}

/// Builds the `text/event-stream` response of a stream.
///
/// The events are metered by the relay itself, not by a task of their own
/// fed over a channel as before: that task and its channel were ~5.7 KiB of
/// every stream held (valgrind massif, 300 streams) and a wake-up per event,
/// for the same metering on the same runtime.
pub fn respond(mut start: StreamStart) -> Response<Body> {
    start.usage.release_body();
    let now = Instant::now();
    let relay = Relay {
        gateway: start.gateway,
        provider: start.provider,
        first: start.first.into(),
        events: Some(start.events),
        strip_usage: start.strip_usage,
        wire: start.wire,
        attempt: start.attempt,
        content_held: start.content_held,
        content_seen: false,
        last_event: now,
        last_sent: now,
        usage: Some(start.usage),
        meter: Meter::new(start.wire),
        failed: None,
        request_id: start.request_id.clone(),
        done: false,
    };
    let stream = futures_util::stream::unfold(relay, |mut relay| async move {
        let bytes = relay.next_frame().await?;
        relay.last_sent = Instant::now();
        Some((Ok::<_, Infallible>(Frame::data(bytes)), relay))
    });
    let mut response = Response::new(BodyExt::boxed_unsync(StreamBody::new(stream)));
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    headers.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    // nginx must pass each event on at once even where proxy_buffering is on.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    if let Ok(id) = HeaderValue::from_str(&start.request_id) {
        headers.insert("x-request-id", id);
    }
    response
}

impl Relay {
    /// The next bytes for the client, or `None` when the stream is over.
    async fn next_frame(&mut self) -> Option<Bytes> {
        loop {
            if self.done {
                return None;
            }
            let (next, held) = match self.first.pop_front() {
                Some(first) => (Next::Event(first), true),
                None => (self.next_upstream().await, false),
            };
            let raw = match next {
                Next::Event(raw) => raw,
                Next::KeepAlive => return Some(Bytes::from_static(KEEP_ALIVE)),
                Next::Failed(error) => return Some(self.fail(error)),
                Next::NoContent(expiry) => return Some(self.no_content(expiry)),
            };
            // Held events were checked while holding; an upstream one that is
            // not JSON is a broken provider, never content to pass on.
            if !held && is_malformed(&raw) {
                return Some(self.fail(ProviderError::Protocol(format!(
                    "malformed event mid-stream: {}",
                    excerpt(&raw)
                ))));
            }
            let is_content = || {
                if held {
                    self.content_held && self.first.is_empty()
                } else {
                    self.wire.is_content(&raw)
                }
            };
            if !self.content_seen && is_content() {
                self.content_seen = true;
                if let Some(usage) = self.usage.as_mut() {
                    usage.first_content(Instant::now());
                }
            }
            if let Some(trace) = self.usage.as_mut().and_then(Accounting::trace) {
                trace.event(&raw);
            }
            // The meter sees every event, including the ones stripped below.
            if let Some((id, tokens)) = self.meter.event(&raw) {
                if let Some(usage) = self.usage.as_ref() {
                    usage.conversation(&id, tokens);
                }
            }
            // A Responses stream's `response.failed` is its last event and an error.
            if self.wire.is_done(&raw) && !self.wire.is_error(&raw) {
                self.done = true;
                self.drain_upstream();
                return Some(raw);
            }
            if self.wire.is_error(&raw) {
                // The provider's own error event: forward it and end.
                tracing::warn!(request_id = %self.request_id, provider = %self.provider, "provider sent an error event mid-stream");
                // The attempt's ticket settled when the stream committed; a later
                // break counts like a request admitted while closed.
                self.gateway
                    .settle(&self.provider, Admission::Allowed, Outcome::Failure);
                self.failed = Some(interrupted_status());
                self.done = true;
                return Some(raw);
            }
            if self.strip_usage {
                if is_usage_only(&raw) {
                    continue;
                }
                if contains(&raw, b"\"usage\":null") || contains(&raw, b"\"usage\": null") {
                    return Some(Bytes::from(strip_null_usage(&raw)));
                }
            }
            return Some(raw);
        }
    }

    /// The next upstream event, or a keep-alive due before it, or why the
    /// wait ended (deadlines from [`Attempt::committed`]).
    async fn next_upstream(&mut self) -> Next {
        let Some(events) = self.events.as_mut() else {
            return Next::Failed(ProviderError::Protocol("stream already closed".into()));
        };
        let (until, wake) =
            self.attempt
                .committed(self.content_seen, self.last_event, self.last_sent);
        // `next()` is cancel-safe: a keep-alive that wins loses no event.
        match tokio::time::timeout_at(until.into(), events.next()).await {
            Ok(Some(Ok(event))) => {
                self.last_event = Instant::now();
                Next::Event(event)
            }
            Ok(Some(Err(error))) => Next::Failed(error),
            Ok(None) => Next::Failed(ProviderError::Protocol(
                "the provider closed the stream before [DONE]".into(),
            )),
            Err(_) => match wake {
                Wake::KeepAlive => Next::KeepAlive,
                Wake::Expire(expiry) if expiry.provider_fault => {
                    Next::Failed(ProviderError::Timeout(expiry.limit.as_str()))
                }
                Wake::Expire(expiry) => Next::NoContent(expiry),
            },
        }
    }

    /// Ends a stream whose provider answered but never started its content
    /// (a reasoning model past `first_content`): an error event for the
    /// client, and no verdict on the provider, whose breaker ticket settled
    /// when the stream committed.
    fn no_content(&mut self, expiry: Expiry) -> Bytes {
        let error = GatewayError::ContentTimeout {
            limit: expiry.limit.as_str(),
            timeout: expiry.timeout,
        };
        tracing::warn!(request_id = %self.request_id, provider = %self.provider, error = %error, "provider answered but sent no content in time; ending the stream");
        self.failed = Some(error.status().as_u16());
        self.done = true;
        self.events = None;
        self.wire.error_event(&error)
    }

    /// Ends the stream after a provider failure with an OpenAI error event.
    fn fail(&mut self, error: ProviderError) -> Bytes {
        tracing::warn!(request_id = %self.request_id, provider = %self.provider, error = %error, "stream failed after its first content");
        // The attempt's ticket settled when the stream committed; a later
        // break counts like a request admitted while closed.
        self.gateway
            .settle(&self.provider, Admission::Allowed, Outcome::Failure);
        self.failed = Some(interrupted_status());
        self.done = true;
        self.events = None;
        self.wire
            .error_event(&GatewayError::StreamInterrupted(error.to_string()))
    }

    /// Reads the upstream to its end in the background so its connection
    /// goes back to the pool instead of being closed.
    fn drain_upstream(&mut self) {
        if let Some(mut events) = self.events.take() {
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(5), async {
                    while events.next().await.is_some() {}
                })
                .await;
            });
        }
    }
}

/// The status recorded for a stream the provider broke after it committed.
fn interrupted_status() -> u16 {
    GatewayError::StreamInterrupted(String::new())
        .status()
        .as_u16()
}

/// Whether `needle` occurs in `haystack` (an event's bytes): memchr's
/// searcher, not a comparison at every offset.
pub(crate) fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(haystack, needle).is_some()
}

/// What a stream's events say the provider billed: the one reader of usage
/// off a stream, for the relay and for an attempt that failed over
/// before its first content (`chat`).
pub struct Meter {
    wire: Wire,
    tokens: Option<TokenUsage>,
    /// Whether the provider said its counts are final (design §3): OpenAI's
    /// usage chunk, the Responses API's final event, Anthropic's message_delta.
    is_final: bool,
    /// Anthropic reports input and output tokens in different events.
    anthropic: StreamUsage,
    content_chars: usize,
    done: bool,
}

impl Meter {
    /// A meter of a stream on `wire`, before its first event.
    pub fn new(wire: Wire) -> Meter {
        Meter {
            wire,
            tokens: None,
            is_final: false,
            anthropic: StreamUsage::default(),
            content_chars: 0,
            done: false,
        }
    }

    /// Reads one event. Returns the Responses API response id and its
    /// total tokens when the event is its final usage (the conversation a
    /// follow-up continues).
    pub fn event(&mut self, raw: &[u8]) -> Option<(String, u64)> {
        if self.wire == Wire::Anthropic {
            let info = inspect_event(raw);
            self.done |= info.done;
            self.content_chars += info.content_chars;
            self.anthropic.update(&info);
            self.tokens = self.anthropic.usage().or(self.tokens);
            self.is_final = self.anthropic.is_final();
            return None;
        }
        let (last, usage, chars, response) = self.wire.inspect(raw);
        self.done |= last;
        self.content_chars += chars;
        if usage.is_some() {
            self.tokens = usage;
            self.is_final = true;
        }
        response.zip(usage.map(|u| u.total_tokens))
    }

    /// Bills the request what the events showed.
    pub fn bill(&self, usage: &mut Accounting) {
        usage.bill(self.tokens, self.is_final, self.content_chars);
    }

    /// Bills a failed-over attempt what its events showed.
    pub fn bill_failed_attempt(&self, usage: &mut Accounting) {
        usage.attempt_failed(self.tokens, self.is_final, self.content_chars);
    }
}

/// Once the stream is over (or the client gone, which drops the body), the
/// relay finishes the request's accounting: 200 when it reached `[DONE]`,
/// 502 when the provider broke it (the client got an error event), 504 when
/// its first content never came, 499 when the client went away first — all
/// but the first flagged truncated.
impl Drop for Relay {
    fn drop(&mut self) {
        let Some(mut usage) = self.usage.take() else {
            return;
        };
        let done = self.meter.done;
        let truncated = self.failed.is_some() || !done;
        usage.record().truncated = truncated;
        // The provider answered: whatever it reported, or at least what it was
        // seen to produce.
        self.meter.bill(&mut usage);
        let status = if let Some(status) = self.failed {
            status
        } else if !done {
            CLIENT_CLOSED
        } else {
            200
        };
        usage.finish(status);
    }
}

/// The start of an event the provider got wrong, for the log: enough to
/// recognise it, bounded so a huge event does not flood the log.
pub(crate) fn excerpt(event: &[u8]) -> String {
    const MAX: usize = 200;
    let text = String::from_utf8_lossy(&event[..event.len().min(MAX)]);
    let text = text.trim();
    if event.len() > MAX {
        format!("{text}…")
    } else {
        text.to_owned()
    }
}
