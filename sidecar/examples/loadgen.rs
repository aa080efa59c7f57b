//! A small, bounded load generator for the benchmark suite (`scripts/bench`,
//! `bench/run.py`, design §8). In the open-loop modes requests are
//! *scheduled* at a fixed rate and each latency is measured from its
//! scheduled start, so a stall is not hidden by the generator waiting for it
//! (coordinated omission). Keep-alive connections from one pooled client,
//! TCP_NODELAY.
//!
//! ```text
//! loadgen rate    URL RATE SECONDS [HEADER:VALUE ...]   open loop, non-streaming
//! loadgen ttft    URL RATE SECONDS [HEADER:VALUE ...]   open loop, streams
//! loadgen closed  URL CONCURRENCY SECONDS [HEADER:VALUE ...]
//! loadgen streams URL COUNT HOLD_SECONDS [HEADER:VALUE ...]
//! ```
//! `rate` posts a non-streaming chat body and prints p50/p90/p99/p99.9/max;
//! `ttft` measures until the first *content* delta (not the first byte: the
//! gateway holds the role chunk until its commit point) and also prints the
//! per-chunk delay (time from the first content delta to the end of the
//! stream over the number of further deltas); `closed` keeps CONCURRENCY
//! requests in flight back to back (concurrency 1 is the pure added-latency
//! lane); `streams` opens COUNT concurrent streams, holds them HOLD_SECONDS
//! (measure RSS meanwhile) and prints how many were still open and healthy
//! at the end (`sustained=`) with time-to-first-byte percentiles.
//!
//! Output lines are `label: n=… errors=… p50=…ms …` (parsed by bench/run.py).
//! With `LOADGEN_SAMPLES=/path` the latency samples (µs, one a line) are
//! also written there, for the latency CDF plots.

use futures_util::StreamExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MAX_IN_FLIGHT: usize = 4096;
/// The most concurrent streams the `streams` mode opens.
const MAX_STREAMS: usize = 20_000;
/// A non-streaming request or a stream's first content slower than this is
/// an error: it bounds every run even against a target that cannot keep up.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How a content delta starts in OpenAI-format chunks (the role chunk has `"role"` first).
const CONTENT: &[u8] = b"\"delta\":{\"content\":\"";

fn body(stream: bool) -> String {
    format!(
        r#"{{"model":"gpt-4o-mini","stream":{stream},"messages":[{{"role":"user","content":"hello there"}}]}}"#
    )
}

/// Prints one result line; `extra` is appended (e.g. achieved rate).
fn percentiles(label: &str, mut micros: Vec<u64>, errors: usize, extra: &str) {
    micros.sort_unstable();
    let at = |q: f64| -> f64 {
        if micros.is_empty() {
            return f64::NAN;
        }
        let i = ((micros.len() as f64 - 1.0) * q).round() as usize;
        micros[i] as f64 / 1000.0
    };
    println!(
        "{label}: n={} errors={errors} p50={:.3}ms p90={:.3}ms p99={:.3}ms p99.9={:.3}ms max={:.3}ms{extra}",
        micros.len(),
        at(0.5),
        at(0.9),
        at(0.99),
        at(0.999),
        at(1.0)
    );
}

/// Writes the samples where `LOADGEN_SAMPLES` says, if it says.
fn write_samples(micros: &[u64]) {
    let Some(path) = std::env::var_os("LOADGEN_SAMPLES") else {
        return;
    };
    let mut text = String::with_capacity(micros.len() * 6);
    for m in micros {
        text.push_str(&m.to_string());
        text.push('\n');
    }
    if let Err(e) = std::fs::write(&path, text) {
        eprintln!("loadgen: cannot write samples: {e}");
    }
}

fn client(pool: usize) -> reqwest::Client {
    match reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(pool)
        .connect_timeout(REQUEST_TIMEOUT)
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("loadgen: cannot build the HTTP client: {e}");
            std::process::exit(1);
        }
    }
}

fn request(
    client: &reqwest::Client,
    url: &str,
    headers: &[(String, String)],
    stream: bool,
) -> reqwest::RequestBuilder {
    let mut r = client
        .post(url)
        .header("content-type", "application/json")
        .body(body(stream));
    for (k, v) in headers {
        r = r.header(k, v);
    }
    r
}

/// When one request counted as answered (non-stream: whole body; stream:
/// first content delta) and, for streams, the mean delay per further chunk.
struct Answered {
    at: Instant,
    per_chunk: Option<Duration>,
}

fn occurrences(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

async fn one(
    client: &reqwest::Client,
    url: &str,
    headers: &[(String, String)],
    stream: bool,
) -> Option<Answered> {
    let r = request(client, url, headers, stream).send().await.ok()?;
    if !r.status().is_success() {
        return None;
    }
    if !stream {
        r.bytes().await.ok()?;
        return Some(Answered {
            at: Instant::now(),
            per_chunk: None,
        });
    }
    let mut body = r.bytes_stream();
    let mut seen = Vec::new();
    while let Some(Ok(chunk)) = body.next().await {
        seen.extend_from_slice(&chunk);
        let first = occurrences(&seen, CONTENT);
        if first > 0 {
            let at = Instant::now();
            // Read the rest (the connection is then reused) and time it.
            let mut tail = Vec::new();
            while let Some(Ok(chunk)) = body.next().await {
                tail.extend_from_slice(&chunk);
            }
            let rest = occurrences(&tail, CONTENT);
            let per_chunk = (rest > 0).then(|| at.elapsed() / rest as u32);
            return Some(Answered { at, per_chunk });
        }
    }
    None
}

/// Shared result lists of one run.
#[derive(Default)]
struct Tally {
    micros: Mutex<Vec<u64>>,
    chunk_micros: Mutex<Vec<u64>>,
    errors: AtomicUsize,
}

impl Tally {
    fn add(&self, answered: Option<Answered>, since: Instant) {
        match answered {
            Some(a) => {
                let micros = a.at.saturating_duration_since(since).as_micros() as u64;
                self.micros.lock().map(|mut v| v.push(micros)).ok();
                if let Some(d) = a.per_chunk {
                    let d = d.as_micros() as u64;
                    self.chunk_micros.lock().map(|mut v| v.push(d)).ok();
                }
            }
            None => {
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn print(&self, label: &str, extra: &str) {
        let micros = self.micros.lock().map(|v| v.clone()).unwrap_or_default();
        let chunks = self
            .chunk_micros
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default();
        let errors = self.errors.load(Ordering::Relaxed);
        write_samples(&micros);
        percentiles(label, micros, errors, extra);
        if !chunks.is_empty() {
            percentiles(&format!("{label} per-chunk"), chunks, 0, "");
        }
    }
}

async fn warm_up(client: &reqwest::Client, url: &str, headers: &[(String, String)]) {
    // Warm up connections so the first second does not measure connects.
    for _ in 0..20 {
        if let Ok(r) = request(client, url, headers, false).send().await {
            let _ = r.bytes().await;
        }
    }
}

async fn rate(url: String, rate: u64, seconds: u64, headers: Vec<(String, String)>, stream: bool) {
    let client = client(MAX_IN_FLIGHT);
    let headers = Arc::new(headers);
    warm_up(&client, &url, &headers).await;
    let total = rate * seconds;
    let interval = Duration::from_nanos(1_000_000_000 / rate.max(1));
    let tally = Arc::new(Tally::default());
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let start = Instant::now();
    let mut ticks = pacer(start, interval, total);
    let mut late = Vec::with_capacity(total as usize);
    let mut tasks = Vec::with_capacity(total as usize);
    while let Some(scheduled) = ticks.recv().await {
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        late.push(scheduled.elapsed().as_micros() as u64);
        let (client, url, headers, tally) =
            (client.clone(), url.clone(), headers.clone(), tally.clone());
        tasks.push(tokio::spawn(async move {
            let answered =
                tokio::time::timeout(REQUEST_TIMEOUT, one(&client, &url, &headers, stream))
                    .await
                    .ok()
                    .flatten();
            tally.add(answered, scheduled);
            drop(permit);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let achieved = total as f64 / start.elapsed().as_secs_f64();
    late.sort_unstable();
    let late_p99 = late
        .get(late.len().saturating_sub(1) * 99 / 100)
        .copied()
        .unwrap_or(0);
    tally.print(
        &format!("{url} @ {rate}/s"),
        &format!(
            " achieved={achieved:.0}/s late_p99={:.3}ms",
            late_p99 as f64 / 1000.0
        ),
    );
}

/// The open loop's clock: a thread that wakes at each scheduled send and hands
/// its instant over. Latency is measured from that instant, so a send the
/// generator made late counts against the target (no coordinated omission);
/// that is only fair if the generator is on time. tokio's timer rounds every
/// sleep up to its next 1 ms tick, which added 0.5–1 ms to every figure at
/// 200 and 1000 req/s (direct to the mock read 1–2 ms); a thread sleeping on
/// the kernel's high-resolution timer with its slack lowered wakes within tens
/// of µs. How late the sends still were is printed (`late_p99`).
fn pacer(
    start: Instant,
    interval: Duration,
    total: u64,
) -> tokio::sync::mpsc::UnboundedReceiver<Instant> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        // SAFETY: PR_SET_TIMERSLACK takes a plain integer and only changes how
        // much this thread's sleeps may be deferred (default 50 µs).
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
        for i in 0..total {
            let scheduled = start + interval * i as u32;
            if let Some(wait) = scheduled.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            if tx.send(scheduled).is_err() {
                break;
            }
        }
    });
    rx
}

async fn closed(url: String, concurrency: usize, seconds: u64, headers: Vec<(String, String)>) {
    let client = client(concurrency);
    let headers = Arc::new(headers);
    warm_up(&client, &url, &headers).await;
    let tally = Arc::new(Tally::default());
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let mut tasks = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let (client, url, headers, tally) =
            (client.clone(), url.clone(), headers.clone(), tally.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let sent = Instant::now();
                let answered =
                    tokio::time::timeout(REQUEST_TIMEOUT, one(&client, &url, &headers, false))
                        .await
                        .ok()
                        .flatten();
                tally.add(answered, sent);
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let done = tally.micros.lock().map(|v| v.len()).unwrap_or(0);
    let achieved = done as f64 / start.elapsed().as_secs_f64();
    tally.print(
        &format!("{url} closed c{concurrency}"),
        &format!(" achieved={achieved:.0}/s"),
    );
}

async fn streams(url: String, count: usize, hold: u64, headers: Vec<(String, String)>) {
    let client = client(count);
    let tally = Arc::new(Tally::default());
    // Streams that failed, or ended before the hold did (the mock is told to
    // stream for longer than the hold), are not sustained.
    let broken = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(hold);
    let mut tasks = Vec::with_capacity(count);
    for _ in 0..count {
        let (client, url, headers, tally, broken) = (
            client.clone(),
            url.clone(),
            headers.clone(),
            tally.clone(),
            broken.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let first = tokio::time::timeout_at(deadline.into(), async {
                let r = request(&client, &url, &headers, true).send().await.ok()?;
                if !r.status().is_success() {
                    return None;
                }
                let mut body = r.bytes_stream();
                match body.next().await {
                    Some(Ok(_)) => Some(body),
                    _ => None,
                }
            })
            .await
            .ok()
            .flatten();
            let Some(mut body) = first else {
                tally.add(None, sent);
                broken.fetch_add(1, Ordering::Relaxed);
                return;
            };
            tally.add(
                Some(Answered {
                    at: Instant::now(),
                    per_chunk: None,
                }),
                sent,
            );
            // Keep reading (slowly arriving chunks) until the hold ends.
            let ended = tokio::time::timeout_at(deadline.into(), async {
                while let Some(Ok(_)) = body.next().await {}
            })
            .await;
            if ended.is_ok() {
                broken.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    println!("streams opened: {count} (holding for {hold}s)");
    for t in tasks {
        let _ = t.await;
    }
    let sustained = count - broken.load(Ordering::Relaxed).min(count);
    tally.print(
        &format!("{url} {count} streams, time to first byte"),
        &format!(" sustained={sustained}"),
    );
}

fn parse_headers(args: &[String]) -> Vec<(String, String)> {
    args.iter()
        .filter_map(|h| {
            h.split_once(':')
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        })
        .collect()
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: loadgen rate|ttft URL RATE SECONDS [H:V...] | loadgen closed URL CONCURRENCY SECONDS [H:V...] | loadgen streams URL COUNT HOLD_SECONDS [H:V...]";
    if args.len() < 5 {
        eprintln!("{usage}");
        std::process::exit(2);
    }
    let (Ok(n), Ok(secs)) = (args[3].parse::<u64>(), args[4].parse::<u64>()) else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let secs = secs.min(3600);
    let headers = parse_headers(&args[5..]);
    match args[1].as_str() {
        "rate" => rate(args[2].clone(), n.clamp(1, 100_000), secs, headers, false).await,
        "ttft" => rate(args[2].clone(), n.clamp(1, 100_000), secs, headers, true).await,
        "closed" => closed(args[2].clone(), n.clamp(1, 4096) as usize, secs, headers).await,
        "streams" => {
            streams(
                args[2].clone(),
                (n as usize).min(MAX_STREAMS),
                secs,
                headers,
            )
            .await
        }
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    }
}
