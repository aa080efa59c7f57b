//! The bare hyper floor (issue 24, "measure the floor in the same run").
//!
//! The sidecar is a second HTTP hop behind nginx, so its own cost is judged
//! against the leanest second hop there can be: this one. It listens on a unix
//! socket (nginx's upstream is `unix:<path>`, as for the sidecar), forwards each
//! request as it came (method, path, headers, body streamed) to one TCP upstream
//! over hyper's pooled keep-alive client, and streams the response back frame by
//! frame, so SSE flows unbuffered. No logic at all: no JSON, no auth, no
//! metrics, no logging per request. Same hyper, hyper-util and tokio as the
//! sidecar, on the same runtime: a multi-thread runtime with `--threads` workers,
//! by default as many as `afr serve` takes (TOKIO_WORKER_THREADS, else half the
//! CPUs, at least one). `bench/run.py` runs it as its `floor` target.
//!
//! ```text
//! afr-bench-floor --listen /tmp/floor.sock --upstream 127.0.0.1:8080 [--threads N]
//! ```

use std::convert::Infallible;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::UnixListener;

type Pool = Client<HttpConnector, Incoming>;
type Body = Either<Incoming, Empty<Bytes>>;

struct Args {
    listen: PathBuf,
    upstream: String,
    threads: Option<usize>,
}

const USAGE: &str =
    "usage: afr-bench-floor --listen SOCKET_PATH --upstream HOST:PORT [--threads N]";

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let (mut listen, mut upstream, mut threads) = (None, None, None);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => listen = Some(PathBuf::from(value()?)),
            "--upstream" => upstream = Some(value()?),
            "--threads" => {
                let v = value()?;
                match v.parse::<usize>() {
                    Ok(n) if n >= 1 => threads = Some(n),
                    _ => return Err(format!("--threads: expected a number from 1, got {v:?}")),
                }
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Args {
        listen: listen.ok_or("--listen is required")?,
        upstream: upstream.ok_or("--upstream is required")?,
        threads,
    })
}

/// `afr serve`'s default (sidecar/src/serve/mod.rs): TOKIO_WORKER_THREADS if
/// set, else half the CPUs, at least one.
fn default_threads() -> usize {
    if let Some(n) = std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n >= 1)
    {
        return n;
    }
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    (cpus / 2).max(1)
}

/// The upstream's pooled keep-alive client, set as the sidecar's providers'
/// client is (TCP_NODELAY, idle connections kept 90 s, up to 1024 per host).
fn pool() -> Pool {
    let mut tcp = HttpConnector::new();
    tcp.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(1024)
        .build(tcp)
}

/// Forwards one request as it came, only its URI pointed at the upstream.
async fn forward(
    pool: Pool,
    upstream: &'static str,
    mut request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
    match format!("http://{upstream}{path}").parse::<Uri>() {
        Ok(uri) => *request.uri_mut() = uri,
        Err(_) => return Ok(status(StatusCode::BAD_REQUEST)),
    }
    Ok(match pool.request(request).await {
        Ok(response) => response.map(Either::Left),
        Err(_) => status(StatusCode::BAD_GATEWAY),
    })
}

fn status(code: StatusCode) -> Response<Body> {
    let mut response = Response::new(Either::Right(Empty::new()));
    *response.status_mut() = code;
    response
}

/// Serves `listener` until the process is stopped.
pub async fn serve(listener: UnixListener, upstream: &'static str) {
    let pool = pool();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let pool = pool.clone();
        let service = service_fn(move |request| forward(pool.clone(), upstream, request));
        tokio::spawn(async move {
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn main() -> std::process::ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("afr-bench-floor: {e}");
            }
            eprintln!("{USAGE}");
            return std::process::ExitCode::from(2);
        }
    };
    let threads = args.threads.unwrap_or_else(default_threads);
    let upstream: &'static str = Box::leak(args.upstream.into_boxed_str());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .expect("starting the tokio runtime");
    runtime.block_on(async {
        let _ = std::fs::remove_file(&args.listen); // a socket a previous run left
        let listener = match UnixListener::bind(&args.listen) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("afr-bench-floor: binding {}: {e}", args.listen.display());
                return std::process::ExitCode::FAILURE;
            }
        };
        eprintln!(
            "afr-bench-floor listening on {} -> {upstream}, threads={threads}",
            args.listen.display()
        );
        serve(listener, upstream).await;
        std::process::ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full, StreamBody};
    use hyper::body::Frame;
    use std::time::Instant;
    use tokio::net::{TcpListener, UnixStream};

    type Frames = tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, Infallible>>;

    /// An upstream that echoes the request line in `x-seen` and the body as
    /// the body, and answers `/sse` with three chunks 100 ms apart.
    async fn upstream() -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let service = service_fn(|request: Request<Incoming>| async move {
                    if request.uri().path() == "/sse" {
                        let (tx, mut rx): (_, Frames) = tokio::sync::mpsc::channel(1);
                        tokio::spawn(async move {
                            for i in 0..3 {
                                let chunk = Bytes::from(format!("data: {i}\n\n"));
                                tx.send(Ok(Frame::data(chunk))).await.unwrap();
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                        });
                        let frames = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
                        return Ok::<_, Infallible>(Response::new(StreamBody::new(frames).boxed()));
                    }
                    let seen = format!("{} {}", request.method(), request.uri());
                    let body = request.into_body().collect().await.unwrap().to_bytes();
                    let mut response = Response::new(Full::new(body).boxed());
                    response
                        .headers_mut()
                        .insert("x-seen", seen.parse().unwrap());
                    Ok(response)
                });
                tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_body_and_a_stream_come_through_as_they_were_sent() {
        let upstream: &'static str = Box::leak(upstream().await.to_string().into_boxed_str());
        let dir = std::env::temp_dir().join(format!("afr-floor-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("floor.sock");
        let _ = std::fs::remove_file(&socket);
        tokio::spawn(serve(UnixListener::bind(&socket).unwrap(), upstream));

        let stream = UnixStream::connect(&socket).await.unwrap();
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(connection);

        // A body, and the method and path as they came.
        let request = Request::post("/v1/chat/completions?x=1")
            .header("host", "gateway")
            .body(Full::new(Bytes::from_static(b"{\"hello\":1}")))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["x-seen"],
            "POST /v1/chat/completions?x=1"
        );
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"{\"hello\":1}");

        // A stream, on the same (kept-alive) connection: each chunk arrives
        // as the upstream sends it, not once the stream has ended.
        let request = Request::get("/sse").body(Full::new(Bytes::new())).unwrap();
        let started = Instant::now();
        let mut body = sender.send_request(request).await.unwrap().into_body();
        let mut chunks = Vec::new();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                chunks.push((started.elapsed(), data));
            }
        }
        let text: Vec<u8> = chunks.iter().flat_map(|(_, d)| d.to_vec()).collect();
        assert_eq!(text, b"data: 0\n\ndata: 1\n\ndata: 2\n\n");
        assert!(
            chunks[0].0 < Duration::from_millis(150),
            "the first chunk waited: {chunks:?}"
        );
        assert!(
            chunks.last().unwrap().0 >= Duration::from_millis(200),
            "{chunks:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
