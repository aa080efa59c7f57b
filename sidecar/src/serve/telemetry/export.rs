//! The way out: our HTTP client for the OTLP exporters, the bounded span
//! queue, and the counting of what is dropped.

use super::otlp::{export_request, EncodedResource};
use super::*;
use opentelemetry_sdk::error::OTelSdkError;

/// The spans' way out: a bounded queue, exported in batches by the SDK's
/// own thread, every drop counted.
pub(super) fn span_pipeline(
    client: &OtlpClient,
    endpoint: &str,
    headers: &[(String, String)],
    dropped: &dyn Fn(&'static str, &'static str) -> Counter,
) -> anyhow::Result<Bounded<BatchSpanProcessor>> {
    let uri: http::Uri = endpoint
        .parse()
        .map_err(|e| anyhow::anyhow!("the OTLP traces endpoint {endpoint:?}: {e}"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        anyhow::bail!("the OTLP traces endpoint {endpoint:?}: expected an http:// or https:// URL");
    }
    let mut extra = http::HeaderMap::new();
    for (name, value) in headers {
        extra.append(
            http::HeaderName::from_bytes(name.as_bytes())?,
            http::HeaderValue::from_str(value)?,
        );
    }
    let spans = OtlpSpans {
        client: client.clone(),
        endpoint: uri,
        headers: extra,
        resource: EncodedResource::default(),
    };
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

/// The exporters' HTTP client: hyper's, on the sidecar's runtime. The
/// exporters run on the SDK's own threads and block on what this returns;
/// the request itself is spawned on the runtime, whose reactor drives it,
/// and bounded by the export timeout, reading the answer included.
#[derive(Debug, Clone)]
pub(super) struct OtlpClient {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    runtime: tokio::runtime::Handle,
    timeout: Duration,
}

/// The most of a collector's answer read (its body is a small protobuf).
const MAX_ANSWER: usize = 1 << 20;

impl OtlpClient {
    pub(super) fn new(timeout: Duration) -> anyhow::Result<OtlpClient> {
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

/// The span exporter: `otlp::export_request`'s bytes POSTed to the
/// collector with our client (the SDK's own exporter encodes through a
/// message tree at several times the cost).
#[derive(Debug)]
struct OtlpSpans {
    client: OtlpClient,
    endpoint: http::Uri,
    headers: http::HeaderMap,
    resource: EncodedResource,
}

impl opentelemetry_sdk::trace::SpanExporter for OtlpSpans {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let body = export_request(&self.resource, &batch);
        drop(batch);
        let mut request = Request::post(self.endpoint.clone())
            .body(Bytes::from(body))
            .map_err(|e| OTelSdkError::InternalFailure(e.to_string()))?;
        let headers = request.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/x-protobuf"),
        );
        headers.extend(self.headers.clone());
        match self.client.send_bytes(request).await {
            Ok(answer) if answer.status().is_success() => Ok(()),
            Ok(answer) => Err(OTelSdkError::InternalFailure(format!(
                "the collector answered {}",
                answer.status()
            ))),
            Err(e) => Err(OTelSdkError::InternalFailure(e.to_string())),
        }
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.resource = EncodedResource::new(resource);
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
pub(super) struct Bounded<P> {
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
pub(super) struct CountedMetrics<E> {
    pub(super) inner: E,
    pub(super) failed: Counter,
    pub(super) failing: AtomicBool,
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
