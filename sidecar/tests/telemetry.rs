//! OpenTelemetry through the real binary, configured by a `[telemetry]`
//! block (the standard variables are tested end to end in
//! `tests/e2e/test_otel.py`): a refusal by an open breaker reads as a span in
//! the request's trace, and a collector that stops answering costs dropped
//! spans, counted, never a request.
//!
//! The receiver is an OTLP/HTTP endpoint on loopback that keeps what it is
//! sent; the test decodes it with `opentelemetry-proto` (the official
//! definitions).

mod common;

use common::*;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Each export received: its path and its body.
type Exports = Mutex<Vec<(String, Vec<u8>)>>;

/// An OTLP/HTTP receiver: keeps each export's path and body and answers 200,
/// or, while stalled, holds every export unanswered.
struct Receiver {
    port: u16,
    exports: Arc<Exports>,
    stalled: Arc<AtomicBool>,
}

impl Receiver {
    fn start(stalled: bool) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let exports = Arc::new(Mutex::new(Vec::new()));
        let stalled = Arc::new(AtomicBool::new(stalled));
        let (kept, stall) = (Arc::clone(&exports), Arc::clone(&stalled));
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (kept, stall) = (Arc::clone(&kept), Arc::clone(&stall));
                std::thread::spawn(move || serve(conn, &kept, &stall));
            }
        });
        Receiver {
            port,
            exports,
            stalled,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn stall(&self, stalled: bool) {
        self.stalled.store(stalled, Ordering::SeqCst);
    }

    /// The spans received (with their resource's `service.name`), once
    /// `done` holds for them or 10 s have passed.
    async fn spans_until(&self, done: impl Fn(&[(String, Span)]) -> bool) -> Vec<(String, Span)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut spans = Vec::new();
            for (path, body) in self.exports.lock().unwrap().iter() {
                if path != "/v1/traces" {
                    continue;
                }
                let request = ExportTraceServiceRequest::decode(&body[..]).expect("OTLP traces");
                for rs in request.resource_spans {
                    let service = service(rs.resource.as_ref());
                    for ss in rs.scope_spans {
                        spans.extend(ss.spans.into_iter().map(|s| (service.clone(), s)));
                    }
                }
            }
            if done(&spans) || Instant::now() >= deadline {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The names of the metrics received and their resource's `service.name`.
    fn metrics(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (path, body) in self.exports.lock().unwrap().iter() {
            if path != "/v1/metrics" {
                continue;
            }
            let request = ExportMetricsServiceRequest::decode(&body[..]).expect("OTLP metrics");
            for rm in request.resource_metrics {
                let service = service(rm.resource.as_ref());
                for sm in rm.scope_metrics {
                    out.extend(sm.metrics.into_iter().map(|m| (m.name, service.clone())));
                }
            }
        }
        out
    }
}

/// One connection's exports, kept-alive, until the peer closes it.
fn serve(conn: std::net::TcpStream, kept: &Exports, stalled: &AtomicBool) {
    let mut reader = BufReader::new(conn.try_clone().expect("clone"));
    let mut writer = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split(' ').nth(1).unwrap_or_default().to_owned();
        let mut length = 0;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            if header == "\r\n" {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().expect("a length");
                }
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        kept.lock().unwrap().push((path, body));
        while stalled.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let answer =
            "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
        if writer.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

/// The resource's `service.name`.
fn service(resource: Option<&Resource>) -> String {
    resource
        .and_then(|r| string(&r.attributes, "service.name"))
        .unwrap_or_default()
}

fn value<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn string(attributes: &[KeyValue], key: &str) -> Option<String> {
    match value(attributes, key) {
        Some(any_value::Value::StringValue(s)) => Some(s.clone()),
        _ => None,
    }
}

/// The request spans (those with `afr.attempts`) among `spans`.
fn requests(spans: &[(String, Span)]) -> Vec<&Span> {
    spans
        .iter()
        .map(|(_, s)| s)
        .filter(|s| value(&s.attributes, "afr.attempts").is_some())
        .collect()
}

/// `afr serve` with a `[telemetry]` block sending to `receiver` (`extra`:
/// more lines of the block) and model `m` routed to `provider`, with `env`.
fn traced_sidecar(
    receiver: &Receiver,
    extra: &str,
    provider: &Mock,
    env: &[(&str, &str)],
) -> Sidecar {
    let body = format!(
        "[telemetry]\nendpoint = \"{}\"\n{extra}\n{}{}",
        receiver.endpoint(),
        openai_provider("good", &provider.base(), ""),
        model("m", &[("good", "y")]),
    );
    Sidecar::start_with_usage_env(&body, 5, "path = \"{dir}/usage.db\"", env)
}

#[tokio::test]
async fn the_telemetry_block_exports_and_an_open_breaker_reads_as_a_span() {
    let receiver = Receiver::start(false);
    let bad = Mock::start(&["--status", "503"]);
    let good = Mock::start(&[]);
    let body = format!(
        "[telemetry]\nendpoint = \"{}\"\nservice_name = \"gw-block\"\n{}{}{}",
        receiver.endpoint(),
        openai_provider("bad", &bad.base(), ""),
        openai_provider("good", &good.base(), ""),
        model("m", &[("bad", "x"), ("good", "y")]),
    );
    let env = [
        ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "100"),
    ];
    let sidecar = Sidecar::start_with_usage_env(&body, 1, "path = \"{dir}/usage.db\"", &env);
    for _ in 0..2 {
        assert_eq!(sidecar.chat(chat_body("m", false)).await.status(), 200);
    }
    assert_eq!(bad.requests().await.len(), 1, "open after one failure");

    let spans = receiver
        .spans_until(|spans| {
            requests(spans).len() >= 2
                && spans
                    .iter()
                    .any(|(_, s)| string(&s.attributes, "afr.breaker").as_deref() == Some("open"))
        })
        .await;
    assert!(
        spans.iter().all(|(service, _)| service == "gw-block"),
        "the block's service name"
    );
    let (_, refusal) = spans
        .iter()
        .find(|(_, s)| string(&s.attributes, "afr.breaker").as_deref() == Some("open"))
        .expect("a span for the open breaker");
    assert_eq!(refusal.name, "chat bad");
    assert_eq!(
        string(&refusal.attributes, "error.type").as_deref(),
        Some("breaker_open")
    );
    assert_eq!(refusal.status.as_ref().map(|s| s.code), Some(2), "an error");
    let request = requests(&spans)
        .into_iter()
        .find(|r| r.span_id == refusal.parent_span_id)
        .expect("the refusal is a child of its request's span");
    assert_eq!(request.trace_id, refusal.trace_id);
    assert!(matches!(
        value(&request.attributes, "afr.attempts"),
        Some(any_value::Value::IntValue(1))
    ));
    let attempts: Vec<&str> = spans
        .iter()
        .map(|(_, s)| s)
        .filter(|s| s.parent_span_id == request.span_id && s.span_id != refusal.span_id)
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(attempts, ["chat y"], "then the next route was tried");

    let deadline = Instant::now() + Duration::from_secs(10);
    while !receiver
        .metrics()
        .iter()
        .any(|(name, _)| name == "gen_ai.client.operation.duration")
    {
        assert!(Instant::now() < deadline, "no metric points arrived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(receiver
        .metrics()
        .iter()
        .all(|(_, service)| service == "gw-block"));
}

/// `afr_otel_dropped_total{signal="traces",reason="queue_full"}`.
async fn queue_full(sidecar: &Sidecar) -> u64 {
    sidecar
        .metrics()
        .await
        .lines()
        .filter(|l| {
            l.starts_with("afr_otel_dropped_total{")
                && l.contains("reason=\"queue_full\"")
                && l.contains("signal=\"traces\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test]
async fn spans_past_a_full_queue_are_dropped_and_counted_while_requests_go_on() {
    let receiver = Receiver::start(true);
    let good = Mock::start(&[]);
    let env = [
        ("OTEL_BSP_MAX_QUEUE_SIZE", "2"),
        ("OTEL_BSP_SCHEDULE_DELAY", "20"),
        // The stalled export stays in flight for the whole test.
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "60000"),
    ];
    let sidecar = traced_sidecar(&receiver, "metrics = false", &good, &env);
    let served = async {
        for _ in 0..10 {
            assert_eq!(sidecar.chat(chat_body("m", false)).await.status(), 200);
        }
    };
    tokio::time::timeout(Duration::from_secs(30), served)
        .await
        .expect("requests never wait on the collector");
    // Two spans a request (the request's and its attempt's); the queue
    // holds two, and the export holding them never ends while stalled.
    let deadline = Instant::now() + Duration::from_secs(10);
    while queue_full(&sidecar).await < 18 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(queue_full(&sidecar).await, 18);

    // The collector answers again: the held spans go out (the request's may
    // have waited for a second export), then what comes next is exported.
    receiver.stall(false);
    let held = receiver.spans_until(|s| s.len() >= 2).await;
    assert_eq!(held.len(), 2, "the first request's two spans");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sidecar.chat(chat_body("m", false)).await.status(), 200);
    let spans = receiver.spans_until(|s| requests(s).len() >= 2).await;
    assert_eq!(requests(&spans).len(), 2, "the first, held, and the last");
    assert_eq!(queue_full(&sidecar).await, 18);
}

#[tokio::test]
async fn what_is_recorded_since_the_last_export_is_sent_when_the_sidecar_stops() {
    let receiver = Receiver::start(false);
    let good = Mock::start(&[]);
    // The defaults: spans every 5 s, metric points every 60 s. Neither
    // comes before the stop.
    let mut sidecar = traced_sidecar(&receiver, "", &good, &[]);
    assert_eq!(sidecar.chat(chat_body("m", false)).await.status(), 200);
    assert!(
        receiver.exports.lock().unwrap().is_empty(),
        "nothing sent yet"
    );
    assert!(sidecar.terminate().success());
    let spans = receiver.spans_until(|s| !requests(s).is_empty()).await;
    assert_eq!(
        requests(&spans).len(),
        1,
        "the request's span, sent at the stop"
    );
    assert!(
        receiver
            .metrics()
            .iter()
            .any(|(name, _)| name == "gen_ai.client.operation.duration"),
        "the metric points, sent at the stop"
    );
}

#[tokio::test]
async fn the_block_s_sample_ratio_decides_unless_the_client_s_traceparent_does() {
    let receiver = Receiver::start(false);
    let good = Mock::start(&[]);
    let env = [("OTEL_BSP_SCHEDULE_DELAY", "20")];
    let sidecar = traced_sidecar(
        &receiver,
        "sample_ratio = 0.0\nmetrics = false",
        &good,
        &env,
    );
    assert_eq!(sidecar.chat(chat_body("m", false)).await.status(), 200);
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let sampled = sidecar
        .request(reqwest::Method::POST, "/v1/chat/completions")
        .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
        .json(&chat_body("m", false))
        .send()
        .await
        .unwrap();
    assert_eq!(sampled.status(), 200);
    // The unsampled request ended first: had its span been exported, it
    // would be there by the time the sampled one's is.
    let spans = receiver
        .spans_until(|s| requests(s).iter().any(|r| hex(&r.trace_id) == trace))
        .await;
    let traced: Vec<String> = requests(&spans).iter().map(|s| hex(&s.trace_id)).collect();
    assert_eq!(traced, [trace], "only the request its client sampled");
    // Both went to the provider with a traceparent; the unsampled one's says so.
    let sent = good.requests().await;
    let flags: Vec<String> = sent
        .iter()
        .filter_map(|r| r["headers"]["traceparent"].as_str())
        .map(|t| t.rsplit('-').next().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(flags, ["00", "01"]);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
