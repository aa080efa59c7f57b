//! What a request's span reads off the client's body (the parameters the
//! conventions name) and off the provider's answer (its id, model and why
//! it stopped).

use super::*;

/// The request parameters the conventions name, read off the client's body.
#[derive(Debug, Default, Deserialize)]
pub(super) struct RequestParams {
    pub(super) model: Option<String>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    max_output_tokens: Option<u64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<f64>,
    frequency_penalty: Option<f64>,
    presence_penalty: Option<f64>,
    seed: Option<i64>,
    n: Option<i64>,
    stop: Option<Stop>,
    stop_sequences: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum Stop {
    One(String),
    Many(Vec<String>),
}

/// What the provider's answer says of itself: its id, model, and why it stopped.
#[derive(Debug, Default)]
pub(super) struct ResponseInfo {
    pub(super) id: Option<String>,
    pub(super) model: Option<String>,
    pub(super) finish_reasons: Vec<String>,
}

/// The members of an answer (a whole body or one event) that carry its id,
/// model and finish reasons, on every wire: chat completions and their
/// chunks, Anthropic's message and its `message_start`/`message_delta`
/// events, the Responses API's response and its `response.*` events.
#[derive(Debug, Default, Deserialize)]
pub(super) struct Answer {
    id: Option<String>,
    model: Option<String>,
    #[serde(default)]
    choices: Vec<Choice>,
    stop_reason: Option<String>,
    status: Option<String>,
    message: Option<Box<Answer>>,
    response: Option<Box<Answer>>,
    delta: Option<Box<Answer>>,
}

#[derive(Debug, Default, Deserialize)]
struct Choice {
    finish_reason: Option<String>,
}

impl ResponseInfo {
    pub(super) fn read(&mut self, answer: Answer) {
        if let Some(inner) = answer.message.or(answer.response) {
            self.read(*inner);
        }
        if let Some(delta) = answer.delta {
            self.read(*delta);
        }
        if self.id.is_none() {
            self.id = answer.id;
        }
        if self.model.is_none() {
            self.model = answer.model;
        }
        for reason in answer
            .choices
            .into_iter()
            .filter_map(|c| c.finish_reason)
            .chain(answer.stop_reason)
            .chain(answer.status.filter(|s| s != "in_progress"))
        {
            self.finish_reasons.push(reason);
        }
    }
}

impl RequestParams {
    /// The parameters from the values of `body`'s members where `spans`
    /// says they lie (what serde would read off the whole body).
    pub(super) fn from_members(
        body: &[u8],
        spans: &afr_core::splice::ObjectSpans,
    ) -> RequestParams {
        fn get<T: serde::de::DeserializeOwned>(
            body: &[u8],
            spans: &afr_core::splice::ObjectSpans,
            key: &str,
        ) -> Option<T> {
            spans
                .get(body, key)
                .and_then(|v| serde_json::from_slice(v).ok())
        }
        let get_f64 = |key| get::<f64>(body, spans, key);
        RequestParams {
            model: get(body, spans, "model"),
            max_tokens: get(body, spans, "max_tokens"),
            max_completion_tokens: get(body, spans, "max_completion_tokens"),
            max_output_tokens: get(body, spans, "max_output_tokens"),
            temperature: get_f64("temperature"),
            top_p: get_f64("top_p"),
            top_k: get_f64("top_k"),
            frequency_penalty: get_f64("frequency_penalty"),
            presence_penalty: get_f64("presence_penalty"),
            seed: get(body, spans, "seed"),
            n: get(body, spans, "n"),
            stop: get(body, spans, "stop"),
            stop_sequences: get(body, spans, "stop_sequences"),
        }
    }

    pub(super) fn attributes(&self) -> Vec<KeyValue> {
        let mut out = Vec::new();
        let max = self
            .max_tokens
            .or(self.max_completion_tokens)
            .or(self.max_output_tokens);
        if let Some(max) = max {
            out.push(KeyValue::new("gen_ai.request.max_tokens", max as i64));
        }
        for (key, value) in [
            ("gen_ai.request.temperature", self.temperature),
            ("gen_ai.request.top_p", self.top_p),
            ("gen_ai.request.top_k", self.top_k),
            ("gen_ai.request.frequency_penalty", self.frequency_penalty),
            ("gen_ai.request.presence_penalty", self.presence_penalty),
        ] {
            if let Some(v) = value {
                out.push(KeyValue::new(key, v));
            }
        }
        if let Some(seed) = self.seed {
            out.push(KeyValue::new("gen_ai.request.seed", seed));
        }
        if let Some(n) = self.n.filter(|n| *n != 1) {
            out.push(KeyValue::new("gen_ai.request.choice.count", n));
        }
        let stop = match (&self.stop, &self.stop_sequences) {
            (Some(Stop::One(s)), _) => Some(vec![s.clone()]),
            (Some(Stop::Many(v)), _) | (None, Some(v)) => Some(v.clone()),
            (None, None) => None,
        };
        if let Some(stop) = stop {
            let values: Vec<StringValue> = stop.into_iter().map(Into::into).collect();
            out.push(KeyValue::new(
                "gen_ai.request.stop_sequences",
                Value::Array(values.into()),
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests;
