//! `afr-mock`: a mock LLM provider speaking the OpenAI, Azure OpenAI and
//! Anthropic wire formats, with fault injection and a request log, for the
//! gateway's tests, benchmarks and quickstart.
//!
//! # Endpoints
//! - `POST /v1/chat/completions` (also `/openai/v1/chat/completions`): OpenAI
//!   chat completions, streaming or not. Auth: `Authorization: Bearer KEY`
//!   (the `/openai/v1` path also takes `api-key: KEY`).
//! - `POST /openai/deployments/{dep}/chat/completions?api-version=…`: Azure
//!   OpenAI; auth `api-key: KEY` (or Bearer); no `api-version` → 404.
//!   Streams start with Azure's prompt-annotation chunk (`"choices":[]`).
//! - `GET /v1/models`: the recorded OpenAI model list.
//! - `POST /v1/messages`: Anthropic Messages; auth `x-api-key: KEY`;
//!   `anthropic-version` is always required (400 without it), as upstream.
//!
//! Auth is only checked when `--api-key` is given.
//!
//! # Faults
//! Instance knobs come from CLI flags and `POST /_mock/config`; each can be
//! overridden per request by a header: `--latency-ms`/`X-Mock-Latency-Ms`,
//! `--ttft-ms`/`X-Mock-Ttft-Ms`, `--chunks`/`X-Mock-Chunks`,
//! `--chunk-interval-ms`/`X-Mock-Chunk-Interval-Ms`, `--status`/`X-Mock-Status`,
//! `--fail-percent`/`X-Mock-Fail-Percent`, `--fail-status`/`X-Mock-Fail-Status`,
//! `--reset-after-chunks`/`X-Mock-Reset-After-Chunks`,
//! `--error-after-chunks`/`X-Mock-Error-After-Chunks`,
//! `--malformed-sse`/`X-Mock-Malformed-Sse`, and instance-only `--fail-first`.
//! See [`knobs::Knobs`] for their meaning.
//!
//! # Control API
//! - `GET /_mock/config` / `POST /_mock/config`: read or replace the instance
//!   knobs (JSON with the snake_case knob names; omitted fields take their
//!   defaults, so `{}` makes the instance healthy; restarts `fail_first`).
//! - `GET /_mock/requests`: `{"total","in_flight_streams","client_disconnects","requests":[…]}`;
//!   each request has `seq, api, method, path, headers, body, status, stream,
//!   chunks_sent, outcome (in_flight|completed|client_disconnected|reset),
//!   client_disconnected, connection_closed_mid_stream`.
//! - `DELETE /_mock/requests`: clears the log and the counters.
//! - `GET /_mock/health`.
//!
//! # Token counts
//! Deterministic; the formula is in the [`reply`] module docs.

mod anthropic;
mod conn;
mod faults;
mod knobs;
mod log;
mod openai;
mod reply;
mod server;
mod stream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

/// Command line of `afr-mock`.
#[derive(Parser, Debug)]
#[command(name = "afr-mock", version, about)]
struct Cli {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Write the bound port (decimal, no newline) to this file once listening.
    #[arg(long)]
    port_file: Option<PathBuf>,
    /// Require this provider key (Bearer / api-key / x-api-key by API).
    #[arg(long)]
    api_key: Option<String>,
    /// Requests kept in the log (0 keeps only counters).
    #[arg(long, default_value_t = 10_000)]
    log_capacity: usize,
    /// Tokio worker threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    #[command(flatten)]
    knobs: knobs::Knobs,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = cli.threads {
        rt.worker_threads(n.max(1));
    }
    let rt = match rt.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("afr-mock: cannot start runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("afr-mock: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> std::io::Result<()> {
    let listener = TcpListener::bind(cli.listen).await?;
    let addr = listener.local_addr()?;
    if let Some(path) = &cli.port_file {
        // Write then rename so a polling test never reads a partial file.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, addr.port().to_string())?;
        std::fs::rename(&tmp, path)?;
    }
    println!("afr-mock listening on {addr}");
    let state = Arc::new(server::State::new(cli.api_key, cli.knobs, cli.log_capacity));
    let mut http = http1::Builder::new();
    http.keep_alive(true).timer(TokioTimer::new());
    let http = Arc::new(http);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    eprintln!("afr-mock: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = term.recv() => return Ok(()),
        };
        // Without it, headers and body go out in separate segments and Nagle
        // plus delayed ACK stalls keep-alive clients ~40 ms (design §8).
        let _ = tcp.set_nodelay(true);
        let reset = Arc::new(AtomicBool::new(false));
        let io = TokioIo::new(conn::MockIo::new(tcp, reset.clone()));
        let state = state.clone();
        let http = http.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| server::handle(state.clone(), reset.clone(), req));
            let _ = http.serve_connection(io, svc).await;
        });
    }
}
