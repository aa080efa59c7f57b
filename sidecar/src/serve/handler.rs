//! The HTTP front of the sidecar: checks nginx's shared secret, reads the
//! key's identity from the module's headers, and dispatches by path.

use crate::providers::MessagesEndpoint;
use crate::serve::accounting::Accounting;
use crate::serve::chat::{chat_completions, reject, Caller};
use crate::serve::clock;
use crate::serve::error::{json_response, Body, GatewayError};
use crate::serve::messages::{self, anthropic_client, COUNT_TOKENS_PATH};
use crate::serve::passthrough::passthrough;
use crate::serve::state::Gateway;
use crate::usage::http::{parse_query_string, render_key_usage, render_limits};
use afr_core::endpoint::Endpoint;
use afr_core::error::ErrorShape;
use afr_core::limits::{usd_micros, DurationText, KeyLimits};
use afr_core::validate::Invalid;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;
use subtle::ConstantTimeEq;

/// The future of one request, boxed on its own.
pub type Handling = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

/// Handles one request from nginx.
///
/// The request's future is boxed here rather than left to hyper: hyper's
/// HTTP/1 dispatcher keeps the box it puts a service's future in for as long
/// as the connection lives, which a stream then held for nothing while it was
/// relayed (9 KiB when that was every endpoint's route loop). This box is
/// freed as soon as the response (a stream's head) is ready, and hyper's
/// holds a pointer. Each endpoint's own future is boxed where it is awaited,
/// so this one is small (2.8 KiB) and moving it in copies little.
pub fn handle(gateway: Arc<Gateway>, request: Request<Incoming>) -> Handling {
    Box::pin(handle_request(gateway, request))
}

async fn handle_request(
    gateway: Arc<Gateway>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    let request_id = request_id();
    let runtime = gateway.runtime.load_full();
    let shape = ErrorShape::for_path(request.uri().path().as_bytes());

    let secret = request
        .headers()
        .get("x-afr-secret")
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    if !bool::from(secret.ct_eq(&runtime.secret)) {
        tracing::warn!(request_id = %request_id, path = %request.uri().path(), has_header = !secret.is_empty(), "refused: missing or wrong X-Afr-Secret");
        return Ok(GatewayError::Unauthenticated.respond(shape, &request_id));
    }
    let limits = match header(&request, "x-afr-limits").map(KeyLimits::parse_header) {
        None => KeyLimits::default(),
        Some(Ok(limits)) => limits,
        Some(Err(e)) => {
            // A module newer than this sidecar: refusing is safer than
            // serving a key without the limits its operator set.
            tracing::error!(request_id = %request_id, error = %e, "refused: X-Afr-Limits from nginx not understood");
            let invalid = Invalid {
                param: None,
                message: format!("Gateway error: {e}."),
                code: None,
            };
            return Ok(GatewayError::Invalid(invalid).respond(shape, &request_id));
        }
    };
    if let Some(limits) = header(&request, "x-afr-fleet") {
        gateway.metrics.fleet_request(limits);
    }
    let caller = Caller {
        request_id: request_id.clone(),
        key_id: header(&request, "x-afr-key-id").unwrap_or("-").to_owned(),
        allowed: header(&request, "x-afr-models").map(|list| {
            list.split(',')
                .map(str::trim)
                .filter(|m| !m.is_empty())
                .map(str::to_owned)
                .collect()
        }),
        limits,
        started,
        ts_ms: clock::unix_ms() as i64,
        shape,
        query: request.uri().query().map(str::to_owned),
    };

    let path = request.uri().path().to_owned();
    let (key_id, limits) = (caller.key_id.clone(), caller.limits);
    let response = match (request.method(), path.as_str()) {
        (&Method::POST, "/v1/chat/completions") => {
            // From here on the request owns one usage row, whatever happens.
            let usage = accounting(&gateway, &caller, &request, &path);
            let limit = runtime.config.server.max_body_bytes;
            match read_body(request, limit).await {
                Ok(body) => {
                    Box::pin(chat_completions(
                        gateway.clone(),
                        runtime,
                        caller,
                        usage,
                        body,
                    ))
                    .await
                }
                Err(e) => reject(&caller, usage, e),
            }
        }
        (&Method::POST, "/v1/messages" | COUNT_TOKENS_PATH) => {
            let usage = accounting(&gateway, &caller, &request, &path);
            let client = anthropic_client(request.headers(), request.uri().query());
            let endpoint = if path == COUNT_TOKENS_PATH {
                MessagesEndpoint::CountTokens
            } else {
                MessagesEndpoint::Messages
            };
            let limit = runtime.config.server.max_body_bytes;
            match read_body(request, limit).await {
                Ok(body) => {
                    Box::pin(messages::messages(
                        gateway.clone(),
                        runtime,
                        caller,
                        usage,
                        body,
                        client,
                        endpoint,
                    ))
                    .await
                }
                Err(e) => reject(&caller, usage, e),
            }
        }
        (&Method::POST, "/v1/embeddings" | "/v1/completions" | "/v1/responses") => {
            let usage = accounting(&gateway, &caller, &request, &path);
            let limit = runtime.config.server.max_body_bytes;
            // The arm's paths are exactly the passthrough endpoints.
            let endpoint = Endpoint::from_path(&path).unwrap_or(Endpoint::Embeddings);
            match read_body(request, limit).await {
                Ok(body) => {
                    Box::pin(passthrough(
                        gateway.clone(),
                        runtime,
                        caller,
                        usage,
                        endpoint,
                        body,
                    ))
                    .await
                }
                Err(e) => reject(&caller, usage, e),
            }
        }
        (&Method::GET, "/v1/models") => {
            let list = runtime.config.models_list(caller.allowed.as_deref());
            json_response(StatusCode::OK, list, &request_id)
        }
        (&Method::GET, "/v1/usage") => {
            usage(&gateway, &caller, request.uri().query().unwrap_or("")).await
        }
        (
            method,
            "/v1/chat/completions"
            | "/v1/models"
            | "/v1/usage"
            | "/v1/messages"
            | COUNT_TOKENS_PATH
            | "/v1/embeddings"
            | "/v1/completions"
            | "/v1/responses",
        ) => GatewayError::MethodNotAllowed(method.to_string()).respond(shape, &request_id),
        _ => GatewayError::NotFound(path).respond(shape, &request_id),
    };
    let mut response = response;
    token_headers(&gateway, &key_id, &limits, shape, &mut response);
    Ok(response)
}

// The names parsed once, at compile time: by string, every insert parsed its
// name again (~3 000 instructions a budgeted response, callgrind).
const LIMIT_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-limit-tokens");
const REMAINING_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-tokens");
const RESET_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-reset-tokens");
const ANTHROPIC_LIMIT_TOKENS: HeaderName =
    HeaderName::from_static("anthropic-ratelimit-tokens-limit");
const ANTHROPIC_REMAINING_TOKENS: HeaderName =
    HeaderName::from_static("anthropic-ratelimit-tokens-remaining");
const ANTHROPIC_RESET_TOKENS: HeaderName =
    HeaderName::from_static("anthropic-ratelimit-tokens-reset");
const BUDGET_REMAINING: HeaderName = HeaderName::from_static("x-afr-budget-remaining-usd");

/// OpenAI's `x-ratelimit-*-tokens` headers (and the remaining budget) on
/// every response of a key with such limits, streams included: they are
/// read when the headers are sent, after this request's reservation. On
/// Anthropic's API the same window also goes out under Anthropic's names,
/// `anthropic-ratelimit-tokens-{limit,remaining,reset}`, the reset as an
/// RFC 3339 time (as recorded in tests/fixtures/README.md).
fn token_headers(
    gateway: &Gateway,
    key_id: &str,
    limits: &KeyLimits,
    shape: ErrorShape,
    response: &mut Response<Body>,
) {
    if !limits.reserves() {
        return;
    }
    let wall = clock::unix_ms();
    let now = gateway.ledger_now(wall);
    let ledger = gateway.ledger();
    let headers = response.headers_mut();
    if let Some(tpm) = limits.tpm {
        let state = ledger.tokens(key_id, tpm, now);
        headers.insert(LIMIT_TOKENS, HeaderValue::from(state.limit));
        headers.insert(REMAINING_TOKENS, HeaderValue::from(state.remaining));
        if let Ok(v) = HeaderValue::from_str(DurationText::new(state.reset_ms).as_str()) {
            headers.insert(RESET_TOKENS, v);
        }
        if shape == ErrorShape::Anthropic {
            headers.insert(ANTHROPIC_LIMIT_TOKENS, HeaderValue::from(state.limit));
            headers.insert(
                ANTHROPIC_REMAINING_TOKENS,
                HeaderValue::from(state.remaining),
            );
            // Rounded up to the second: at the time it names, the window is full.
            let reset_ms = (wall + state.reset_ms).div_ceil(1000) * 1000;
            let reset = std::time::UNIX_EPOCH + std::time::Duration::from_millis(reset_ms);
            let reset = humantime::format_rfc3339_seconds(reset).to_string();
            if let Ok(v) = HeaderValue::from_str(&reset) {
                headers.insert(ANTHROPIC_RESET_TOKENS, v);
            }
        }
    }
    if let Some(budget) = limits.budget {
        let left = ledger.budget_remaining(key_id, budget, now);
        if let Ok(v) = HeaderValue::from_str(&usd_micros(left)) {
            headers.insert(BUDGET_REMAINING, v);
        }
    }
}

/// The accounting of a request that gets a usage row, and its span when
/// telemetry is on (started from the request's `traceparent`, before the
/// body is read).
fn accounting(
    gateway: &Arc<Gateway>,
    caller: &Caller,
    request: &Request<Incoming>,
    path: &str,
) -> Accounting {
    let trace = gateway
        .telemetry
        .as_ref()
        .map(|telemetry| telemetry.start(request.headers(), path, caller.started));
    Accounting::new(
        gateway.clone(),
        &caller.request_id,
        &caller.key_id,
        caller.started,
        caller.ts_ms,
    )
    .traced(trace)
}

/// A fresh id for every request: ids in client-supplied headers are not
/// trusted to be unique, and usage rows are keyed by this one. A random
/// per-process prefix and a counter: unique without a syscall per request.
fn request_id() -> String {
    static PREFIX: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = PREFIX.get_or_init(|| uuid::Uuid::new_v4().as_u64_pair().0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // The two numbers' 32 hex digits by uuid's table encoder: `format!` with
    // `{:016x}` twice cost ~2 200 instructions a request (callgrind).
    let mut digits = [0u8; uuid::fmt::Simple::LENGTH];
    let mut id = String::with_capacity(4 + digits.len());
    id.push_str("req_");
    id.push_str(
        uuid::Uuid::from_u64_pair(*prefix, n)
            .simple()
            .encode_lower(&mut digits),
    );
    id
}

fn header<'a>(request: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    request.headers().get(name).and_then(|v| v.to_str().ok())
}

/// Reads the whole body, refusing more than `limit` bytes with 413.
async fn read_body(request: Request<Incoming>, limit: usize) -> Result<Bytes, GatewayError> {
    let declared = request
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(GatewayError::TooLarge(limit));
    }
    match Limited::new(request.into_body(), limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(GatewayError::TooLarge(limit)),
        Err(e) => Err(GatewayError::BodyRead(e.to_string())),
    }
}

/// `GET /v1/usage`: the calling key's own usage.
async fn usage(gateway: &Gateway, caller: &Caller, query: &str) -> Response<Body> {
    let q = match parse_query_string(query, &caller.key_id, caller.ts_ms) {
        Ok(q) => q,
        Err(e) => {
            let invalid = Invalid {
                param: Some(e.param().to_owned()),
                message: e.to_string(),
                code: None,
            };
            return GatewayError::Invalid(invalid).into_response(&caller.request_id);
        }
    };
    let Some(reader) = gateway.reader.clone() else {
        return GatewayError::Usage("no usage store".into()).into_response(&caller.request_id);
    };
    let query = q.clone();
    let rows = tokio::task::spawn_blocking(move || reader.query(&query)).await;
    match rows {
        Ok(Ok(rows)) => {
            let mut body = render_key_usage(&caller.key_id, &q, &rows);
            // The key's own limits, for the dashboard's headroom and burn-down.
            let now = clock::unix_ms();
            let left = caller.limits.budget.map(|budget| {
                let at = gateway.ledger_now(now);
                gateway
                    .ledger()
                    .budget_remaining(&caller.key_id, budget, at)
            });
            body["limits"] = render_limits(&caller.limits, left, now);
            json_response(StatusCode::OK, body.to_string(), &caller.request_id)
        }
        Ok(Err(e)) => {
            tracing::error!(request_id = %caller.request_id, error = %e, "usage query failed");
            GatewayError::Usage(e.to_string()).into_response(&caller.request_id)
        }
        Err(e) => GatewayError::Usage(e.to_string()).into_response(&caller.request_id),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn request_ids_are_a_fixed_prefix_and_a_counter_in_hex() {
        let (a, b) = (super::request_id(), super::request_id());
        for id in [&a, &b] {
            assert_eq!(id.len(), 36, "{id}");
            assert!(id.starts_with("req_"), "{id}");
            assert!(
                id[4..]
                    .bytes()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()),
                "{id}"
            );
        }
        assert_eq!(a[..20], b[..20], "one process, one prefix");
        let n = |id: &str| u64::from_str_radix(&id[20..], 16).expect("hex");
        assert!(n(&b) > n(&a), "{a} then {b}");
    }
}
