//! The OpenAI endpoints besides chat completions that the gateway passes
//! through (design §3): `/v1/embeddings`, `/v1/completions` and
//! `/v1/responses`. What a model serves ([`ModelKind`]), what the gateway
//! reads from a request ([`validate_passthrough`]), the body each route gets
//! (the client's bytes with only `model` and, for a completions stream,
//! `stream_options.include_usage` spliced in), and the usage in an answer.
//!
//! Responses-API streams are typed events (`event: response.created` …
//! `response.completed`) ending without `[DONE]`; [`responses_event`] reads
//! one the way the relay and the usage tap need it.

use crate::config::RouteConfig;
use crate::estimate::{Tally, Wire};
use crate::readable::readable;
use crate::splice::{members, ObjectSpans, Splice};
use crate::sse::{event_data, event_name, TokenUsage};
use crate::validate::{
    capped, check_int_at_least, check_positive_int, field, find, type_error, value, Invalid,
    DEFAULT_MAX_TOKENS,
};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

/// An OpenAI endpoint the gateway serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`.
    ChatCompletions,
    /// `POST /v1/completions` (legacy text completions).
    Completions,
    /// `POST /v1/embeddings`.
    Embeddings,
    /// `POST /v1/responses`.
    Responses,
    /// `POST /v1/messages` (Anthropic's Messages API, served by chat models).
    Messages,
}

impl Endpoint {
    /// Every endpoint, in the order `/v1/models` lists them.
    pub const ALL: [Endpoint; 5] = [
        Endpoint::ChatCompletions,
        Endpoint::Completions,
        Endpoint::Responses,
        Endpoint::Messages,
        Endpoint::Embeddings,
    ];

    /// The path below the API root (`/v1/` or a provider's `base_url`).
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat/completions",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Responses => "responses",
            Endpoint::Messages => "messages",
        }
    }

    /// The endpoint at a request path (`/v1/embeddings`).
    pub fn from_path(path: &str) -> Option<Endpoint> {
        let rest = path.strip_prefix("/v1/")?;
        Endpoint::ALL.into_iter().find(|e| e.path() == rest)
    }

    /// Whether answers can stream.
    pub fn streams(self) -> bool {
        self != Endpoint::Embeddings
    }
}

/// What a catalogue model is (`kind` in `[models.ID]`): it decides the
/// endpoints the model serves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// A text model: chat completions, completions, the Responses API and
    /// Anthropic's Messages API.
    #[default]
    Chat,
    /// An embedding model: `/v1/embeddings` only.
    Embedding,
}

impl ModelKind {
    /// Whether a model of this kind serves `endpoint`.
    pub fn serves(self, endpoint: Endpoint) -> bool {
        match self {
            ModelKind::Chat => endpoint != Endpoint::Embeddings,
            ModelKind::Embedding => endpoint == Endpoint::Embeddings,
        }
    }

    /// The endpoints (paths below `/v1/`) a model of this kind serves.
    pub fn endpoints(self) -> Vec<&'static str> {
        Endpoint::ALL
            .into_iter()
            .filter(|e| self.serves(*e))
            .map(|e| e.path())
            .collect()
    }
}

/// The 400 for a model used on an endpoint it does not serve.
pub fn wrong_endpoint(model: &str, kind: ModelKind, endpoint: Endpoint) -> Invalid {
    let what = match kind {
        ModelKind::Chat => "a chat model",
        ModelKind::Embedding => "an embedding model",
    };
    Invalid {
        param: Some("model".into()),
        message: format!(
            "The model '{model}' is {what} and does not serve /v1/{}; it serves {}.",
            endpoint.path(),
            kind.endpoints()
                .iter()
                .map(|p| format!("/v1/{p}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        code: Some("model_not_supported"),
    }
}

/// A passthrough request that passed validation; the body stays the client's.
#[derive(Debug, Clone, PartialEq)]
pub struct PassthroughRequest {
    /// The endpoint.
    pub endpoint: Endpoint,
    /// The catalogue model asked for.
    pub model: String,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// Whether the client itself asked for `stream_options.include_usage`
    /// (completions streams; the gateway asks for it otherwise and strips it).
    pub include_usage: bool,
    /// `previous_response_id` (Responses API): the conversation lives on the
    /// provider that created that response.
    pub previous_response_id: Option<String>,
    /// The client's output limit (completions `max_tokens`, Responses
    /// `max_output_tokens`); `None`: the gateway writes one in.
    pub output_limit: Option<u64>,
    /// Completions generated and billed per request: completions
    /// max(`n`, `best_of`), 1 elsewhere.
    pub choices: u64,
    /// A non-standard `service_tier` (see `validate::special_tier`).
    pub special_tier: Option<String>,
    /// Where the body's top-level members lie.
    pub spans: ObjectSpans,
    /// The prompt estimate ([`crate::estimate::prompt_tokens`] of the body,
    /// before any conversation a follow-up continues), when
    /// [`validate_passthrough_counting`] counted it; `None` leaves it to be
    /// counted when asked for.
    pub prompt_tokens: Option<u64>,
}

/// The members of `endpoint`'s bodies the prompt estimate reads.
fn estimate_wire(endpoint: Endpoint) -> Wire {
    match endpoint {
        Endpoint::Embeddings => Wire::Embeddings,
        Endpoint::Completions => Wire::Completions,
        Endpoint::ChatCompletions => Wire::Chat,
        Endpoint::Messages => Wire::Messages,
        Endpoint::Responses => Wire::Responses,
    }
}

/// OpenAI's default `max_tokens` of `/v1/completions` (its API reference),
/// written into a request that sets none so the bound the gateway reserved
/// is the one the provider applies.
pub const COMPLETIONS_DEFAULT_MAX_TOKENS: u64 = 16;

impl PassthroughRequest {
    /// The body for one route: the client's bytes with the route's
    /// adaptations and upstream `model`, and `stream_options.include_usage`
    /// when `ask_usage` (completions streams only: the Responses API always
    /// sends usage in its last event).
    pub fn upstream_body(&self, src: &[u8], route: &RouteConfig, ask_usage: bool) -> Vec<u8> {
        let mut body = self.spans.edit(src);
        if self.output_limit.is_none() {
            if let Some((field, cap)) = self.filled_limit(route) {
                body.set(field, cap.to_string().into_bytes());
            }
        }
        if ask_usage && self.endpoint == Endpoint::Completions {
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

    /// Which members of the body the provider bills as input (`crate::estimate`).
    pub fn estimate_wire(&self) -> Wire {
        estimate_wire(self.endpoint)
    }

    /// The output limit the gateway writes in when the client set none.
    fn filled_limit(&self, route: &RouteConfig) -> Option<(&'static str, u64)> {
        match self.endpoint {
            Endpoint::Completions => Some(("max_tokens", COMPLETIONS_DEFAULT_MAX_TOKENS)),
            Endpoint::Responses => Some((
                "max_output_tokens",
                route.max_output_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
            )),
            _ => None,
        }
    }

    /// The most output tokens `route` can bill for this request: the
    /// client's limit (or the one written in) after the route's
    /// adaptations, for every choice generated. Embeddings produce none.
    pub fn output_cap(&self, route: &RouteConfig) -> u64 {
        let (field, limit) = match (self.endpoint, self.output_limit) {
            (Endpoint::Embeddings, _) => return 0,
            (Endpoint::Completions, Some(n)) => ("max_tokens", n),
            (Endpoint::Responses, Some(n)) => ("max_output_tokens", n),
            _ => match self.filled_limit(route) {
                Some(filled) => filled,
                None => ("max_tokens", DEFAULT_MAX_TOKENS),
            },
        };
        capped(route, field, limit).saturating_mul(self.choices)
    }
}

/// Validates the fields the gateway reads on a passthrough endpoint; the
/// provider judges the rest.
pub fn validate_passthrough(
    endpoint: Endpoint,
    bytes: &[u8],
) -> Result<PassthroughRequest, Invalid> {
    validate(endpoint, bytes, false)
}

/// [`validate_passthrough`] for a request that will reserve its prompt
/// estimate (a key with limits). On `/v1/responses` and `/v1/completions`
/// the estimate's pass over the prompt members (`prompt_tokens`) is also the
/// check that `input` / `prompt` reads as a `Value`: one pass where there
/// were two (a Codex turn carries its whole conversation in `input`).
pub fn validate_passthrough_counting(
    endpoint: Endpoint,
    bytes: &[u8],
) -> Result<PassthroughRequest, Invalid> {
    validate(endpoint, bytes, true)
}

fn validate(endpoint: Endpoint, bytes: &[u8], count: bool) -> Result<PassthroughRequest, Invalid> {
    let body = members(bytes).map_err(|e| Invalid::object("", e))?;
    // Counted from the prompt members' raw values: the estimate reads every
    // value in them as strictly as a `Value` would, so a count is a check.
    let wire = estimate_wire(endpoint);
    let prompt_tokens = (count && matches!(endpoint, Endpoint::Responses | Endpoint::Completions))
        .then(|| {
            let mut tally = Tally::default();
            body.iter()
                .all(|(key, raw)| tally.member(wire, key, raw))
                .then(|| tally.tokens(wire))
        })
        .flatten();
    let checked = |raw: &&RawValue| prompt_tokens.is_some() || readable(raw);
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
    let stream = match field(&body, "stream", "stream")? {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => b,
        Some(other) => return Err(type_error("stream", "a boolean", &other)),
    };
    if stream && !endpoint.streams() {
        return Err(Invalid::field(
            "stream",
            format!(
                "/v1/{} does not stream; leave out 'stream'.",
                endpoint.path()
            ),
        ));
    }
    let include_usage = match find(&body, "stream_options") {
        Some(raw) if raw.get().starts_with('{') => {
            let options =
                members(raw.get().as_bytes()).map_err(|e| Invalid::object("stream_options", e))?;
            matches!(
                field(&options, "include_usage", "stream_options.include_usage")?,
                Some(Value::Bool(true))
            )
        }
        _ => false,
    };
    let mut output_limit = None;
    let mut choices = 1;
    match endpoint {
        Endpoint::Embeddings => {
            let input = find(&body, "input")
                .ok_or_else(|| Invalid::field("input", "Missing required parameter: 'input'."))?;
            check_input(&value("input", input)?)?;
            match field(&body, "encoding_format", "encoding_format")? {
                None | Some(Value::Null) => {}
                Some(Value::String(f)) if f == "float" || f == "base64" => {}
                Some(other) => {
                    return Err(Invalid::field(
                        "encoding_format",
                        format!(
                            "Invalid 'encoding_format': {other}; expected 'float' or 'base64'."
                        ),
                    ))
                }
            }
            check_positive_int(&body, "dimensions")?;
        }
        Endpoint::Completions => {
            // Read as a `Value` (which words the refusal) only if unreadable.
            if let Some(raw) = find(&body, "prompt").filter(|raw| !checked(raw)) {
                value("prompt", raw)?;
            }
            // openai-openapi's CreateCompletionRequest: `max_tokens` and
            // `best_of` have `minimum: 0` (`max_tokens: 0` with `echo` scores
            // a prompt without generating), `n` has `minimum: 1`.
            output_limit = check_int_at_least(&body, "max_tokens", 0)?;
            let n = check_positive_int(&body, "n")?.unwrap_or(1);
            let best_of = check_int_at_least(&body, "best_of", 0)?.unwrap_or(1);
            choices = n.max(best_of);
        }
        Endpoint::Responses => {
            // A Codex session's whole input: read as a `Value` (which words
            // the refusal) only if it is unreadable.
            if let Some(raw) = find(&body, "input").filter(|raw| !checked(raw)) {
                value("input", raw)?;
            }
            output_limit = check_positive_int(&body, "max_output_tokens")?;
        }
        // Validated by their own modules (`validate`, `messages`).
        Endpoint::ChatCompletions | Endpoint::Messages => {}
    }
    let previous_response_id = match field(&body, "previous_response_id", "previous_response_id")? {
        Some(Value::String(id)) if endpoint == Endpoint::Responses => Some(id),
        _ => None,
    };
    Ok(PassthroughRequest {
        endpoint,
        model,
        stream,
        include_usage,
        previous_response_id,
        output_limit,
        choices,
        special_tier: crate::validate::special_tier(&body)?,
        spans: ObjectSpans::new(bytes, &body),
        prompt_tokens,
    })
}

/// Embeddings `input`: a string, an array of strings, an array of token ids
/// or an array of token-id arrays, never empty.
fn check_input(input: &Value) -> Result<(), Invalid> {
    let bad = || {
        Invalid::field(
            "input",
            "Invalid 'input': expected a string, an array of strings, an array of token ids or an array of token-id arrays.",
        )
    };
    match input {
        Value::String(_) => Ok(()),
        Value::Array(items) if items.is_empty() => Err(Invalid::field(
            "input",
            "Invalid 'input': must not be an empty array.",
        )),
        Value::Array(items) => {
            let ok = items.iter().all(Value::is_string)
                || items.iter().all(Value::is_u64)
                || items
                    .iter()
                    .all(|i| i.as_array().is_some_and(|a| a.iter().all(Value::is_u64)));
            if ok {
                Ok(())
            } else {
                Err(bad())
            }
        }
        _ => Err(bad()),
    }
}

/// The Responses API's `usage` object.
#[derive(Debug, Deserialize)]
struct ResponsesUsage {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    total_tokens: Option<u64>,
    #[serde(default)]
    input_tokens_details: Option<Details>,
    #[serde(default)]
    output_tokens_details: Option<Details>,
}

/// `input_tokens_details` / `output_tokens_details`.
#[derive(Debug, Default, Deserialize)]
struct Details {
    #[serde(default)]
    cached_tokens: Option<u64>,
    #[serde(default)]
    reasoning_tokens: Option<u64>,
}

impl From<ResponsesUsage> for TokenUsage {
    fn from(u: ResponsesUsage) -> Self {
        let prompt = u.input_tokens.unwrap_or(0);
        let completion = u.output_tokens.unwrap_or(0);
        TokenUsage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: u.total_tokens.unwrap_or(prompt + completion),
            cached_tokens: u
                .input_tokens_details
                .and_then(|d| d.cached_tokens)
                .unwrap_or(0),
            reasoning_tokens: u
                .output_tokens_details
                .and_then(|d| d.reasoning_tokens)
                .unwrap_or(0),
            ..TokenUsage::default()
        }
    }
}

/// The usage in a whole (non-streamed) answer of `endpoint`: `usage` with
/// `prompt_tokens` (embeddings: no completion tokens) or, for the Responses
/// API, `input_tokens`/`output_tokens`.
pub fn body_usage(endpoint: Endpoint, body: &[u8]) -> Option<TokenUsage> {
    #[derive(Deserialize)]
    struct With<T> {
        usage: Option<T>,
    }
    match endpoint {
        Endpoint::Responses => serde_json::from_slice::<With<ResponsesUsage>>(body)
            .ok()?
            .usage
            .map(TokenUsage::from),
        _ => serde_json::from_slice::<With<TokenUsage>>(body).ok()?.usage,
    }
}

/// The `id` of a whole (non-streamed) Responses API answer.
pub fn response_body_id(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct WithId {
        id: Option<String>,
    }
    serde_json::from_slice::<WithId>(body).ok()?.id
}

/// What the gateway needs to know about one Responses-API stream event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResponsesEvent {
    /// The event type (`response.output_text.delta`), from `type` or the `event:` line.
    pub kind: String,
    /// Before any output (`response.created`, `response.in_progress`, a
    /// comment): nothing the client acts on, so failover is still clean.
    pub preamble: bool,
    /// The stream's last event (`response.completed`, `.incomplete`, `.failed`).
    pub done: bool,
    /// An error (`error` event or `response.failed`).
    pub error: bool,
    /// The response's id (on `response.created` and the final event).
    pub response_id: Option<String>,
    /// Usage, from the final event's `response.usage`.
    pub usage: Option<TokenUsage>,
    /// Characters of generated text or arguments (estimates of a cut stream).
    pub content_chars: usize,
}

/// Reads one raw Responses-API event. Unparseable data reads as output
/// (never preamble: what the gateway does not understand is not held back).
pub fn responses_event(raw: &[u8]) -> ResponsesEvent {
    #[derive(Deserialize)]
    struct Wire {
        #[serde(default, rename = "type")]
        kind: Option<String>,
        #[serde(default)]
        response: Option<ResponseWire>,
        #[serde(default)]
        delta: Option<Value>,
    }
    #[derive(Deserialize)]
    struct ResponseWire {
        #[serde(default)]
        id: Option<String>,
        #[serde(default)]
        usage: Option<ResponsesUsage>,
    }
    let Some(data) = event_data(raw) else {
        return ResponsesEvent {
            preamble: true,
            ..ResponsesEvent::default()
        };
    };
    let wire = serde_json::from_str::<Wire>(&data).ok();
    let kind = wire
        .as_ref()
        .and_then(|w| w.kind.clone())
        .or_else(|| event_name(raw))
        .unwrap_or_default();
    let (response_id, usage, content_chars) = match wire {
        Some(w) => {
            let chars = match &w.delta {
                Some(Value::String(s)) => s.chars().count(),
                _ => 0,
            };
            match w.response {
                Some(r) => (r.id, r.usage.map(TokenUsage::from), chars),
                None => (None, None, chars),
            }
        }
        None => (None, None, 0),
    };
    ResponsesEvent {
        preamble: matches!(kind.as_str(), "response.created" | "response.in_progress"),
        done: matches!(
            kind.as_str(),
            "response.completed" | "response.incomplete" | "response.failed"
        ),
        error: matches!(kind.as_str(), "error" | "response.failed"),
        kind,
        response_id,
        usage,
        content_chars,
    }
}

#[cfg(test)]
#[path = "endpoint_tests.rs"]
mod tests;
