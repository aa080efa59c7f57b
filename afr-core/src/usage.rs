//! One [`UsageRecord`] per request (design §5): what the sidecar hands to the
//! usage store, and what `afr usage` and `GET /v1/usage` report.

use serde::{Deserialize, Serialize};

/// Where token counts came from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenSource {
    /// The provider's `usage` object.
    Provider,
    /// Estimated by the gateway (a stream cut short before the provider sent usage).
    Estimated,
    /// No tokens were consumed (the request failed before any provider answered).
    #[default]
    None,
}

/// What follows a request's id in the `request_id` of the row of one of its
/// attempts that a provider answered and that was then failed over
/// (`<id>/attempt-<n>`): billed, but no request of its own in reports.
pub const ATTEMPT_ROW: &str = "/attempt-";

/// Everything recorded about one request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UsageRecord {
    /// Unix time in milliseconds when the request arrived at the sidecar.
    pub ts_ms: i64,
    /// Gateway request id (`x-request-id`).
    pub request_id: String,
    /// The key's id from keys.toml (never the secret).
    pub key_id: String,
    /// Catalogue model the client asked for.
    pub model: String,
    /// Provider that served (or last failed) the request; empty when none was tried.
    pub provider: String,
    /// Model name sent upstream.
    pub upstream_model: String,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// Total tokens.
    pub total_tokens: u64,
    /// Where the token counts came from.
    pub token_source: TokenSource,
    /// Latency until the response was complete, in milliseconds.
    pub latency_ms: u64,
    /// Time to first byte of content for streams, in milliseconds.
    pub ttft_ms: Option<u64>,
    /// HTTP status returned to the client (200 even for a stream that later failed).
    pub status: u16,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// Whether the stream ended early (client disconnect or provider failure mid-stream).
    pub truncated: bool,
    /// Cost in nano-dollars (10⁻⁹ USD) at the route's price; `None` when the
    /// route has no price (unknown, not free). 0 when nothing was consumed.
    #[serde(default)]
    pub cost_nanos: Option<u64>,
    /// Of the prompt tokens, those read from the provider's cache.
    #[serde(default)]
    pub cached_tokens: u64,
    /// Of the prompt tokens, those written to a 5-minute cache (Anthropic).
    #[serde(default)]
    pub cache_write_5m_tokens: u64,
    /// Of the prompt tokens, those written to a 1-hour cache (Anthropic).
    #[serde(default)]
    pub cache_write_1h_tokens: u64,
    /// Of the completion tokens, those spent reasoning (billed as output).
    #[serde(default)]
    pub reasoning_tokens: u64,
}
