//! The way out: our HTTP client for the OTLP exports, the bounded span
//! queue, the metrics' export thread, and the counting of what is dropped.

use super::metrics::Histograms;
use super::otlp::{export_request, EncodedResource};
use super::*;
use opentelemetry_sdk::error::OTelSdkError;
use std::sync::{mpsc, Condvar, Mutex};

/// The spans' way out: a queue of at most `queue` spans, exported in
/// batches by the SDK's own thread, every drop counted.
pub(super) fn span_pipeline(
    client: &OtlpClient,
    target: Target,
    queue: usize,
    dropped: &dyn Fn(&'static str, &'static str) -> Counter,
) -> Bounded<BatchSpanProcessor> {
    let inflight = Arc::new(AtomicUsize::new(0));
    let exporter = OtlpSpans {
        client: client.clone(),
        target,
        resource: EncodedResource::default(),
        inflight: Arc::clone(&inflight),
        failed: dropped("traces", "export_failed"),
        failing: AtomicBool::new(false),
    };
    // The batch processor's own queue is one larger than ours, so the
    // spans it would drop silently are dropped (and counted) here first.
    let processor = BatchSpanProcessor::builder(exporter)
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_max_queue_size(queue + 1)
                .build(),
        )
        .build();
    Bounded {
        inner: processor,
        inflight,
        capacity: queue,
        full: dropped("traces", "queue_full"),
    }
}

/// The exporters' HTTP client: hyper's, on the sidecar's runtime. The
/// exporters run on the SDK's own threads and block on what this returns;
/// the request itself is spawned on the runtime, whose reactor drives it,
/// and bounded by the export timeout, reading the answer included.
#[derive(Debug, Clone)]
pub(super) struct OtlpClient {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    runtime: tokio::runtime::Handle,
}

/// The most of a collector's answer read (its body is a small protobuf).
const MAX_ANSWER: usize = 1 << 20;

impl OtlpClient {
    /// A client whose connections are given up on after `connect_timeout`.
    pub(super) fn new(connect_timeout: Duration) -> anyhow::Result<OtlpClient> {
        let tls = crate::tls::client_config(None, "OTEL_EXPORTER_OTLP_CERTIFICATE")?;
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(connect_timeout));
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
        })
    }
}

/// Where one signal's exports go: the collector's URL, the extra headers,
/// and how long one export may take.
#[derive(Debug, Clone)]
pub(super) struct Target {
    endpoint: http::Uri,
    headers: http::HeaderMap,
    timeout: Duration,
}

impl Target {
    pub(super) fn new(
        signal: &str,
        endpoint: &str,
        headers: &[(String, String)],
        timeout: Duration,
    ) -> anyhow::Result<Target> {
        let uri: http::Uri = endpoint
            .parse()
            .map_err(|e| anyhow::anyhow!("the OTLP {signal} endpoint {endpoint:?}: {e}"))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            anyhow::bail!(
                "the OTLP {signal} endpoint {endpoint:?}: expected an http:// or https:// URL"
            );
        }
        let mut extra = http::HeaderMap::new();
        for (name, value) in headers {
            extra.append(
                http::HeaderName::from_bytes(name.as_bytes())?,
                http::HeaderValue::from_str(value)?,
            );
        }
        Ok(Target {
            endpoint: uri,
            headers: extra,
            timeout,
        })
    }
}

impl OtlpClient {
    /// POSTs an export `body` (protobuf) to `target`; `Err` says why it
    /// was not accepted. The exchange runs on the sidecar's runtime, whose
    /// reactor drives it, bounded by `timeout` (reading the answer
    /// included); the caller, on an exporter's own thread, only waits.
    async fn post(&self, target: &Target, body: Vec<u8>, timeout: Duration) -> Result<(), String> {
        let mut request = Request::post(target.endpoint.clone())
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let headers = request.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/x-protobuf"),
        );
        headers.insert(
            http::header::USER_AGENT,
            http::HeaderValue::from_static(USER_AGENT),
        );
        headers.extend(target.headers.clone());
        let client = self.client.clone();
        let exchange = async move {
            let response = client.request(request).await.map_err(|e| e.to_string())?;
            let status = response.status();
            // The answer is read whole, so the connection can be used again.
            Limited::new(response.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| e.to_string())?;
            if status.is_success() {
                Ok(())
            } else {
                Err(format!("the collector answered {status}"))
            }
        };
        let task = self
            .runtime
            .spawn(async move { tokio::time::timeout(timeout, exchange).await });
        match task.await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(format!("no answer within {timeout:?}")),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// What the exports say they are (the SDK's exporter sent its own name).
const USER_AGENT: &str = concat!("afr/", env!("CARGO_PKG_VERSION"), " (OTLP/HTTP)");

/// The span exporter: `otlp::export_request`'s bytes POSTed to the
/// collector with our client (the SDK's own exporter encodes through a
/// message tree at several times the cost). The spans of a failed export are
/// counted as dropped, and the log says once when exports start and stop
/// failing.
#[derive(Debug)]
struct OtlpSpans {
    client: OtlpClient,
    target: Target,
    resource: EncodedResource,
    /// Spans accepted by [`Bounded`] and not yet exported.
    inflight: Arc<AtomicUsize>,
    failed: Counter,
    failing: AtomicBool,
}

impl opentelemetry_sdk::trace::SpanExporter for OtlpSpans {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len();
        let body = export_request(&self.resource, &batch);
        drop(batch);
        let result = self
            .client
            .post(&self.target, body, self.target.timeout)
            .await;
        self.inflight.fetch_sub(n, Ordering::Relaxed);
        note_result(&self.failing, &self.failed, "traces", &result, n as u64);
        result.map_err(OTelSdkError::InternalFailure)
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.resource = EncodedResource::new(resource);
    }
}

fn note_result<E: std::fmt::Display>(
    failing: &AtomicBool,
    failed: &Counter,
    signal: &str,
    result: &Result<(), E>,
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

/// The metrics' way out: a thread of its own that exports the histograms
/// every `interval`, and once more when stopped. A failed export is counted
/// in `afr_otel_dropped_total{signal="metrics",reason="export_failed"}`;
/// cumulative points lose nothing by it (the next export carries the
/// totals), delta points are lost.
pub(super) struct MetricsExport {
    histograms: Arc<Histograms>,
    /// `Some(within)` once stopped: the last export's deadline.
    stop: Arc<(Mutex<Option<Duration>>, Condvar)>,
    done: Mutex<mpsc::Receiver<()>>,
}

impl MetricsExport {
    pub(super) fn start(
        histograms: Histograms,
        client: OtlpClient,
        target: Target,
        resource: EncodedResource,
        interval: Duration,
        failed: Counter,
    ) -> anyhow::Result<MetricsExport> {
        let histograms = Arc::new(histograms);
        let exported = Arc::clone(&histograms);
        let stop = Arc::new((Mutex::new(None), Condvar::new()));
        let (done_tx, done) = mpsc::channel();
        let stopping = Arc::clone(&stop);
        std::thread::Builder::new()
            .name("afr-otel-metrics".into())
            .spawn(move || {
                let failing = AtomicBool::new(false);
                loop {
                    let stopped = {
                        let (flag, wake) = &*stopping;
                        let (guard, _) = wake
                            .wait_timeout_while(lock(flag), interval, |stop| stop.is_none())
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        *guard
                    };
                    // The last export has most of the shutdown's wait.
                    let timeout = stopped.map_or(target.timeout, |within: Duration| {
                        (within - within / 10).min(target.timeout)
                    });
                    if let Some(body) = exported.export_request(&resource, SystemTime::now()) {
                        let result = client.runtime.block_on(client.post(&target, body, timeout));
                        note_result(&failing, &failed, "metrics", &result, 1);
                    }
                    if stopped.is_some() {
                        let _ = done_tx.send(());
                        return;
                    }
                }
            })?;
        Ok(MetricsExport {
            histograms,
            stop,
            done: Mutex::new(done),
        })
    }

    /// Where the points are recorded.
    pub(super) fn histograms(&self) -> &Histograms {
        &self.histograms
    }

    /// Exports once more and stops, waiting at most `within` (an export
    /// under way when it is called may use the whole of it).
    pub(super) fn shutdown(&self, within: Duration) -> bool {
        let started = Instant::now();
        self.signal_stop(within);
        let done = lock(&self.done);
        done.recv_timeout(within.saturating_sub(started.elapsed()))
            .is_ok()
    }

    fn signal_stop(&self, within: Duration) {
        let (flag, wake) = &*self.stop;
        lock(flag).get_or_insert(within);
        wake.notify_all();
    }
}

impl Drop for MetricsExport {
    /// Stops the thread (after one last export) when telemetry goes away
    /// without a shutdown.
    fn drop(&mut self) {
        self.signal_stop(Duration::from_secs(1));
    }
}
