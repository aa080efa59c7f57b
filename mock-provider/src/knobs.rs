//! Fault-injection knobs: the per-instance defaults (CLI flags or
//! `POST /_mock/config`) overlaid with per-request `X-Mock-*` headers.
//!
//! Instance-level knobs are the primary mechanism for failover tests, because a
//! gateway does not necessarily forward client `X-Mock-*` headers upstream.

use hyper::HeaderMap;
use serde::{Deserialize, Serialize};

/// Every fault knob. A request's effective knobs are the instance's knobs with
/// any `X-Mock-*` header of the same name overriding the field.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct Knobs {
    /// Delay before the response headers, in milliseconds (`X-Mock-Latency-Ms`).
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Streams: delay between the role chunk and the first content delta;
    /// non-streaming: added to the latency (`X-Mock-Ttft-Ms`).
    #[arg(long, default_value_t = 0)]
    pub ttft_ms: u64,
    /// Number of content deltas, which is also the completion token count;
    /// unset means one per word of the reply (`X-Mock-Chunks`).
    #[arg(long)]
    pub chunks: Option<u32>,
    /// Delay between consecutive content deltas, in milliseconds
    /// (`X-Mock-Chunk-Interval-Ms`).
    #[arg(long, default_value_t = 0)]
    pub chunk_interval_ms: u64,
    /// Always answer with this HTTP status and the provider's error body for it
    /// (`X-Mock-Status`).
    #[arg(long)]
    pub status: Option<u16>,
    /// Percentage (0–100) of requests that fail with `fail_status`
    /// (`X-Mock-Fail-Percent`). Deterministic pseudo-random sequence per instance.
    #[arg(long, default_value_t = 0)]
    pub fail_percent: u8,
    /// Status used by `fail_percent` and `fail_first`; default 500
    /// (`X-Mock-Fail-Status`).
    #[arg(long)]
    pub fail_status: Option<u16>,
    /// `Retry-After` header value sent with every injected error status
    /// (seconds or an HTTP-date; replaces Azure's own `1` on a 429)
    /// (`X-Mock-Retry-After`).
    #[arg(long)]
    pub retry_after: Option<String>,
    /// The first N API requests after start (or after `POST /_mock/config`)
    /// fail with `fail_status`. Instance-level only.
    #[arg(long, default_value_t = 0)]
    pub fail_first: u32,
    /// Streams: abort the TCP connection (RST) after this many content deltas;
    /// non-streaming: any value resets the connection instead of answering
    /// (`X-Mock-Reset-After-Chunks`).
    #[arg(long)]
    pub reset_after_chunks: Option<u32>,
    /// Streams: send the provider's mid-stream error event after this many
    /// content deltas and end the stream (`X-Mock-Error-After-Chunks`).
    #[arg(long)]
    pub error_after_chunks: Option<u32>,
    /// Streams: insert one event whose data is truncated JSON after the first
    /// content delta (`X-Mock-Malformed-Sse`: `1`/`true`).
    #[arg(long)]
    pub malformed_sse: bool,
    /// Request 1, 1+N, 1+2N, … after start (or after `POST /_mock/config`)
    /// fails with `fail_status`: a flapping provider (`2`: every other
    /// request). Instance-level only.
    #[arg(long, default_value_t = 0)]
    pub fail_every: u32,
    /// Abort the TCP connection (RST) before any byte of the response,
    /// streaming or not (`X-Mock-Reset-Before-Response`: `1`/`true`).
    #[arg(long)]
    pub reset_before_response: bool,
    /// Streams: end the stream cleanly (last chunk, no RST) after this many
    /// content deltas, without the finish chunk, usage or `[DONE]`
    /// (`X-Mock-End-After-Chunks`).
    #[arg(long)]
    pub end_after_chunks: Option<u32>,
    /// Send the response headers, then nothing: no body, no event, the
    /// connection kept open until the client leaves (`X-Mock-Stall-After-Headers`).
    #[arg(long)]
    pub stall_after_headers: bool,
    /// Send the response body one byte at a time, this many milliseconds
    /// apart (`X-Mock-Drip-Ms`).
    #[arg(long, default_value_t = 0)]
    pub drip_ms: u64,
    /// Answer 200 with a reply this many bytes long, generated as it is sent:
    /// non-streaming, one `chat.completion` whose content has that size;
    /// streaming, a first content delta of that size (`X-Mock-Body-Bytes`).
    #[arg(long)]
    pub body_bytes: Option<u64>,
    /// Answer 200 with an HTML page (`text/html`) instead of JSON or SSE, as a
    /// captive portal or a misrouted proxy does (`X-Mock-Non-Json`: `1`/`true`).
    #[arg(long)]
    pub non_json: bool,
    /// This many of the prompt tokens are reported as cache reads (clamped to
    /// the prompt): OpenAI `cached_tokens`, Anthropic `cache_read_input_tokens`
    /// (`X-Mock-Cache-Read`).
    #[arg(long, default_value_t = 0)]
    pub cache_read: u64,
    /// Anthropic only: this many prompt tokens are reported as written to the
    /// 5-minute cache (`X-Mock-Cache-Write-5m`).
    #[arg(long, default_value_t = 0)]
    pub cache_write_5m: u64,
    /// Anthropic only: this many prompt tokens are reported as written to the
    /// 1-hour cache (`X-Mock-Cache-Write-1h`).
    #[arg(long, default_value_t = 0)]
    pub cache_write_1h: u64,
    /// This many more output tokens, billed as reasoning
    /// (`X-Mock-Reasoning-Tokens`).
    #[arg(long, default_value_t = 0)]
    pub reasoning_tokens: u64,
    /// Answer 200 without usage: no `usage` in bodies, no usage chunk or
    /// usage in the final event of streams (`X-Mock-Omit-Usage`: `1`/`true`).
    #[arg(long)]
    pub omit_usage: bool,
    /// Streams: end the body cleanly after this many SSE events, whatever
    /// they are (`X-Mock-Cut-After-Events`).
    #[arg(long)]
    pub cut_after_events: Option<u32>,
    /// How a request offering tools is answered (`X-Mock-Tools`): `first`
    /// (the default) calls its first tool, every string property set to the
    /// last user text; `agent` behaves like a model driving a coding agent:
    /// a call of its shell tool with arguments made from the tool's schema
    /// (`echo afr-mock`), then, once the tool's result is sent back, a text
    /// answer quoting it. See [`crate::tools`].
    #[arg(long, value_enum, default_value_t = ToolsMode::First)]
    pub tools: ToolsMode,
}

/// The `tools` knob.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ToolsMode {
    /// Call the first tool, string properties set to the user's words,
    /// until a tool result comes back (Responses: every time).
    #[default]
    First,
    /// Call the shell-like tool with arguments valid against its schema;
    /// answer a tool result with text.
    Agent,
}

/// A header value that is not a valid value for its knob.
#[derive(Debug)]
pub struct BadKnobHeader(pub &'static str);

impl Knobs {
    /// The status a failure injected by `fail_percent`/`fail_first` uses.
    pub fn fail_status(&self) -> u16 {
        self.fail_status.unwrap_or(500)
    }

    /// This instance's knobs overridden by the request's `X-Mock-*` headers.
    pub fn with_headers(&self, headers: &HeaderMap) -> Result<Knobs, BadKnobHeader> {
        let mut k = self.clone();
        // Fast path: benchmarks send no knob headers at all.
        if !headers.keys().any(|n| n.as_str().starts_with("x-mock-")) {
            return Ok(k);
        }
        if let Some(v) = num(headers, "x-mock-latency-ms")? {
            k.latency_ms = v;
        }
        if let Some(v) = num(headers, "x-mock-ttft-ms")? {
            k.ttft_ms = v;
        }
        if let Some(v) = num(headers, "x-mock-chunks")? {
            k.chunks = Some(v);
        }
        if let Some(v) = num(headers, "x-mock-chunk-interval-ms")? {
            k.chunk_interval_ms = v;
        }
        if let Some(v) = num(headers, "x-mock-status")? {
            k.status = Some(v);
        }
        if let Some(v) = num::<u8>(headers, "x-mock-fail-percent")? {
            k.fail_percent = v.min(100);
        }
        if let Some(v) = num(headers, "x-mock-fail-status")? {
            k.fail_status = Some(v);
        }
        if let Some(v) = headers.get("x-mock-retry-after") {
            let v = v
                .to_str()
                .map_err(|_| BadKnobHeader("x-mock-retry-after"))?;
            k.retry_after = Some(v.to_owned());
        }
        if let Some(v) = num(headers, "x-mock-reset-after-chunks")? {
            k.reset_after_chunks = Some(v);
        }
        if let Some(v) = num(headers, "x-mock-error-after-chunks")? {
            k.error_after_chunks = Some(v);
        }
        if let Some(v) = flag(headers, "x-mock-malformed-sse")? {
            k.malformed_sse = v;
        }
        if let Some(v) = flag(headers, "x-mock-reset-before-response")? {
            k.reset_before_response = v;
        }
        if let Some(v) = num(headers, "x-mock-end-after-chunks")? {
            k.end_after_chunks = Some(v);
        }
        if let Some(v) = flag(headers, "x-mock-stall-after-headers")? {
            k.stall_after_headers = v;
        }
        if let Some(v) = num(headers, "x-mock-drip-ms")? {
            k.drip_ms = v;
        }
        if let Some(v) = num(headers, "x-mock-body-bytes")? {
            k.body_bytes = Some(v);
        }
        if let Some(v) = flag(headers, "x-mock-non-json")? {
            k.non_json = v;
        }
        if let Some(v) = num(headers, "x-mock-cache-read")? {
            k.cache_read = v;
        }
        if let Some(v) = num(headers, "x-mock-cache-write-5m")? {
            k.cache_write_5m = v;
        }
        if let Some(v) = num(headers, "x-mock-cache-write-1h")? {
            k.cache_write_1h = v;
        }
        if let Some(v) = num(headers, "x-mock-reasoning-tokens")? {
            k.reasoning_tokens = v;
        }
        if let Some(v) = flag(headers, "x-mock-omit-usage")? {
            k.omit_usage = v;
        }
        if let Some(v) = num(headers, "x-mock-cut-after-events")? {
            k.cut_after_events = Some(v);
        }
        if let Some(v) = headers.get("x-mock-tools") {
            k.tools = match v.as_bytes().to_ascii_lowercase().as_slice() {
                b"first" => ToolsMode::First,
                b"agent" => ToolsMode::Agent,
                _ => return Err(BadKnobHeader("x-mock-tools")),
            };
        }
        Ok(k)
    }
}

fn flag(headers: &HeaderMap, name: &'static str) -> Result<Option<bool>, BadKnobHeader> {
    match headers.get(name).map(|v| v.as_bytes()) {
        None => Ok(None),
        Some(b"1" | b"true" | b"yes") => Ok(Some(true)),
        Some(b"0" | b"false" | b"no") => Ok(Some(false)),
        Some(_) => Err(BadKnobHeader(name)),
    }
}

fn num<T: std::str::FromStr>(
    headers: &HeaderMap,
    name: &'static str,
) -> Result<Option<T>, BadKnobHeader> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .map(Some)
            .ok_or(BadKnobHeader(name)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_override_instance_knobs() {
        let base = Knobs {
            latency_ms: 5,
            status: Some(503),
            ..Knobs::default()
        };
        let mut h = HeaderMap::new();
        h.insert("x-mock-chunks", "3".parse().unwrap());
        h.insert("x-mock-malformed-sse", "true".parse().unwrap());
        let k = base.with_headers(&h).unwrap();
        assert_eq!(k.chunks, Some(3));
        assert!(k.malformed_sse);
        assert_eq!(k.latency_ms, 5);
        assert_eq!(k.status, Some(503));
        h.insert("x-mock-status", "abc".parse().unwrap());
        assert!(base.with_headers(&h).is_err());
    }

    #[test]
    fn token_class_headers_override_and_reject_bad_values() {
        let base = Knobs {
            cache_read: 9,
            reasoning_tokens: 4,
            ..Knobs::default()
        };
        let mut h = HeaderMap::new();
        h.insert("x-mock-cache-read", "3".parse().unwrap());
        h.insert("x-mock-cache-write-5m", "2".parse().unwrap());
        h.insert("x-mock-cache-write-1h", "1".parse().unwrap());
        h.insert("x-mock-omit-usage", "1".parse().unwrap());
        h.insert("x-mock-cut-after-events", "5".parse().unwrap());
        h.insert("x-mock-tools", "Agent".parse().unwrap());
        let k = base.with_headers(&h).unwrap();
        assert_eq!(k.tools, ToolsMode::Agent);
        assert_eq!(
            (k.cache_read, k.cache_write_5m, k.cache_write_1h),
            (3, 2, 1)
        );
        assert_eq!(k.reasoning_tokens, 4, "no header: the instance's value");
        assert!(k.omit_usage);
        assert_eq!(k.cut_after_events, Some(5));
        for (name, bad) in [
            ("x-mock-cache-read", "-1"),
            ("x-mock-cache-write-5m", "x"),
            ("x-mock-cache-write-1h", "1.5"),
            ("x-mock-reasoning-tokens", ""),
            ("x-mock-omit-usage", "maybe"),
            ("x-mock-cut-after-events", "all"),
            ("x-mock-tools", "smart"),
        ] {
            let mut h = HeaderMap::new();
            h.insert(name, bad.parse().unwrap());
            assert_eq!(base.with_headers(&h).unwrap_err().0, name);
        }
    }
}
