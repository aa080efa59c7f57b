//! OpenTelemetry: a span per request and per provider attempt, and the GenAI
//! metrics, exported over OTLP (HTTP/protobuf) off the request path.
//!
//! Names and attributes follow the OpenTelemetry semantic conventions for
//! generative AI (status "Development"):
//! <https://github.com/open-telemetry/semantic-conventions/blob/main/docs/gen-ai/gen-ai-spans.md>
//! and `gen-ai-metrics.md` beside it. Their transition plan asks that the
//! attributes renamed since v1.36.0 keep their old names unless
//! `OTEL_SEMCONV_STABILITY_OPT_IN` lists `gen_ai_latest_experimental`: by
//! default the provider is `gen_ai.system` (Azure OpenAI `az.ai.openai`),
//! opted in it is `gen_ai.provider.name` (`azure.ai.openai`). What did not
//! exist in v1.36.0 (the cache and reasoning token counts, the streaming
//! chunk metrics) is emitted either way.
//!
//! Switched on by the standard `OTEL_EXPORTER_OTLP_ENDPOINT` (or the
//! per-signal `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` /
//! `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`); `OTEL_SDK_DISABLED=true` keeps it
//! off. The SDK reads the rest of the standard variables itself: headers
//! (`OTEL_EXPORTER_OTLP_HEADERS`), timeout, `OTEL_SERVICE_NAME` (default
//! `afr`), `OTEL_RESOURCE_ATTRIBUTES`, the sampler (`OTEL_TRACES_SAMPLER`,
//! default parent-based always-on), the batch (`OTEL_BSP_*`) and the metric
//! interval (`OTEL_METRIC_EXPORT_INTERVAL`).
//!
//! A request never waits for the collector: finished spans go to a bounded
//! queue that a background thread exports in batches; when the queue is full
//! or an export fails, the spans are dropped and counted in
//! `afr_otel_dropped_total{signal,reason}` (Prometheus, the admin listener).
//! Message contents are never recorded, nor keys or provider credentials:
//! a span carries the key's id, never its secret.

use crate::serve::metrics::Metrics;
use afr_core::config::{ProviderKind, TelemetryConfig};
use afr_core::genai_content;
use afr_core::sse::event_data;
use afr_core::tracecontext;
use afr_core::usage::{TokenSource, UsageRecord};
use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use opentelemetry::metrics::{Histogram, Meter, MeterProvider as _};
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{
    Span as _, SpanContext, SpanKind, Status, TraceContextExt, TraceId, Tracer as _,
    TracerProvider as _,
};
use opentelemetry::{Context, KeyValue, StringValue, Value};
use opentelemetry_http::{HttpClient, HttpError};
use opentelemetry_otlp::{
    MetricExporter, Protocol, SpanExporter, WithExportConfig, WithHttpConfig,
};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider, Temporality};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, IdGenerator, RandomIdGenerator, Sampler, SdkTracer,
    SdkTracerProvider, SpanData, SpanProcessor,
};
use opentelemetry_sdk::Resource;
use prometheus_client::metrics::counter::Counter;
use serde::Deserialize;
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// The instrumentation scope's name.
const SCOPE: &str = "afr";
/// Bucket boundaries the conventions advise for `gen_ai.client.operation.duration`
/// (and which we use for the time to first chunk), in seconds.
const DURATION_BUCKETS: [f64; 14] = [
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
];
/// The conventions' advice for `gen_ai.client.token.usage`.
const TOKEN_BUCKETS: [f64; 14] = [
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
    16777216.0, 67108864.0,
];
/// The conventions' advice for the time per output token/chunk, in seconds.
const CHUNK_BUCKETS: [f64; 13] = [
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
];
/// What one export may take when `OTEL_EXPORTER_OTLP_TIMEOUT` says nothing
/// (the specification's default).
const DEFAULT_EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// Spans finished but not yet exported, at most, when `OTEL_BSP_MAX_QUEUE_SIZE`
/// says nothing (the specification's default).
const DEFAULT_QUEUE: usize = 2048;

/// Which version of the GenAI conventions' renamed attributes to emit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Semconv {
    /// v1.36.0: `gen_ai.system`.
    V1_36,
    /// `OTEL_SEMCONV_STABILITY_OPT_IN=gen_ai_latest_experimental`:
    /// `gen_ai.provider.name`.
    Latest,
}

impl Semconv {
    /// From the value of `OTEL_SEMCONV_STABILITY_OPT_IN` (a comma-separated list).
    pub fn from_opt_in(value: Option<&str>) -> Semconv {
        let latest = value.is_some_and(|v| {
            v.split(',')
                .any(|item| item.trim() == "gen_ai_latest_experimental")
        });
        if latest {
            Semconv::Latest
        } else {
            Semconv::V1_36
        }
    }

    /// The key of the provider attribute.
    pub fn provider_key(self) -> &'static str {
        match self {
            Semconv::V1_36 => "gen_ai.system",
            Semconv::Latest => "gen_ai.provider.name",
        }
    }

    /// The well-known value for a provider of `kind`.
    pub fn provider_value(self, kind: ProviderKind) -> &'static str {
        match (kind, self) {
            (ProviderKind::Openai, _) => "openai",
            (ProviderKind::Anthropic, _) => "anthropic",
            (ProviderKind::Azure, Semconv::V1_36) => "az.ai.openai",
            (ProviderKind::Azure, Semconv::Latest) => "azure.ai.openai",
        }
    }
}

/// The operation a request performs, by its endpoint (`gen_ai.operation.name`:
/// the conventions' well-known values, and `count_tokens` of our own).
pub fn operation_name(path: &str) -> &'static str {
    match path {
        "/v1/completions" => "text_completion",
        "/v1/embeddings" => "embeddings",
        "/v1/messages/count_tokens" => "count_tokens",
        _ => "chat",
    }
}

/// Tracing and GenAI metrics, when an OTLP endpoint is configured.
pub struct Telemetry {
    /// Whether spans are exported (`OTEL_TRACES_EXPORTER` is not `none`).
    traces: bool,
    /// Whether sampled spans carry message contents (opt-in).
    capture_content: bool,
    tracer: SdkTracer,
    tracer_provider: SdkTracerProvider,
    meter_provider: SdkMeterProvider,
    duration: Histogram<f64>,
    tokens: Histogram<u64>,
    first_chunk: Histogram<f64>,
    per_chunk: Histogram<f64>,
    semconv: Semconv,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("semconv", &self.semconv)
            .finish_non_exhaustive()
    }
}

/// What telemetry exports, and where: the `[telemetry]` block with the
/// standard `OTEL_*` variables over it. `None` fields are left to the SDK,
/// which reads the variables itself.
#[derive(Debug, Clone, PartialEq)]
struct Settings {
    /// Where spans go when no variable says (`[telemetry] endpoint` + `/v1/traces`).
    traces_endpoint: Option<String>,
    /// Where metric points go when no variable says.
    metrics_endpoint: Option<String>,
    /// `service.name`, unless a variable names it.
    service_name: Option<String>,
    /// A parent-based trace-id ratio, unless `OTEL_TRACES_SAMPLER` decides
    /// (`None` also for the SDK's default, every request).
    sample_ratio: Option<f64>,
    traces: bool,
    metrics: bool,
    /// Message contents on sampled spans (opt-in).
    capture_content: bool,
    timeout: Duration,
    semconv: Semconv,
}

impl Settings {
    /// The settings from `config` and the variables `var` reads; `None`
    /// when neither names a collector, or `OTEL_SDK_DISABLED=true`.
    fn resolve(
        config: Option<&TelemetryConfig>,
        var: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Option<Settings>> {
        let set = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        if set("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        let general = set("OTEL_EXPORTER_OTLP_ENDPOINT").is_some();
        let from_env = |signal: &str| general || set(signal).is_some();
        let (env_traces, env_metrics) = (
            from_env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
            from_env("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"),
        );
        if config.is_none() && !env_traces && !env_metrics {
            return Ok(None);
        }
        let protocol = var("OTEL_EXPORTER_OTLP_PROTOCOL").unwrap_or_default();
        if !matches!(protocol.trim(), "" | "http/protobuf") {
            anyhow::bail!(
                "OTEL_EXPORTER_OTLP_PROTOCOL: this gateway exports http/protobuf only, got {protocol:?}"
            );
        }
        let base = config.map(|c| c.endpoint.trim().trim_end_matches('/'));
        let at = |path: &str, from_env: bool| match base {
            Some(base) if !from_env => Some(format!("{base}{path}")),
            _ => None,
        };
        let named = set("OTEL_SERVICE_NAME").is_some()
            || var("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|v| v.contains("service.name="));
        let exporter = |name: &str, configured: Option<bool>| match set(name) {
            Some(value) => exporter_on(Some(value), name),
            None => Ok(configured.unwrap_or(true)),
        };
        Ok(Some(Settings {
            traces_endpoint: at("/v1/traces", env_traces),
            metrics_endpoint: at("/v1/metrics", env_metrics),
            service_name: (!named)
                .then(|| config.map_or_else(|| "afr".to_owned(), |c| c.service_name.clone())),
            sample_ratio: match config {
                Some(c) if set("OTEL_TRACES_SAMPLER").is_none() && c.sample_ratio < 1.0 => {
                    Some(c.sample_ratio)
                }
                _ => None,
            },
            traces: exporter("OTEL_TRACES_EXPORTER", config.map(|c| c.traces))?,
            metrics: exporter("OTEL_METRICS_EXPORTER", config.map(|c| c.metrics))?,
            capture_content: match set("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT") {
                Some(v) => match v.trim().to_ascii_lowercase().as_str() {
                    "true" => true,
                    "false" => false,
                    other => anyhow::bail!(
                        "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT: expected true or false, got {other:?}"
                    ),
                },
                None => config.is_some_and(|c| c.capture_content),
            },
            timeout: var("OTEL_EXPORTER_OTLP_TIMEOUT")
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map_or(DEFAULT_EXPORT_TIMEOUT, Duration::from_millis),
            semconv: Semconv::from_opt_in(var("OTEL_SEMCONV_STABILITY_OPT_IN").as_deref()),
        }))
    }
}

impl Telemetry {
    /// Telemetry as the process environment configures it: `None` when no
    /// OTLP endpoint is set. Must be called inside the sidecar's runtime: the
    /// exporters' HTTP requests are spawned on it.
    pub fn start_exporting(
        metrics: &Metrics,
        config: Option<&TelemetryConfig>,
    ) -> anyhow::Result<Option<Telemetry>> {
        let Some(settings) = Settings::resolve(config, |name| std::env::var(name).ok())? else {
            return Ok(None);
        };
        let client = OtlpClient::new(settings.timeout)?;
        let mut resource = Resource::builder();
        if let Some(name) = &settings.service_name {
            resource = resource.with_service_name(name.clone());
        }
        let resource = resource
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        let semconv = settings.semconv;

        let dropped = |signal, reason| metrics.otel_dropped(signal, reason);
        let mut tracer_provider = SdkTracerProvider::builder()
            .with_id_generator(Ids::default())
            .with_resource(resource.clone());
        let traces = settings.traces;
        if traces {
            let pipeline = span_pipeline(&client, settings.traces_endpoint.as_deref(), &dropped)?;
            tracer_provider = tracer_provider.with_span_processor(pipeline);
            if let Some(ratio) = settings.sample_ratio {
                tracer_provider = tracer_provider.with_sampler(Sampler::ParentBased(Box::new(
                    Sampler::TraceIdRatioBased(ratio),
                )));
            }
        } else {
            // No spans: the tracer decides "not sampled" and records nothing.
            tracer_provider = tracer_provider.with_sampler(Sampler::AlwaysOff);
        }
        let tracer_provider = tracer_provider.build();
        let tracer = tracer_provider.tracer(SCOPE);

        let mut meter_provider = SdkMeterProvider::builder().with_resource(resource);
        if settings.metrics {
            let mut builder = MetricExporter::builder()
                .with_http()
                .with_http_client(client)
                .with_protocol(Protocol::HttpBinary);
            if let Some(endpoint) = &settings.metrics_endpoint {
                builder = builder.with_endpoint(endpoint.clone());
            }
            let metric_exporter = builder
                .build()
                .map_err(|e| anyhow::anyhow!("OTLP metric exporter: {e}"))?;
            let reader = PeriodicReader::builder(CountedMetrics {
                inner: metric_exporter,
                failed: dropped("metrics", "export_failed"),
                failing: AtomicBool::new(false),
            })
            .build();
            meter_provider = meter_provider.with_reader(reader);
        }
        let meter_provider = meter_provider.build();
        let meter = meter_provider.meter(SCOPE);
        Ok(Some(Telemetry::with(
            (traces, settings.capture_content),
            tracer,
            tracer_provider,
            meter_provider,
            &meter,
            semconv,
        )))
    }

    fn with(
        (traces, capture_content): (bool, bool),
        tracer: SdkTracer,
        tracer_provider: SdkTracerProvider,
        meter_provider: SdkMeterProvider,
        meter: &Meter,
        semconv: Semconv,
    ) -> Telemetry {
        let seconds = |name: &'static str, description: &'static str, buckets: &[f64]| {
            meter
                .f64_histogram(name)
                .with_unit("s")
                .with_description(description)
                .with_boundaries(buckets.to_vec())
                .build()
        };
        Telemetry {
            duration: seconds(
                "gen_ai.client.operation.duration",
                "GenAI operation duration.",
                &DURATION_BUCKETS,
            ),
            tokens: meter
                .u64_histogram("gen_ai.client.token.usage")
                .with_unit("{token}")
                .with_description("Number of input and output tokens used.")
                .with_boundaries(TOKEN_BUCKETS.to_vec())
                .build(),
            first_chunk: seconds(
                "gen_ai.client.operation.time_to_first_chunk",
                "Time to receive the first chunk, measured from when the client issues the generation request to when the first chunk is received in the response stream.",
                &DURATION_BUCKETS,
            ),
            per_chunk: seconds(
                "gen_ai.client.operation.time_per_output_chunk",
                "Time per output chunk, after the first chunk, of a streamed response.",
                &CHUNK_BUCKETS,
            ),
            traces,
            capture_content,
            tracer,
            tracer_provider,
            meter_provider,
            semconv,
        }
    }

    /// Starts the span of a request that arrived at `started` with
    /// `headers`, for the endpoint `path`. Its parent is the client's W3C
    /// `traceparent` (passed through nginx); without one, the module's
    /// `$afr_trace_id` (`X-Afr-Trace-Id`, 32 hex digits) becomes the trace
    /// id, so nginx's access log and the trace share it.
    pub fn start(
        self: &Arc<Self>,
        headers: &HeaderMap,
        path: &str,
        started: Instant,
    ) -> RequestTrace {
        let operation = operation_name(path);
        if !self.traces {
            return self.request_trace(Context::new(), false, operation, started);
        }
        let parent = TraceContextPropagator::new().extract(&Headers(headers));
        let has_parent = parent.span().span_context().is_valid();
        let trace_id = (!has_parent)
            .then(|| headers.get("x-afr-trace-id"))
            .flatten()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| TraceId::from_hex(v.trim()).ok())
            .filter(|id| *id != TraceId::INVALID);
        let builder = self
            .tracer
            .span_builder(operation)
            .with_kind(SpanKind::Client)
            .with_start_time(system_time(started));
        let span = NEXT_TRACE_ID.with(|next| {
            next.set(trace_id);
            let span = self.tracer.build_with_context(builder, &parent);
            next.set(None);
            span
        });
        let recording = span.is_recording();
        self.request_trace(parent.with_span(span), recording, operation, started)
    }

    fn request_trace(
        self: &Arc<Self>,
        cx: Context,
        recording: bool,
        operation: &'static str,
        started: Instant,
    ) -> RequestTrace {
        RequestTrace {
            telemetry: Arc::clone(self),
            recording,
            cx,
            operation,
            started,
            params: RequestParams::default(),
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

    /// Exports what is queued and stops the exporters, waiting at most
    /// `within` for each. Blocking: call it off the runtime's workers.
    pub fn shutdown(&self, within: Duration) {
        if let Err(e) = self.tracer_provider.shutdown_with_timeout(within) {
            tracing::warn!(error = %e, "OpenTelemetry: traces not flushed at shutdown");
        }
        if let Err(e) = self.meter_provider.shutdown_with_timeout(within) {
            tracing::warn!(error = %e, "OpenTelemetry: metrics not flushed at shutdown");
        }
    }
}

/// Whether `OTEL_TRACES_EXPORTER` / `OTEL_METRICS_EXPORTER` (`name`, with
/// `value`) asks for OTLP (the default) or for nothing (`none`).
fn exporter_on(value: Option<String>, name: &str) -> anyhow::Result<bool> {
    match value.as_deref().map(str::trim) {
        None | Some("" | "otlp") => Ok(true),
        Some("none") => Ok(false),
        Some(other) => anyhow::bail!("{name}: expected otlp or none, got {other:?}"),
    }
}

/// The spans' way out: a bounded queue, exported in batches by the SDK's
/// own thread, every drop counted.
fn span_pipeline(
    client: &OtlpClient,
    endpoint: Option<&str>,
    dropped: &dyn Fn(&'static str, &'static str) -> Counter,
) -> anyhow::Result<Bounded<BatchSpanProcessor>> {
    let mut builder = SpanExporter::builder()
        .with_http()
        .with_http_client(client.clone())
        .with_protocol(Protocol::HttpBinary);
    if let Some(endpoint) = endpoint {
        builder = builder.with_endpoint(endpoint);
    }
    let spans = builder
        .build()
        .map_err(|e| anyhow::anyhow!("OTLP span exporter: {e}"))?;
    let batch = BatchConfigBuilder::default();
    let queue = std::env::var("OTEL_BSP_MAX_QUEUE_SIZE")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(DEFAULT_QUEUE)
        .max(1);
    let inflight = Arc::new(AtomicUsize::new(0));
    let exporter = Counted {
        inner: spans,
        inflight: Arc::clone(&inflight),
        failed: dropped("traces", "export_failed"),
        failing: AtomicBool::new(false),
    };
    // The batch processor's own queue is one larger than ours, so the
    // spans it would drop silently are dropped (and counted) here first.
    let processor = BatchSpanProcessor::builder(exporter)
        .with_batch_config(batch.with_max_queue_size(queue + 1).build())
        .build();
    Ok(Bounded {
        inner: processor,
        inflight,
        capacity: queue,
        full: dropped("traces", "queue_full"),
    })
}

fn system_time(at: Instant) -> SystemTime {
    SystemTime::now()
        .checked_sub(at.elapsed())
        .unwrap_or_else(SystemTime::now)
}

thread_local! {
    /// The trace id the next root span built on this thread takes (see [`Ids`]).
    static NEXT_TRACE_ID: Cell<Option<TraceId>> = const { Cell::new(None) };
}

/// Random ids, except for a root span's trace id when nginx gave one: the
/// SDK's tracer takes a root's trace id from its id generator and from
/// nothing else, so [`Telemetry::start`] leaves it here for the one
/// synchronous `build_with_context` call on this thread.
#[derive(Debug, Default)]
struct Ids(RandomIdGenerator);

impl IdGenerator for Ids {
    fn new_trace_id(&self) -> TraceId {
        NEXT_TRACE_ID
            .with(Cell::take)
            .unwrap_or_else(|| self.0.new_trace_id())
    }

    fn new_span_id(&self) -> opentelemetry::trace::SpanId {
        self.0.new_span_id()
    }
}

/// Reads `traceparent`/`tracestate` off the request's headers.
struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// The request parameters the conventions name, read off the client's body.
#[derive(Debug, Default, Deserialize)]
struct RequestParams {
    model: Option<String>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    max_output_tokens: Option<u64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<f64>,
    frequency_penalty: Option<f64>,
    presence_penalty: Option<f64>,
    seed: Option<i64>,
    n: Option<i64>,
    stop: Option<Stop>,
    stop_sequences: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// What the provider's answer says of itself: its id, model, and why it stopped.
#[derive(Debug, Default)]
struct ResponseInfo {
    id: Option<String>,
    model: Option<String>,
    finish_reasons: Vec<String>,
}

/// The members of an answer (a whole body or one event) that carry its id,
/// model and finish reasons, on every wire: chat completions and their
/// chunks, Anthropic's message and its `message_start`/`message_delta`
/// events, the Responses API's response and its `response.*` events.
#[derive(Debug, Default, Deserialize)]
struct Answer {
    id: Option<String>,
    model: Option<String>,
    #[serde(default)]
    choices: Vec<Choice>,
    stop_reason: Option<String>,
    status: Option<String>,
    message: Option<Box<Answer>>,
    response: Option<Box<Answer>>,
    delta: Option<Box<Answer>>,
}

#[derive(Debug, Default, Deserialize)]
struct Choice {
    finish_reason: Option<String>,
}

impl ResponseInfo {
    fn read(&mut self, answer: Answer) {
        if let Some(inner) = answer.message.or(answer.response) {
            self.read(*inner);
        }
        if let Some(delta) = answer.delta {
            self.read(*delta);
        }
        if self.id.is_none() {
            self.id = answer.id;
        }
        if self.model.is_none() {
            self.model = answer.model;
        }
        for reason in answer
            .choices
            .into_iter()
            .filter_map(|c| c.finish_reason)
            .chain(answer.stop_reason)
            .chain(answer.status.filter(|s| s != "in_progress"))
        {
            self.finish_reasons.push(reason);
        }
    }
}

/// A provider attempt's span, open while the attempt lasts.
struct AttemptSpan {
    cx: Context,
}

/// The trace of one request: its span, the open attempt's, and what the
/// span's attributes are made of at the end. Owned by the request's
/// [`crate::serve::accounting::Accounting`].
pub struct RequestTrace {
    telemetry: Arc<Telemetry>,
    /// Whether the request's span is sampled: what only a span shows (the
    /// request's parameters, the answer's id) is read only then.
    recording: bool,
    cx: Context,
    operation: &'static str,
    started: Instant,
    params: RequestParams,
    response: ResponseInfo,
    /// The messages in and out, when the operator opted in and the span is sampled.
    content: Option<(genai_content::Input, genai_content::Output)>,
    attempt: Option<AttemptSpan>,
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
    /// Reads the request parameters the conventions name off the client's body.
    pub fn request_body(&mut self, body: &[u8]) {
        if !self.recording {
            return;
        }
        if let Ok(params) = serde_json::from_slice(body) {
            self.params = params;
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
    /// kind, and the route's `upstream_model`, `base_url`), ending the one
    /// before. Returns the `traceparent` to send the provider.
    pub fn attempt(
        &mut self,
        provider: &str,
        kind: ProviderKind,
        upstream_model: &str,
        base_url: &str,
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
            let span = tracer.span_builder("").start_with_context(tracer, &self.cx);
            let sc = span.span_context().clone();
            self.attempt = Some(AttemptSpan {
                cx: self.cx.with_span(span),
            });
            return HeaderValue::from_str(&traceparent(&sc)).ok();
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
        if let Ok(uri) = base_url.parse::<http::Uri>() {
            if let Some(host) = uri.host() {
                attributes.push(KeyValue::new("server.address", host.to_owned()));
                let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
                    Some("http") => 80,
                    _ => 443,
                });
                attributes.push(KeyValue::new("server.port", i64::from(port)));
            }
        }
        let span = self
            .telemetry
            .tracer
            .span_builder(format!("{} {upstream_model}", self.operation))
            .with_kind(SpanKind::Client)
            .with_attributes(attributes)
            .start_with_context(&self.telemetry.tracer, &self.cx);
        let sc = span.span_context().clone();
        self.attempt = Some(AttemptSpan {
            cx: self.cx.with_span(span),
        });
        HeaderValue::from_str(&traceparent(&sc)).ok()
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
        let mut span = self
            .telemetry
            .tracer
            .span_builder(format!("{} {provider}", self.operation))
            .with_kind(SpanKind::Client)
            .with_attributes([
                KeyValue::new("gen_ai.operation.name", self.operation),
                KeyValue::new(semconv.provider_key(), semconv.provider_value(kind)),
                KeyValue::new("afr.provider", provider.to_owned()),
                KeyValue::new("afr.breaker", "open"),
                KeyValue::new("afr.breaker.retry_after_s", retry_after.as_secs_f64()),
                KeyValue::new("error.type", "breaker_open"),
            ])
            .start_with_context(&self.telemetry.tracer, &self.cx);
        span.set_status(Status::error("breaker open"));
        span.end();
    }

    fn end_attempt(&mut self, error_type: Option<String>) {
        let Some(attempt) = self.attempt.take() else {
            return;
        };
        let span = attempt.cx.span();
        if let Some(error) = error_type {
            span.set_status(Status::error(error.clone()));
            span.set_attribute(KeyValue::new("error.type", error));
        }
        span.end();
    }

    /// A whole (non-streamed) answer body.
    pub fn answer_body(&mut self, body: &[u8]) {
        if !self.recording {
            return;
        }
        if let Ok(answer) = serde_json::from_slice::<Answer>(body) {
            self.response.read(answer);
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
                || memchr_any(
                    raw,
                    &[
                        b"finish_reason\":\"",
                        b"stop_reason\":\"",
                        b"response.completed",
                    ],
                ));
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
        let attributes = self.metric_attributes(model, None);
        self.telemetry.first_chunk.record(ttfc, &attributes);
    }

    /// The attributes of the request's metric points: a bounded set (the
    /// catalogue's model, never the client's free text nor the provider's
    /// answer), the same whether or not the span is sampled.
    fn metric_attributes(&self, model: &str, error: Option<&str>) -> Vec<KeyValue> {
        let semconv = self.telemetry.semconv;
        let mut attributes = vec![KeyValue::new("gen_ai.operation.name", self.operation)];
        if let Some(kind) = self.provider {
            attributes.push(KeyValue::new(
                semconv.provider_key(),
                semconv.provider_value(kind),
            ));
        }
        if !model.is_empty() {
            attributes.push(KeyValue::new("gen_ai.request.model", model.to_owned()));
        }
        if let Some(error) = error {
            attributes.push(KeyValue::new("error.type", error.to_owned()));
        }
        attributes
    }

    /// Ends the request's span (and an open attempt's) with the request's
    /// usage row, and records its metrics.
    pub fn finish(mut self, record: &UsageRecord, latency: Duration) {
        let status = record.status;
        let error = (status >= 400).then(|| error_type(status));
        self.end_attempt(error.clone());
        let telemetry = Arc::clone(&self.telemetry);
        let mut metric = self.metric_attributes(&record.model, error.as_deref());
        telemetry.duration.record(latency.as_secs_f64(), &metric);
        let consumed = record.token_source != TokenSource::None;
        if consumed {
            for (kind, count) in [
                ("input", record.prompt_tokens),
                ("output", record.completion_tokens),
            ] {
                metric.push(KeyValue::new("gen_ai.token.type", kind));
                telemetry.tokens.record(count, &metric);
                metric.pop();
            }
        }
        if let (Some(first), Some(last)) = (self.first_chunk, self.last_chunk) {
            if self.chunks > 1 && last > first {
                let per = last.duration_since(first).as_secs_f64() / (self.chunks - 1) as f64;
                telemetry.per_chunk.record(per, &metric);
            }
        }
        if !self.recording {
            return;
        }

        let span = self.cx.span();
        // The catalogue's name, or the client's own when it named none the
        // catalogue has (the row and the metrics keep no free text; the span may).
        let model = Some(&record.model)
            .filter(|m| !m.is_empty())
            .or(self.params.model.as_ref());
        let mut attributes = metric;
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

impl RequestParams {
    fn attributes(&self) -> Vec<KeyValue> {
        let mut out = Vec::new();
        let max = self
            .max_tokens
            .or(self.max_completion_tokens)
            .or(self.max_output_tokens);
        if let Some(max) = max {
            out.push(KeyValue::new("gen_ai.request.max_tokens", max as i64));
        }
        for (key, value) in [
            ("gen_ai.request.temperature", self.temperature),
            ("gen_ai.request.top_p", self.top_p),
            ("gen_ai.request.top_k", self.top_k),
            ("gen_ai.request.frequency_penalty", self.frequency_penalty),
            ("gen_ai.request.presence_penalty", self.presence_penalty),
        ] {
            if let Some(v) = value {
                out.push(KeyValue::new(key, v));
            }
        }
        if let Some(seed) = self.seed {
            out.push(KeyValue::new("gen_ai.request.seed", seed));
        }
        if let Some(n) = self.n.filter(|n| *n != 1) {
            out.push(KeyValue::new("gen_ai.request.choice.count", n));
        }
        let stop = match (&self.stop, &self.stop_sequences) {
            (Some(Stop::One(s)), _) => Some(vec![s.clone()]),
            (Some(Stop::Many(v)), _) | (None, Some(v)) => Some(v.clone()),
            (None, None) => None,
        };
        if let Some(stop) = stop {
            let values: Vec<StringValue> = stop.into_iter().map(Into::into).collect();
            out.push(KeyValue::new(
                "gen_ai.request.stop_sequences",
                Value::Array(values.into()),
            ));
        }
        out
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

fn memchr_any(haystack: &[u8], needles: &[&[u8]]) -> bool {
    needles
        .iter()
        .any(|n| haystack.windows(n.len()).any(|w| w == *n))
}

/// The exporters' HTTP client: hyper's, on the sidecar's runtime. The
/// exporters run on the SDK's own threads and block on what this returns;
/// the request itself is spawned on the runtime, whose reactor drives it,
/// and bounded by the export timeout, reading the answer included.
#[derive(Debug, Clone)]
struct OtlpClient {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    runtime: tokio::runtime::Handle,
    timeout: Duration,
}

/// The most of a collector's answer read (its body is a small protobuf).
const MAX_ANSWER: usize = 1 << 20;

impl OtlpClient {
    fn new(timeout: Duration) -> anyhow::Result<OtlpClient> {
        let tls = crate::tls::client_config(None, "OTEL_EXPORTER_OTLP_CERTIFICATE")?;
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(tcp);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(OtlpClient {
            client,
            runtime: tokio::runtime::Handle::current(),
            timeout,
        })
    }
}

#[async_trait]
impl HttpClient for OtlpClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let (parts, body) = request.into_parts();
        let request = Request::from_parts(parts, Full::new(body));
        let client = self.client.clone();
        let timeout = self.timeout;
        let exchange = async move {
            let response = client.request(request).await?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_ANSWER).collect().await?.to_bytes();
            Ok::<_, HttpError>(Response::from_parts(parts, body))
        };
        let task = self
            .runtime
            .spawn(async move { tokio::time::timeout(timeout, exchange).await });
        match task.await? {
            Ok(answer) => answer,
            Err(_) => Err(format!("no answer within {timeout:?}").into()),
        }
    }
}

/// Counts the spans of every failed export as dropped, and says once in the
/// log when exports start and stop failing.
#[derive(Debug)]
struct Counted<E> {
    inner: E,
    inflight: Arc<AtomicUsize>,
    failed: Counter,
    failing: AtomicBool,
}

impl<E: opentelemetry_sdk::trace::SpanExporter> opentelemetry_sdk::trace::SpanExporter
    for Counted<E>
{
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len();
        let result = self.inner.export(batch).await;
        self.inflight.fetch_sub(n, Ordering::Relaxed);
        note_result(&self.failing, &self.failed, "traces", &result, n as u64);
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

fn note_result(
    failing: &AtomicBool,
    failed: &Counter,
    signal: &str,
    result: &OTelSdkResult,
    n: u64,
) {
    match result {
        Ok(()) => {
            if failing.swap(false, Ordering::Relaxed) {
                tracing::info!(signal, "OpenTelemetry: the collector accepts exports again");
            }
        }
        Err(e) => {
            failed.inc_by(n);
            if !failing.swap(true, Ordering::Relaxed) {
                tracing::warn!(signal, error = %e, "OpenTelemetry: export failed; dropping and counting in afr_otel_dropped_total until the collector answers");
            }
        }
    }
}

/// Refuses (and counts) a finished span when `capacity` spans wait for
/// export already, instead of leaving the batch processor to drop it unseen.
#[derive(Debug)]
struct Bounded<P> {
    inner: P,
    inflight: Arc<AtomicUsize>,
    capacity: usize,
    full: Counter,
}

impl<P: SpanProcessor> SpanProcessor for Bounded<P> {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if self.inflight.fetch_add(1, Ordering::Relaxed) >= self.capacity {
            self.inflight.fetch_sub(1, Ordering::Relaxed);
            self.full.inc();
            return;
        }
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// Counts failed metric exports. A failed export loses nothing for good:
/// the points are cumulative, and the next export carries the totals.
struct CountedMetrics<E> {
    inner: E,
    failed: Counter,
    failing: AtomicBool,
}

impl<E: PushMetricExporter> PushMetricExporter for CountedMetrics<E> {
    async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
        let result = self.inner.export(metrics).await;
        note_result(&self.failing, &self.failed, "metrics", &result, 1);
        result
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn temporality(&self) -> Temporality {
        self.inner.temporality()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{TraceFlags, TraceState};

    #[test]
    fn semconv_opt_in_switches_the_provider_attribute() {
        assert_eq!(Semconv::from_opt_in(None), Semconv::V1_36);
        assert_eq!(Semconv::from_opt_in(Some("http")), Semconv::V1_36);
        let latest = Semconv::from_opt_in(Some("http, gen_ai_latest_experimental"));
        assert_eq!(latest, Semconv::Latest);
        assert_eq!(latest.provider_key(), "gen_ai.provider.name");
        assert_eq!(
            latest.provider_value(ProviderKind::Azure),
            "azure.ai.openai"
        );
        assert_eq!(Semconv::V1_36.provider_key(), "gen_ai.system");
        assert_eq!(
            Semconv::V1_36.provider_value(ProviderKind::Azure),
            "az.ai.openai"
        );
    }

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name: &str| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    fn block(endpoint: &str) -> TelemetryConfig {
        TelemetryConfig {
            endpoint: endpoint.to_owned(),
            service_name: "gw".to_owned(),
            sample_ratio: 0.25,
            traces: true,
            metrics: false,
            capture_content: false,
        }
    }

    #[test]
    fn an_endpoint_switches_it_on_and_sdk_disabled_off() {
        assert_eq!(Settings::resolve(None, env(&[])).unwrap(), None);
        assert_eq!(
            Settings::resolve(None, env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")])).unwrap(),
            None
        );
        let on = Settings::resolve(
            None,
            env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (on.traces_endpoint, on.service_name.as_deref()),
            (None, Some("afr"))
        );
        assert!(on.traces && on.metrics && on.sample_ratio.is_none());
        let traces_only = env(&[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c/v1/traces")]);
        assert!(Settings::resolve(None, traces_only).unwrap().is_some());
        let disabled = env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
            ("OTEL_SDK_DISABLED", "TRUE"),
        ]);
        assert_eq!(
            Settings::resolve(Some(&block("http://c:4318")), disabled).unwrap(),
            None
        );
    }

    #[test]
    fn the_block_configures_and_the_variables_override_it() {
        let config = block("http://collector:4318/");
        let only = Settings::resolve(Some(&config), env(&[])).unwrap().unwrap();
        assert_eq!(
            only.traces_endpoint.as_deref(),
            Some("http://collector:4318/v1/traces")
        );
        assert_eq!(
            only.metrics_endpoint.as_deref(),
            Some("http://collector:4318/v1/metrics")
        );
        assert_eq!(only.service_name.as_deref(), Some("gw"));
        assert_eq!(only.sample_ratio, Some(0.25));
        assert!(only.traces && !only.metrics && !only.capture_content);
        let opted = env(&[("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "TRUE")]);
        let opted = Settings::resolve(Some(&config), opted).unwrap().unwrap();
        assert!(opted.capture_content);
        let typo = env(&[("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "yes")]);
        assert!(Settings::resolve(Some(&config), typo).is_err());
        let over = Settings::resolve(
            Some(&config),
            env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://other:4318"),
                ("OTEL_SERVICE_NAME", "edge"),
                ("OTEL_TRACES_SAMPLER", "always_on"),
                ("OTEL_METRICS_EXPORTER", "otlp"),
                ("OTEL_TRACES_EXPORTER", "none"),
            ]),
        )
        .unwrap()
        .unwrap();
        assert_eq!((over.traces_endpoint, over.metrics_endpoint), (None, None));
        assert_eq!((over.service_name, over.sample_ratio), (None, None));
        assert!(!over.traces && over.metrics);
        let grpc = env(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]);
        let refused = Settings::resolve(Some(&config), grpc).unwrap_err();
        assert!(
            refused.to_string().contains("http/protobuf only"),
            "{refused}"
        );
    }

    #[test]
    fn exporters_are_otlp_or_none() {
        assert!(exporter_on(None, "X").unwrap());
        assert!(exporter_on(Some("otlp".into()), "X").unwrap());
        assert!(!exporter_on(Some(" none ".into()), "X").unwrap());
        let refused = exporter_on(Some("zipkin".into()), "OTEL_TRACES_EXPORTER").unwrap_err();
        assert_eq!(
            refused.to_string(),
            "OTEL_TRACES_EXPORTER: expected otlp or none, got \"zipkin\""
        );
    }

    #[test]
    fn answers_give_id_model_and_finish_reasons_on_every_wire() {
        let read = |json: &str| {
            let mut info = ResponseInfo::default();
            info.read(serde_json::from_str(json).unwrap());
            (info.id, info.model, info.finish_reasons)
        };
        let chat = r#"{"id":"chatcmpl-1","model":"gpt-4o-2024","choices":[{"index":0,"finish_reason":"stop"},{"index":1,"finish_reason":"length"}]}"#;
        assert_eq!(
            read(chat),
            (
                Some("chatcmpl-1".into()),
                Some("gpt-4o-2024".into()),
                vec!["stop".into(), "length".into()]
            )
        );
        let message = r#"{"id":"msg_1","type":"message","model":"claude-x","stop_reason":"end_turn","content":[]}"#;
        assert_eq!(read(message).2, vec!["end_turn".to_owned()]);
        let start = r#"{"type":"message_start","message":{"id":"msg_2","model":"claude-y"}}"#;
        assert_eq!(read(start).0.as_deref(), Some("msg_2"));
        let delta = r#"{"type":"message_delta","delta":{"stop_reason":"max_tokens"}}"#;
        assert_eq!(read(delta).2, vec!["max_tokens".to_owned()]);
        let done = r#"{"type":"response.completed","response":{"id":"resp_1","model":"gpt-5","status":"completed"}}"#;
        assert_eq!(
            read(done),
            (
                Some("resp_1".into()),
                Some("gpt-5".into()),
                vec!["completed".into()]
            )
        );
    }

    #[test]
    fn request_parameters_become_the_conventions_attributes() {
        let params: RequestParams = serde_json::from_str(
            r#"{"model":"m","max_completion_tokens":50,"temperature":0.5,"stop":"END","n":2,"seed":7,"messages":[]}"#,
        )
        .unwrap();
        let attributes = params.attributes();
        let get = |k: &str| {
            attributes
                .iter()
                .find(|kv| kv.key.as_str() == k)
                .map(|kv| kv.value.clone())
        };
        assert_eq!(get("gen_ai.request.max_tokens"), Some(Value::I64(50)));
        assert_eq!(get("gen_ai.request.temperature"), Some(Value::F64(0.5)));
        assert_eq!(get("gen_ai.request.choice.count"), Some(Value::I64(2)));
        assert_eq!(get("gen_ai.request.seed"), Some(Value::I64(7)));
        assert!(get("gen_ai.request.stop_sequences").is_some());
        assert!(get("gen_ai.request.top_p").is_none());
        let one: RequestParams = serde_json::from_str(r#"{"n":1}"#).unwrap();
        assert!(
            one.attributes().is_empty(),
            "n = 1 is the default and not recorded"
        );
    }

    #[test]
    fn traceparent_is_w3c() {
        let sc = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            opentelemetry::trace::SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        );
        assert_eq!(
            traceparent(&sc),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
    }

    #[test]
    fn error_types_are_low_cardinality() {
        assert_eq!(error_type(429), "429");
        assert_eq!(error_type(499), "client_closed");
    }
}
