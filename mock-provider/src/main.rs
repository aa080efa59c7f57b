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
//! `POST /v1/embeddings`, `/v1/completions` and `/v1/responses` answer in
//! OpenAI's shapes too. Responses ids name the instance (`resp_afrmock` + its
//! process id + a sequence number); a `previous_response_id` naming another
//! instance's response is a 400 (`param: previous_response_id`), as a
//! provider refuses an id it never stored.
//!
//! Auth is only checked when `--api-key` is given.
//!
//! # TLS
//! `--tls-listen ADDR` adds a TLS listener serving the same endpoints over
//! HTTP/1.1 or HTTP/2 (by ALPN, as real providers do), with HTTP/2 limited to
//! `--h2-max-streams` concurrent streams (default 100). Its certificate is
//! signed by a CA made at start-up, written as PEM to `--tls-ca-file`; the
//! bound port goes to `--tls-port-file`. See the [`tls`] module.
//!
//! # Faults
//! Instance knobs come from CLI flags and `POST /_mock/config`; each can be
//! overridden per request by a header: `--latency-ms`/`X-Mock-Latency-Ms`,
//! `--ttft-ms`/`X-Mock-Ttft-Ms`, `--chunks`/`X-Mock-Chunks`,
//! `--chunk-interval-ms`/`X-Mock-Chunk-Interval-Ms`, `--status`/`X-Mock-Status`,
//! `--fail-percent`/`X-Mock-Fail-Percent`, `--fail-status`/`X-Mock-Fail-Status`,
//! `--reset-after-chunks`/`X-Mock-Reset-After-Chunks`,
//! `--error-after-chunks`/`X-Mock-Error-After-Chunks`,
//! `--malformed-sse`/`X-Mock-Malformed-Sse`,
//! `--reset-before-response`/`X-Mock-Reset-Before-Response`,
//! `--end-after-chunks`/`X-Mock-End-After-Chunks`,
//! `--stall-after-headers`/`X-Mock-Stall-After-Headers`, `--drip-ms`/`X-Mock-Drip-Ms`,
//! `--body-bytes`/`X-Mock-Body-Bytes`, `--non-json`/`X-Mock-Non-Json`,
//! `--cut-after-events`/`X-Mock-Cut-After-Events`, and instance-only
//! `--fail-first` and `--fail-every`.
//! See [`knobs::Knobs`] for their meaning.
//!
//! Token-class knobs, the same way: `--cache-read`/`X-Mock-Cache-Read`,
//! `--cache-write-5m`/`X-Mock-Cache-Write-5m` and
//! `--cache-write-1h`/`X-Mock-Cache-Write-1h` (Anthropic),
//! `--reasoning-tokens`/`X-Mock-Reasoning-Tokens`,
//! `--omit-usage`/`X-Mock-Omit-Usage`; the request's `n` (and `best_of` for
//! `/v1/completions`) gives that many choices. See the [`usage`] module.
//!
//! Tool calls: `--tools`/`tools`/`X-Mock-Tools` is `first` (the default:
//! the first tool is called, string properties set to the user's words) or
//! `agent` (the shell-like tool is called with arguments valid against its
//! schema, then a tool result is answered with text). See the [`tools`] and
//! [`schema_args`] modules.
//!
//! # Control API
//! - `GET /_mock/config` / `POST /_mock/config`: read or replace the instance
//!   knobs (JSON with the snake_case knob names; omitted fields take their
//!   defaults, so `{}` makes the instance healthy; restarts `fail_first`).
//! - `GET /_mock/requests`: `{"total","in_flight_streams","client_disconnects","requests":[…]}`;
//!   each request has `seq, api, method, version, path, headers, body, status, stream,
//!   chunks_sent, outcome (in_flight|completed|client_disconnected|reset),
//!   client_disconnected, connection_closed_mid_stream, billed`.
//! - `GET /_mock/billing`: the `billed` fields summed over the log, and
//!   `requests` (how many entries were billed).
//! - `DELETE /_mock/requests`: clears the log and the counters.
//! - `GET /_mock/health`.
//!
//! # Token counts
//! Deterministic; the formula is in the [`reply`] module docs.

mod anthropic;
mod conn;
mod endpoints;
mod faults;
mod knobs;
mod log;
mod openai;
mod reply;
mod schema_args;
mod server;
mod stream;
mod tls;
mod tools;
mod usage;

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
    /// Also serve TLS (HTTP/1.1 and HTTP/2 by ALPN) on this address.
    #[arg(long)]
    tls_listen: Option<SocketAddr>,
    /// Write the TLS listener's port to this file once listening.
    #[arg(long, requires = "tls_listen")]
    tls_port_file: Option<PathBuf>,
    /// Write the PEM certificate of the CA that signed the TLS listener's
    /// certificate to this file (before the port files are written).
    #[arg(long, requires = "tls_listen")]
    tls_ca_file: Option<PathBuf>,
    /// HTTP/2 concurrent-stream limit of the TLS listener (real providers: 100 or so).
    #[arg(long, default_value_t = 100)]
    h2_max_streams: u32,
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

/// Connections the kernel completes for the mock before it accepts them.
/// `TcpListener::bind` asks for 128: a bench opening 10 000 streams at once
/// overflowed it, the dropped SYNs were retried past the sidecar's 3 s
/// connect timeout, and the mock's breaker opened (nstat showed
/// `ListenOverflows`). nginx in the bench listens with `backlog=4096` too;
/// the kernel caps it at `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 4096;

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let bind = || {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    // "Address already in use" alone does not say which listener.
    bind().map_err(|e| std::io::Error::new(e.kind(), format!("listening on {addr}: {e}")))
}

/// Writes `text` to `path` through a rename, so a polling test never reads a partial file.
fn write_whole(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

async fn run(cli: Cli) -> std::io::Result<()> {
    let state = Arc::new(server::State::new(cli.api_key, cli.knobs, cli.log_capacity));
    // The TLS side first: once the plain port file exists, both are ready.
    let _tls = match cli.tls_listen {
        Some(tls_addr) => {
            let identity = tls::identity()?;
            if let Some(path) = &cli.tls_ca_file {
                write_whole(path, &identity.ca_pem)?;
            }
            let listener = listen(tls_addr)?;
            let addr = listener.local_addr()?;
            if let Some(path) = &cli.tls_port_file {
                write_whole(path, &addr.port().to_string())?;
            }
            println!("afr-mock listening on {addr} (TLS)");
            Some(AbortOnDrop(tokio::spawn(tls::serve(
                listener,
                identity.config,
                state.clone(),
                cli.h2_max_streams,
            ))))
        }
        None => None,
    };
    let listener = listen(cli.listen)?;
    let addr = listener.local_addr()?;
    if let Some(path) = &cli.port_file {
        write_whole(path, &addr.port().to_string())?;
    }
    println!("afr-mock listening on {addr}");
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
            let connection = crate::log::ConnectionId::next();
            let svc = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(connection);
                server::handle(state.clone(), reset.clone(), req)
            });
            let _ = http.serve_connection(io, svc).await;
        });
    }
}

/// Stops a spawned task when dropped (the TLS accept loop ends with `run`).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
