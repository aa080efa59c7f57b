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
//! off. Read here: the endpoints, headers (`OTEL_EXPORTER_OTLP_HEADERS` and
//! the per-signal ones), timeout, compression (none), the metric interval
//! (`OTEL_METRIC_EXPORT_INTERVAL`) and temporality
//! (`OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE`); the SDK reads
//! `OTEL_SERVICE_NAME` (default `afr`), `OTEL_RESOURCE_ATTRIBUTES`, the
//! sampler (`OTEL_TRACES_SAMPLER`, default parent-based always-on) and the
//! batch (`OTEL_BSP_*`).
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
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{
    Span as _, SpanContext, SpanKind, Status, TraceContextExt, TraceId, Tracer as _,
    TracerProvider as _,
};
use opentelemetry::{Context, KeyValue, StringValue, Value};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, IdGenerator, RandomIdGenerator, Sampler, SdkTracer,
    SdkTracerProvider, Span as SdkSpan, SpanData, SpanProcessor,
};
use opentelemetry_sdk::Resource;
use prometheus_client::metrics::counter::Counter;
use serde::Deserialize;
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

mod export;
mod metrics;
mod otlp;
mod request;

use export::{span_pipeline, MetricsExport, OtlpClient, Target};
use metrics::{Histograms, Instrument, Series};
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
/// About as many attributes as a request's span gets, with room to spare.
const SPAN_ATTRIBUTES: usize = 40;
/// How often metric points are exported when `OTEL_METRIC_EXPORT_INTERVAL`
/// says nothing (the specification's default).
const DEFAULT_METRIC_INTERVAL: Duration = Duration::from_secs(60);
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
    /// The GenAI metrics' points and their export, unless
    /// `OTEL_METRICS_EXPORTER=none`.
    metrics: Option<MetricsExport>,
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
/// standard `OTEL_*` variables over it. Both exports are ours (see
/// `otlp.rs` and `metrics.rs`), so their endpoints and headers are resolved
/// here; the SDK's tracer reads the resource, sampler and batch variables.
#[derive(Debug, Clone, PartialEq)]
struct Settings {
    /// Where spans go: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` as it is, else
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` or `[telemetry] endpoint` + `/v1/traces`,
    /// else the specification's default (localhost:4318).
    traces_endpoint: String,
    /// Headers on every span export: `OTEL_EXPORTER_OTLP_TRACES_HEADERS`,
    /// else `OTEL_EXPORTER_OTLP_HEADERS` (`key=value,…`, values URL-encoded).
    traces_headers: Vec<(String, String)>,
    /// Where metric points go, likewise (`…_METRICS_…`, `/v1/metrics`).
    metrics_endpoint: String,
    metrics_headers: Vec<(String, String)>,
    /// `OTEL_METRIC_EXPORT_INTERVAL` (milliseconds).
    metric_interval: Duration,
    /// What one export may take: `OTEL_EXPORTER_OTLP_TRACES_TIMEOUT` /
    /// `…_METRICS_TIMEOUT`, else `OTEL_EXPORTER_OTLP_TIMEOUT` (milliseconds).
    traces_timeout: Duration,
    metrics_timeout: Duration,
    /// Spans waiting for export, at most (`OTEL_BSP_MAX_QUEUE_SIZE`).
    span_queue: usize,
    /// Delta points (`OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE`
    /// `delta` or `lowmemory`: both ask delta for histograms), else cumulative.
    delta: bool,
    /// `service.name`, unless a variable names it.
    service_name: Option<String>,
    /// A parent-based trace-id ratio, unless `OTEL_TRACES_SAMPLER` decides
    /// (`None` also for the SDK's default, every request).
    sample_ratio: Option<f64>,
    traces: bool,
    metrics: bool,
    /// Message contents on sampled spans (opt-in).
    capture_content: bool,
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
        let at = |path: &str| base.map(|base| format!("{base}{path}"));
        let named = set("OTEL_SERVICE_NAME").is_some()
            || var("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|v| v.contains("service.name="));
        let exporter = |name: &str, configured: Option<bool>| match set(name) {
            Some(value) => exporter_on(Some(value), name),
            None => Ok(configured.unwrap_or(true)),
        };
        // Each signal's own endpoint as it is, else the general one or the
        // block's with the signal's path, else the specification's default.
        let endpoint = |signal: &str, path: &str| match (
            set(&format!("OTEL_EXPORTER_OTLP_{signal}_ENDPOINT")),
            set("OTEL_EXPORTER_OTLP_ENDPOINT"),
        ) {
            (Some(url), _) => url.trim().to_owned(),
            (None, Some(base)) => format!("{}{path}", base.trim().trim_end_matches('/')),
            (None, None) => at(path).unwrap_or_else(|| format!("http://localhost:4318{path}")),
        };
        let headers = |signal: &str| {
            let own = format!("OTEL_EXPORTER_OTLP_{signal}_HEADERS");
            let (name, value) = match set(&own) {
                Some(v) => (own, v),
                None => match set("OTEL_EXPORTER_OTLP_HEADERS") {
                    Some(v) => ("OTEL_EXPORTER_OTLP_HEADERS".to_owned(), v),
                    None => return Ok(Vec::new()),
                },
            };
            otlp_headers(&value).map_err(|e| anyhow::anyhow!("{name}: {e}"))
        };
        // Milliseconds, above 0.
        let millis = |name: &str| -> anyhow::Result<Option<Duration>> {
            match set(name) {
                None => Ok(None),
                Some(v) => match v.trim().parse::<u64>() {
                    Ok(ms) if ms > 0 => Ok(Some(Duration::from_millis(ms))),
                    _ => anyhow::bail!(
                        "{name}: expected milliseconds (a whole number above 0), got {v:?}"
                    ),
                },
            }
        };
        let metric_interval =
            millis("OTEL_METRIC_EXPORT_INTERVAL")?.unwrap_or(DEFAULT_METRIC_INTERVAL);
        let timeout = millis("OTEL_EXPORTER_OTLP_TIMEOUT")?.unwrap_or(DEFAULT_EXPORT_TIMEOUT);
        let traces_timeout = millis("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")?.unwrap_or(timeout);
        let metrics_timeout = millis("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT")?.unwrap_or(timeout);
        let span_queue = match set("OTEL_BSP_MAX_QUEUE_SIZE") {
            None => DEFAULT_QUEUE,
            Some(v) => match v.trim().parse::<usize>() {
                Ok(n) if n > 0 => n,
                _ => anyhow::bail!(
                    "OTEL_BSP_MAX_QUEUE_SIZE: expected a whole number above 0, got {v:?}"
                ),
            },
        };
        let temporality = "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE";
        let delta = match set(temporality).map(|v| v.trim().to_ascii_lowercase()) {
            None => false,
            Some(v) if v == "cumulative" => false,
            Some(v) if v == "delta" || v == "lowmemory" => true,
            Some(v) => {
                anyhow::bail!("{temporality}: expected cumulative, delta or lowmemory, got {v:?}")
            }
        };
        Ok(Some(Settings {
            traces_endpoint: endpoint("TRACES", "/v1/traces"),
            traces_headers: headers("TRACES")?,
            metrics_endpoint: endpoint("METRICS", "/v1/metrics"),
            metrics_headers: headers("METRICS")?,
            metric_interval,
            traces_timeout,
            metrics_timeout,
            span_queue,
            delta,
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
        let client = OtlpClient::new(settings.traces_timeout.max(settings.metrics_timeout))?;
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
            let target = Target::new(
                "traces",
                &settings.traces_endpoint,
                &settings.traces_headers,
                settings.traces_timeout,
            )?;
            let pipeline = span_pipeline(&client, target, settings.span_queue, &dropped);
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

        let metrics = if settings.metrics {
            let target = Target::new(
                "metrics",
                &settings.metrics_endpoint,
                &settings.metrics_headers,
                settings.metrics_timeout,
            )?;
            Some(MetricsExport::start(
                Histograms::new(SystemTime::now(), settings.delta),
                client,
                target,
                otlp::EncodedResource::new(&resource),
                settings.metric_interval,
                dropped("metrics", "export_failed"),
            )?)
        } else {
            None
        };
        Ok(Some(Telemetry {
            traces,
            capture_content: settings.capture_content,
            tracer,
            tracer_provider,
            metrics,
            semconv,
        }))
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
            return self.request_trace(None, Context::new(), operation, started);
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
            .with_start_time(system_time(started))
            // Room for the attributes `finish` sets: the SDK keeps this vector.
            .with_attributes(Vec::with_capacity(SPAN_ATTRIBUTES));
        let span = NEXT_TRACE_ID.with(|next| {
            next.set(trace_id);
            let span = self.tracer.build_with_context(builder, &parent);
            next.set(None);
            span
        });
        // The attempts' parent: this span's context (the SDK's own spans'
        // are local, so the children's parent is not marked remote).
        let cx = Context::new().with_remote_span_context(span.span_context().clone());
        self.request_trace(Some(span), cx, operation, started)
    }

    /// Exports what is queued and stops the exporters, waiting at most
    /// `within` for each. Blocking: call it off the runtime's workers.
    pub fn shutdown(&self, within: Duration) {
        if let Err(e) = self.tracer_provider.shutdown_with_timeout(within) {
            tracing::warn!(error = %e, "OpenTelemetry: traces not flushed at shutdown");
        }
        if let Some(export) = &self.metrics {
            if !export.shutdown(within) {
                tracing::warn!("OpenTelemetry: metrics not flushed at shutdown");
            }
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

/// A lock whose holders never leave its value half-updated, so a panic
/// elsewhere does not stop telemetry.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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
