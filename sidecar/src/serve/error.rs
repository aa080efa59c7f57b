//! Every way a request can fail, each knowing its HTTP status, mapped to
//! exactly one OpenAI error body here and nowhere else — rendered in
//! Anthropic's shape instead on the Messages API ([`ErrorShape`]).

use crate::providers::ProviderError;
use afr_core::error::{ErrorBody, ErrorShape};
use afr_core::ledger::{Never, Refusal, Reserve};
use afr_core::limits::{openai_duration, Budget};
use afr_core::retry_after;
use afr_core::validate::Invalid;
use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use std::convert::Infallible;
use std::time::Duration;

/// The response body type of every sidecar answer.
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// A request the sidecar answers with an error.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// No or wrong `X-Afr-Secret`: the request did not come through nginx.
    #[error("missing or wrong X-Afr-Secret")]
    Unauthenticated,
    /// No such endpoint.
    #[error("unknown endpoint {0}")]
    NotFound(String),
    /// Endpoint exists, method does not.
    #[error("method {0} not allowed")]
    MethodNotAllowed(String),
    /// The body exceeds `server.max_body_bytes`.
    #[error("request body larger than {0} bytes")]
    TooLarge(usize),
    /// Validation failed (400 with `param`).
    #[error("invalid request: {}", .0.message)]
    Invalid(Invalid),
    /// A provider's non-retryable 4xx, returned to the client.
    #[error("provider {provider} refused the request")]
    Upstream {
        /// Provider name (logged, not sent).
        provider: String,
        /// The provider's error.
        error: ProviderError,
    },
    /// Every route was tried and failed.
    #[error("all providers failed for {model}")]
    AllFailed {
        /// The catalogue model.
        model: String,
    },
    /// No route of the model has an enabled provider (its API key variable is
    /// unset): a configuration problem, not a transient one.
    #[error("no enabled provider for {model}")]
    NoProvider {
        /// The catalogue model.
        model: String,
    },
    /// Every route tried answered 429 (the others were open): the client may
    /// retry, like after a provider's own 429.
    #[error("all providers for {model} are rate limited")]
    RateLimited {
        /// The catalogue model.
        model: String,
        /// The shortest wait the providers asked for.
        retry_after: Option<Duration>,
    },
    /// The provider answered but sent no content within `first_content` (or
    /// `total`): a reasoning model thinking too long, not a provider failure,
    /// so nothing was failed over. Before the stream committed this is the
    /// response; after, the error event that ends the stream.
    #[error("no content within the {limit} timeout of {timeout:?}")]
    ContentTimeout {
        /// The timeout's config name (`first_content` or `total`).
        limit: &'static str,
        /// Its value.
        timeout: Duration,
    },
    /// The gateway could not open a connection to the provider: it is out of
    /// its own resources (file descriptors, ports). Transient and not the
    /// provider's fault: 503 with a short `Retry-After`, which the SDKs honour.
    #[error("the gateway is out of local resources: {0}")]
    Overloaded(String),
    /// Every provider tried answered that it is overloaded (Anthropic's 529):
    /// 529 `overloaded_error` on Anthropic's API, as the provider said; 503
    /// on OpenAI's, whose SDKs know no 529.
    #[error("all providers for {model} are overloaded")]
    AllOverloaded {
        /// The catalogue model.
        model: String,
    },
    /// Every route's breaker is open.
    #[error("all providers for {model} are unavailable (circuit open)")]
    AllOpen {
        /// The catalogue model.
        model: String,
        /// Seconds until the first breaker half-opens.
        retry_after_secs: u64,
    },
    /// A committed stream broke; ends the stream as an error event (the
    /// status line, 200, is already sent).
    #[error("stream interrupted: {0}")]
    StreamInterrupted(String),
    /// The client's body could not be read.
    #[error("reading the request body: {0}")]
    BodyRead(String),
    /// The key's tokens-per-minute window cannot hold this request's worst
    /// case now (decided before any provider is called).
    #[error("key over its tokens per minute ({requested} requested, limit {limit})")]
    OverTokens {
        /// The key's `tpm`.
        limit: u64,
        /// The request's worst case in tokens.
        requested: u64,
        /// Milliseconds until it would fit.
        retry_after_ms: u64,
    },
    /// The key's budget for this period cannot hold this request's worst-case cost.
    #[error("key over its budget")]
    OverBudget {
        /// The key's budget.
        budget: Budget,
        /// Milliseconds until the period renews.
        retry_after_ms: u64,
    },
    /// The request's worst case exceeds the key's whole `tpm` or budget: no
    /// wait makes it fit, so no `Retry-After` and `x-should-retry: false`.
    #[error("request larger than the key's whole limit: {0:?}")]
    NeverFits(Never),
    /// A budgeted key while the ledger does not know what keys spent: its
    /// seed from the usage store is being retried (`Some` wait), or there is
    /// no usage store at all (`None`: no retry helps).
    #[error("budgets are unavailable")]
    BudgetUnavailable {
        /// When to retry, if a retry can help.
        retry_after_secs: Option<u64>,
    },
    /// The usage store is not available or failed.
    #[error("usage store: {0}")]
    Usage(String),
}

impl GatewayError {
    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::Unauthenticated => StatusCode::UNAUTHORIZED,
            GatewayError::NotFound(_) => StatusCode::NOT_FOUND,
            GatewayError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::Invalid(_) | GatewayError::BodyRead(_) => StatusCode::BAD_REQUEST,
            GatewayError::Upstream { error, .. } => match error {
                ProviderError::Status { status, .. } => {
                    StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_REQUEST)
                }
                _ => StatusCode::BAD_GATEWAY,
            },
            GatewayError::StreamInterrupted(_) => StatusCode::BAD_GATEWAY,
            GatewayError::RateLimited { .. }
            | GatewayError::OverTokens { .. }
            | GatewayError::OverBudget { .. }
            | GatewayError::NeverFits(_) => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::BudgetUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::ContentTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::AllFailed { .. }
            | GatewayError::NoProvider { .. }
            | GatewayError::Usage(_) => StatusCode::INTERNAL_SERVER_ERROR,
            GatewayError::AllOpen { .. }
            | GatewayError::Overloaded(_)
            | GatewayError::AllOverloaded { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The OpenAI error object for this error. Never contains a secret:
    /// upstream messages are only relayed for a provider's 4xx about the
    /// request itself (credential errors are failed over, never relayed).
    pub fn body(&self) -> ErrorBody {
        match self {
            GatewayError::Unauthenticated => ErrorBody::new(
                "invalid_request_error",
                Some("invalid_api_key"),
                "This request did not come through the gateway's nginx (missing or wrong shared secret).",
            ),
            GatewayError::NotFound(path) => ErrorBody::new(
                "invalid_request_error",
                Some("unknown_url"),
                format!("Unknown request URL: {path}."),
            ),
            GatewayError::MethodNotAllowed(method) => ErrorBody::new(
                "invalid_request_error",
                Some("method_not_allowed"),
                format!("Method {method} is not allowed for this URL."),
            ),
            GatewayError::TooLarge(limit) => ErrorBody::new(
                "invalid_request_error",
                Some("request_too_large"),
                format!("The request body is larger than the limit of {limit} bytes."),
            ),
            GatewayError::Invalid(invalid) => invalid.to_error_body(),
            GatewayError::BodyRead(_) => ErrorBody::new(
                "invalid_request_error",
                None,
                "The request body could not be read.",
            ),
            GatewayError::Upstream { error, .. } => upstream_body(error),
            GatewayError::AllFailed { model } => ErrorBody::new(
                "server_error",
                Some("upstream_failed"),
                format!("Every provider for the model '{model}' failed; please retry later."),
            ),
            GatewayError::NoProvider { model } => ErrorBody::new(
                "server_error",
                Some("no_provider"),
                format!("No provider is configured for the model '{model}'; contact the gateway's operator."),
            ),
            GatewayError::AllOpen { model, .. } => ErrorBody::new(
                "server_error",
                Some("providers_unavailable"),
                format!("Every provider for the model '{model}' is temporarily unavailable; please retry later."),
            ),
            GatewayError::Overloaded(_) => ErrorBody::new(
                "server_error",
                Some("gateway_overloaded"),
                "The gateway is momentarily out of capacity to reach a provider; please retry shortly.",
            ),
            GatewayError::RateLimited { model, .. } => ErrorBody::new(
                "rate_limit_error",
                Some("rate_limit_exceeded"),
                format!("Every provider for the model '{model}' is rate limiting requests; please retry after the time in the Retry-After header."),
            ),
            GatewayError::OverTokens {
                limit,
                requested,
                retry_after_ms,
            } if requested > limit => ErrorBody::new(
                "tokens",
                Some("rate_limit_exceeded"),
                format!("Request too large: tokens per min (TPM) limit {limit}, requested {requested} (estimated prompt + max_tokens); lower max_tokens or shorten the prompt. Retry after {}.", openai_duration(*retry_after_ms)),
            ),
            GatewayError::OverTokens {
                limit,
                requested,
                retry_after_ms,
            } => ErrorBody::new(
                "tokens",
                Some("rate_limit_exceeded"),
                format!("Rate limit reached on tokens per min (TPM): limit {limit}, requested {requested} (estimated prompt + max_tokens). Please try again in {}.", openai_duration(*retry_after_ms)),
            ),
            GatewayError::OverBudget { budget, .. } => ErrorBody::new(
                "insufficient_quota",
                Some("insufficient_quota"),
                format!(
                    "You exceeded your current quota: this key's budget of ${} per {} is spent (or cannot cover this request's worst case).",
                    budget.usd(),
                    budget.per.as_str()
                ),
            ),
            GatewayError::NeverFits(Never::Tokens { limit, requested }) => ErrorBody::new(
                "tokens",
                Some("rate_limit_exceeded"),
                format!("Request too large: this key's tokens per min (TPM) limit is {limit} and this request may use {requested} (estimated prompt + its largest possible output: max_tokens × n). It can never fit; lower max_tokens (or max_output_tokens), n or the prompt."),
            ),
            GatewayError::NeverFits(Never::Budget {
                budget,
                requested_nanos,
            }) => ErrorBody::new(
                "insufficient_quota",
                Some("insufficient_quota"),
                format!(
                    "This request may cost up to ${} (estimated prompt + its largest possible output at the route's price), more than this key's whole budget of ${} per {}; lower max_tokens or the prompt.",
                    afr_core::limits::usd_micros(*requested_nanos),
                    budget.usd(),
                    budget.per.as_str()
                ),
            ),
            GatewayError::BudgetUnavailable {
                retry_after_secs: Some(_),
            } => ErrorBody::new(
                "server_error",
                Some("budget_unavailable"),
                "This key has a budget and the gateway cannot read what it has spent yet (its usage store is unavailable); please retry shortly.",
            ),
            GatewayError::BudgetUnavailable {
                retry_after_secs: None,
            } => ErrorBody::new(
                "server_error",
                Some("budget_unavailable"),
                "This key has a budget, but this gateway records no usage ([usage] record = false), so it cannot hold one; contact the gateway's operator.",
            ),
            GatewayError::AllOverloaded { model } => ErrorBody::new(
                "server_error",
                Some("provider_overloaded"),
                format!("Every provider for the model '{model}' is overloaded; please retry shortly."),
            ),
            GatewayError::ContentTimeout { timeout, .. } => ErrorBody::new(
                "server_error",
                Some("timeout"),
                format!(
                    "The provider accepted the request but produced no output within {}; the request was not retried.",
                    humantime::format_duration(*timeout)
                ),
            ),
            GatewayError::StreamInterrupted(_) => ErrorBody::new(
                "server_error",
                Some("stream_interrupted"),
                "The provider failed while streaming the response; the output is incomplete.",
            ),
            GatewayError::Usage(_) => ErrorBody::new(
                "server_error",
                None,
                "Usage data is temporarily unavailable.",
            ),
        }
    }

    /// The full HTTP response (JSON body, `x-request-id`, `Retry-After` where it applies).
    pub fn into_response(self, request_id: &str) -> Response<Body> {
        self.respond(ErrorShape::OpenAi, request_id)
    }

    /// The full HTTP response with the body in `shape` (Anthropic's on the
    /// Messages API: same status, same headers, same message).
    pub fn respond(self, shape: ErrorShape, request_id: &str) -> Response<Body> {
        let anthropic = shape == ErrorShape::Anthropic;
        let (status, body) = match &self {
            // What Anthropic itself answers: its own overload status, and for
            // spent credits a 400 whose message Claude Code recognises
            // ("Your credit balance is too low", tests/fixtures/README.md).
            GatewayError::AllOverloaded { .. } if anthropic => {
                (StatusCode::from_u16(529).unwrap_or(self.status()), self.body())
            }
            GatewayError::OverBudget {
                budget,
                retry_after_ms,
            } if anthropic => (
                StatusCode::BAD_REQUEST,
                ErrorBody::new(
                    "invalid_request_error",
                    None,
                    format!(
                        "Your credit balance is too low to access this API: this key's budget of ${} per {} at this gateway is spent. It renews in {}.",
                        budget.usd(),
                        budget.per.as_str(),
                        humantime::format_duration(Duration::from_secs(retry_after_ms / 1000))
                    ),
                ),
            ),
            _ => (self.status(), self.body()),
        };
        let body = shape.render(status.as_u16(), &body);
        let mut response = json_response(status, body, request_id);
        let headers = response.headers_mut();
        match self {
            GatewayError::OverBudget { .. } if anthropic => {
                // Anthropic's credit refusal carries no Retry-After (Claude
                // Code gives up on one over 60 s anyway), and is not retried.
                headers.insert("x-should-retry", HeaderValue::from_static("false"));
            }
            GatewayError::AllOpen {
                retry_after_secs, ..
            } => {
                headers.insert(
                    http::header::RETRY_AFTER,
                    HeaderValue::from(retry_after_secs),
                );
            }
            GatewayError::Overloaded(_) => {
                headers.insert(http::header::RETRY_AFTER, HeaderValue::from(1));
            }
            GatewayError::RateLimited {
                retry_after: Some(wait),
                ..
            } => {
                // The SDKs read the exact `retry-after-ms` first.
                headers.insert(
                    http::header::RETRY_AFTER,
                    HeaderValue::from(retry_after::ceil_secs(wait)),
                );
                headers.insert(
                    "retry-after-ms",
                    HeaderValue::from(retry_after::ceil_millis(wait)),
                );
            }
            GatewayError::OverTokens { retry_after_ms, .. } => {
                let wait = Duration::from_millis(retry_after_ms);
                headers.insert(
                    http::header::RETRY_AFTER,
                    HeaderValue::from(retry_after::ceil_secs(wait).max(1)),
                );
                headers.insert(
                    "retry-after-ms",
                    HeaderValue::from(retry_after::ceil_millis(wait)),
                );
            }
            GatewayError::OverBudget { retry_after_ms, .. } => {
                let wait = Duration::from_millis(retry_after_ms);
                headers.insert(
                    http::header::RETRY_AFTER,
                    HeaderValue::from(retry_after::ceil_secs(wait).max(1)),
                );
                // Retrying before the period renews only spends the client's time.
                headers.insert("x-should-retry", HeaderValue::from_static("false"));
            }
            GatewayError::BudgetUnavailable { retry_after_secs } => match retry_after_secs {
                Some(secs) => {
                    headers.insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
                }
                None => {
                    headers.insert("x-should-retry", HeaderValue::from_static("false"));
                }
            },
            GatewayError::NeverFits(_) => {
                // Waiting changes nothing: no Retry-After, and the SDKs'
                // automatic retry of a 429 is switched off.
                headers.insert("x-should-retry", HeaderValue::from_static("false"));
            }
            GatewayError::ContentTimeout { .. } => {
                // The provider is healthy and slow: the SDKs' automatic retry
                // of a 5xx would only think, and bill, that long again.
                headers.insert("x-should-retry", HeaderValue::from_static("false"));
            }
            _ => {}
        }
        response
    }
}

impl From<Reserve> for GatewayError {
    fn from(why: Reserve) -> Self {
        match why {
            Reserve::Refused(refusal) => refusal.into(),
            Reserve::Never(never) => GatewayError::NeverFits(never),
            Reserve::Unavailable => GatewayError::BudgetUnavailable {
                retry_after_secs: Some(crate::serve::SEED_RETRY.as_secs()),
            },
        }
    }
}

impl From<Refusal> for GatewayError {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::Tokens {
                limit,
                requested,
                retry_after_ms,
            } => GatewayError::OverTokens {
                limit,
                requested,
                retry_after_ms,
            },
            Refusal::Budget {
                budget,
                retry_after_ms,
            } => GatewayError::OverBudget {
                budget,
                retry_after_ms,
            },
        }
    }
}

/// Maps a provider's 4xx to the OpenAI error shape; `type` and `code` are
/// kept when they are ones the OpenAI SDKs know.
fn upstream_body(error: &ProviderError) -> ErrorBody {
    let ProviderError::Status {
        status,
        message,
        kind,
        param,
        code,
        ..
    } = error
    else {
        return ErrorBody::new(
            "server_error",
            None,
            "The provider's answer could not be read.",
        );
    };
    let kind = match kind.as_deref() {
        Some("invalid_request_error") => "invalid_request_error",
        Some("not_found_error") => "not_found_error",
        Some("rate_limit_error" | "requests" | "tokens") => "rate_limit_error",
        Some("insufficient_quota") => "insufficient_quota",
        _ if *status == 404 => "not_found_error",
        _ => "invalid_request_error",
    };
    const KNOWN_CODES: [&str; 10] = [
        "model_not_found",
        "context_length_exceeded",
        "content_filter",
        "invalid_value",
        "invalid_type",
        "unsupported_parameter",
        "unsupported_value",
        "missing_required_parameter",
        "string_above_max_length",
        "rate_limit_exceeded",
    ];
    let code = code
        .as_deref()
        .and_then(|c| KNOWN_CODES.iter().copied().find(|k| *k == c));
    let body = ErrorBody::new(kind, code, message.clone());
    match param {
        Some(p) => body.with_param(p.clone()),
        None => body,
    }
}

/// A JSON response with the gateway's standard headers.
pub fn json_response(
    status: StatusCode,
    json: impl Into<Bytes>,
    request_id: &str,
) -> Response<Body> {
    let mut response = Response::new(full(json.into()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(id) = HeaderValue::from_str(request_id) {
        headers.insert("x-request-id", id);
    }
    response
}

/// A complete body.
pub fn full(bytes: Bytes) -> Body {
    Full::new(bytes).boxed_unsync()
}
