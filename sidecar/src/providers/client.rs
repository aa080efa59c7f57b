//! The providers' HTTP client: hyper's pooled client over rustls, with a
//! request builder shaped like the few calls the providers make.
//!
//! Why not reqwest: it parses every request's URL with the `url` crate up to
//! three times (into a `Url`, then again in its redirect layer even with
//! redirects off) and wraps each call in retry and redirect services we never
//! use. Under callgrind that was ~18 000 instructions of a ~185 000-instruction
//! proxied request (bench/results/README.md). hyper-util's client is the same
//! connection pool reqwest drives underneath; what this file adds is the
//! builder (headers, bearer auth, a query string) and the error mapping.

use super::{ProviderError, UpstreamCall};
use afr_core::config::ProviderConfig;
use bytes::Bytes;
use http::header::{HeaderValue, IntoHeaderName, AUTHORIZATION, HOST};
use http::{HeaderMap, Method, Request, Uri};
use http_body_util::Full;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// A provider's answer, its body still to be read (or streamed).
pub type Response = http::Response<UpstreamBody>;

type Pool = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A pooled keep-alive client for one provider.
#[derive(Clone)]
pub struct HttpClient {
    /// HTTP/1.1 keep-alive connections, one per request in flight.
    inner: Pool,
    /// With `http2 = true`: HTTP/2 connections, each carrying up to
    /// `http2_max_streams` requests.
    multiplexed: Option<Multiplexed>,
}

/// The HTTP/2 connections and their streams in flight.
///
/// hyper-util's pool keeps one HTTP/2 connection per host and never opens a
/// second when the server's concurrent-stream limit is reached: the 101st
/// stream waited for a free one, past `first_byte`, and failed over (150
/// streams held against a provider allowing 100: 50 failed after 10 s, each
/// counted against its breaker). So each connection here is a pool of its
/// own (a `Client` of its own keeps its own one connection per host), and a
/// request takes a stream on the first connection with one free, or opens
/// the next connection: 10 000 streams against a provider allowing 100 are
/// 100 connections, not 10 000 (one HTTP/1.1 connection each, ~24 KiB of
/// buffers apiece in the sidecar). Past `http2_max_connections` full
/// connections, requests go over HTTP/1.1 instead.
#[derive(Clone)]
struct Multiplexed {
    lanes: Arc<RwLock<Vec<Lane>>>,
    /// A new connection's pool.
    open: Arc<dyn Fn() -> Pool + Send + Sync>,
    max_streams: usize,
    max_connections: usize,
}

/// One HTTP/2 connection (its own pool) and its streams in flight.
struct Lane {
    pool: Pool,
    in_flight: Arc<AtomicUsize>,
}

impl Lane {
    fn take(&self, max_streams: usize) -> Option<(Pool, Stream)> {
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max_streams).then_some(n + 1)
            })
            .ok()?;
        Some((self.pool.clone(), Stream(self.in_flight.clone())))
    }
}

impl Multiplexed {
    /// A stream on the first connection with one free, on a new connection
    /// when every one is full, or `None` past `max_connections` full ones.
    fn take(&self) -> Option<(Pool, Stream)> {
        let first_free = |lanes: &[Lane]| lanes.iter().find_map(|l| l.take(self.max_streams));
        if let Some(taken) = first_free(&self.lanes.read().unwrap_or_else(|e| e.into_inner())) {
            return Some(taken);
        }
        let mut lanes = self.lanes.write().unwrap_or_else(|e| e.into_inner());
        // Another request may have opened one, or streams ended, meanwhile.
        if let Some(taken) = first_free(&lanes) {
            return Some(taken);
        }
        if lanes.len() >= self.max_connections {
            return None;
        }
        let lane = Lane {
            pool: (self.open)(),
            in_flight: Arc::new(AtomicUsize::new(0)),
        };
        let taken = lane.take(self.max_streams);
        lanes.push(lane);
        taken
    }
}

/// One stream in flight on an HTTP/2 connection, given back when dropped
/// (the answer's body read to its end, or dropped unread).
#[derive(Debug)]
struct Stream(Arc<AtomicUsize>);

impl Drop for Stream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An answer's body; over HTTP/2 it holds its stream until it is dropped.
#[derive(Debug)]
pub struct UpstreamBody {
    inner: hyper::body::Incoming,
    _stream: Option<Stream>,
}

impl hyper::body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl HttpClient {
    /// A client with TCP_NODELAY, the provider's connect timeout, idle
    /// connections kept 90 s, and the provider's CA file trusted besides the
    /// built-in (webpki) roots.
    ///
    /// HTTP/1.1 unless the provider sets `http2 = true` (design §4): over
    /// TLS, h2 negotiated by ALPN puts up to `http2_max_streams` requests on
    /// each connection, up to `http2_max_connections` of them, and the rest
    /// on HTTP/1.1 ([`Multiplexed`]).
    pub fn new(config: &ProviderConfig) -> anyhow::Result<Self> {
        let tls = crate::tls::client_config(config.ca_file.as_deref(), "ca_file")?;

        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(config.timeouts.connect));
        let builder = || {
            HttpsConnectorBuilder::new()
                .with_tls_config(tls.clone())
                .https_or_http()
                .enable_http1()
        };
        let pool = |connector| {
            Client::builder(TokioExecutor::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(Duration::from_secs(90))
                .pool_max_idle_per_host(1024)
                .build(connector)
        };
        let multiplexed = config.http2.then(|| {
            let h2 = builder().enable_http2().wrap_connector(tcp.clone());
            Multiplexed {
                lanes: Arc::new(RwLock::new(Vec::new())),
                open: Arc::new(move || pool(h2.clone())),
                max_streams: config.http2_max_streams as usize,
                max_connections: config.http2_max_connections as usize,
            }
        });
        Ok(HttpClient {
            inner: pool(builder().wrap_connector(tcp)),
            multiplexed,
        })
    }

    /// Starts a POST to `uri`.
    pub fn post(&self, uri: impl IntoUri) -> Outgoing<'_> {
        Outgoing {
            client: self,
            uri: uri.into_uri(),
            headers: HeaderMap::new(),
            body: Bytes::new(),
            invalid: None,
        }
    }
}

/// What a request can be addressed with: a pre-parsed [`Uri`] (the
/// providers keep their fixed endpoints parsed) or a string built per call.
pub trait IntoUri {
    /// The parsed URI, or why it is not one.
    fn into_uri(self) -> Result<Uri, String>;
}

impl IntoUri for &Uri {
    fn into_uri(self) -> Result<Uri, String> {
        Ok(self.clone())
    }
}

impl IntoUri for String {
    fn into_uri(self) -> Result<Uri, String> {
        Uri::try_from(self).map_err(|e| e.to_string())
    }
}

impl IntoUri for &String {
    fn into_uri(self) -> Result<Uri, String> {
        Uri::try_from(self.as_str()).map_err(|e| e.to_string())
    }
}

/// A request being built; [`Outgoing::send`] sends it.
pub struct Outgoing<'a> {
    client: &'a HttpClient,
    uri: Result<Uri, String>,
    headers: HeaderMap,
    body: Bytes,
    /// The first header that could not be built (reported by `send`).
    invalid: Option<String>,
}

impl Outgoing<'_> {
    /// Sets a header (replacing one of the same name). A value that is not a
    /// valid header value (a key with a newline) fails the send.
    pub fn header<V>(mut self, name: impl IntoHeaderName, value: V) -> Self
    where
        V: TryInto<HeaderValue>,
    {
        match value.try_into() {
            Ok(value) => {
                self.headers.insert(name, value);
            }
            Err(_) => {
                // The value may be a key: never echoed.
                self.invalid
                    .get_or_insert_with(|| "a request header value is not valid".to_owned());
            }
        }
        self
    }

    /// The headers that tie the call to the gateway's request: its id
    /// (`x-request-id`) and, when telemetry is on, the attempt's span
    /// (`traceparent`), so a provider's own traces continue the gateway's.
    pub fn correlate(self, call: &UpstreamCall) -> Self {
        let mut this = self.header("x-request-id", &call.request_id);
        if let Some(traceparent) = &call.traceparent {
            this.headers.insert("traceparent", traceparent.clone());
        }
        this
    }

    /// `Authorization: Bearer <key>`, marked sensitive (never logged by hyper).
    pub fn bearer_auth(mut self, key: &str) -> Self {
        match HeaderValue::try_from(format!("Bearer {key}")) {
            Ok(mut value) => {
                value.set_sensitive(true);
                self.headers.insert(AUTHORIZATION, value);
            }
            Err(_) => {
                self.invalid
                    .get_or_insert_with(|| "invalid API key for Authorization".to_owned());
            }
        }
        self
    }

    /// Appends the client's own query string (raw, as it sent it) to the
    /// URI, less any parameter named in `owned` (the provider sets those
    /// itself, such as Azure's `api-version`): parameters the gateway does
    /// not know reach a provider of the client's wire untouched.
    pub fn client_query(mut self, raw: Option<&str>, owned: &[&str]) -> Self {
        let Some(raw) = raw.filter(|q| !q.is_empty()) else {
            return self;
        };
        let kept: Vec<&str> = raw
            .split('&')
            .filter(|part| !part.is_empty())
            .filter(|part| {
                let name = part.split('=').next().unwrap_or_default();
                let name: String = form_urlencoded::parse(name.as_bytes())
                    .next()
                    .map(|(k, _)| k.into_owned())
                    .unwrap_or_default();
                !owned.contains(&name.as_str())
            })
            .collect();
        if !kept.is_empty() {
            self.append_query(&kept.join("&"));
        }
        self
    }

    /// Appends `pairs` to the URI's query, form-encoded.
    pub fn query(mut self, pairs: &[(&str, &str)]) -> Self {
        let mut query = form_urlencoded::Serializer::new(String::new());
        query.extend_pairs(pairs);
        self.append_query(&query.finish());
        self
    }

    /// Appends `suffix` (already encoded) to the URI's query: an existing
    /// query is kept, the suffix after a `&`.
    fn append_query(&mut self, suffix: &str) {
        let Ok(uri) = &self.uri else {
            return;
        };
        let path_and_query = match uri.query() {
            Some(existing) if !existing.is_empty() => format!("{}?{existing}&{suffix}", uri.path()),
            _ => format!("{}?{suffix}", uri.path()),
        };
        let mut parts = uri.clone().into_parts();
        self.uri = path_and_query
            .parse()
            .map_err(|e: http::uri::InvalidUri| e.to_string())
            .and_then(|pq| {
                parts.path_and_query = Some(pq);
                Uri::from_parts(parts).map_err(|e| e.to_string())
            });
    }

    /// The request body.
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    /// Sends the request; the answer's status and headers are in when this
    /// returns, its body is still to be read.
    pub async fn send(self) -> Result<Response, SendError> {
        if let Some(invalid) = self.invalid {
            return Err(SendError::Build(invalid));
        }
        let uri = self.uri.map_err(SendError::Build)?;
        let mut request = Request::new(Full::new(self.body));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = uri;
        *request.headers_mut() = self.headers;
        // A free stream of an HTTP/2 connection, else the HTTP/1.1 pool.
        let (h2, stream) = match self.client.multiplexed.as_ref().and_then(Multiplexed::take) {
            Some((pool, stream)) => (Some(pool), Some(stream)),
            None => (None, None),
        };
        if h2.is_none() && !request.headers().contains_key(HOST) {
            if let Some(host) = host_header(request.uri()) {
                request.headers_mut().insert(HOST, host);
            }
        }
        let pool = h2.as_ref().unwrap_or(&self.client.inner);
        let response = pool.request(request).await.map_err(SendError::Client)?;
        Ok(response.map(|inner| UpstreamBody {
            inner,
            _stream: stream,
        }))
    }
}

/// The `Host` header of an HTTP/1.1 request to `uri`: its host, and its port
/// unless it is the scheme's default. hyper-util's client would write the
/// same, but with `format!` on every request (~2 500 instructions under
/// callgrind, 2% of a proxied request); this copies the authority as written.
/// `None` (hyper-util words it) for an authority with user info.
fn host_header(uri: &Uri) -> Option<HeaderValue> {
    let authority = uri.authority()?;
    if authority.as_str().contains('@') {
        return None;
    }
    let secure = matches!(uri.scheme_str(), Some("https" | "wss"));
    let value = match (authority.port_u16(), secure) {
        (None, _) | (Some(443), true) | (Some(80), false) => authority.host(),
        _ => authority.as_str(),
    };
    HeaderValue::from_str(value).ok()
}

/// Why a request could not be sent or got no answer.
#[derive(Debug)]
pub enum SendError {
    /// The request could not be built (bad URL or header value: a config error).
    Build(String),
    /// Connecting, TLS, or the exchange failed.
    Client(hyper_util::client::legacy::Error),
}

/// Maps a failure on send to a provider error: a connect timeout is
/// `Timeout("connect")`, anything else a connection error whose message is
/// the error's chain (it names neither the URL's query nor any header, so no
/// key leaks).
pub(crate) fn send_error(e: SendError) -> ProviderError {
    match e {
        SendError::Build(why) => ProviderError::Connect(why),
        SendError::Client(e) => {
            let mut timed_out = false;
            let mut local = false;
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                if let Some(io) = cause.downcast_ref::<std::io::Error>() {
                    timed_out |= io.kind() == std::io::ErrorKind::TimedOut;
                    local |= is_local_exhaustion(io);
                }
                source = cause.source();
            }
            if local && e.is_connect() {
                ProviderError::Local(error_chain(&e))
            } else if timed_out && e.is_connect() {
                ProviderError::Timeout("connect")
            } else {
                ProviderError::Connect(error_chain(&e))
            }
        }
    }
}

/// Whether a connect failed for want of the gateway's own resources: no
/// descriptor for the socket (`EMFILE`, `ENFILE`), no kernel memory or
/// buffers, or no free ephemeral port (`EADDRNOTAVAIL`).
fn is_local_exhaustion(io: &std::io::Error) -> bool {
    matches!(
        io.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL)
    )
}

/// An error and its causes, `: `-separated (hyper's own messages are terse:
/// "error reading a body from connection" says why only in its source).
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// Where a provider's calls go, read off its `base_url` once, when it is
/// built: an attempt's span names it (`server.address`, `server.port`).
#[derive(Debug, Clone, PartialEq)]
pub struct Server {
    pub address: Arc<str>,
    pub port: u16,
}

impl Server {
    /// The host and port of `base_url` (the scheme's port when it names none).
    pub fn of(base_url: &str) -> Option<Server> {
        let uri: http::Uri = base_url.parse().ok()?;
        let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
            Some("http") => 80,
            _ => 443,
        });
        Some(Server {
            address: Arc::from(uri.host()?),
            port,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_provider_s_server_is_its_base_url_s_host_and_port() {
        let server = |url: &str| Server::of(url).map(|s| (s.address.to_string(), s.port));
        assert_eq!(
            server("https://api.openai.com/v1"),
            Some(("api.openai.com".into(), 443))
        );
        assert_eq!(
            server("http://127.0.0.1:8080/v1"),
            Some(("127.0.0.1".into(), 8080))
        );
        assert_eq!(server("http://mock/v1"), Some(("mock".into(), 80)));
        assert_eq!(server("not a url"), None);
    }

    #[test]
    fn the_host_header_is_the_authority_less_a_default_port() {
        let host = |uri: &str| {
            host_header(&uri.parse().expect("a URI")).map(|v| v.to_str().expect("ASCII").to_owned())
        };
        assert_eq!(
            host("https://api.openai.com/v1/chat").as_deref(),
            Some("api.openai.com")
        );
        assert_eq!(
            host("https://api.openai.com:443/v1").as_deref(),
            Some("api.openai.com")
        );
        assert_eq!(host("http://127.0.0.1:80/v1").as_deref(), Some("127.0.0.1"));
        assert_eq!(
            host("http://127.0.0.1:8080/v1").as_deref(),
            Some("127.0.0.1:8080")
        );
        assert_eq!(host("https://mock:80/v1").as_deref(), Some("mock:80"));
        assert_eq!(host("http://[::1]:9000/v1").as_deref(), Some("[::1]:9000"));
        assert_eq!(host("http://[::1]/v1").as_deref(), Some("[::1]"));
        // User info is left to hyper-util, which drops it.
        assert_eq!(host("http://user:pw@mock/v1"), None);
        assert_eq!(host("/v1/chat"), None);
    }

    fn config(toml: &str) -> ProviderConfig {
        toml::from_str(toml).expect("a provider config")
    }

    #[test]
    fn query_pairs_are_appended_form_encoded() {
        let client = HttpClient::new(&config(
            "kind = \"azure\"\nbase_url = \"https://x.example\"\napi_version = \"v\"",
        ))
        .expect("client");
        let out = client
            .post("https://x.example/a/b?z=1".to_owned())
            .query(&[("api-version", "2024-10-21 &x")]);
        assert_eq!(
            out.uri.expect("uri").to_string(),
            "https://x.example/a/b?z=1&api-version=2024-10-21+%26x"
        );
    }

    #[test]
    fn the_clients_query_goes_as_sent_less_what_the_provider_owns() {
        let client = HttpClient::new(&config(
            "kind = \"azure\"\nbase_url = \"https://x.example\"\napi_version = \"v\"",
        ))
        .expect("client");
        let out = client
            .post("https://x.example/a".to_owned())
            .client_query(
                Some("x=a%20b&api-version=old&flag&api%2Dversion=2"),
                &["api-version"],
            )
            .query(&[("api-version", "v")]);
        assert_eq!(
            out.uri.expect("uri").to_string(),
            "https://x.example/a?x=a%20b&flag&api-version=v"
        );
        let none = client
            .post("https://x.example/a".to_owned())
            .client_query(None, &[]);
        assert_eq!(none.uri.expect("uri").to_string(), "https://x.example/a");
    }

    #[test]
    fn a_key_that_is_not_a_header_value_fails_the_send_not_the_process() {
        let client = HttpClient::new(&config(
            "kind = \"openai\"\nbase_url = \"http://127.0.0.1:9\"",
        ))
        .expect("client");
        let out = client
            .post("http://127.0.0.1:9/v1".to_owned())
            .bearer_auth("sk-with\nnewline");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let error = rt.block_on(out.send()).expect_err("refused");
        let error = send_error(error);
        assert!(!error.to_string().contains("sk-with"), "{error}");
    }

    #[test]
    fn a_ca_file_without_certificates_is_a_config_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate\n").expect("write");
        let error = HttpClient::new(&config(&format!(
            "kind = \"openai\"\nbase_url = \"https://x\"\nca_file = \"{}\"",
            path.display()
        )))
        .err()
        .expect("refused");
        assert!(
            error.to_string().contains("holds no PEM certificate"),
            "{error}"
        );
    }
}
