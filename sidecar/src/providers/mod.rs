//! Upstream providers behind one trait (design §4): each file speaks one wire
//! format and hands back OpenAI-shaped answers, so routing, failover and
//! streaming never see a provider's own types.
//!
//! Timeouts other than connect are enforced by the caller (`serve::chat`),
//! which knows where the first byte, the gaps between chunks and the total
//! deadline fall; connect is set on each provider's own HTTP client.

use afr_core::breaker::Outcome;
use afr_core::config::{ProviderConfig, ProviderKind, Timeouts};
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
            message: field("message")
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
}

/// A configured provider.
#[async_trait]
pub trait Provider: Send + Sync {
    /// Its timeouts.
    fn timeouts(&self) -> Timeouts;

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
}

/// Builds the provider for a config entry. `api_key` is the resolved secret.
pub fn build(
    name: &str,
    config: &ProviderConfig,
    api_key: Option<String>,
) -> anyhow::Result<Arc<dyn Provider>> {
    let client = http_client(config.timeouts)?;
    let provider: Arc<dyn Provider> = match config.kind {
        ProviderKind::Openai => Arc::new(openai::OpenAi::new(name, config, api_key, client)),
        ProviderKind::Azure => Arc::new(azure::Azure::new(name, config, api_key, client)),
        ProviderKind::Anthropic => {
            Arc::new(anthropic::Anthropic::new(name, config, api_key, client))
        }
    };
    Ok(provider)
}

/// A pooled keep-alive client with TCP_NODELAY and the provider's connect timeout.
fn http_client(timeouts: Timeouts) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .connect_timeout(timeouts.connect)
        .tcp_nodelay(true)
        .pool_idle_timeout(std::time::Duration::from_secs(90))
        .pool_max_idle_per_host(1024)
        // reqwest strips only Authorization/Cookie on a cross-host redirect:
        // `api-key` / `x-api-key` would follow it, and a POST would turn into a GET.
        .redirect(reqwest::redirect::Policy::none())
        .build()?)
}

/// Maps a reqwest failure on send to a provider error.
pub(crate) fn send_error(e: reqwest::Error) -> ProviderError {
    if e.is_timeout() {
        ProviderError::Timeout("connect")
    } else {
        // Display of a reqwest error names the URL but never headers, so no key leaks.
        ProviderError::Connect(e.without_url().to_string())
    }
}

/// Reads usage from an OpenAI-shaped completion body.
pub(crate) fn body_usage(body: &[u8]) -> Option<TokenUsage> {
    #[derive(serde::Deserialize)]
    struct WithUsage {
        usage: Option<TokenUsage>,
    }
    serde_json::from_slice::<WithUsage>(body)
        .ok()
        .and_then(|w| w.usage)
}

/// Turns a streaming response body into its SSE events, byte for byte.
pub(crate) fn sse_events(
    response: reqwest::Response,
) -> BoxStream<'static, Result<Bytes, ProviderError>> {
    use afr_core::sse::EventFramer;
    use futures_util::StreamExt;
    use std::collections::VecDeque;

    struct State {
        body: BoxStream<'static, reqwest::Result<Bytes>>,
        framer: EventFramer,
        ready: VecDeque<Bytes>,
        finished: bool,
    }
    let state = State {
        body: response.bytes_stream().boxed(),
        framer: EventFramer::new(),
        ready: VecDeque::new(),
        finished: false,
    };
    futures_util::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(event) = s.ready.pop_front() {
                return Some((Ok(event), s));
            }
            if s.finished {
                return None;
            }
            match s.body.next().await {
                Some(Ok(bytes)) => {
                    s.framer.push(&bytes);
                    while let Some(event) = s.framer.next_event() {
                        s.ready.push_back(Bytes::from(event));
                    }
                }
                Some(Err(e)) => {
                    s.finished = true;
                    return Some((
                        Err(ProviderError::Connect(format!(
                            "stream broke: {}",
                            e.without_url()
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
pub(crate) async fn openai_status_error(response: reqwest::Response) -> ProviderError {
    let status = response.status().as_u16();
    let wait = retry_after(response.headers());
    match response.bytes().await {
        Ok(body) => ProviderError::from_openai_body(status, &body, wait),
        Err(e) => ProviderError::Connect(format!("reading the error body: {}", e.without_url())),
    }
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
