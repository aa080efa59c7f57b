//! Request routing: the provider endpoints (auth, latency, injected faults,
//! then the wire-format module) and the `/_mock/*` control endpoints.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{HeaderMap, Method, Request, Response, StatusCode};
use serde_json::Value;

use crate::conn::MockBody;
use crate::faults::{self, Api, FailureState};
use crate::knobs::Knobs;
use crate::log::{Entry, Outcome, RequestLog};
use crate::stream::{self, StreamCtx, StreamPlan};
use crate::usage::Billed;
use crate::{anthropic, endpoints, openai};

/// Largest request body the mock reads.
const MAX_BODY: usize = 32 << 20;

/// One mock instance: its settings, runtime knobs, failure state and log.
pub struct State {
    api_key: Option<String>,
    knobs: RwLock<Arc<Knobs>>,
    failures: FailureState,
    ids: AtomicU64,
    /// The request log.
    pub log: RequestLog,
}

impl State {
    /// A new instance with its default knobs.
    pub fn new(api_key: Option<String>, knobs: Knobs, log_capacity: usize) -> Self {
        let failures = FailureState::default();
        failures.reset(&knobs);
        State {
            api_key,
            knobs: RwLock::new(Arc::new(knobs)),
            failures,
            ids: AtomicU64::new(0),
            log: RequestLog::new(log_capacity),
        }
    }

    fn knobs(&self) -> Arc<Knobs> {
        self.knobs.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_knobs(&self, k: Knobs) {
        self.failures.reset(&k);
        *self.knobs.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(k);
    }
}

/// Everything a wire-format module needs to answer one request.
pub struct Ctx {
    /// The instance.
    pub state: Arc<State>,
    /// The request's effective knobs.
    pub knobs: Knobs,
    /// The request's log entry.
    pub entry: Arc<Entry>,
    /// The connection's reset flag.
    pub reset: Arc<AtomicBool>,
    /// Value of the provider's request-id header.
    pub request_id: String,
    /// Per-instance number for response ids (never reset).
    pub id_seq: u64,
}

impl Ctx {
    /// A `text/event-stream` 200 whose events `plan` produces, honouring the
    /// request's stream knobs.
    pub fn stream_response(&self, plan: StreamPlan) -> Response<MockBody> {
        let body = stream::spawn(
            plan,
            StreamCtx {
                knobs: self.knobs.clone(),
                entry: self.entry.clone(),
                state: self.state.clone(),
                reset: self.reset.clone(),
            },
        );
        let mut resp = Response::new(body);
        resp.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream; charset=utf-8"),
        );
        resp
    }

    /// Records what a 200 answer bills.
    pub fn bill(&self, billed: Billed) {
        self.entry.progress().billed = Some(billed);
    }

    /// Records a complete (non-streamed) answer.
    pub fn finish(&self, status: u16) {
        let mut p = self.entry.progress();
        p.status = Some(status);
        p.outcome = Outcome::Completed;
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Marks the request as cancelled by the client if hyper drops the handler
/// before it returned (the connection closed while we were waiting).
struct DisconnectGuard<'a> {
    state: &'a State,
    entry: &'a Entry,
    armed: bool,
}

impl Drop for DisconnectGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.state.log.client_disconnected(self.entry);
        }
    }
}

fn json(status: StatusCode, v: &Value) -> Response<MockBody> {
    let mut r = Response::new(MockBody::full(v.to_string()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

enum Route {
    OpenAi,
    /// `/v1/embeddings`, `/v1/completions`, `/v1/responses` (the path's last
    /// segment), or an Azure deployment's embeddings/completions.
    Endpoint(&'static str, Option<String>),
    Azure(String),
    Anthropic,
    /// `POST /v1/messages/count_tokens`.
    AnthropicCount,
    Models,
    Unknown,
}

fn route(method: &Method, path: &str) -> Route {
    match (method, path) {
        (&Method::POST, "/v1/chat/completions" | "/openai/v1/chat/completions") => Route::OpenAi,
        (&Method::POST, "/v1/messages") => Route::Anthropic,
        (&Method::POST, "/v1/messages/count_tokens") => Route::AnthropicCount,
        (&Method::POST, "/v1/embeddings") => Route::Endpoint("embeddings", None),
        (&Method::POST, "/v1/completions") => Route::Endpoint("completions", None),
        (&Method::POST, "/v1/responses") => Route::Endpoint("responses", None),
        (&Method::GET, "/v1/models" | "/openai/v1/models") => Route::Models,
        (&Method::POST, p) => {
            let Some(rest) = p.strip_prefix("/openai/deployments/") else {
                return Route::Unknown;
            };
            let Some((dep, tail)) = rest.split_once('/') else {
                return Route::Unknown;
            };
            if dep.is_empty() {
                return Route::Unknown;
            }
            match tail {
                "chat/completions" => Route::Azure(dep.to_owned()),
                "embeddings" => Route::Endpoint("embeddings", Some(dep.to_owned())),
                "completions" => Route::Endpoint("completions", Some(dep.to_owned())),
                _ => Route::Unknown,
            }
        }
        _ => Route::Unknown,
    }
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    h.get(name).map(HeaderValue::as_bytes)
}

fn bearer_ok(h: &HeaderMap, key: &str) -> bool {
    header(h, "authorization")
        .and_then(|v| v.strip_prefix(b"Bearer "))
        .is_some_and(|v| v == key.as_bytes())
}

/// The hyper service: one call per request.
pub async fn handle(
    state: Arc<State>,
    reset: Arc<AtomicBool>,
    req: Request<Incoming>,
) -> Result<Response<MockBody>, Infallible> {
    if let Some(ctl) = req.uri().path().strip_prefix("/_mock/") {
        return Ok(control(&state, ctl.to_owned(), req).await);
    }
    let route = route(req.method(), req.uri().path());
    let (parts, incoming) = req.into_parts();
    let body = match Limited::new(incoming, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let api = match route {
        Route::Anthropic | Route::AnthropicCount => Api::Anthropic,
        Route::Azure(_) | Route::Endpoint(_, Some(_)) => Api::Azure,
        _ => Api::OpenAi,
    };
    let log_api = match route {
        Route::Models => "models",
        Route::Unknown => "unknown",
        Route::Endpoint(name, _) => name,
        _ => api.name(),
    };
    let entry = state.log.record(log_api, &parts, body.clone());
    let mut guard = DisconnectGuard {
        state: &state,
        entry: &entry,
        armed: true,
    };
    let id_seq = state.ids.fetch_add(1, Ordering::Relaxed) + 1;
    let request_id = format!("req_afrmock{id_seq:016}");
    let resp = answer(
        &state, &entry, route, api, &parts, &body, reset, request_id, id_seq,
    )
    .await;
    {
        let mut p = entry.progress();
        if p.status.is_none() {
            p.status = Some(resp.status().as_u16());
        }
        if !p.stream && p.outcome == Outcome::InFlight {
            p.outcome = Outcome::Completed;
        }
    }
    guard.armed = false;
    Ok(resp)
}

#[allow(clippy::too_many_arguments)]
async fn answer(
    state: &Arc<State>,
    entry: &Arc<Entry>,
    route: Route,
    api: Api,
    parts: &hyper::http::request::Parts,
    body: &Bytes,
    reset: Arc<AtomicBool>,
    request_id: String,
    id_seq: u64,
) -> Response<MockBody> {
    let h = &parts.headers;
    let knobs = match state.knobs().with_headers(h) {
        Ok(k) => k,
        Err(bad) => {
            let msg = format!("afr-mock: invalid {} header", bad.0);
            return faults::invalid_request(api, &msg, None, &request_id);
        }
    };
    if knobs.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(knobs.latency_ms)).await;
    }
    // Authentication, as each provider does it.
    if let Some(key) = &state.api_key {
        let ok = match (&route, api) {
            (_, Api::Anthropic) => header(h, "x-api-key") == Some(key.as_bytes()),
            (Route::Azure(_) | Route::Endpoint(_, Some(_)), _) => {
                header(h, "api-key") == Some(key.as_bytes()) || bearer_ok(h, key)
            }
            _ if parts.uri.path().starts_with("/openai/") => {
                header(h, "api-key") == Some(key.as_bytes()) || bearer_ok(h, key)
            }
            _ => bearer_ok(h, key),
        };
        if !ok {
            return faults::error_response(api, 401, "", &request_id);
        }
    }
    match route {
        Route::Models => {
            entry.progress().billed = Some(Billed::default());
            return openai::models();
        }
        Route::Unknown => {
            let msg = format!("Invalid URL ({} {})", parts.method, parts.uri.path());
            let v = serde_json::json!({"error": {"message": msg, "type": "invalid_request_error", "param": null, "code": null}});
            return json(StatusCode::NOT_FOUND, &v);
        }
        Route::Azure(_) | Route::Endpoint(_, Some(_))
            if !parts
                .uri
                .query()
                .is_some_and(|q| q.contains("api-version=")) =>
        {
            return faults::error_response(Api::Azure, 404, "", &request_id);
        }
        _ => {}
    }
    if api == Api::Anthropic && h.get("anthropic-version").is_none() {
        return faults::invalid_request(
            api,
            "anthropic-version: header is required",
            None,
            &request_id,
        );
    }
    let parsed: Value = match serde_json::from_slice(body) {
        Ok(v @ Value::Object(_)) => v,
        _ => {
            let msg = "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON.)";
            return faults::invalid_request(api, msg, None, &request_id);
        }
    };
    let model = parsed.get("model").and_then(Value::as_str).unwrap_or("");
    if let Some(status) = state.failures.injected_status(&knobs) {
        let mut resp = faults::error_response(api, status, model, &request_id);
        if let Some(v) = knobs
            .retry_after
            .as_deref()
            .and_then(|v| HeaderValue::from_str(v).ok())
        {
            resp.headers_mut().insert(hyper::header::RETRY_AFTER, v);
        }
        return resp;
    }
    let valid = match (&route, api) {
        (Route::AnthropicCount, _) => anthropic::validate_count(&parsed),
        (Route::Endpoint(name, dep), _) => {
            let mut body = parsed.clone();
            if let Some(dep) = dep {
                // Azure names the model by the deployment in the URL.
                body["model"] = Value::String(dep.clone());
            }
            endpoints::validate(name, &body)
        }
        (_, Api::Anthropic) => anthropic::validate(&parsed),
        _ => openai::validate(&parsed, api == Api::Azure),
    };
    if let Err((msg, param)) = valid {
        return faults::invalid_request(api, msg, Some(param), &request_id);
    }
    let stream = parsed.get("stream").and_then(Value::as_bool) == Some(true);
    if knobs.reset_before_response {
        reset.store(true, Ordering::Relaxed);
        entry.progress().outcome = Outcome::Reset;
        return Response::new(MockBody::full(Bytes::new()));
    }
    let drip_ms = knobs.drip_ms;
    if let Some((resp, billed)) = broken_answer(&knobs, stream, model) {
        let mut p = entry.progress();
        p.stream = stream;
        p.billed = Some(billed);
        drop(p);
        return dripped(resp, drip_ms);
    }
    if !stream {
        if knobs.ttft_ms > 0 {
            tokio::time::sleep(Duration::from_millis(knobs.ttft_ms)).await;
        }
        if knobs.reset_after_chunks.is_some() {
            // hyper's first write fails and the connection closes with a RST.
            reset.store(true, Ordering::Relaxed);
            entry.progress().outcome = Outcome::Reset;
            return Response::new(MockBody::full(Bytes::new()));
        }
    }
    let ctx = Ctx {
        state: state.clone(),
        knobs,
        entry: entry.clone(),
        reset,
        request_id,
        id_seq,
    };
    let resp = match route {
        Route::Anthropic => anthropic::respond(ctx, &parsed),
        Route::AnthropicCount => anthropic::count_tokens(ctx, &parsed),
        Route::Azure(dep) => openai::respond(ctx, &parsed, Api::Azure, Some(&dep)),
        Route::Endpoint("embeddings", dep) => endpoints::embeddings(ctx, &parsed, dep.as_deref()),
        Route::Endpoint("completions", dep) => endpoints::completions(ctx, &parsed, dep.as_deref()),
        Route::Endpoint(_, _) => endpoints::responses(ctx, &parsed),
        _ => openai::respond(ctx, &parsed, Api::OpenAi, None),
    };
    dripped(resp, drip_ms)
}

/// The 200 answers that are not a well-formed reply (`non_json`,
/// `stall_after_headers`, `body_bytes`) and what each bills (what its body
/// reports: only a non-streamed `body_bytes` reply has a usage, 1 + 1), or
/// `None` for a normal answer.
fn broken_answer(k: &Knobs, stream: bool, model: &str) -> Option<(Response<MockBody>, Billed)> {
    let mut billed = Billed::default();
    let content_type = if stream {
        "text/event-stream; charset=utf-8"
    } else {
        "application/json"
    };
    let (body, content_type) = if k.non_json {
        (
            MockBody::full(Bytes::from_static(
                b"<html><head><title>502 Bad Gateway</title></head><body>upstream unavailable</body></html>\n",
            )),
            "text/html",
        )
    } else if k.stall_after_headers {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        // Holds the body open, silent, until the client leaves.
        tokio::spawn(async move { tx.closed().await });
        (MockBody::Channel(rx), content_type)
    } else if let Some(size) = k.body_bytes {
        let model = serde_json::to_string(model).unwrap_or_else(|_| "\"\"".to_owned());
        let (head, tail) = if stream {
            (
                format!("data: {{\"id\":\"chatcmpl-afrmockbig\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":{model},\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\""),
                "\"},\"finish_reason\":null}]}\n\ndata: [DONE]\n\n".to_owned(),
            )
        } else {
            billed = Billed {
                input: 1,
                output: 1,
                ..Billed::default()
            };
            (
                format!("{{\"id\":\"chatcmpl-afrmockbig\",\"object\":\"chat.completion\",\"created\":0,\"model\":{model},\"choices\":[{{\"index\":0,\"message\":{{\"role\":\"assistant\",\"content\":\""),
                "\"},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1,\"total_tokens\":2}}".to_owned(),
            )
        };
        (huge(head, size, tail), content_type)
    } else {
        return None;
    };
    let mut resp = Response::new(body);
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    Some((resp, billed))
}

/// A body of `head`, `size` bytes of filler, then `tail`, generated while it
/// is sent so a 50 MB answer costs the mock no 50 MB buffer.
fn huge(head: String, size: u64, tail: String) -> MockBody {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        const PIECE: usize = 64 << 10;
        let filler = Bytes::from(vec![b'x'; PIECE]);
        if tx.send(Ok(Bytes::from(head))).await.is_err() {
            return;
        }
        let mut left = size;
        while left > 0 {
            let n = left.min(PIECE as u64) as usize;
            if tx.send(Ok(filler.slice(..n))).await.is_err() {
                return;
            }
            left -= n as u64;
        }
        let _ = tx.send(Ok(Bytes::from(tail))).await;
    });
    MockBody::Channel(rx)
}

/// `resp` with its body sent one byte at a time, `ms` apart (`drip_ms`).
fn dripped(resp: Response<MockBody>, ms: u64) -> Response<MockBody> {
    if ms == 0 {
        return resp;
    }
    let (parts, mut inner) = resp.into_parts();
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        while let Some(frame) = inner.frame().await {
            let data = match frame {
                Ok(f) => match f.into_data() {
                    Ok(d) => d,
                    Err(_) => continue,
                },
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            for i in 0..data.len() {
                if tx.send(Ok(data.slice(i..=i))).await.is_err() {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
                    _ = tx.closed() => return,
                }
            }
        }
    });
    Response::from_parts(parts, MockBody::Channel(rx))
}

async fn control(state: &State, what: String, req: Request<Incoming>) -> Response<MockBody> {
    match (req.method().clone(), what.as_str()) {
        (Method::GET, "requests") => json(StatusCode::OK, &state.log.to_json()),
        (Method::GET, "billing") => json(StatusCode::OK, &state.log.billing()),
        (Method::DELETE, "requests") => {
            state.log.clear();
            json(StatusCode::OK, &serde_json::json!({"cleared": true}))
        }
        (Method::GET, "config") => json(StatusCode::OK, &serde_json::json!(*state.knobs())),
        (Method::POST | Method::PUT, "config") => {
            let body = match Limited::new(req.into_body(), 1 << 20).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => Bytes::new(),
            };
            match serde_json::from_slice::<Knobs>(&body) {
                Ok(k) => {
                    state.set_knobs(k);
                    json(StatusCode::OK, &serde_json::json!(*state.knobs()))
                }
                Err(e) => json(
                    StatusCode::BAD_REQUEST,
                    &serde_json::json!({"error": {"message": format!("afr-mock: bad config: {e}"), "type": "invalid_request_error", "param": null, "code": null}}),
                ),
            }
        }
        (Method::GET, "health") => json(StatusCode::OK, &serde_json::json!({"ok": true})),
        _ => json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": {"message": "afr-mock: unknown control endpoint", "type": "invalid_request_error", "param": null, "code": null}}),
        ),
    }
}
