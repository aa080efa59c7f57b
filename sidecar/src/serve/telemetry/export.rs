//! The way out: our HTTP client for the OTLP exports, the span queue and
//! its thread, the metrics' thread, and the counting of what is dropped.

use super::metrics::Histograms;
use super::otlp::{export_request, span_message, EncodedResource, EncodedSpan};
use super::*;
use opentelemetry_sdk::error::OTelSdkError;
use std::sync::{mpsc, Condvar, Mutex};

/// How the spans are batched: `OTEL_BSP_SCHEDULE_DELAY`,
/// `OTEL_BSP_MAX_QUEUE_SIZE`, `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Batching {
    pub(super) delay: Duration,
    pub(super) queue: usize,
    pub(super) batch: usize,
}

/// The spans' way out, in place of the SDK's batch processor: each span is
/// encoded to its OTLP bytes where it ends, on the thread that built it,
/// and a thread of ours sends them in batches. The SDK's processor handed
/// the whole `SpanData` to its own thread, which read it and freed it there:
/// every attribute crossed cores twice, and the CPU time that cost showed
/// in no instruction count (callgrind) but in the benchmark's (issue 26).
/// At most `queue` spans wait (queued or being sent); past that a span is
/// dropped and counted, never waited for.
#[derive(Debug)]
pub(super) struct SpanExport {
    queue: Arc<SpanQueue>,
    worker: Worker,
    batching: Batching,
    full: Counter,
}

#[derive(Debug, Default)]
struct SpanQueue {
    spans: Mutex<Vec<EncodedSpan>>,
    /// Spans accepted and not yet sent (queued or in an export).
    waiting: AtomicUsize,
}

impl SpanExport {
    pub(super) fn start(
        client: OtlpClient,
        target: Target,
        resource: EncodedResource,
        batching: Batching,
        dropped: &dyn Fn(&'static str, &'static str) -> Counter,
    ) -> anyhow::Result<SpanExport> {
        let queue = Arc::new(SpanQueue::default());
        let failed = dropped("traces", "export_failed");
        let failing = AtomicBool::new(false);
        let spans = Arc::clone(&queue);
        let worker = Worker::start("afr-otel-spans", batching.delay, move |stopped| {
            // Everything queued, a batch at a time; a stop's deadline bounds
            // all of it.
            let deadline = stopped.map(|within| Instant::now() + within - within / 10);
            loop {
                let batch: Vec<EncodedSpan> = {
                    let mut queued = lock(&spans.spans);
                    let n = queued.len().min(batching.batch);
                    queued.drain(..n).collect()
                };
                if batch.is_empty() {
                    return;
                }
                let n = batch.len();
                let body = export_request(&resource, &batch);
                drop(batch);
                let timeout = match deadline {
                    Some(at) => at
                        .saturating_duration_since(Instant::now())
                        .min(target.timeout),
                    None => target.timeout,
                };
                let result = if timeout.is_zero() {
                    Err("no time left at shutdown".to_owned())
                } else {
                    client.runtime.block_on(client.post(&target, body, timeout))
                };
                spans.waiting.fetch_sub(n, Ordering::Relaxed);
                note_result(&failing, &failed, "traces", &result, n as u64);
            }
        })?;
        Ok(SpanExport {
            queue,
            worker,
            batching,
            full: dropped("traces", "queue_full"),
        })
    }
}

impl SpanProcessor for SpanExport {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if self.queue.waiting.fetch_add(1, Ordering::Relaxed) >= self.batching.queue {
            self.queue.waiting.fetch_sub(1, Ordering::Relaxed);
            self.full.inc();
            return;
        }
        let body = span_message(&span);
        let encoded = EncodedSpan {
            scope: span.instrumentation_scope,
            body,
        };
        let queued = {
            let mut spans = lock(&self.queue.spans);
            spans.push(encoded);
            spans.len()
        };
        if queued >= self.batching.batch {
            self.worker.wake();
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.worker.wake();
        Ok(())
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        if self.worker.stop(timeout) {
            Ok(())
        } else {
            Err(OTelSdkError::Timeout(timeout))
        }
    }
}

/// A thread that runs `tick` every `interval` (sooner when woken), and once
/// more when stopped, with the stop's wait as its deadline.
#[derive(Debug)]
struct Worker {
    state: Arc<(Mutex<WorkerState>, Condvar)>,
    done: Mutex<mpsc::Receiver<()>>,
}

#[derive(Debug, Default)]
struct WorkerState {
    /// `Some(within)` once stopped.
    stop: Option<Duration>,
    woken: bool,
}

impl Worker {
    fn start(
        name: &str,
        interval: Duration,
        mut tick: impl FnMut(Option<Duration>) + Send + 'static,
    ) -> anyhow::Result<Worker> {
        let state = Arc::new((Mutex::new(WorkerState::default()), Condvar::new()));
        let (done_tx, done) = mpsc::channel();
        let shared = Arc::clone(&state);
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || loop {
                let stopped = {
                    let (state, wake) = &*shared;
                    let (mut guard, _) = wake
                        .wait_timeout_while(lock(state), interval, |s| s.stop.is_none() && !s.woken)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    guard.woken = false;
                    guard.stop
                };
                tick(stopped);
                if stopped.is_some() {
                    let _ = done_tx.send(());
                    return;
                }
            })?;
        Ok(Worker {
            state,
            done: Mutex::new(done),
        })
    }

    fn wake(&self) {
        let (state, wake) = &*self.state;
        lock(state).woken = true;
        wake.notify_one();
    }

    /// Runs the last tick and stops, waiting at most `within`.
    fn stop(&self, within: Duration) -> bool {
        let started = Instant::now();
        self.signal_stop(within);
        lock(&self.done)
            .recv_timeout(within.saturating_sub(started.elapsed()))
            .is_ok()
    }

    fn signal_stop(&self, within: Duration) {
        let (state, wake) = &*self.state;
        lock(state).stop.get_or_insert(within);
        wake.notify_all();
    }
}

impl Drop for Worker {
    /// Stops the thread (after a last tick) when its owner goes away
    /// without stopping it.
    fn drop(&mut self) {
        self.signal_stop(Duration::from_secs(1));
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

/// The metrics' way out: a thread of its own that exports the histograms
/// every `interval`, and once more when stopped. A failed export is counted
/// in `afr_otel_dropped_total{signal="metrics",reason="export_failed"}`;
/// cumulative points lose nothing by it (the next export carries the
/// totals), delta points are lost.
#[derive(Debug)]
pub(super) struct MetricsExport {
    worker: Worker,
}

impl MetricsExport {
    pub(super) fn start(
        histograms: Arc<Histograms>,
        client: OtlpClient,
        target: Target,
        resource: EncodedResource,
        interval: Duration,
        failed: Counter,
    ) -> anyhow::Result<MetricsExport> {
        let failing = AtomicBool::new(false);
        let worker = Worker::start("afr-otel-metrics", interval, move |stopped| {
            // The last export has most of the shutdown's wait.
            let timeout = stopped.map_or(target.timeout, |within: Duration| {
                (within - within / 10).min(target.timeout)
            });
            if let Some(body) = histograms.export_request(&resource, SystemTime::now()) {
                let result = client.runtime.block_on(client.post(&target, body, timeout));
                note_result(&failing, &failed, "metrics", &result, 1);
            }
        })?;
        Ok(MetricsExport { worker })
    }

    /// Exports once more and stops, waiting at most `within` (an export
    /// under way when it is called may use the whole of it).
    pub(super) fn shutdown(&self, within: Duration) -> bool {
        self.worker.stop(within)
    }
}
