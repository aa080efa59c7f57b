//! The operator's usage dashboard on the admin listener (loopback only, like
//! `/metrics`): the page itself, read from `[admin] web` (the package's
//! `/usr/share/afr/web`), and the JSON it draws from. None of this is routed
//! through nginx: the public server reaches only the main listener, and a key
//! holder's own view (`/dashboard/` there) reads `GET /v1/usage`.
//!
//! | path | answer |
//! |---|---|
//! | `/dashboard/` | the operator page (`web/dashboard/operator.html`) and its assets |
//! | `/api/usage` | every key's usage: `GET /v1/usage`'s query string plus `key` and `by=key` |
//! | `/api/providers?since=&until=` | per provider and UTC day: answers, errors, latency |
//! | `/api/breakers` | the breakers' states over the last hour, sampled every 5 s, and now |
//! | `/api/fleet` | whether tpm and budgets are held across a fleet, and how now |
//!
//! The pages and the API answer only requests whose `Host` is a loopback
//! name or address: a web page the operator has open elsewhere cannot read
//! them by pointing its own hostname at 127.0.0.1 (DNS rebinding).

use crate::serve::error::{full, json_response, Body, GatewayError};
use crate::serve::state::Gateway;
use crate::usage::http::{parse_scoped, render_usage, Scope, UsageParamError};
use crate::usage::providers::ProviderQuery;
use crate::usage::time_arg::{format_ms, now_ms, parse_time_arg};
use afr_core::breaker::BreakerState;
use afr_core::validate::Invalid;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use serde_json::{json, Map, Value};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often the breakers' states are sampled into the history.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// Samples kept: one hour at [`SAMPLE_EVERY`], about 60 KB for ten providers.
pub const HISTORY_SAMPLES: usize = 720;

/// The `x-request-id` of the admin listener's answers: they are no API
/// request and have no usage row.
const ADMIN_REQUEST_ID: &str = "admin";

/// What the admin listener's dashboard needs: the gateway and the breaker history.
pub struct Admin {
    gateway: Arc<Gateway>,
    history: Mutex<BreakerHistory>,
}

impl Admin {
    /// The dashboard of `gateway`, with an empty history.
    pub fn new(gateway: Arc<Gateway>) -> Self {
        Admin {
            gateway,
            history: Mutex::new(BreakerHistory::new(HISTORY_SAMPLES)),
        }
    }

    /// Records the breakers' states now (every [`SAMPLE_EVERY`]).
    pub fn sample(&self) {
        let sample = Sample {
            unix_ms: now_ms(),
            states: self.gateway.breaker_states(Instant::now()),
        };
        // Each push leaves the ring valid, so a poisoned lock is still sound.
        self.history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(sample);
    }

    /// Answers one request on the admin listener that is not `/metrics` or
    /// `/healthz`.
    pub async fn route<B>(&self, request: Request<B>) -> Response<Body> {
        let path = request.uri().path().to_owned();
        let query = request.uri().query().unwrap_or("").to_owned();
        if !loopback_host(request.headers().get(http::header::HOST)) {
            return plain(
                StatusCode::FORBIDDEN,
                "the admin listener answers only requests to a loopback name or address\n",
            );
        }
        if path == "/" || path == "/dashboard" {
            return redirect("/dashboard/");
        }
        let known = path.starts_with("/api/") || static_file(&path).is_some();
        if !known {
            return GatewayError::NotFound(path).into_response(ADMIN_REQUEST_ID);
        }
        if request.method() != Method::GET && request.method() != Method::HEAD {
            return GatewayError::MethodNotAllowed(request.method().to_string())
                .into_response(ADMIN_REQUEST_ID);
        }
        match path.as_str() {
            "/api/usage" => self.usage(&query).await,
            "/api/providers" => self.providers(&query).await,
            "/api/breakers" => self.breakers(),
            "/api/fleet" => self.fleet(),
            _ => match static_file(&path) {
                Some(file) => self.file(file).await,
                None => GatewayError::NotFound(path).into_response(ADMIN_REQUEST_ID),
            },
        }
    }

    async fn usage(&self, query: &str) -> Response<Body> {
        let q = match parse_scoped(query, Scope::Operator, now_ms()) {
            Ok(q) => q,
            Err(e) => return invalid(e),
        };
        let Some(reader) = self.gateway.reader.clone() else {
            return GatewayError::Usage("no usage store".into()).into_response(ADMIN_REQUEST_ID);
        };
        let query = q.clone();
        match tokio::task::spawn_blocking(move || reader.query(&query)).await {
            Ok(Ok(rows)) => ok(render_usage(&q, &rows)),
            Ok(Err(e)) => store_failed(e.to_string()),
            Err(e) => store_failed(e.to_string()),
        }
    }

    async fn providers(&self, query: &str) -> Response<Body> {
        let q = match parse_provider_query(query, now_ms()) {
            Ok(q) => q,
            Err(e) => return invalid(e),
        };
        let Some(reader) = self.gateway.reader.clone() else {
            return GatewayError::Usage("no usage store".into()).into_response(ADMIN_REQUEST_ID);
        };
        match tokio::task::spawn_blocking(move || reader.providers(q)).await {
            Ok(Ok(rows)) => ok(json!({
                "object": "list",
                "since": q.since_ms.map(format_ms),
                "until": q.until_ms.map(format_ms),
                "data": rows,
            })),
            Ok(Err(e)) => store_failed(e.to_string()),
            Err(e) => store_failed(e.to_string()),
        }
    }

    fn breakers(&self) -> Response<Body> {
        let now = Sample {
            unix_ms: now_ms(),
            states: self.gateway.breaker_states(Instant::now()),
        };
        let history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        ok(history.render(&now))
    }

    fn fleet(&self) -> Response<Body> {
        ok(match &self.gateway.fleet {
            None => json!({"mode": "single", "redis_up": null, "local_reservations": null}),
            Some(fleet) => json!({
                "mode": if fleet.is_up() { "global" } else { "local" },
                "redis_up": fleet.is_up(),
                "local_reservations": fleet.local_reservations(),
            }),
        })
    }

    async fn file(&self, file: &StaticFile) -> Response<Body> {
        let root: PathBuf = self.gateway.runtime.load().config.admin.web.clone();
        let path = root.join(file.path);
        match tokio::fs::read(&path).await {
            Ok(bytes) => {
                let mut response = Response::new(full(bytes.into()));
                let headers = response.headers_mut();
                headers.insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static(file.content_type),
                );
                headers.insert(
                    http::header::CACHE_CONTROL,
                    HeaderValue::from_static("no-cache"),
                );
                headers.insert(
                    "x-content-type-options",
                    HeaderValue::from_static("nosniff"),
                );
                headers.insert("content-security-policy", HeaderValue::from_static(CSP));
                headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
                response
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "admin dashboard file unreadable; check admin.web");
                plain(
                    StatusCode::NOT_FOUND,
                    &format!(
                        "{} is missing under admin.web ({}): install the web files (scripts/vendor-web fetches the chart library)\n",
                        file.path,
                        root.display()
                    ),
                )
            }
        }
    }
}

/// The pages' policy: their own scripts and styles, data from this listener only.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'";

/// A file the admin listener serves: only these, never a path from the request.
struct StaticFile {
    url: &'static str,
    path: &'static str,
    content_type: &'static str,
}

const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

const STATIC_FILES: &[StaticFile] = &[
    StaticFile {
        url: "/dashboard/",
        path: "dashboard/operator.html",
        content_type: "text/html; charset=utf-8",
    },
    StaticFile {
        url: "/assets/site.css",
        path: "assets/site.css",
        content_type: CSS,
    },
    StaticFile {
        url: "/assets/dashboard.css",
        path: "assets/dashboard.css",
        content_type: CSS,
    },
    StaticFile {
        url: "/assets/favicon.svg",
        path: "assets/favicon.svg",
        content_type: "image/svg+xml",
    },
    StaticFile {
        url: "/assets/charts.js",
        path: "assets/charts.js",
        content_type: JS,
    },
    StaticFile {
        url: "/assets/operator.js",
        path: "assets/operator.js",
        content_type: JS,
    },
    StaticFile {
        url: "/assets/vendor/uPlot.esm.js",
        path: "assets/vendor/uPlot.esm.js",
        content_type: JS,
    },
    StaticFile {
        url: "/assets/vendor/uPlot.min.css",
        path: "assets/vendor/uPlot.min.css",
        content_type: CSS,
    },
];

fn static_file(url: &str) -> Option<&'static StaticFile> {
    STATIC_FILES.iter().find(|f| f.url == url)
}

/// Whether `host` names this machine by a loopback name or address (with
/// or without a port). No `Host` at all (HTTP/1.0 tools) is let through:
/// a browser always sends one.
fn loopback_host(host: Option<&HeaderValue>) -> bool {
    let Some(host) = host else { return true };
    let Ok(host) = host.to_str() else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        // [::1]:9464
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The breakers' states over time: a ring of the last samples.
pub struct BreakerHistory {
    samples: VecDeque<Sample>,
    cap: usize,
}

/// The breakers' states at one time.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// When, Unix ms.
    pub unix_ms: i64,
    /// Each provider's state, by name.
    pub states: Vec<(String, BreakerState)>,
}

impl BreakerHistory {
    /// An empty history keeping at most `cap` samples.
    pub fn new(cap: usize) -> Self {
        BreakerHistory {
            samples: VecDeque::with_capacity(cap.min(1024)),
            cap: cap.max(1),
        }
    }

    /// Adds a sample, forgetting the oldest when full.
    pub fn push(&mut self, sample: Sample) {
        if self.samples.len() == self.cap {
            self.samples.pop_front();
        }
        self.samples.push_back(sample);
    }

    /// The body of `/api/breakers`: every provider seen, and the samples
    /// oldest first ending with `now`:
    ///
    /// ```json
    /// {"interval_ms": 5000, "providers": ["anthropic", "openai"],
    ///  "samples": [{"t": "2026-12-07T10:00:00Z", "unix_ms": 1796637600000,
    ///               "states": {"anthropic": "closed", "openai": "open"}}]}
    /// ```
    pub fn render(&self, now: &Sample) -> Value {
        let mut providers: Vec<&str> = Vec::new();
        let samples: Vec<Value> = self
            .samples
            .iter()
            .chain(std::iter::once(now))
            .map(|s| {
                let mut states = Map::new();
                for (name, state) in &s.states {
                    if !providers.contains(&name.as_str()) {
                        providers.push(name);
                    }
                    states.insert(name.clone(), Value::from(state_name(*state)));
                }
                json!({"t": format_ms(s.unix_ms), "unix_ms": s.unix_ms, "states": states})
            })
            .collect();
        providers.sort_unstable();
        json!({
            "interval_ms": SAMPLE_EVERY.as_millis() as u64,
            "providers": providers,
            "samples": samples,
        })
    }
}

fn state_name(state: BreakerState) -> &'static str {
    match state {
        BreakerState::Closed => "closed",
        BreakerState::HalfOpen => "half_open",
        BreakerState::Open => "open",
    }
}

/// Parses `/api/providers`'s query string: `since` and `until`, as in
/// `GET /v1/usage`.
pub fn parse_provider_query(query: &str, now_ms: i64) -> Result<ProviderQuery, UsageParamError> {
    let query = query.strip_prefix('?').unwrap_or(query);
    let mut q = ProviderQuery::default();
    let mut seen: Vec<String> = Vec::new();
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        if seen.iter().any(|s| *s == name) {
            return Err(UsageParamError::Repeated(name.into_owned()));
        }
        seen.push(name.to_string());
        let slot = match name.as_ref() {
            "since" => &mut q.since_ms,
            "until" => &mut q.until_ms,
            _ => {
                return Err(UsageParamError::Unknown(
                    name.into_owned(),
                    "since or until",
                ))
            }
        };
        let param = if name == "since" { "since" } else { "until" };
        *slot = Some(
            parse_time_arg(&value, now_ms)
                .map_err(|source| UsageParamError::Time { param, source })?,
        );
    }
    if let (Some(since), Some(until)) = (q.since_ms, q.until_ms) {
        if since >= until {
            return Err(UsageParamError::EmptyRange);
        }
    }
    Ok(q)
}

fn ok(body: Value) -> Response<Body> {
    let mut response = json_response(StatusCode::OK, body.to_string(), ADMIN_REQUEST_ID);
    response.headers_mut().insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    response
}

fn invalid(e: UsageParamError) -> Response<Body> {
    GatewayError::Invalid(Invalid {
        param: Some(e.param().to_owned()),
        message: e.to_string(),
        code: None,
    })
    .into_response(ADMIN_REQUEST_ID)
}

fn store_failed(reason: String) -> Response<Body> {
    tracing::error!(error = %reason, "admin dashboard: usage query failed");
    GatewayError::Usage(reason).into_response(ADMIN_REQUEST_ID)
}

fn plain(status: StatusCode, text: &str) -> Response<Body> {
    let mut response = Response::new(full(text.to_owned().into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn redirect(to: &'static str) -> Response<Body> {
    let mut response = Response::new(full(Default::default()));
    *response.status_mut() = StatusCode::FOUND;
    response
        .headers_mut()
        .insert(http::header::LOCATION, HeaderValue::from_static(to));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_795_600_800_000;

    fn sample(unix_ms: i64, openai: BreakerState) -> Sample {
        Sample {
            unix_ms,
            states: vec![
                ("anthropic".into(), BreakerState::Closed),
                ("openai".into(), openai),
            ],
        }
    }

    #[test]
    fn the_history_keeps_the_newest_samples_and_ends_with_now() {
        let mut h = BreakerHistory::new(3);
        for i in 0..5 {
            h.push(sample(NOW + i * 5000, BreakerState::Closed));
        }
        let v = h.render(&sample(NOW + 30_000, BreakerState::Open));
        let samples = v["samples"].as_array().expect("samples");
        assert_eq!(samples.len(), 4, "three kept, then now");
        assert_eq!(samples[0]["unix_ms"], NOW + 10_000);
        assert_eq!(samples[3]["states"]["openai"], "open");
        assert_eq!(samples[3]["states"]["anthropic"], "closed");
        assert_eq!(v["providers"], json!(["anthropic", "openai"]));
        assert_eq!(v["interval_ms"], 5000);
        assert_eq!(state_name(BreakerState::HalfOpen), "half_open");
    }

    #[test]
    fn provider_query_takes_a_range_and_names_a_bad_parameter() {
        let q = parse_provider_query("since=7d", NOW).expect("parse");
        assert_eq!(q.since_ms, Some(NOW - 7 * 86_400_000));
        assert_eq!(q.until_ms, None);
        for (qs, param) in [
            ("since=soon", "since"),
            ("until=x", "until"),
            ("since=1h&since=2h", "since"),
            ("key=a", "key"),
            ("since=1h&until=2h", "since"),
        ] {
            let e = parse_provider_query(qs, NOW).expect_err(qs);
            assert_eq!(e.param(), param, "{qs}: {e}");
        }
    }

    #[test]
    fn only_loopback_hosts_are_answered() {
        let host = |h: &str| loopback_host(Some(&HeaderValue::from_str(h).expect("header")));
        for ok in [
            "127.0.0.1:9464",
            "localhost:9464",
            "LOCALHOST",
            "[::1]:9464",
            "127.0.0.2",
        ] {
            assert!(host(ok), "{ok}");
        }
        for bad in [
            "evil.example:9464",
            "10.0.0.1:9464",
            "[::2]:1",
            "localhost.evil.example",
        ] {
            assert!(!host(bad), "{bad}");
        }
        assert!(loopback_host(None));
    }

    #[test]
    fn only_listed_files_are_served() {
        assert!(static_file("/dashboard/").is_some());
        assert!(static_file("/assets/vendor/uPlot.esm.js").is_some());
        for url in [
            "/assets/../../etc/passwd",
            "/assets/vendor/",
            "/keys.toml",
            "/assets/playground.js",
        ] {
            assert!(static_file(url).is_none(), "{url}");
        }
    }
}
