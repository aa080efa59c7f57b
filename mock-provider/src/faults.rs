//! Injected failures: which request fails, and the provider-shaped error body
//! it gets. Bodies come from the recorded fixtures in `tests/fixtures/` where a
//! recording exists, otherwise they follow the provider's documented shape.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};

use crate::conn::MockBody;
use crate::knobs::Knobs;

const OPENAI_400: &str = include_str!("../../tests/fixtures/openai-error-400.json");
const OPENAI_401: &str = include_str!("../../tests/fixtures/openai-error-401.json");
const OPENAI_429: &str = include_str!("../../tests/fixtures/openai-error-429.json");
const ANTHROPIC_400: &str = include_str!("../../tests/fixtures/anthropic-error.json");
const ANTHROPIC_529: &str = include_str!("../../tests/fixtures/anthropic-error-529.json");
/// Anthropic's mid-stream error event, as recorded.
pub const ANTHROPIC_STREAM_ERROR: &str =
    include_str!("../../tests/fixtures/anthropic-error-stream.sse");
/// The mid-stream error event the OpenAI SDKs turn into `APIError`.
pub const OPENAI_STREAM_ERROR: &str = "data: {\"error\":{\"message\":\"The server had an error while processing your request. Sorry about that!\",\"type\":\"server_error\",\"param\":null,\"code\":null}}\n\n";

/// Which wire format an error body must follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    /// api.openai.com and compatibles.
    OpenAi,
    /// Azure OpenAI deployment URLs.
    Azure,
    /// Anthropic Messages API.
    Anthropic,
}

impl Api {
    /// The name used in the request log.
    pub fn name(self) -> &'static str {
        match self {
            Api::OpenAi => "openai",
            Api::Azure => "azure",
            Api::Anthropic => "anthropic",
        }
    }
}

/// Instance-wide failure state: the `fail_first` countdown and the
/// deterministic sequence behind `fail_percent`.
#[derive(Default)]
pub struct FailureState {
    fail_first_left: AtomicU32,
    rng: AtomicU64,
    /// Requests seen since the last reset, for `fail_every`.
    seen: AtomicU64,
}

impl FailureState {
    /// Restarts the `fail_first` countdown and the random sequence.
    pub fn reset(&self, knobs: &Knobs) {
        self.fail_first_left
            .store(knobs.fail_first, Ordering::Relaxed);
        self.rng.store(0, Ordering::Relaxed);
        self.seen.store(0, Ordering::Relaxed);
    }

    /// The error status to inject into this request, if any.
    pub fn injected_status(&self, k: &Knobs) -> Option<u16> {
        // A status below 400 (e.g. `X-Mock-Status: 200`) overrides an
        // instance-level failure with a normal answer.
        match k.status {
            Some(s) if s >= 400 => return Some(s),
            Some(_) => return None,
            None => {}
        }
        if self
            .fail_first_left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
        {
            return Some(k.fail_status());
        }
        if k.fail_every > 0 {
            let n = self.seen.fetch_add(1, Ordering::Relaxed);
            if n.is_multiple_of(u64::from(k.fail_every)) {
                return Some(k.fail_status());
            }
        }
        if k.fail_percent > 0 {
            // splitmix64 over a counter: cheap, lock-free, reproducible per run.
            let mut z = self
                .rng
                .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
                .wrapping_add(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            if z % 100 < u64::from(k.fail_percent) {
                return Some(k.fail_status());
            }
        }
        None
    }
}

fn openai_body(status: u16, model: &str) -> String {
    let (message, typ, param, code) = match status {
        400 => return OPENAI_400.to_owned(),
        401 => return OPENAI_401.to_owned(),
        429 => return OPENAI_429.to_owned(),
        403 => (
            "Country, region, or territory not supported".to_owned(),
            "request_forbidden",
            None,
            Some("unsupported_country_region_territory"),
        ),
        404 => (
            format!("The model `{model}` does not exist or you do not have access to it."),
            "invalid_request_error",
            Some("model"),
            Some("model_not_found"),
        ),
        500 => (
            "The server had an error while processing your request. Sorry about that!".to_owned(),
            "server_error",
            None,
            None,
        ),
        503 => (
            "The server is overloaded or not ready yet.".to_owned(),
            "server_error",
            None,
            None,
        ),
        s if s >= 500 => (
            format!("afr-mock injected status {s}"),
            "server_error",
            None,
            None,
        ),
        s => (
            format!("afr-mock injected status {s}"),
            "invalid_request_error",
            None,
            None,
        ),
    };
    serde_json::json!({"error": {"message": message, "type": typ, "param": param, "code": code}})
        .to_string()
}

fn azure_body(status: u16, model: &str) -> String {
    let message = match status {
        401 => "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an active subscription and use a correct regional API endpoint for your resource.",
        404 => "Resource not found",
        429 => "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-10-21 have exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry after 1 second.",
        _ => return openai_body(status, model),
    };
    serde_json::json!({"error": {"code": status.to_string(), "message": message}}).to_string()
}

fn anthropic_body(status: u16, model: &str, request_id: &str) -> String {
    let (typ, message) = match status {
        400 => return ANTHROPIC_400.to_owned(),
        529 => return ANTHROPIC_529.to_owned(),
        401 => ("authentication_error", "invalid x-api-key".to_owned()),
        403 => (
            "permission_error",
            "Your API key does not have permission to use the specified resource.".to_owned(),
        ),
        404 => ("not_found_error", format!("model: {model}")),
        413 => (
            "request_too_large",
            "Request exceeds the maximum allowed number of bytes.".to_owned(),
        ),
        429 => (
            "rate_limit_error",
            "This request would exceed your organization's rate limit. Please try again later."
                .to_owned(),
        ),
        500 => ("api_error", "Internal server error".to_owned()),
        s if s >= 500 => ("api_error", format!("afr-mock injected status {s}")),
        s => (
            "invalid_request_error",
            format!("afr-mock injected status {s}"),
        ),
    };
    serde_json::json!({"type": "error", "error": {"type": typ, "message": message}, "request_id": request_id})
        .to_string()
}

/// An error response in `api`'s shape, with its status and headers.
pub fn error_response(api: Api, status: u16, model: &str, request_id: &str) -> Response<MockBody> {
    error_with_body(
        api,
        status,
        match api {
            Api::OpenAi => openai_body(status, model),
            Api::Azure => azure_body(status, model),
            Api::Anthropic => anthropic_body(status, model, request_id),
        },
        request_id,
    )
}

/// An error response in `api`'s shape carrying a specific message
/// (validation failures of the mock itself).
pub fn invalid_request(
    api: Api,
    message: &str,
    param: Option<&str>,
    request_id: &str,
) -> Response<MockBody> {
    let body = match api {
        Api::Anthropic => {
            serde_json::json!({"type": "error", "error": {"type": "invalid_request_error", "message": message}, "request_id": request_id})
        }
        _ => {
            serde_json::json!({"error": {"message": message, "type": "invalid_request_error", "param": param, "code": null}})
        }
    };
    error_with_body(api, 400, body.to_string(), request_id)
}

fn error_with_body(api: Api, status: u16, body: String, request_id: &str) -> Response<MockBody> {
    let mut resp = Response::new(MockBody::full(body));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let h = resp.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    let id = HeaderValue::from_str(request_id).unwrap_or(HeaderValue::from_static("req_mock"));
    match api {
        Api::Anthropic => {
            h.insert("request-id", id);
            // Recorded Anthropic errors say whether the SDK may retry.
            let retry = matches!(status, 408 | 409 | 429) || status >= 500;
            h.insert(
                "x-should-retry",
                HeaderValue::from_static(if retry { "true" } else { "false" }),
            );
        }
        Api::Azure => {
            h.insert("apim-request-id", id);
            if status == 429 {
                h.insert("retry-after", HeaderValue::from_static("1"));
            }
        }
        Api::OpenAi => {
            h.insert("x-request-id", id);
        }
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fail_first_then_percent() {
        let f = FailureState::default();
        let k = Knobs {
            fail_first: 2,
            fail_status: Some(503),
            ..Knobs::default()
        };
        f.reset(&k);
        assert_eq!(f.injected_status(&k), Some(503));
        assert_eq!(f.injected_status(&k), Some(503));
        assert_eq!(f.injected_status(&k), None);
        let k = Knobs {
            fail_percent: 30,
            ..Knobs::default()
        };
        let fails = (0..1000)
            .filter(|_| f.injected_status(&k).is_some())
            .count();
        assert!((200..400).contains(&fails), "{fails}");
    }

    #[test]
    fn fail_every_flaps() {
        let f = FailureState::default();
        let k = Knobs {
            fail_every: 2,
            ..Knobs::default()
        };
        f.reset(&k);
        let seq: Vec<bool> = (0..6).map(|_| f.injected_status(&k).is_some()).collect();
        assert_eq!(seq, [true, false, true, false, true, false]);
        f.reset(&k);
        assert_eq!(f.injected_status(&k), Some(500));
    }

    #[test]
    fn bodies_parse_as_their_provider_shape() {
        for s in [400, 401, 403, 404, 429, 500, 503, 418] {
            let v: serde_json::Value = serde_json::from_str(&openai_body(s, "m")).unwrap();
            assert!(v["error"]["message"].is_string(), "{s}");
            let v: serde_json::Value = serde_json::from_str(&anthropic_body(s, "m", "r")).unwrap();
            assert_eq!(v["type"], "error", "{s}");
            assert!(v["error"]["type"].is_string(), "{s}");
        }
    }
}
