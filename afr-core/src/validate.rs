//! Validation of `POST /v1/chat/completions` bodies (design §3): every
//! rejection names the field at fault in `param`, defaults are filled in, and
//! fields the gateway does not know pass through untouched.

use crate::error::ErrorBody;
use serde_json::{Map, Value};

/// Default `temperature` when the client sends none (design §3).
pub const DEFAULT_TEMPERATURE: f64 = 0.7;
/// Default `max_tokens` when the client sends none (design §3).
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

/// Roles a chat message may have.
const ROLES: [&str; 6] = [
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "function",
];

/// A request that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    /// The catalogue model asked for.
    pub model: String,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// Whether the client itself asked for `stream_options.include_usage`.
    pub include_usage: bool,
    /// The whole body with defaults filled in.
    pub body: Map<String, Value>,
}

/// A 400 answer: the message and the field at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// The field at fault (`None` for a body that is not a JSON object).
    pub param: Option<String>,
    /// What is wrong, worded for the developer reading the SDK exception.
    pub message: String,
    /// OpenAI-style machine code.
    pub code: Option<&'static str>,
}

impl Invalid {
    fn field(param: impl Into<String>, message: impl Into<String>) -> Self {
        Invalid {
            param: Some(param.into()),
            message: message.into(),
            code: None,
        }
    }

    /// The OpenAI error body for this rejection.
    pub fn to_error_body(&self) -> ErrorBody {
        let body = ErrorBody::new("invalid_request_error", self.code, self.message.clone());
        match &self.param {
            Some(p) => body.with_param(p.clone()),
            None => body,
        }
    }
}

/// Parses and validates a chat completions body, filling in the defaults.
pub fn validate_chat(bytes: &[u8]) -> Result<ChatRequest, Invalid> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| Invalid {
        param: None,
        message: format!("We could not parse the JSON body of your request: {e}"),
        code: None,
    })?;
    let Value::Object(mut body) = value else {
        return Err(Invalid {
            param: None,
            message: "The request body must be a JSON object.".into(),
            code: None,
        });
    };

    let model = match body.get("model") {
        None | Some(Value::Null) => {
            return Err(Invalid::field(
                "model",
                "Missing required parameter: 'model'.",
            ))
        }
        Some(Value::String(s)) if s.is_empty() => {
            return Err(Invalid::field(
                "model",
                "Invalid 'model': must not be empty.",
            ))
        }
        Some(Value::String(s)) => s.clone(),
        Some(other) => return Err(type_error("model", "a string", other)),
    };

    check_messages(body.get("messages"))?;

    let stream = match body.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => return Err(type_error("stream", "a boolean", other)),
    };

    let include_usage = match body.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(opts)) => match opts.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(type_error(
                    "stream_options.include_usage",
                    "a boolean",
                    other,
                ))
            }
        },
        Some(other) => return Err(type_error("stream_options", "an object", other)),
    };

    match body.get("temperature") {
        None | Some(Value::Null) => {
            body.insert("temperature".into(), Value::from(DEFAULT_TEMPERATURE));
        }
        Some(Value::Number(n)) => match n.as_f64() {
            Some(t) if (0.0..=2.0).contains(&t) => {}
            _ => {
                return Err(Invalid::field(
                    "temperature",
                    format!(
                    "Invalid 'temperature': {n} is out of range; expected a number from 0 to 2."
                ),
                ))
            }
        },
        Some(other) => return Err(type_error("temperature", "a number", other)),
    }

    let has_completion_limit = check_positive_int(&body, "max_completion_tokens")?;
    if !check_positive_int(&body, "max_tokens")? && !has_completion_limit {
        // A client that set max_completion_tokens chose its limit; adding
        // max_tokens next to it would be a contradiction upstream.
        body.insert("max_tokens".into(), Value::from(DEFAULT_MAX_TOKENS));
    }

    Ok(ChatRequest {
        model,
        stream,
        include_usage,
        body,
    })
}

/// Checks that the key may use `model` and that the catalogue has it.
/// `allowed` is the key's allow-list (`None`: every model).
pub fn check_model(
    model: &str,
    in_catalogue: bool,
    allowed: Option<&[String]>,
) -> Result<(), Invalid> {
    if !in_catalogue {
        return Err(Invalid {
            param: Some("model".into()),
            message: format!("The model '{model}' does not exist or you do not have access to it."),
            code: Some("model_not_found"),
        });
    }
    if allowed.is_some_and(|list| !list.iter().any(|m| m == model)) {
        return Err(Invalid {
            param: Some("model".into()),
            message: format!("This API key is not allowed to use the model '{model}'."),
            code: Some("model_not_allowed"),
        });
    }
    Ok(())
}

/// Validates `field` as a positive integer when present; `Ok(true)` if it is set.
fn check_positive_int(body: &Map<String, Value>, field: &str) -> Result<bool, Invalid> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Number(n)) if n.as_u64().is_some_and(|v| v > 0) => Ok(true),
        Some(other) => Err(Invalid::field(
            field,
            format!(
                "Invalid '{field}': expected a positive integer, got {}.",
                describe(other)
            ),
        )),
    }
}

fn check_messages(messages: Option<&Value>) -> Result<(), Invalid> {
    let list = match messages {
        None | Some(Value::Null) => {
            return Err(Invalid::field(
                "messages",
                "Missing required parameter: 'messages'.",
            ))
        }
        Some(Value::Array(list)) => list,
        Some(other) => return Err(type_error("messages", "an array", other)),
    };
    if list.is_empty() {
        return Err(Invalid::field(
            "messages",
            "Invalid 'messages': empty array. Expected an array with minimum length 1.",
        ));
    }
    for (i, message) in list.iter().enumerate() {
        let Value::Object(m) = message else {
            return Err(type_error(&format!("messages[{i}]"), "an object", message));
        };
        let role = match m.get("role") {
            Some(Value::String(r)) if ROLES.contains(&r.as_str()) => r.as_str(),
            Some(Value::String(r)) => {
                return Err(Invalid::field(
                    format!("messages[{i}].role"),
                    format!("Invalid 'messages[{i}].role': '{r}' is not one of {ROLES:?}."),
                ))
            }
            None | Some(Value::Null) => {
                return Err(Invalid::field(
                    format!("messages[{i}].role"),
                    format!("Missing required parameter: 'messages[{i}].role'."),
                ))
            }
            Some(other) => {
                return Err(type_error(
                    &format!("messages[{i}].role"),
                    "a string",
                    other,
                ))
            }
        };
        match m.get("content") {
            Some(Value::String(_)) | Some(Value::Array(_)) => {}
            // An assistant turn that only calls tools carries no content.
            None | Some(Value::Null) if role == "assistant" => {}
            None => {
                return Err(Invalid::field(
                    format!("messages[{i}].content"),
                    format!("Missing required parameter: 'messages[{i}].content'."),
                ))
            }
            Some(other) => {
                return Err(type_error(
                    &format!("messages[{i}].content"),
                    "a string or an array of content parts",
                    other,
                ))
            }
        }
    }
    Ok(())
}

fn type_error(param: &str, expected: &str, got: &Value) -> Invalid {
    Invalid::field(
        param,
        format!(
            "Invalid type for '{param}': expected {expected}, but got {}.",
            describe(got)
        ),
    )
}

fn describe(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_u64() || n.is_i64() => "an integer",
        Value::Number(_) => "a decimal",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param_of(body: &str) -> Option<String> {
        validate_chat(body.as_bytes()).expect_err(body).param
    }

    const MSG: &str = r#""messages":[{"role":"user","content":"hi"}]"#;

    #[test]
    fn bad_input_corpus_names_the_field() {
        let corpus: Vec<(String, Option<&str>)> = vec![
            ("{".into(), None),
            ("[]".into(), None),
            ("null".into(), None),
            (format!("{{{MSG}}}"), Some("model")),
            (format!(r#"{{"model":7,{MSG}}}"#), Some("model")),
            (format!(r#"{{"model":"",{MSG}}}"#), Some("model")),
            (r#"{"model":"m"}"#.into(), Some("messages")),
            (r#"{"model":"m","messages":"hi"}"#.into(), Some("messages")),
            (r#"{"model":"m","messages":[]}"#.into(), Some("messages")),
            (
                r#"{"model":"m","messages":[1]}"#.into(),
                Some("messages[0]"),
            ),
            (
                r#"{"model":"m","messages":[{"content":"x"}]}"#.into(),
                Some("messages[0].role"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"wizard","content":"x"}]}"#.into(),
                Some("messages[0].role"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"a"},{"role":"user"}]}"#
                    .into(),
                Some("messages[1].content"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":5}]}"#.into(),
                Some("messages[0].content"),
            ),
            (
                format!(r#"{{"model":"m",{MSG},"temperature":2.5}}"#),
                Some("temperature"),
            ),
            (
                format!(r#"{{"model":"m",{MSG},"temperature":-0.1}}"#),
                Some("temperature"),
            ),
            (
                format!(r#"{{"model":"m",{MSG},"temperature":"hot"}}"#),
                Some("temperature"),
            ),
            (
                format!(r#"{{"model":"m",{MSG},"max_tokens":0}}"#),
                Some("max_tokens"),
            ),
            (
                format!(r#"{{"model":"m",{MSG},"max_tokens":-5}}"#),
                Some("max_tokens"),
            ),
            (
                format!(r#"{{"model":"m",{MSG},"max_tokens":1.5}}"#),
                Some("max_tokens"),
            ),
            (
                format!(r#"{{"model":"m",{MSG},"max_tokens":"10"}}"#),
                Some("max_tokens"),
            ),
            (
                format!(r#"{{"model":"m",{MSG},"stream":"yes"}}"#),
                Some("stream"),
            ),
            (
                format!(r#"{{"model":"m",{MSG},"stream_options":1}}"#),
                Some("stream_options"),
            ),
            (
                format!(r#"{{"model":"m",{MSG},"stream_options":{{"include_usage":"y"}}}}"#),
                Some("stream_options.include_usage"),
            ),
        ];
        for (body, param) in corpus {
            assert_eq!(param_of(&body).as_deref(), param, "{body}");
        }
    }

    #[test]
    fn fills_defaults_and_keeps_unknown_fields() {
        let body = format!(r#"{{"model":"m",{MSG},"seed":42,"tools":[{{"type":"function"}}]}}"#);
        let req = validate_chat(body.as_bytes()).unwrap();
        assert_eq!(req.model, "m");
        assert!(!req.stream);
        assert_eq!(req.body["temperature"], 0.7);
        assert_eq!(req.body["max_tokens"], 4096);
        assert_eq!(req.body["seed"], 42);
        assert_eq!(req.body["tools"][0]["type"], "function");
    }

    #[test]
    fn keeps_client_values_and_reads_stream_flags() {
        let body = format!(
            r#"{{"model":"m",{MSG},"temperature":0,"max_tokens":5,"stream":true,"stream_options":{{"include_usage":true}}}}"#
        );
        let req = validate_chat(body.as_bytes()).unwrap();
        assert_eq!(req.body["temperature"], 0);
        assert_eq!(req.body["max_tokens"], 5);
        assert!(req.stream && req.include_usage);
    }

    #[test]
    fn max_completion_tokens_suppresses_the_max_tokens_default() {
        let body = format!(r#"{{"model":"m",{MSG},"max_completion_tokens":9}}"#);
        let req = validate_chat(body.as_bytes()).unwrap();
        assert!(!req.body.contains_key("max_tokens"));
    }

    #[test]
    fn assistant_tool_call_turns_need_no_content() {
        let body =
            r#"{"model":"m","messages":[{"role":"assistant","content":null,"tool_calls":[]}]}"#;
        assert!(validate_chat(body.as_bytes()).is_ok());
    }

    #[test]
    fn model_checks() {
        assert_eq!(
            check_model("x", false, None).unwrap_err().code,
            Some("model_not_found")
        );
        let allowed = vec!["a".to_string()];
        assert_eq!(
            check_model("b", true, Some(&allowed))
                .unwrap_err()
                .param
                .as_deref(),
            Some("model")
        );
        assert!(check_model("a", true, Some(&allowed)).is_ok());
        assert!(check_model("b", true, None).is_ok());
    }
}
