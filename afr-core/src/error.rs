//! OpenAI-shaped error bodies: the one place an HTTP status becomes
//! `{"error":{"message","type","param","code"}}`.
//!
//! The official SDKs pick their exception class from the status and read
//! `message`, `type`, `param` and `code` from this object
//! (tests/fixtures/openai-sdk-error-mapping.md).

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

#[cfg(test)]
mod tests {
    use super::*;

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
