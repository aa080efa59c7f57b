//! OpenAI-shaped error bodies: the one place an HTTP status becomes
//! `{"error":{"message","type","param","code"}}`.
//!
//! The official SDKs pick their exception class from the status and read
//! `message`, `type`, `param` and `code` from this object
//! (tests/fixtures/openai-sdk-error-mapping.md).
//!
//! Anthropic's Messages API (`/v1/messages…`) answers the same errors in
//! Anthropic's shape, `{"type":"error","error":{"type","message"}}`
//! ([`ErrorShape`]): the Anthropic SDKs pick their exception class from the
//! status too, and read `error.type` and `error.message`.

use serde::Serialize;

/// The inner object of an OpenAI error body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ErrorBody {
    /// Human-readable message; never contains a secret.
    pub message: String,
    /// OpenAI error type, e.g. `invalid_request_error`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The request field at fault, if any.
    pub param: Option<String>,
    /// Machine-readable code, e.g. `invalid_api_key`.
    pub code: Option<&'static str>,
}

#[derive(Serialize)]
struct Envelope<'a> {
    error: &'a ErrorBody,
}

impl ErrorBody {
    /// Builds an error body without a `param`.
    pub fn new(kind: &'static str, code: Option<&'static str>, message: impl Into<String>) -> Self {
        ErrorBody {
            message: message.into(),
            kind,
            param: None,
            code,
        }
    }

    /// Sets the request field at fault.
    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    /// Serializes as `{"error":{...}}`, the shape every OpenAI SDK parses.
    pub fn to_json(&self) -> String {
        // Serializing a struct of strings cannot fail.
        serde_json::to_string(&Envelope { error: self }).unwrap_or_default()
    }
}

/// Which API's error body a request gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorShape {
    /// `{"error":{"message","type","param","code"}}`.
    OpenAi,
    /// `{"type":"error","error":{"type","message"}}`.
    Anthropic,
}

impl ErrorShape {
    /// The shape for a request path: Anthropic's for `/v1/messages` and
    /// everything under it (`/v1/messages/count_tokens`), where only the
    /// Anthropic SDKs and Claude Code call; OpenAI's elsewhere.
    pub fn for_path(path: &[u8]) -> Self {
        match path.strip_prefix(b"/v1/messages") {
            Some(rest) if rest.is_empty() || rest[0] == b'/' || rest[0] == b'?' => {
                ErrorShape::Anthropic
            }
            _ => ErrorShape::OpenAi,
        }
    }

    /// `body` (answered with `status`) serialized in this shape.
    pub fn render(self, status: u16, body: &ErrorBody) -> String {
        match self {
            ErrorShape::OpenAi => body.to_json(),
            ErrorShape::Anthropic => body.to_anthropic_json(status),
        }
    }
}

/// Anthropic's error `type` for an HTTP status (the types its API documents
/// per status; the SDKs map the status, the type is for people and logs).
pub fn anthropic_error_type(status: u16) -> &'static str {
    match status {
        400 | 405 | 422 => "invalid_request_error",
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        504 => "timeout_error",
        s if s >= 500 => "api_error",
        _ => "invalid_request_error",
    }
}

#[derive(Serialize)]
struct AnthropicEnvelope<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    error: AnthropicInner<'a>,
}

#[derive(Serialize)]
struct AnthropicInner<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    message: &'a str,
}

impl ErrorBody {
    /// Serializes as Anthropic's `{"type":"error","error":{"type","message"}}`
    /// for a response with `status`. An exhausted budget
    /// (`insufficient_quota`) is Anthropic's `billing_error`, not a rate limit.
    pub fn to_anthropic_json(&self, status: u16) -> String {
        let kind = match self.code {
            Some("insufficient_quota") => "billing_error",
            _ => anthropic_error_type(status),
        };
        let envelope = AnthropicEnvelope {
            kind: "error",
            error: AnthropicInner {
                kind,
                message: &self.message,
            },
        };
        serde_json::to_string(&envelope).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anthropic_shape_by_path_and_status() {
        assert_eq!(ErrorShape::for_path(b"/v1/messages"), ErrorShape::Anthropic);
        assert_eq!(
            ErrorShape::for_path(b"/v1/messages/count_tokens"),
            ErrorShape::Anthropic
        );
        assert_eq!(
            ErrorShape::for_path(b"/v1/messages?beta=true"),
            ErrorShape::Anthropic
        );
        assert_eq!(ErrorShape::for_path(b"/v1/messagesx"), ErrorShape::OpenAi);
        assert_eq!(
            ErrorShape::for_path(b"/v1/chat/completions"),
            ErrorShape::OpenAi
        );
        let body = ErrorBody::new(
            "invalid_request_error",
            Some("invalid_api_key"),
            "No \"key\".",
        );
        let v: serde_json::Value =
            serde_json::from_str(&ErrorShape::Anthropic.render(401, &body)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type":"error","error":{"type":"authentication_error","message":"No \"key\"."}})
        );
        for (status, kind) in [
            (403, "permission_error"),
            (429, "rate_limit_error"),
            (500, "api_error"),
            (503, "overloaded_error"),
            (504, "timeout_error"),
            (413, "request_too_large"),
        ] {
            let v: serde_json::Value =
                serde_json::from_str(&body.to_anthropic_json(status)).unwrap();
            assert_eq!(v["error"]["type"], kind, "{status}");
        }
        let quota = ErrorBody::new(
            "insufficient_quota",
            Some("insufficient_quota"),
            "Budget spent.",
        );
        assert!(quota.to_anthropic_json(429).contains("billing_error"));
    }

    #[test]
    fn serializes_openai_shape() {
        let body =
            ErrorBody::new("invalid_request_error", None, "bad \"x\"").with_param("temperature");
        let v: serde_json::Value = serde_json::from_str(&body.to_json()).unwrap();
        assert_eq!(v["error"]["message"], "bad \"x\"");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["param"], "temperature");
        assert!(v["error"]["code"].is_null());
    }
}
