//! Upstream providers behind one trait (design §4): each file speaks one wire
//! format and hands back OpenAI-shaped answers, so routing, failover and
//! streaming never see a provider's own types.
//!
//! Timeouts other than connect are enforced by the caller (`serve::chat`),
//! which knows where the first byte, the gaps between chunks and the total
//! deadline fall; connect is set on each provider's own HTTP client.

use afr_core::breaker::Outcome;
use afr_core::config::{ProviderConfig, ProviderKind, Timeouts};
use afr_core::endpoint::Endpoint;
use afr_core::redact::mask_secrets;
use afr_core::route::RouteFailure;
use afr_core::sse::TokenUsage;
use afr_core::validate::Invalid;
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::stream::BoxStream;
use serde_json::Value;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

mod anthropic;
mod body;
pub(crate) use body::read_answer;
pub use body::AnswerFacts;
pub mod client;
pub(crate) use client::send_error;
pub use client::Server;
mod azure;
mod openai;

/// One OpenAI-format SSE event (raw bytes including the blank line), or the failure that ended the stream.
pub type EventStream = BoxStream<'static, Result<Bytes, ProviderError>>;

/// What a provider answered with a success status.
pub enum Reply {
    /// A whole `chat.completion` body, OpenAI-shaped.
    Complete {
        /// The body bytes to send to the client.
        body: Bytes,
        /// Token counts read from the body.
        usage: Option<TokenUsage>,
        /// What the body says of itself, when the call asked
        /// ([`UpstreamCall::facts`]) and the provider read it in its usage
        /// pass; `None` leaves the span to read the body itself.
        facts: Option<Box<AnswerFacts>>,
    },
    /// A stream of `chat.completion.chunk` events.
    Stream(EventStream),
}

/// Why a provider call failed.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// TCP/TLS connect failed or the connection broke before an answer.
    #[error("connect: {0}")]
    Connect(String),
    /// A timeout expired (`connect`, `first_byte`, `idle`, `total`).
    #[error("timeout ({0})")]
    Timeout(&'static str),
    /// The provider answered with an error status.
    #[error("status {status}: {message}")]
    Status {
        /// HTTP status from the provider.
        status: u16,
        /// The provider's error, mapped to OpenAI fields.
        message: String,
        /// OpenAI error `type` (or the provider's nearest equivalent).
        kind: Option<String>,
        /// The request field at fault.
        param: Option<String>,
        /// OpenAI error `code`.
        code: Option<String>,
        /// The wait the provider asked for (`retry-after-ms` / `Retry-After`).
        retry_after: Option<Duration>,
    },
    /// The provider's answer could not be read (bad JSON, malformed stream).
    #[error("protocol: {0}")]
    Protocol(String),
    /// The gateway itself could not open a connection: it is out of file
    /// descriptors, ephemeral ports or kernel buffers. Not the provider's
    /// fault, so it must not count against its breaker, and every other route
    /// would fail the same way.
    #[error("out of local resources: {0}")]
    Local(String),
}

impl ProviderError {
    /// Whether the next route should be tried (design §4): connect errors,
    /// timeouts, 429, 5xx, unreadable answers — and 401/403, which mean the
    /// gateway's provider credentials are wrong, never the client's request.
    pub fn is_retryable(&self) -> bool {
        match self {
            ProviderError::Status { status, .. } => {
                // 3xx: redirects are not followed (a provider key must never be
                // replayed to another host), so one means a misconfigured base_url.
                matches!(*status, 300..=399 | 401 | 403 | 408 | 429 | 500..=599)
            }
            // Every route would meet the same exhausted limit.
            ProviderError::Local(_) => false,
            _ => true,
        }
    }

    /// How the route plan sees this failure: a 429 (with the provider's
    /// wait) may end in a 429 to the client, anything else in a 500.
    pub fn route_failure(&self) -> RouteFailure {
        match self {
            ProviderError::Status {
                status: 429,
                retry_after,
                ..
            } => RouteFailure::RateLimited {
                retry_after: *retry_after,
            },
            ProviderError::Status { status: 529, .. } => RouteFailure::Overloaded,
            _ => RouteFailure::Other,
        }
    }

    /// How a retryable failure settles the provider's breaker: a provider
    /// that said when to come back keeps its breaker open that long.
    pub fn breaker_outcome(&self) -> Outcome {
        match self {
            ProviderError::Status {
                retry_after: Some(retry_after),
                ..
            } => Outcome::Throttled {
                retry_after: *retry_after,
            },
            ProviderError::Local(_) => Outcome::Neutral,
            _ => Outcome::Failure,
        }
    }

    /// Builds a status error from a body in the OpenAI error shape (or
    /// anything else) and the wait the response asked for.
    pub fn from_openai_body(status: u16, body: &[u8], retry_after: Option<Duration>) -> Self {
        let parsed: Option<Value> = serde_json::from_slice(body).ok();
        let error = parsed.as_ref().and_then(|v| v.get("error"));
        let field = |name: &str| {
            error
                .and_then(|e| e.get(name))
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        ProviderError::Status {
            status,
            // Providers echo credentials back ("Incorrect API key provided: sk-…"),
            // and this message is logged and may reach the client.
            message: field("message")
                .map(|m| mask_secrets(&m).into_owned())
                .unwrap_or_else(|| format!("the provider answered with status {status}")),
            kind: field("type"),
            param: field("param"),
            code: field("code"),
            retry_after,
        }
    }
}

/// One request as sent upstream.
pub struct UpstreamCall {
    /// The body to send: the client's bytes with the gateway's edits
    /// (upstream `model` already set).
    pub body: Bytes,
    /// The route's upstream model name (the `model` in `body`).
    pub upstream_model: String,
    /// Whether a stream's last chunk must carry usage (the body asks for it).
    pub include_usage: bool,
    /// Whether to stream.
    pub stream: bool,
    /// The gateway request id, forwarded for correlation.
    pub request_id: String,
    /// Longest one SSE event may take once its first byte arrived (the
    /// route's `event_idle`).
    pub event_idle: Duration,
    /// The client's query string, for a provider of the client's own wire
    /// (an OpenAI-format endpoint to an OpenAI-format provider); `None` on a
    /// translated call, whose provider would not know the client's
    /// parameters.
    pub query: Option<String>,
    /// The W3C `traceparent` of this attempt's span, when telemetry is on.
    pub traceparent: Option<http::HeaderValue>,
    /// Whether the request's span is sampled, so that a whole answer's id,
    /// model and finish reasons are wanted ([`Reply::Complete`]'s `facts`).
    pub facts: bool,
}

/// A configured provider.
#[async_trait]
pub trait Provider: Send + Sync {
    /// Its timeouts.
    fn timeouts(&self) -> Timeouts;

    /// Where its calls go.
    fn server(&self) -> Option<&Server>;

    /// Turns the OpenAI-shaped call into what this provider is sent. A
    /// request the provider cannot serve (an Anthropic route asked for
    /// `n > 1`) is refused here, before any breaker admits it: that refusal
    /// is the gateway's own, never a provider outcome.
    fn prepare(&self, call: UpstreamCall) -> Result<UpstreamCall, Invalid> {
        Ok(call)
    }

    /// Sends one prepared chat completion. For streams, returns once the
    /// response headers arrived; events then come from the stream.
    async fn chat(&self, call: UpstreamCall) -> Result<Reply, ProviderError>;

    /// Whether the provider speaks Anthropic's Messages API itself: then
    /// `/v1/messages` is passed through ([`Provider::messages`]); otherwise
    /// it is translated to a chat completion.
    fn speaks_messages(&self) -> bool {
        false
    }

    /// Sends a Messages API call as the client wrote it (`call.body` has
    /// only the gateway's edits); the reply is Anthropic's, body or events,
    /// unchanged.
    async fn messages(
        &self,
        _call: UpstreamCall,
        _endpoint: MessagesEndpoint,
        _client: &AnthropicClient,
    ) -> Result<Reply, ProviderError> {
        Err(ProviderError::Protocol(
            "this provider does not speak the Messages API".into(),
        ))
    }

    /// Whether this provider speaks `endpoint` itself, so a call can be
    /// passed through byte for byte (chat completions: every provider, some
    /// by translation, through [`Provider::chat`]).
    fn serves(&self, endpoint: Endpoint) -> bool {
        endpoint == Endpoint::ChatCompletions
    }

    /// Sends one call on a passthrough endpoint (`serves` said yes): the body
    /// goes up as is, the answer comes back unchanged (`Reply::Complete`
    /// carries no usage: the caller reads it in the endpoint's shape).
    async fn forward(
        &self,
        endpoint: Endpoint,
        call: UpstreamCall,
    ) -> Result<Reply, ProviderError> {
        let _ = call;
        Err(ProviderError::Protocol(format!(
            "this provider does not serve /v1/{}",
            endpoint.path()
        )))
    }
}

/// Which Messages API endpoint a call goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessagesEndpoint {
    /// `POST /v1/messages`.
    Messages,
    /// `POST /v1/messages/count_tokens`.
    CountTokens,
}

/// What an Anthropic client sent beside its body that an Anthropic
/// provider must see: the API version and beta flags it wrote against, and
/// the query (`?beta=true`). Never its key.
#[derive(Debug, Clone, Default)]
pub struct AnthropicClient {
    /// `anthropic-version`.
    pub version: Option<http::HeaderValue>,
    /// `anthropic-beta`.
    pub beta: Option<http::HeaderValue>,
    /// The request's query string.
    pub query: Option<String>,
}

/// Sends a prepared OpenAI-format request and reads its answer: an error
/// status in the OpenAI error shape, an SSE stream byte for byte, or a
/// whole body (usage left to the caller, who knows the endpoint's shape).
pub(crate) async fn send_openai_format(
    request: client::Outgoing<'_>,
    stream: bool,
    event_idle: Duration,
    facts: bool,
) -> Result<Reply, ProviderError> {
    let response = request.send().await.map_err(send_error)?;
    if !response.status().is_success() {
        return Err(openai_status_error(response).await);
    }
    if stream {
        return Ok(Reply::Stream(sse_events(response, event_idle)));
    }
    let body = read_success_body(response).await?;
    // A 200 that is not a JSON object (a portal's HTML page) fails over;
    // the usage itself is read by the caller in the endpoint's shape.
    let (_, facts) = read_answer(&body, facts)?;
    Ok(Reply::Complete {
        body,
        usage: None,
        facts,
    })
}

/// Builds the provider for a config entry. `api_key` is the resolved secret.
pub fn build(
    name: &str,
    config: &ProviderConfig,
    api_key: Option<String>,
) -> anyhow::Result<Arc<dyn Provider>> {
    let client = client::HttpClient::new(config)?;
    let provider: Arc<dyn Provider> = match config.kind {
        ProviderKind::Openai => Arc::new(openai::OpenAi::new(name, config, api_key, client)),
        ProviderKind::Azure => Arc::new(azure::Azure::new(name, config, api_key, client)),
        ProviderKind::Anthropic => {
            Arc::new(anthropic::Anthropic::new(name, config, api_key, client))
        }
    };
    Ok(provider)
}

/// Largest success body read from a provider (a non-streamed completion).
/// Chat completions are kilobytes; this bounds a broken or hostile upstream.
pub(crate) const MAX_BODY_BYTES: usize = 32 << 20;

/// Largest error body read from a provider: real ones are under a kilobyte,
/// a proxy's HTML error page a few.
pub(crate) const MAX_ERROR_BODY_BYTES: usize = 256 << 10;

/// Reads a whole response body of at most `limit` bytes. Over the limit is a
/// protocol error (retryable), found before more than `limit` bytes are held.
pub(crate) async fn read_body<B>(
    response: http::Response<B>,
    limit: usize,
    what: &str,
) -> Result<Bytes, ProviderError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use http_body_util::{BodyExt, LengthLimitError, Limited};
    match Limited::new(response.into_body(), limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(ProviderError::Protocol(format!(
            "the {what} is longer than {limit} bytes"
        ))),
        Err(e) => {
            let detail = client::error_chain(&*e);
            Err(ProviderError::Connect(format!(
                "reading the {what}: {detail}"
            )))
        }
    }
}

/// Reads a success body (a non-streamed answer).
pub(crate) async fn read_success_body<B>(
    response: http::Response<B>,
) -> Result<Bytes, ProviderError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    read_body(response, MAX_BODY_BYTES, "body").await
}

/// Reads an error body.
pub(crate) async fn read_error_body<B>(response: http::Response<B>) -> Bytes
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // The status decides what the error means (a 400 stays the client's, a
    // 503 is failed over); a body too long or cut short only loses the
    // provider's wording, never the status.
    read_body(response, MAX_ERROR_BODY_BYTES, "error body")
        .await
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, "provider error body unreadable; answering by its status");
            Bytes::new()
        })
}

/// Turns a streaming response body into its SSE events, byte for byte.
/// An event longer than [`afr_core::sse::MAX_EVENT_BYTES`] ends the stream
/// with a protocol error (a failover while nothing was sent to the client),
/// and so does an event whose bytes take longer than `event_idle` from the
/// first to the last (a drip or a stall mid-event: `Timeout("event_idle")`).
/// Silence *between* events is not bounded here: before the first content it
/// is a model thinking, after it the relay's `idle` bounds it.
pub(crate) fn sse_events<B>(
    response: http::Response<B>,
    event_idle: Duration,
) -> BoxStream<'static, Result<Bytes, ProviderError>>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    use afr_core::sse::EventFramer;
    use futures_util::StreamExt;
    use std::collections::VecDeque;

    struct State {
        body: BoxStream<'static, Result<Bytes, Box<dyn std::error::Error + Send + Sync>>>,
        framer: EventFramer,
        ready: VecDeque<Bytes>,
        finished: bool,
        failed: Option<ProviderError>,
        /// When the first byte of the unfinished event arrived.
        partial_since: Option<tokio::time::Instant>,
    }
    let state = State {
        body: http_body_util::BodyExt::into_data_stream(response.into_body())
            .map(|r| r.map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>))
            .boxed(),
        framer: EventFramer::new(),
        ready: VecDeque::new(),
        finished: false,
        failed: None,
        partial_since: None,
    };
    futures_util::stream::unfold(state, move |mut s| async move {
        loop {
            if let Some(event) = s.ready.pop_front() {
                return Some((Ok(event), s));
            }
            if let Some(error) = s.failed.take() {
                return Some((Err(error), s));
            }
            if s.finished {
                return None;
            }
            let next = match s.partial_since {
                Some(since) => {
                    match tokio::time::timeout_at(since + event_idle, s.body.next()).await {
                        Ok(next) => next,
                        Err(_) => {
                            s.finished = true;
                            return Some((Err(ProviderError::Timeout("event_idle")), s));
                        }
                    }
                }
                None => s.body.next().await,
            };
            match next {
                Some(Ok(bytes)) => {
                    s.framer.push(&bytes);
                    let mut completed = false;
                    loop {
                        match s.framer.next_event() {
                            Ok(Some(event)) => {
                                completed = true;
                                s.ready.push_back(Bytes::from(event));
                            }
                            Ok(None) => break,
                            Err(e) => {
                                // Events framed before it go out first; then the error.
                                s.finished = true;
                                s.failed = Some(ProviderError::Protocol(e.to_string()));
                                break;
                            }
                        }
                    }
                    // The clock of an unfinished event starts at its first
                    // byte: now, unless it was already pending before.
                    s.partial_since = match (s.framer.pending().is_empty(), s.partial_since) {
                        (true, _) => None,
                        (false, Some(since)) if !completed => Some(since),
                        (false, _) => Some(tokio::time::Instant::now()),
                    };
                }
                Some(Err(e)) => {
                    s.finished = true;
                    return Some((
                        Err(ProviderError::Connect(format!(
                            "stream broke: {}",
                            client::error_chain(&*e)
                        ))),
                        s,
                    ));
                }
                None => {
                    s.finished = true;
                    if s.framer.pending().iter().any(|b| !b.is_ascii_whitespace()) {
                        // A last event without its blank line: the SDKs would never emit it.
                        return Some((
                            Err(ProviderError::Protocol(
                                "stream ended inside an event".into(),
                            )),
                            s,
                        ));
                    }
                }
            }
        }
    })
    .boxed()
}

/// Reads an error response into a [`ProviderError`] in the OpenAI shape.
pub(crate) async fn openai_status_error<B>(response: http::Response<B>) -> ProviderError
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let status = response.status().as_u16();
    let wait = retry_after(response.headers());
    let body = read_error_body(response).await;
    ProviderError::from_openai_body(status, &body, wait)
}

/// The wait an error response asked for (`retry-after-ms`, `Retry-After`).
pub(crate) fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    let value = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    afr_core::retry_after::parse(
        value("retry-after-ms"),
        value(http::header::RETRY_AFTER.as_str()),
        SystemTime::now(),
    )
}

#[cfg(test)]
mod tests;
