//! Accept loops: the main listener (unix socket or loopback TCP) and the admin
//! listener (`/metrics`, `/healthz`, and the operator's dashboard: [`admin`]). HTTP/1.1 with keep-alive; `TCP_NODELAY`
//! on every accepted TCP socket (headers and body go out in separate writes,
//! and Nagle against delayed ACK would stall each response ~40 ms).

use crate::serve::admin::{self, Admin};
use crate::serve::error::{full, json_response, Body};
use crate::serve::handler::handle;
use crate::serve::state::Gateway;
use afr_core::config::Listen;
use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// A bound listener.
pub enum Bound {
    /// Loopback TCP.
    Tcp(TcpListener),
    /// Unix domain socket (its path removed on drop by `serve`).
    Unix(UnixListener, std::path::PathBuf),
}

impl Bound {
    /// Binds `listen`, replacing a stale unix socket file and giving a new
    /// one the permissions `socket_mode`. Anything else at the socket path (a
    /// regular file, a directory, a symlink) is left alone and fails the bind:
    /// a typo in `server.listen` must not delete an operator's file.
    pub async fn bind(listen: &Listen, socket_mode: u32) -> std::io::Result<Bound> {
        match listen {
            Listen::Tcp(addr) => Ok(Bound::Tcp(TcpListener::bind(addr).await?)),
            Listen::Unix(path) => {
                if let Ok(meta) = std::fs::symlink_metadata(path) {
                    use std::os::unix::fs::FileTypeExt;
                    if !meta.file_type().is_socket() {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::AlreadyExists,
                            format!(
                                "{} exists and is not a socket; not removing it (move it away or choose another path)",
                                path.display()
                            ),
                        ));
                    }
                    std::fs::remove_file(path)?;
                }
                let listener = UnixListener::bind(path)?;
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(socket_mode))?;
                Ok(Bound::Unix(listener, path.clone()))
            }
        }
    }

    /// The bound TCP port, if TCP.
    pub fn port(&self) -> Option<u16> {
        match self {
            Bound::Tcp(l) => l.local_addr().ok().map(|a| a.port()),
            Bound::Unix(..) => None,
        }
    }
}

/// Serves the main API until `stop` turns true, then lets open connections
/// (in-flight requests and streams) finish for up to `grace`; whatever is still
/// open then is cut, which records its usage as cut short. Returns once every
/// connection task has ended.
pub async fn serve_api(
    bound: Bound,
    gateway: Arc<Gateway>,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
) {
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            // Reap finished connections so the set stays as small as the load.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = accept(&bound) => match accepted {
                Ok(Accepted::Tcp(stream)) => spawn_api(&mut connections, TokioIo::new(stream), &gateway, graceful.watcher()),
                Ok(Accepted::Unix(stream)) => spawn_api(&mut connections, TokioIo::new(stream), &gateway, graceful.watcher()),
                Err(e) => {
                    tracing::error!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    if let Bound::Unix(_, path) = &bound {
        let _ = std::fs::remove_file(path);
    }
    drop(bound);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            open = connections.len(),
            "connections still open after {grace:?}; closing them (usage recorded as cut short)"
        );
        connections.abort_all();
    }
    while connections.join_next().await.is_some() {}
}

enum Accepted {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(bound: &Bound) -> std::io::Result<Accepted> {
    match bound {
        Bound::Tcp(l) => {
            let (stream, _) = l.accept().await?;
            stream.set_nodelay(true)?;
            Ok(Accepted::Tcp(stream))
        }
        Bound::Unix(l, _) => Ok(Accepted::Unix(l.accept().await?.0)),
    }
}

fn spawn_api<I>(
    connections: &mut JoinSet<()>,
    io: TokioIo<I>,
    gateway: &Arc<Gateway>,
    watcher: Watcher,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let gateway = gateway.clone();
    let service = service_fn(move |request| handle(gateway.clone(), request));
    let connection = http1::Builder::new()
        .keep_alive(true)
        .serve_connection(io, service);
    connections.spawn(async move {
        if let Err(e) = watcher.watch(connection).await {
            tracing::debug!(error = %e, "connection ended with an error");
        }
    });
}

/// Serves `/metrics`, `/healthz` and the operator's dashboard until `stop`
/// turns true, sampling the breakers' states for the dashboard meanwhile.
pub async fn serve_admin(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    mut stop: watch::Receiver<bool>,
) {
    let dashboard = Arc::new(Admin::new(gateway.clone()));
    let mut sampling = tokio::time::interval(admin::SAMPLE_EVERY);
    sampling.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = sampling.tick() => dashboard.sample(),
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let gateway = gateway.clone();
                let dashboard = dashboard.clone();
                let service = service_fn(move |request| admin(gateway.clone(), dashboard.clone(), request));
                tokio::spawn(async move {
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                });
            }
        }
    }
}

async fn admin(
    gateway: Arc<Gateway>,
    dashboard: Arc<Admin>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    Ok(match request.uri().path() {
        "/metrics" => {
            let mut response = Response::new(full(gateway.metrics.encode().into()));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            response
        }
        "/healthz" => json_response(StatusCode::OK, r#"{"status":"ok"}"#, "-"),
        _ => dashboard.route(request).await,
    })
}
