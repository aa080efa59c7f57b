//! A small, bounded, open-loop load generator for the sidecar benchmark
//! (design §8): requests are *scheduled* at a fixed rate and each latency is
//! measured from its scheduled start, so a stall is not hidden by the
//! generator waiting for it (coordinated omission). Keep-alive connections
//! from one pooled client, TCP_NODELAY.
//!
//! ```text
//! cargo run --release --example loadgen -- rate URL RATE SECONDS [HEADER:VALUE ...]
//! cargo run --release --example loadgen -- streams URL COUNT HOLD_SECONDS [HEADER:VALUE ...]
//! cargo run --release --example loadgen -- ttft URL RATE SECONDS [HEADER:VALUE ...]
//! ```
//! `rate` posts a non-streaming chat body and prints p50/p90/p99/p99.9/max;
//! `ttft` schedules streams at RATE and measures until the first content delta;
//! `streams` opens COUNT concurrent streams, holds them HOLD_SECONDS (measure
//! RSS meanwhile) and prints time-to-first-byte percentiles.

use futures_util::StreamExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MAX_IN_FLIGHT: usize = 4096;

/// How a content delta starts in OpenAI-format chunks (the role chunk has `"role"` first).
const CONTENT: &[u8] = b"\"delta\":{\"content\":\"";

fn body(stream: bool) -> String {
    format!(
        r#"{{"model":"gpt-4o-mini","stream":{stream},"messages":[{{"role":"user","content":"hello there"}}]}}"#
    )
}

fn percentiles(label: &str, mut micros: Vec<u64>, errors: usize) {
    micros.sort_unstable();
    let at = |q: f64| -> f64 {
        if micros.is_empty() {
            return f64::NAN;
        }
        let i = ((micros.len() as f64 - 1.0) * q).round() as usize;
        micros[i] as f64 / 1000.0
    };
    println!(
        "{label}: n={} errors={errors} p50={:.3}ms p90={:.3}ms p99={:.3}ms p99.9={:.3}ms max={:.3}ms",
        micros.len(),
        at(0.5),
        at(0.9),
        at(0.99),
        at(0.999),
        at(1.0)
    );
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

/// One request; the moment it counts as answered (non-stream: whole body;
/// stream: first content delta, the rest is then drained).
async fn one(
    client: &reqwest::Client,
    url: &str,
    headers: &[(String, String)],
    stream: bool,
) -> Option<Instant> {
    let r = request(client, url, headers, stream).send().await.ok()?;
    if !r.status().is_success() {
        return None;
    }
    if !stream {
        r.bytes().await.ok()?;
        return Some(Instant::now());
    }
    let mut body = r.bytes_stream();
    let mut seen = Vec::new();
    while let Some(Ok(chunk)) = body.next().await {
        seen.extend_from_slice(&chunk);
        if seen.windows(CONTENT.len()).any(|w| w == CONTENT) {
            let at = Instant::now();
            // Read the rest so the connection is reused.
            while body.next().await.is_some() {}
            return Some(at);
        }
    }
    None
}

async fn rate(url: String, rate: u64, seconds: u64, headers: Vec<(String, String)>, stream: bool) {
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(MAX_IN_FLIGHT)
        .build()
        .expect("client");
    let headers = Arc::new(headers);
    // Warm up connections so the first second does not measure connects.
    for _ in 0..50 {
        let _ = request(&client, &url, &headers, false)
            .send()
            .await
            .map(|r| r.bytes());
    }
    let total = rate * seconds;
    let interval = Duration::from_nanos(1_000_000_000 / rate.max(1));
    let results = Arc::new(Mutex::new(Vec::with_capacity(total as usize)));
    let errors = Arc::new(Mutex::new(0usize));
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        let scheduled = start + interval * i as u32;
        tokio::time::sleep_until(scheduled.into()).await;
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let (client, url, headers, results, errors) = (
            client.clone(),
            url.clone(),
            headers.clone(),
            results.clone(),
            errors.clone(),
        );
        tasks.push(tokio::spawn(async move {
            match one(&client, &url, &headers, stream).await {
                Some(at) => {
                    let micros = at.saturating_duration_since(scheduled).as_micros() as u64;
                    results.lock().map(|mut v| v.push(micros)).ok();
                }
                None => {
                    errors.lock().map(|mut e| *e += 1).ok();
                }
            }
            drop(permit);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let achieved = total as f64 / start.elapsed().as_secs_f64();
    let micros = results.lock().map(|v| v.clone()).unwrap_or_default();
    let errors = errors.lock().map(|e| *e).unwrap_or(0);
    percentiles(
        &format!("{url} @ {rate}/s (achieved {achieved:.0}/s)"),
        micros,
        errors,
    );
}

async fn streams(url: String, count: usize, hold: u64, headers: Vec<(String, String)>) {
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(count)
        .build()
        .expect("client");
    let ttfb = Arc::new(Mutex::new(Vec::with_capacity(count)));
    let errors = Arc::new(Mutex::new(0usize));
    let deadline = Instant::now() + Duration::from_secs(hold);
    let mut tasks = Vec::with_capacity(count);
    for _ in 0..count.min(MAX_IN_FLIGHT) {
        let (client, url, headers, ttfb, errors) = (
            client.clone(),
            url.clone(),
            headers.clone(),
            ttfb.clone(),
            errors.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let Ok(r) = request(&client, &url, &headers, true).send().await else {
                errors.lock().map(|mut e| *e += 1).ok();
                return;
            };
            let mut body = r.bytes_stream();
            if let Some(Ok(_)) = body.next().await {
                ttfb.lock()
                    .map(|mut v| v.push(sent.elapsed().as_micros() as u64))
                    .ok();
            } else {
                errors.lock().map(|mut e| *e += 1).ok();
            }
            // Keep reading (slowly arriving chunks) until the hold ends.
            let _ = tokio::time::timeout_at(deadline.into(), async {
                while body.next().await.is_some() {}
            })
            .await;
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!("streams open: {} (holding until {hold}s)", count);
    for t in tasks {
        let _ = t.await;
    }
    let micros = ttfb.lock().map(|v| v.clone()).unwrap_or_default();
    let errors = errors.lock().map(|e| *e).unwrap_or(0);
    percentiles(
        &format!("{url} {count} streams, time to first byte"),
        micros,
        errors,
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
    let usage = "usage: loadgen rate|ttft URL RATE SECONDS [H:V...] | loadgen streams URL COUNT HOLD_SECONDS [H:V...]";
    if args.len() < 5 {
        eprintln!("{usage}");
        std::process::exit(2);
    }
    let n: u64 = args[3].parse().unwrap_or(0);
    let secs: u64 = args[4].parse().unwrap_or(0).min(300);
    let headers = parse_headers(&args[5..]);
    match args[1].as_str() {
        "rate" => rate(args[2].clone(), n.min(100_000), secs, headers, false).await,
        "ttft" => rate(args[2].clone(), n.min(100_000), secs, headers, true).await,
        "streams" => streams(args[2].clone(), n.min(10_000) as usize, secs, headers).await,
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    }
}
