//! A request's trace: its span, its attempts' spans, and the attributes and
//! metric points made from the request's usage row when it ends.

use super::*;
use crate::providers::{AnswerFacts, Server};
use crate::serve::relay::contains;
use read::{Answer, RequestParams, ResponseInfo};

mod read;

impl Telemetry {
    /// Where a request's metric points go, when metrics are exported.
    fn histograms(&self) -> Option<&Histograms> {
        self.metrics.as_ref().map(MetricsExport::histograms)
    }

    /// The trace of a request whose span is `span` (`None`: spans are not
    /// exported) and whose context, for the attempts' spans, is `cx`.
    pub(super) fn request_trace(
        self: &Arc<Self>,
        span: Option<SdkSpan>,
        cx: Context,
        operation: &'static str,
        started: Instant,
    ) -> RequestTrace {
        RequestTrace {
            telemetry: Arc::clone(self),
            recording: span.as_ref().is_some_and(|s| s.is_recording()),
            span,
            cx,
            operation,
            started,
            params: RequestParams::default(),
            params_read: false,
            response: ResponseInfo::default(),
            content: None,
            attempt: None,
            attempts: 0,
            provider: None,
            decision: "none",
            first_chunk: None,
            last_chunk: None,
            chunks: 0,
        }
    }
}

/// The trace of one request: its span, the open attempt's, and what the
/// span's attributes are made of at the end. Owned by the request's
/// [`crate::serve::accounting::Accounting`].
pub struct RequestTrace {
    telemetry: Arc<Telemetry>,
    /// Whether the request's span is sampled: what only a span shows (the
    /// request's parameters, the answer's id) is read only then.
    recording: bool,
    /// The request's span, held here rather than in a `Context`: a span in
    /// a `Context` sits behind a mutex and a `dyn` call for every attribute.
    span: Option<SdkSpan>,
    /// The parent of the attempts' spans: the request span's own context.
    cx: Context,
    operation: &'static str,
    started: Instant,
    params: RequestParams,
    /// Whether `params` came from validation's members already.
    params_read: bool,
    response: ResponseInfo,
    /// The messages in and out, when the operator opted in and the span is sampled.
    content: Option<(genai_content::Input, genai_content::Output)>,
    /// The open attempt's span.
    attempt: Option<SdkSpan>,
    attempts: u32,
    /// The kind of the provider that served (or was last tried).
    provider: Option<ProviderKind>,
    decision: &'static str,
    first_chunk: Option<Instant>,
    last_chunk: Option<Instant>,
    chunks: u64,
}

/// Why an attempt failed, for its span's `error.type`: the provider's HTTP
/// status, or the class of failure.
pub fn attempt_error_type(error: &crate::providers::ProviderError) -> String {
    use crate::providers::ProviderError;
    match error {
        ProviderError::Connect(_) => "connect".into(),
        ProviderError::Timeout(_) => "timeout".into(),
        ProviderError::Status { status, .. } => status.to_string(),
        ProviderError::Protocol(_) => "protocol".into(),
        ProviderError::Local(_) => "local_resources".into(),
    }
}

impl RequestTrace {
    /// The request parameters the conventions name, from the members
    /// validation found (`spans` of `body`): only their values are read, not
    /// the body again (on a 20 KB agent turn that second pass was most of a
    /// traced request's extra cost).
    pub fn request_params(&mut self, body: &[u8], spans: &afr_core::splice::ObjectSpans) {
        if !self.recording {
            return;
        }
        self.params = RequestParams::from_members(body, spans);
        self.params_read = true;
    }

    /// Reads the request parameters the conventions name off the client's
    /// body, unless [`RequestTrace::request_params`] did.
    pub fn request_body(&mut self, body: &[u8]) {
        if !self.recording {
            return;
        }
        if !self.params_read {
            if let Ok(params) = serde_json::from_slice(body) {
                self.params = params;
            }
        }
        if self.telemetry.capture_content {
            self.content = Some((genai_content::input(body), genai_content::Output::default()));
        }
    }

    /// The limits decision (`afr.limits.decision`): `reserved`, or the
    /// limit that refused the request.
    pub fn decision(&mut self, decision: &'static str) {
        self.decision = decision;
    }

    /// Starts the span of an attempt at `provider` (its config name and
    /// kind, and the route's `upstream_model`, and where its calls go), ending the one
    /// before. Returns the `traceparent` to send the provider.
    pub fn attempt(
        &mut self,
        provider: &str,
        kind: ProviderKind,
        upstream_model: &str,
        server: Option<&Server>,
        probe: bool,
    ) -> Option<HeaderValue> {
        self.end_attempt(None);
        self.attempts += 1;
        self.provider = Some(kind);
        let tracer = &self.telemetry.tracer;
        if !self.telemetry.traces {
            return None;
        }
        if !self.recording {
            // Not sampled: the provider still learns the trace (flags 00).
            let span = tracer.build_with_context(tracer.span_builder(""), &self.cx);
            let header = HeaderValue::from_str(&traceparent(span.span_context())).ok();
            self.attempt = Some(span);
            return header;
        }
        let semconv = self.telemetry.semconv;
        let mut attributes = vec![
            KeyValue::new("gen_ai.operation.name", self.operation),
            KeyValue::new(semconv.provider_key(), semconv.provider_value(kind)),
            KeyValue::new("gen_ai.request.model", upstream_model.to_owned()),
            KeyValue::new("afr.provider", provider.to_owned()),
            KeyValue::new("afr.attempt", i64::from(self.attempts)),
            KeyValue::new("afr.breaker", if probe { "probe" } else { "closed" }),
        ];
        if let Some(server) = server {
            // Shared, so each span's copy is a reference count.
            let address = StringValue::from(Arc::clone(&server.address));
            attributes.push(KeyValue::new("server.address", address));
            attributes.push(KeyValue::new("server.port", i64::from(server.port)));
        }
        let builder = tracer
            .span_builder(format!("{} {upstream_model}", self.operation))
            .with_kind(SpanKind::Client)
            .with_attributes(attributes);
        let span = tracer.build_with_context(builder, &self.cx);
        let header = HeaderValue::from_str(&traceparent(span.span_context())).ok();
        self.attempt = Some(span);
        header
    }

    /// The open attempt failed with `error_type` (and the request moves on,
    /// or ends with the gateway's error).
    pub fn attempt_failed(&mut self, error_type: String) {
        self.end_attempt(Some(error_type));
    }

    /// A route skipped because its provider's breaker is open: a span of
    /// no length, so the refusal shows in the trace where an attempt would be.
    pub fn breaker_open(&mut self, provider: &str, kind: ProviderKind, retry_after: Duration) {
        if !self.recording {
            return;
        }
        let semconv = self.telemetry.semconv;
        let tracer = &self.telemetry.tracer;
        let builder = tracer
            .span_builder(format!("{} {provider}", self.operation))
            .with_kind(SpanKind::Client)
            .with_attributes([
                KeyValue::new("gen_ai.operation.name", self.operation),
                KeyValue::new(semconv.provider_key(), semconv.provider_value(kind)),
                KeyValue::new("afr.provider", provider.to_owned()),
                KeyValue::new("afr.breaker", "open"),
                KeyValue::new("afr.breaker.retry_after_s", retry_after.as_secs_f64()),
                KeyValue::new("error.type", "breaker_open"),
            ]);
        let mut span = tracer.build_with_context(builder, &self.cx);
        span.set_status(Status::error("breaker open"));
        span.end();
    }

    fn end_attempt(&mut self, error_type: Option<String>) {
        let Some(mut span) = self.attempt.take() else {
            return;
        };
        if let Some(error) = error_type {
            span.set_status(Status::error(error.clone()));
            span.set_attribute(KeyValue::new("error.type", error));
        }
        span.end();
    }

    /// Whether the request's span is sampled (and so wants what only a
    /// span shows).
    pub fn recording(&self) -> bool {
        self.recording
    }

    /// A whole (non-streamed) answer body, and what the provider read of it
    /// in its usage pass (`None`: the body is read here).
    pub fn answer_body(&mut self, body: &[u8], facts: Option<Box<AnswerFacts>>) {
        if !self.recording {
            return;
        }
        match facts {
            Some(facts) => {
                let AnswerFacts {
                    id,
                    model,
                    finish_reasons,
                } = *facts;
                self.response = ResponseInfo {
                    id,
                    model,
                    finish_reasons,
                };
            }
            None => {
                if let Ok(answer) = serde_json::from_slice::<Answer>(body) {
                    self.response.read(answer);
                }
            }
        }
        if let Some((_, output)) = &mut self.content {
            output.body(body);
        }
    }

    /// One event relayed to the client: counts the chunks and reads the
    /// id, model and stop reason off the events that carry them.
    pub fn event(&mut self, raw: &[u8]) {
        let now = Instant::now();
        self.chunks += 1;
        self.last_chunk = Some(now);
        let worth_reading = self.recording
            && (self.response.id.is_none()
                || [
                    &b"finish_reason\":\""[..],
                    b"stop_reason\":\"",
                    b"response.completed",
                ]
                .iter()
                .any(|needle| contains(raw, needle)));
        if worth_reading || self.content.is_some() {
            if let Some(data) = event_data(raw) {
                if worth_reading {
                    if let Ok(answer) = serde_json::from_str::<Answer>(&data) {
                        self.response.read(answer);
                    }
                }
                if let Some((_, output)) = &mut self.content {
                    output.event(&data);
                }
            }
        }
    }

    /// The first content of a stream of `model` (the catalogue's name)
    /// reached the client `at`.
    pub fn first_content(&mut self, at: Instant, model: &str) {
        self.first_chunk = Some(at);
        let ttfc = at.saturating_duration_since(self.started).as_secs_f64();
        if let Some(histograms) = self.telemetry.histograms() {
            let series = self.series(model, None);
            histograms.record(Instrument::FirstChunk, &series, ttfc);
        }
    }

    /// The attributes of the request's metric points: a bounded set (the
    /// catalogue's model, never the client's free text nor the provider's
    /// answer), the same whether or not the span is sampled.
    fn series(&self, model: &str, error: Option<&str>) -> Series {
        let semconv = self.telemetry.semconv;
        Series {
            operation: self.operation,
            provider: self
                .provider
                .map(|kind| (semconv.provider_key(), semconv.provider_value(kind))),
            model: model.to_owned(),
            error: error.map(str::to_owned),
            token_type: None,
        }
    }

    /// Ends the request's span (and an open attempt's) with the request's
    /// usage row, and records its metrics.
    pub fn finish(mut self, record: &UsageRecord, latency: Duration) {
        let status = record.status;
        let error = (status >= 400).then(|| error_type(status));
        self.end_attempt(error.clone());
        let telemetry = Arc::clone(&self.telemetry);
        let consumed = record.token_source != TokenSource::None;
        let mut series = self.series(&record.model, error.as_deref());
        if let Some(histograms) = telemetry.histograms() {
            histograms.record(Instrument::Duration, &series, latency.as_secs_f64());
            if consumed {
                for (kind, count) in [
                    ("input", record.prompt_tokens),
                    ("output", record.completion_tokens),
                ] {
                    series.token_type = Some(kind);
                    histograms.record(Instrument::Tokens, &series, count as f64);
                }
                series.token_type = None;
            }
            if let (Some(first), Some(last)) = (self.first_chunk, self.last_chunk) {
                if self.chunks > 1 && last > first {
                    let per = last.duration_since(first).as_secs_f64() / (self.chunks - 1) as f64;
                    histograms.record(Instrument::PerChunk, &series, per);
                }
            }
        }
        let Some(mut span) = self.span.take().filter(|_| self.recording) else {
            return;
        };
        // The catalogue's name, or the client's own when it named none the
        // catalogue has (the row and the metrics keep no free text; the span may).
        let model = Some(&record.model)
            .filter(|m| !m.is_empty())
            .or(self.params.model.as_ref());
        // The metric points' attributes, and the span's own.
        let mut attributes = Vec::with_capacity(32);
        attributes.extend(series.attributes().map(|(k, v)| KeyValue::new(k, v)));
        if let Some(model) = model {
            span.update_name(format!("{} {model}", self.operation));
            if record.model.is_empty() {
                attributes.push(KeyValue::new("gen_ai.request.model", model.clone()));
            }
        }
        attributes.extend(self.params.attributes());
        let r = &self.response;
        if let Some(response_model) = &r.model {
            attributes.push(KeyValue::new(
                "gen_ai.response.model",
                response_model.clone(),
            ));
        }
        if let Some(id) = &r.id {
            attributes.push(KeyValue::new("gen_ai.response.id", id.clone()));
        }
        if !r.finish_reasons.is_empty() {
            let reasons: Vec<StringValue> =
                r.finish_reasons.iter().cloned().map(Into::into).collect();
            attributes.push(KeyValue::new(
                "gen_ai.response.finish_reasons",
                Value::Array(reasons.into()),
            ));
        }
        if consumed {
            attributes.push(KeyValue::new(
                "gen_ai.usage.input_tokens",
                record.prompt_tokens as i64,
            ));
            attributes.push(KeyValue::new(
                "gen_ai.usage.output_tokens",
                record.completion_tokens as i64,
            ));
            let cache_write = record.cache_write_5m_tokens + record.cache_write_1h_tokens;
            for (key, count) in [
                ("gen_ai.usage.cache_read.input_tokens", record.cached_tokens),
                ("gen_ai.usage.cache_creation.input_tokens", cache_write),
                (
                    "gen_ai.usage.reasoning.output_tokens",
                    record.reasoning_tokens,
                ),
            ] {
                if count > 0 {
                    attributes.push(KeyValue::new(key, count as i64));
                }
            }
            let source = if record.token_source == TokenSource::Estimated {
                "estimated"
            } else {
                "provider"
            };
            attributes.push(KeyValue::new("afr.usage.source", source));
        }
        attributes.extend([
            KeyValue::new("afr.key.id", record.key_id.clone()),
            KeyValue::new("afr.request.id", record.request_id.clone()),
            KeyValue::new("afr.limits.decision", self.decision),
            KeyValue::new("afr.attempts", i64::from(self.attempts)),
            KeyValue::new("afr.stream", record.stream),
            KeyValue::new("http.response.status_code", i64::from(status)),
        ]);
        if !record.provider.is_empty() {
            attributes.push(KeyValue::new("afr.provider", record.provider.clone()));
        }
        if let Some(nanos) = record.cost_nanos.filter(|_| consumed) {
            attributes.push(KeyValue::new("afr.cost_usd", nanos as f64 / 1e9));
        }
        if record.truncated {
            attributes.push(KeyValue::new("afr.truncated", true));
        }
        if let Some((input, output)) = &self.content {
            let texts = [
                (
                    "gen_ai.system_instructions",
                    input.system_instructions.clone(),
                ),
                ("gen_ai.input.messages", input.messages.clone()),
                ("gen_ai.output.messages", output.render()),
            ];
            for (key, text) in texts {
                if let Some(text) = text {
                    attributes.push(KeyValue::new(key, text));
                }
            }
        }
        span.set_attributes(attributes);
        if let Some(error) = error {
            span.set_status(Status::error(error));
        }
        span.end();
    }
}

/// `error.type` of a request that ended with `status`: the class of the
/// gateway's answer, low-cardinality as the conventions ask.
pub fn error_type(status: u16) -> String {
    match status {
        499 => "client_closed".into(),
        s => s.to_string(),
    }
}

/// The W3C `traceparent` of `sc`.
fn traceparent(sc: &SpanContext) -> String {
    tracecontext::traceparent(
        sc.trace_id().to_bytes(),
        sc.span_id().to_bytes(),
        sc.trace_flags().to_u8(),
    )
}

#[cfg(test)]
mod tests;
