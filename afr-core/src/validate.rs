//! Validation of `POST /v1/chat/completions` bodies (design §3): every
//! rejection names the field at fault in `param`, and the body the provider
//! gets is the client's own bytes with only the gateway's edits spliced in
//! (filled defaults, route adaptations, `stream_options.include_usage`).
//!
//! Validation reads a borrowed view of the bytes ([`crate::splice`]): only the
//! fields the gateway reads are decoded, and a key repeated where the gateway
//! reads is a 400, so the gateway and the provider can never read different values.

use crate::config::RouteConfig;
use crate::error::ErrorBody;
use crate::estimate::{Tally, Wire};
use crate::splice::{members, ObjectError, ObjectSpans, Splice};
use serde_json::value::RawValue;
use serde_json::Value;
use std::borrow::Cow;

mod messages;

/// Default `temperature` when the client sends none (design §3).
pub const DEFAULT_TEMPERATURE: f64 = 0.7;
/// Default `max_tokens` when the client sends none (design §3).
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

/// The chat message roles of the SDKs (`ChatCompletionMessageParam`, openai
/// 6.49.0), whose content rules the gateway knows. Another role is not
/// refused: a chat route's provider judges it, and a route of the other wire
/// names it when it cannot translate it.
pub(crate) const ROLES: [&str; 6] = [
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "function",
];

/// A request that passed validation. The body itself stays with the caller
/// (the client's bytes); this holds what the gateway read from it.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    /// The catalogue model asked for.
    pub model: String,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// Whether the client itself asked for `stream_options.include_usage`.
    pub include_usage: bool,
    /// Whether `temperature` is absent or null (the default is filled in).
    pub fill_temperature: bool,
    /// Whether neither `max_tokens` nor `max_completion_tokens` is set (the
    /// default `max_tokens` is filled in).
    pub fill_max_tokens: bool,
    /// The client's `max_tokens` and `max_completion_tokens` (0: not set),
    /// for the worst case a request reserves.
    pub output_limits: [(&'static str, u64); 2],
    /// Choices asked for (`n`, default 1): each may produce the whole limit.
    pub choices: u64,
    /// A `service_tier` other than the standard one (`flex`, `priority`,
    /// `scale`…), which a route's single price does not cover.
    pub special_tier: Option<String>,
    /// Where the body's top-level members lie.
    pub spans: ObjectSpans,
    /// The prompt estimate ([`crate::estimate::prompt_tokens`] of the body),
    /// when [`validate_chat_counting`] counted it in validation's pass;
    /// `None` leaves it to be counted when asked for.
    pub prompt_tokens: Option<u64>,
}

impl ChatRequest {
    /// The body for one route: `src` (the validated bytes) with the defaults
    /// filled in, `stream_options.include_usage` set when `ask_usage`, and the
    /// route's adaptations applied. Everything else is the client's bytes.
    pub fn upstream_body(&self, src: &[u8], route: &RouteConfig, ask_usage: bool) -> Vec<u8> {
        let mut body = self.spans.edit(src);
        if self.fill_temperature {
            body.set("temperature", DEFAULT_TEMPERATURE.to_string().into_bytes());
        }
        if self.fill_max_tokens {
            body.set("max_tokens", DEFAULT_MAX_TOKENS.to_string().into_bytes());
        }
        if ask_usage {
            let options = body
                .get("stream_options")
                .and_then(|raw| Splice::parse(raw).ok())
                .map(|mut options| {
                    options.set("include_usage", b"true".to_vec());
                    options.finish()
                });
            body.set(
                "stream_options",
                options.unwrap_or_else(|| br#"{"include_usage":true}"#.to_vec()),
            );
        }
        route.adapt(&mut body);
        body.finish()
    }

    /// The most completion tokens `route` can produce for this request: the
    /// client's limit (or the default that is filled in) after the route's
    /// rename and clamp — what the provider will really be told — for each
    /// of the `n` choices.
    pub fn output_cap(&self, route: &RouteConfig) -> u64 {
        let limits = if self.fill_max_tokens {
            [("max_tokens", DEFAULT_MAX_TOKENS), ("", 0)]
        } else {
            self.output_limits
        };
        let per_choice = limits
            .iter()
            .filter(|(field, n)| !field.is_empty() && *n > 0)
            .map(|&(field, n)| capped(route, field, n))
            .max()
            .unwrap_or(DEFAULT_MAX_TOKENS);
        per_choice.saturating_mul(self.choices)
    }
}

/// What a client's output limit `n`, sent as `field`, becomes on `route`:
/// the route's clamp of the (renamed) field, or — when the route drops the
/// field — the contract's default standing in for the provider's own.
pub fn capped(route: &RouteConfig, field: &str, n: u64) -> u64 {
    if route.drop.iter().any(|d| d == field) {
        // Dropped: the provider's own default applies, which the gateway
        // cannot know; the contract's default stands in.
        return DEFAULT_MAX_TOKENS;
    }
    let name = route.rename.get(field).map_or(field, String::as_str);
    match route.clamp.get(name).and_then(|c| c.max) {
        Some(max) if (n as f64) > max => max.max(0.0) as u64,
        _ => n,
    }
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
    pub(crate) fn field(param: impl Into<String>, message: impl Into<String>) -> Self {
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

    /// The rejection of an object at `path` (`""`: the body) that did not parse.
    pub(crate) fn object(path: &str, error: ObjectError) -> Self {
        let at = |key: &str| {
            if path.is_empty() {
                key.to_owned()
            } else {
                format!("{path}.{key}")
            }
        };
        match error {
            ObjectError::Syntax(e) => Invalid {
                param: None,
                message: format!("We could not parse the JSON body of your request: {e}"),
                code: None,
            },
            ObjectError::NotObject => Invalid {
                param: (!path.is_empty()).then(|| path.to_owned()),
                message: if path.is_empty() {
                    "The request body must be a JSON object.".into()
                } else {
                    format!("Invalid type for '{path}': expected an object.")
                },
                code: None,
            },
            ObjectError::Duplicate(key) => {
                let param = at(&key);
                Invalid::field(
                    param.clone(),
                    format!(
                        "Invalid body: the key '{param}' appears more than once; send it once."
                    ),
                )
            }
        }
    }
}

/// The top-level members of a body as (key, raw value) pairs.
pub(crate) type Members<'a> = [(Cow<'a, str>, &'a RawValue)];

pub(crate) fn find<'a>(members: &Members<'a>, key: &str) -> Option<&'a RawValue> {
    members.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
}

/// Decodes a small field the gateway reads. The text is valid JSON, but a
/// number may still be out of range (`1e999`): that is the client's error,
/// never a value to treat as absent.
pub(crate) fn value(param: &str, raw: &RawValue) -> Result<Value, Invalid> {
    serde_json::from_str(raw.get()).map_err(|e| {
        let text: String = raw.get().chars().take(40).collect();
        Invalid::field(
            param,
            format!("Invalid '{param}': {text} cannot be read ({e})."),
        )
    })
}

/// The decoded value of `key`, if present.
pub(crate) fn field(
    members: &Members<'_>,
    key: &str,
    param: &str,
) -> Result<Option<Value>, Invalid> {
    find(members, key).map(|raw| value(param, raw)).transpose()
}

/// Validates a chat completions body and records what the gateway read.
pub fn validate_chat(bytes: &[u8]) -> Result<ChatRequest, Invalid> {
    validate(bytes, false)
}

/// [`validate_chat`] for a request that will reserve its prompt estimate (a
/// key with limits): the estimate is counted in the same pass over the
/// messages (`prompt_tokens`), which was a second full pass of its own
/// (~6 instructions a byte, callgrind).
pub fn validate_chat_counting(bytes: &[u8]) -> Result<ChatRequest, Invalid> {
    validate(bytes, true)
}

fn validate(bytes: &[u8], count: bool) -> Result<ChatRequest, Invalid> {
    let body = members(bytes).map_err(|e| Invalid::object("", e))?;
    let model = match field(&body, "model", "model")? {
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
        Some(Value::String(s)) => s,
        Some(other) => return Err(type_error("model", "a string", &other)),
    };

    let mut tally = count.then(Tally::default);
    let counted = messages::check(find(&body, "messages"), tally.as_mut())?;
    // The other prompt members (tools, response_format, …) are counted
    // from their raw values; a member the count cannot read leaves the
    // estimate to `prompt_tokens`, which then decides it as before.
    let prompt_tokens = tally.filter(|_| counted).and_then(|mut tally| {
        body.iter()
            .all(|(key, raw)| key == "messages" || tally.member(Wire::Chat, key, raw))
            .then(|| tally.tokens(Wire::Chat))
    });

    let stream = match field(&body, "stream", "stream")? {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => b,
        Some(other) => return Err(type_error("stream", "a boolean", &other)),
    };

    let include_usage = match find(&body, "stream_options") {
        None => false,
        Some(raw) if raw.get() == "null" => false,
        Some(raw) if raw.get().starts_with('{') => {
            let options =
                members(raw.get().as_bytes()).map_err(|e| Invalid::object("stream_options", e))?;
            match field(&options, "include_usage", "stream_options.include_usage")? {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => b,
                Some(other) => {
                    return Err(type_error(
                        "stream_options.include_usage",
                        "a boolean",
                        &other,
                    ))
                }
            }
        }
        Some(raw) => {
            return Err(type_error(
                "stream_options",
                "an object",
                &value("stream_options", raw)?,
            ))
        }
    };

    let fill_temperature = match find(&body, "temperature") {
        None => true,
        Some(raw) => match value("temperature", raw)? {
            Value::Null => true,
            Value::Number(n) => match n.as_f64() {
                Some(t) if (0.0..=2.0).contains(&t) => false,
                _ => {
                    return Err(Invalid::field(
                        "temperature",
                        format!(
                        "Invalid 'temperature': {} is out of range; expected a number from 0 to 2.",
                        raw.get()
                    ),
                    ))
                }
            },
            other => return Err(type_error("temperature", "a number", &other)),
        },
    };

    let completion_limit = check_positive_int(&body, "max_completion_tokens")?;
    let max_tokens = check_positive_int(&body, "max_tokens")?;
    // A client that set max_completion_tokens chose its limit; adding
    // max_tokens next to it would be a contradiction upstream.
    let fill_max_tokens = max_tokens.is_none() && completion_limit.is_none();
    let output_limits = [
        ("max_tokens", max_tokens.unwrap_or(0)),
        ("max_completion_tokens", completion_limit.unwrap_or(0)),
    ];

    let choices = check_positive_int(&body, "n")?.unwrap_or(1);
    let special_tier = special_tier(&body)?;

    Ok(ChatRequest {
        model,
        choices,
        special_tier,
        stream,
        include_usage,
        fill_temperature,
        fill_max_tokens,
        output_limits,
        spans: ObjectSpans::new(bytes, &body),
        prompt_tokens,
    })
}

/// A `service_tier` priced differently from the standard tier: anything but
/// absent, `null`, `"auto"` or `"default"`. Routes have one price, so a
/// budgeted key is refused such a tier (budgets fail closed, design §3).
pub(crate) fn special_tier(body: &Members<'_>) -> Result<Option<String>, Invalid> {
    match field(body, "service_tier", "service_tier")? {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(t)) if t == "auto" || t == "default" => Ok(None),
        Some(Value::String(t)) => Ok(Some(t)),
        Some(other) => Err(type_error("service_tier", "a string", &other)),
    }
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

/// Validates `field` as a positive integer when present; `Ok(Some(n))` if it is set.
pub(crate) fn check_positive_int(body: &Members<'_>, field: &str) -> Result<Option<u64>, Invalid> {
    check_int_at_least(body, field, 1)
}

/// Validates `field` as an integer of at least `min` when present (`null`:
/// absent); `Ok(Some(n))` if it is set. A refusal is worded as OpenAI's.
pub(crate) fn check_int_at_least(
    body: &Members<'_>,
    field: &str,
    min: u64,
) -> Result<Option<u64>, Invalid> {
    match self::field(body, field, field)? {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) if n.as_u64().is_some_and(|v| v >= min) => Ok(n.as_u64()),
        Some(Value::Number(n)) if n.is_u64() || n.is_i64() => Err(Invalid::field(
            field,
            format!(
                "Invalid '{field}': integer below minimum value. Expected a value >= {min}, but got {n} instead."
            ),
        )),
        Some(other) => Err(type_error(field, "an integer", &other)),
    }
}

pub(crate) fn missing(param: &str) -> Invalid {
    Invalid::field(param, format!("Missing required parameter: '{param}'."))
}

pub(crate) fn type_error(param: &str, expected: &str, got: &Value) -> Invalid {
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
#[path = "validate_tests.rs"]
mod tests;
