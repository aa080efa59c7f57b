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
use opentelemetry_otlp::{MetricExporter, Protocol, WithExportConfig, WithHttpConfig};
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

mod export;
mod otlp;
mod request;

use export::{span_pipeline, CountedMetrics, OtlpClient};
pub use request::{attempt_error_type, RequestTrace};

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
/// standard `OTEL_*` variables over it. Spans are ours to send (see
/// `otlp.rs`), so their endpoint and headers are resolved here; the metric
/// exporter is the SDK's, and `None` fields are left to it (it reads the
/// variables itself).
#[derive(Debug, Clone, PartialEq)]
struct Settings {
    /// Where spans go: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` as it is, else
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` or `[telemetry] endpoint` + `/v1/traces`,
    /// else the specification's default (localhost:4318).
    traces_endpoint: String,
    /// Headers on every span export: `OTEL_EXPORTER_OTLP_TRACES_HEADERS`,
    /// else `OTEL_EXPORTER_OTLP_HEADERS` (`key=value,…`, values URL-encoded).
    traces_headers: Vec<(String, String)>,
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
        // Each signal's own variable over the general one.
        for signal in [
            "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
            "OTEL_EXPORTER_OTLP_METRICS_COMPRESSION",
        ] {
            let general = "OTEL_EXPORTER_OTLP_COMPRESSION";
            let named = set(signal).map(|v| (signal, v));
            if let Some((name, v)) = named.or_else(|| set(general).map(|v| (general, v))) {
                if !v.trim().eq_ignore_ascii_case("none") {
                    anyhow::bail!("{name}: this gateway sends OTLP uncompressed, got {v:?}");
                }
            }
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
        let traces_endpoint = match (
            set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
            set("OTEL_EXPORTER_OTLP_ENDPOINT"),
        ) {
            (Some(url), _) => url.trim().to_owned(),
            (None, Some(base)) => format!("{}/v1/traces", base.trim().trim_end_matches('/')),
            (None, None) => at("/v1/traces", false)
                .unwrap_or_else(|| "http://localhost:4318/v1/traces".to_owned()),
        };
        let headers = set("OTEL_EXPORTER_OTLP_TRACES_HEADERS")
            .map(|v| ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", v))
            .or_else(|| {
                set("OTEL_EXPORTER_OTLP_HEADERS").map(|v| ("OTEL_EXPORTER_OTLP_HEADERS", v))
            });
        let traces_headers = match headers {
            Some((name, value)) => {
                otlp_headers(&value).map_err(|e| anyhow::anyhow!("{name}: {e}"))?
            }
            None => Vec::new(),
        };
        Ok(Some(Settings {
            traces_endpoint,
            traces_headers,
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

/// `key=value` pairs separated by commas, each value URL-encoded (the
/// specification's format for `OTEL_EXPORTER_OTLP_HEADERS`). A pair that is
/// not one, or a name or value HTTP cannot carry, is refused.
fn otlp_headers(list: &str) -> anyhow::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for pair in list.split(',').filter(|p| !p.trim().is_empty()) {
        let Some((name, value)) = pair.split_once('=') else {
            anyhow::bail!("expected key=value pairs separated by commas, got {pair:?}");
        };
        let name = name.trim();
        let value = percent_decode(value.trim())
            .ok_or_else(|| anyhow::anyhow!("{name}: the value is not URL-encoded UTF-8"))?;
        http::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| anyhow::anyhow!("{name:?} is not a header name"))?;
        http::HeaderValue::from_str(&value)
            .map_err(|_| anyhow::anyhow!("{name}: the value is not one a header can carry"))?;
        out.push((name.to_owned(), value));
    }
    Ok(out)
}

/// `%XX` escapes decoded (`+` is left alone: these are not form values).
fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hex = [bytes.next()?, bytes.next()?];
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok()
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
            let pipeline = span_pipeline(
                &client,
                &settings.traces_endpoint,
                &settings.traces_headers,
                &dropped,
            )?;
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

#[cfg(test)]
mod tests;
