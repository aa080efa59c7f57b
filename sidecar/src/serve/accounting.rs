//! The one owner of a request's accounting: its usage row and its metrics.
//!
//! An [`Accounting`] is made when a request arrives and moves with it — into
//! the routing loop, then into a stream's relay — and records exactly one
//! row however the request ends: [`Accounting::finish`] with a status, or, if
//! it is dropped first (the client went away, hyper dropped the handler), on
//! `Drop` as 499, nginx's "client closed request", flagged truncated.
//! "Exactly one row per request" holds by construction, not by every path
//! remembering to write one.
//!
//! The guard also owns the request's token and money reservation
//! ([`Accounting::reserve`], made once before dispatch): recording the row
//! settles it to the provider's usage (or the estimate of a cut stream) and
//! a request that consumed nothing releases it — so every reservation ends
//! exactly once too, however the request ends.

use crate::providers::Server;
use crate::serve::fleet::Held;
use crate::serve::state::Gateway;
use crate::serve::telemetry::RequestTrace;
use afr_core::billing::{settle, Billed};
use afr_core::config::{Price, ProviderConfig, RouteConfig};
use afr_core::estimate::{prompt_tokens, Wire};
use afr_core::ledger::{never_fits, Amount, Never, Refusal, Reserve};
use afr_core::limits::KeyLimits;
use afr_core::sse::TokenUsage;
use afr_core::usage::{TokenSource, UsageRecord, ATTEMPT_ROW};
use bytes::Bytes;
use http::HeaderValue;
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
    /// The reservation to settle or release when the row is recorded.
    hold: Option<Held>,
    /// The client's body and which of its members are billed as input: the
    /// prompt estimate, computed only when a reservation or an estimated
    /// settlement needs it (`prompt_estimate`).
    prompt: Option<(Bytes, Wire)>,
    /// The prompt estimate, once computed.
    prompt_estimate: Option<u64>,
    /// Tokens of the conversation a Responses follow-up continues.
    history: u64,
    /// Price of the route that served (or last tried) the request.
    price: Option<Price>,
    /// The most output that route may produce for this request.
    output_cap: Option<u64>,
    /// The tokens billed, by class (what the row's counts and cost are of).
    tokens: TokenUsage,
    /// Attempts that failed over after their provider answered.
    failed_attempts: u32,
    /// What those attempts were billed (their own rows), settled with the request.
    attempts_billed: Amount,
    /// The request's span, when telemetry is on: ended with the row.
    trace: Option<Box<RequestTrace>>,
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
            hold: None,
            prompt: None,
            prompt_estimate: None,
            history: 0,
            price: None,
            output_cap: None,
            tokens: TokenUsage::default(),
            failed_attempts: 0,
            attempts_billed: Amount::default(),
            trace: None,
        }
    }

    /// The request's span (`telemetry`), which ends when the row is recorded.
    pub fn traced(mut self, trace: Option<RequestTrace>) -> Self {
        self.trace = trace.map(Box::new);
        self
    }

    /// The request's span, when telemetry is on.
    pub fn trace(&mut self) -> Option<&mut RequestTrace> {
        self.trace.as_deref_mut()
    }

    /// Starts the trace of an attempt at `route` (its provider's `config`,
    /// and `server`, where its calls go): the `traceparent` to send the
    /// provider, when telemetry is on.
    pub fn trace_attempt(
        &mut self,
        route: &RouteConfig,
        config: Option<&ProviderConfig>,
        server: Option<&Server>,
        probe: bool,
    ) -> Option<HeaderValue> {
        let trace = self.trace.as_deref_mut()?;
        trace.attempt(&route.provider, config?.kind, &route.model, server, probe)
    }

    /// Reserves the request's worst case (`worst`: estimated prompt tokens
    /// plus the most completion tokens any route may produce, and the highest
    /// cost of that) against the key's `limits`, before any provider is
    /// called. Refused: which limit (a 429, see `GatewayError::from`). Called once per request.
    pub async fn reserve(&mut self, limits: &KeyLimits, worst: Amount) -> Result<(), Reserve> {
        if let Some(never) = never_fits(limits, worst) {
            if let Some(trace) = self.trace() {
                trace.decision(decision(&Reserve::Never(never)));
            }
            return Err(Reserve::Never(never));
        }
        let now = self.gateway.ledger_now(self.record.ts_ms as u64);
        let key = &self.record.key_id;
        let gateway = &self.gateway;
        let hold = match &gateway.fleet {
            Some(fleet) => {
                let store = gateway.reader.as_ref();
                let id = &self.record.request_id;
                // Boxed: the Redis exchange's future is kilobytes, and
                // unboxed it sized every request's future, fleet or not.
                Box::pin(fleet.reserve(&gateway.ledger, store, id, key, limits, worst, now)).await
            }
            None => gateway
                .ledger()
                .reserve(key, limits, worst, now)
                .map(Held::Local)
                .map_err(Reserve::Refused),
        };
        if let Some(trace) = self.trace.as_deref_mut() {
            trace.decision(hold.as_ref().map_or_else(decision, |_| "reserved"));
        }
        let hold = hold?;
        // The row is timed in the budget period the ledger charged: a
        // request that started in one a later request has already closed
        // is counted at the start of the next, in both.
        if let Some(start) = hold.period_start() {
            self.record.ts_ms = self.record.ts_ms.max(start as i64);
        }
        self.hold = Some(hold);
        Ok(())
    }

    /// The route being tried: its provider, upstream model, price and the
    /// most output it may produce for this request.
    pub fn route(&mut self, route: &RouteConfig, output_cap: u64) {
        self.record.provider.clone_from(&route.provider);
        self.record.upstream_model.clone_from(&route.model);
        self.price = route.price;
        self.output_cap = Some(output_cap);
    }

    /// The row so far, to fill in as the request proceeds.
    pub fn record(&mut self) -> &mut UsageRecord {
        &mut self.record
    }

    /// Records the time to first token of a stream whose first content
    /// reached the client `at`.
    pub fn first_content(&mut self, at: Instant) {
        if let Some(trace) = self.trace.as_deref_mut() {
            trace.first_content(at, &self.record.model);
        }
        let ttft = at.saturating_duration_since(self.started);
        self.record.ttft_ms = Some(ttft.as_millis() as u64);
        self.gateway
            .metrics
            .ttft(&self.record.model, &self.record.provider, ttft);
    }

    /// The request's body and its wire, for the prompt estimate, and the
    /// `history` tokens the provider holds of a conversation it continues
    /// (`previous_response_id`), which it bills as input again.
    pub fn prompt(&mut self, body: Bytes, wire: Wire, history: u64) {
        if let Some(trace) = self.trace() {
            trace.request_body(&body);
        }
        self.prompt = Some((body, wire));
        self.history = history;
    }

    /// The prompt estimate `tokens` of the body given to [`Accounting::prompt`],
    /// counted already (by validation's pass over it).
    pub fn prompt_counted(&mut self, tokens: u64) {
        self.prompt_estimate = Some(tokens.saturating_add(self.history));
    }

    /// Lets go of the request body before a stream is relayed: the bytes
    /// hyper hands over are a slice of the connection's read buffer, so
    /// keeping them kept the whole buffer (8 KiB or more) alive for as long as
    /// a stream lasted, and hyper read the next bytes into a second one
    /// (valgrind massif, 300 streams held: 8 KiB per stream). An estimate
    /// made already (a reserving key) needs no body; otherwise a copy of its
    /// own is kept. A non-streamed answer is done with the body as soon as
    /// it is, so only streams pay for the copy.
    pub fn release_body(&mut self) {
        if self.prompt_estimate.is_some() {
            self.prompt = None;
        } else if let Some((body, _)) = &mut self.prompt {
            *body = Bytes::copy_from_slice(body);
        }
    }

    /// Remembers what the provider holds of the conversation up to the
    /// Responses API response `id` (its input + output), for follow-ups.
    pub fn conversation(&self, id: &str, tokens: u64) {
        self.gateway.pins().set_tokens(id, tokens);
    }

    /// The request's estimated prompt tokens (`afr_core::estimate`): what it
    /// reserves, and what a request cut before any usage is billed for its
    /// prompt. One pass over the body, the first time it is asked for.
    pub fn prompt_estimate(&mut self) -> u64 {
        if let Some(tokens) = self.prompt_estimate {
            return tokens;
        }
        let tokens = self
            .prompt
            .as_ref()
            .map_or(0, |(body, wire)| prompt_tokens(body, *wire))
            .saturating_add(self.history);
        self.prompt_estimate = Some(tokens);
        tokens
    }

    /// Bills what the provider did (`afr_core::billing::settle`): its
    /// `reported` counts when `is_final`, otherwise at least the estimate of
    /// the prompt and of the `output_chars` it produced.
    pub fn bill(&mut self, reported: Option<TokenUsage>, is_final: bool, output_chars: usize) {
        let billed = self.settle(reported, is_final, output_chars);
        fill(&mut self.record, &billed);
        self.tokens = billed.usage;
    }

    fn settle(
        &mut self,
        reported: Option<TokenUsage>,
        is_final: bool,
        output_chars: usize,
    ) -> Billed {
        let output_cap = self.output_cap;
        settle(
            reported,
            is_final,
            || self.prompt_estimate(),
            output_chars,
            output_cap,
        )
    }

    /// The route being tried answered, then failed before any content
    /// reached the client, and the request fails over (design §4): the
    /// provider may have billed that attempt — at least the prompt it read,
    /// and whatever its events reported or showed it producing. The attempt
    /// gets its own usage row (`<request id>/attempt-<n>`, status 502,
    /// truncated, as billed by the route that answered it), and its amount
    /// is settled against the request's reservation with the final answer.
    pub fn attempt_failed(
        &mut self,
        reported: Option<TokenUsage>,
        is_final: bool,
        output_chars: usize,
    ) {
        let billed = self.settle(reported, is_final, output_chars);
        self.failed_attempts += 1;
        let mut row = self.record.clone();
        row.request_id = format!(
            "{}{ATTEMPT_ROW}{}",
            self.record.request_id, self.failed_attempts
        );
        fill(&mut row, &billed);
        row.status = 502;
        row.truncated = true;
        row.latency_ms = self.started.elapsed().as_millis() as u64;
        row.ttft_ms = None;
        row.cost_nanos = self.price.map(|p| p.cost_nanos(&billed.usage));
        self.attempts_billed.tokens += row.total_tokens;
        self.attempts_billed.cost_nanos += row.cost_nanos.unwrap_or(0);
        self.publish(row, Some(&billed.usage));
    }

    /// The metrics of `record`'s tokens (`tokens`, when it consumed any) and
    /// cost, and the row itself to the usage store.
    fn publish(&self, record: UsageRecord, tokens: Option<&TokenUsage>) {
        let metrics = &self.gateway.metrics;
        if let Some(tokens) = tokens {
            metrics.tokens(&record.model, &record.provider, tokens);
        }
        if let Some(nanos) = record.cost_nanos {
            metrics.spend(&record.key_id, &record.model, nanos);
        }
        if let Some(recorder) = &self.gateway.recorder {
            recorder.record(record);
        }
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
        if record.token_source == TokenSource::None
            && status == CLIENT_CLOSED
            && !record.provider.is_empty()
        {
            // Gone while a provider was working on it: the prompt was
            // consumed (the upstream call is cancelled with the client). The
            // row says so, so the row and the ledger carry the same numbers.
            let prompt = self.prompt_estimate();
            self.tokens = TokenUsage {
                prompt_tokens: prompt,
                total_tokens: prompt,
                ..TokenUsage::default()
            };
            record.prompt_tokens = prompt;
            record.total_tokens = prompt;
            record.token_source = TokenSource::Estimated;
        }
        let consumed = record.token_source != TokenSource::None;
        record.cost_nanos = if consumed {
            self.price.map(|p| p.cost_nanos(&self.tokens))
        } else {
            Some(0)
        };
        if let Some(hold) = self.hold.take() {
            let mut used = self.attempts_billed;
            if consumed {
                used.tokens += record.total_tokens;
                used.cost_nanos += record.cost_nanos.unwrap_or(0);
            }
            match hold {
                Held::Fleet(hold) => hold.settle(used),
                Held::Outage(fleet, hold, names) => {
                    let now = self.gateway.ledger_now(record.ts_ms as u64);
                    fleet.settle_outage(hold, names, used, now);
                }
                Held::Local(hold) => {
                    let now = self.gateway.ledger_now(record.ts_ms as u64);
                    self.gateway.ledger().settle(hold, used, now);
                }
            }
        }
        if let Some(trace) = self.trace.take() {
            trace.finish(&record, latency);
        }
        let metrics = &self.gateway.metrics;
        metrics.request(&record.model, &record.provider, status, latency);
        let tokens = (record.token_source != TokenSource::None).then_some(self.tokens);
        self.publish(record, tokens.as_ref());
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

/// The limits decision a refused reservation is traced as.
fn decision(refusal: &Reserve) -> &'static str {
    match refusal {
        Reserve::Refused(Refusal::Tokens { .. }) => "refused_tpm",
        Reserve::Refused(_) => "refused_budget",
        Reserve::Never(Never::Tokens { .. }) => "never_fits_tpm",
        Reserve::Never(_) => "never_fits_budget",
        Reserve::Unavailable => "budget_unavailable",
    }
}

/// Puts `billed`'s counts in `record`.
fn fill(record: &mut UsageRecord, billed: &Billed) {
    let u = &billed.usage;
    record.prompt_tokens = u.prompt_tokens;
    record.completion_tokens = u.completion_tokens;
    record.total_tokens = u.total_tokens;
    record.cached_tokens = u.cached_tokens;
    record.cache_write_5m_tokens = u.cache_write_5m;
    record.cache_write_1h_tokens = u.cache_write_1h;
    record.reasoning_tokens = u.reasoning_tokens;
    record.token_source = if billed.estimated {
        TokenSource::Estimated
    } else {
        TokenSource::Provider
    };
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
        cost_nanos: None,
        cached_tokens: 0,
        cache_write_5m_tokens: 0,
        cache_write_1h_tokens: 0,
        reasoning_tokens: 0,
    }
}
