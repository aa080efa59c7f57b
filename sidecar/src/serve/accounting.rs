//! The one owner of a request's accounting: its usage row and its metrics.
//!
//! An [`Accounting`] is made when a request arrives and moves with it — into
//! the routing loop, then into a stream's usage tap — and records exactly one
//! row however the request ends: [`Accounting::finish`] with a status, or, if
//! it is dropped first (the client went away, hyper dropped the handler), on
//! `Drop` as 499, nginx's "client closed request", flagged truncated.
//! "Exactly one row per request" holds by construction, not by every path
//! remembering to write one.

use crate::serve::state::Gateway;
use afr_core::sse::TokenUsage;
use afr_core::usage::{TokenSource, UsageRecord};
use std::sync::Arc;
use std::time::Instant;

/// Status recorded for a request whose client went away first.
pub const CLIENT_CLOSED: u16 = 499;

/// A request's usage row and metrics, recorded once.
pub struct Accounting {
    gateway: Arc<Gateway>,
    record: UsageRecord,
    started: Instant,
    recorded: bool,
}

impl Accounting {
    /// The accounting of a request that arrived at `started` (`ts_ms` in Unix ms).
    pub fn new(
        gateway: Arc<Gateway>,
        request_id: &str,
        key_id: &str,
        started: Instant,
        ts_ms: i64,
    ) -> Self {
        Accounting {
            gateway,
            record: UsageRecord {
                ts_ms,
                request_id: request_id.to_owned(),
                key_id: key_id.to_owned(),
                ..blank_record()
            },
            started,
            recorded: false,
        }
    }

    /// The row so far, to fill in as the request proceeds.
    pub fn record(&mut self) -> &mut UsageRecord {
        &mut self.record
    }

    /// Records the time to first token of a stream whose first content
    /// reached the client `at`.
    pub fn first_content(&mut self, at: Instant) {
        let ttft = at.saturating_duration_since(self.started);
        self.record.ttft_ms = Some(ttft.as_millis() as u64);
        self.gateway
            .metrics
            .ttft(&self.record.model, &self.record.provider, ttft);
    }

    /// Fills token counts from a provider's usage.
    pub fn apply_usage(&mut self, usage: Option<TokenUsage>) {
        if let Some(u) = usage {
            let record = &mut self.record;
            record.prompt_tokens = u.prompt_tokens;
            record.completion_tokens = u.completion_tokens;
            record.total_tokens = if u.total_tokens > 0 {
                u.total_tokens
            } else {
                u.prompt_tokens + u.completion_tokens
            };
            record.token_source = TokenSource::Provider;
        }
    }

    /// Estimated token counts, for a stream that ended without the provider's usage.
    pub fn estimate(&mut self, prompt_chars: usize, completion_chars: usize) {
        let record = &mut self.record;
        record.prompt_tokens = estimate_tokens(prompt_chars);
        record.completion_tokens = estimate_tokens(completion_chars);
        record.total_tokens = record.prompt_tokens + record.completion_tokens;
        record.token_source = TokenSource::Estimated;
    }

    /// Records the row and the metrics of a request that ended with `status`.
    pub fn finish(mut self, status: u16) {
        self.write(status);
    }

    fn write(&mut self, status: u16) {
        if std::mem::replace(&mut self.recorded, true) {
            return;
        }
        let mut record = std::mem::replace(&mut self.record, blank_record());
        let latency = self.started.elapsed();
        record.status = status;
        record.latency_ms = latency.as_millis() as u64;
        let metrics = &self.gateway.metrics;
        metrics.request(&record.model, &record.provider, status, latency);
        if record.token_source != TokenSource::None {
            metrics.tokens(
                &record.model,
                &record.provider,
                record.prompt_tokens,
                record.completion_tokens,
            );
        }
        if let Some(recorder) = &self.gateway.recorder {
            recorder.record(record);
        }
    }
}

impl Drop for Accounting {
    fn drop(&mut self) {
        if !self.recorded {
            self.record.truncated = true;
            tracing::info!(request_id = %self.record.request_id, "client went away before the answer");
            self.write(CLIENT_CLOSED);
        }
    }
}

/// A record with nothing in it yet.
fn blank_record() -> UsageRecord {
    UsageRecord {
        ts_ms: 0,
        request_id: String::new(),
        key_id: String::new(),
        model: String::new(),
        provider: String::new(),
        upstream_model: String::new(),
        prompt_tokens: 0,
        completion_tokens: 0,
        total_tokens: 0,
        token_source: TokenSource::None,
        latency_ms: 0,
        ttft_ms: None,
        status: 0,
        stream: false,
        truncated: false,
    }
}

/// Rough tokens for `chars` characters (about four per token for English).
fn estimate_tokens(chars: usize) -> u64 {
    chars.div_ceil(4) as u64
}
