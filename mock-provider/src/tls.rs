//! The optional TLS listener: HTTP/1.1 and HTTP/2 chosen by ALPN, as real
//! providers serve them, with HTTP/2's concurrent-stream limit set like
//! theirs (100 by default). It lets the gateway's tests reproduce what only
//! shows over TLS: a client that negotiates h2 puts every request on one
//! connection, and requests past the stream limit wait.
//!
//! The certificate is made at start-up: a private CA (written as PEM for the
//! client to trust, e.g. a provider's `ca_file`) and a server certificate for
//! `localhost` and `127.0.0.1` signed by it. Nothing is read from disk.

use std::io;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;

use crate::conn::MockIo;
use crate::server;

/// A freshly made CA and the server configuration using a certificate it signed.
pub struct Identity {
    /// The CA certificate, PEM: what a client must trust.
    pub ca_pem: String,
    /// The TLS server configuration (ALPN `h2`, `http/1.1`).
    pub config: Arc<rustls::ServerConfig>,
}

fn tls_error(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("making the TLS identity: {e}"))
}

/// Makes a CA and a `localhost`/`127.0.0.1` server certificate signed by it.
pub fn identity() -> io::Result<Identity> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().map_err(tls_error)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(tls_error)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "afr-mock test CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca_params.self_signed(&ca_key).map_err(tls_error)?;

    let key = KeyPair::generate().map_err(tls_error)?;
    let mut params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .map_err(tls_error)?;
    params
        .distinguished_name
        .push(DnType::CommonName, "afr-mock");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &ca, &ca_key).map_err(tls_error)?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(tls_error)?
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .map_err(tls_error)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Identity {
        ca_pem: ca.pem(),
        config: Arc::new(config),
    })
}

/// Accepts TLS connections until the task is dropped, serving each with
/// HTTP/2 when the client negotiated `h2` and HTTP/1.1 otherwise. With h2 the
/// `reset` knob aborts the whole connection, every stream on it included.
pub async fn serve(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    state: Arc<server::State>,
    max_concurrent_streams: u32,
) {
    let acceptor = TlsAcceptor::from(config);
    let mut h1 = http1::Builder::new();
    h1.keep_alive(true).timer(TokioTimer::new());
    let h1 = Arc::new(h1);
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.max_concurrent_streams(max_concurrent_streams)
        .timer(TokioTimer::new());
    let h2 = Arc::new(h2);
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                eprintln!("afr-mock: accept (tls): {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let reset = Arc::new(AtomicBool::new(false));
        let acceptor = acceptor.clone();
        let (state, h1, h2) = (state.clone(), h1.clone(), h2.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(MockIo::new(tcp, reset.clone())).await else {
                return;
            };
            let is_h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            let io = TokioIo::new(tls);
            let connection = crate::log::ConnectionId::next();
            let svc = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(connection);
                server::handle(state.clone(), reset.clone(), req)
            });
            if is_h2 {
                let _ = h2.serve_connection(io, svc).await;
            } else {
                let _ = h1.serve_connection(io, svc).await;
            }
        });
    }
}
