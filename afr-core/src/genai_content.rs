//! Message contents in the shapes of the OpenTelemetry GenAI conventions'
//! opt-in attributes `gen_ai.system_instructions`, `gen_ai.input.messages`
//! and `gen_ai.output.messages` (JSON strings; the schemas are
//! `gen-ai-input-messages.json` and `gen-ai-output-messages.json` beside
//! <https://github.com/open-telemetry/semantic-conventions/blob/main/docs/gen-ai/gen-ai-spans.md>).
//!
//! Read from the client's body (chat completions, Anthropic Messages, legacy
//! completions, the Responses API's string input) and from the answer (a
//! whole body, or a stream's events one by one). Only the sidecar's
//! telemetry calls this, and only when the operator opted in: a prompt is
//! the client's data.
//!
//! Parts the conventions name are mapped (`text`, `tool_call`,
//! `tool_call_response`); any other part (an image, a document) keeps only
//! its `type`, so a trace shows that it was there without its bytes.

use serde_json::{json, Map, Value};

/// What the client sent, as the conventions' JSON.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Input {
    /// `gen_ai.system_instructions`: Anthropic's `system` parameter.
    pub system_instructions: Option<String>,
    /// `gen_ai.input.messages`.
    pub messages: Option<String>,
}

/// The client's body as the conventions' input attributes. A body whose
/// shape is not a chat (embeddings' `input` lists) gives nothing.
pub fn input(body: &[u8]) -> Input {
    let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(body) else {
        return Input::default();
    };
    let system = body.get("system").map(|system| match system {
        Value::String(text) => json!([text_part(text)]),
        Value::Array(blocks) => Value::Array(blocks.iter().map(part).collect()),
        other => json!([{"type": type_of(other)}]),
    });
    let messages = match (body.get("messages"), body.get("prompt"), body.get("input")) {
        (Some(Value::Array(messages)), _, _) => {
            Some(Value::Array(messages.iter().map(message).collect()))
        }
        (None, Some(Value::String(prompt)), _) | (None, None, Some(Value::String(prompt))) => {
            Some(json!([{"role": "user", "parts": [text_part(prompt)]}]))
        }
        _ => None,
    };
    Input {
        system_instructions: system.map(|v| v.to_string()),
        messages: messages.map(|v| v.to_string()),
    }
}

fn text_part(text: &str) -> Value {
    json!({"type": "text", "content": text})
}

fn type_of(v: &Value) -> &str {
    v.get("type").and_then(Value::as_str).unwrap_or("unknown")
}

/// One message of either API: its role and its content as parts.
fn message(m: &Value) -> Value {
    let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
    let mut parts = match m.get("content") {
        Some(Value::String(text)) if role == "tool" => vec![json!({
            "type": "tool_call_response",
            "id": m.get("tool_call_id").cloned().unwrap_or(Value::Null),
            "response": text,
        })],
        Some(Value::String(text)) => vec![text_part(text)],
        Some(Value::Array(blocks)) => blocks.iter().map(part).collect(),
        _ => Vec::new(),
    };
    for call in m
        .get("tool_calls")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let function = call.get("function");
        parts.push(json!({
            "type": "tool_call",
            "id": call.get("id").cloned().unwrap_or(Value::Null),
            "name": function.and_then(|f| f.get("name")).cloned().unwrap_or(Value::Null),
            "arguments": arguments(function.and_then(|f| f.get("arguments"))),
        }));
    }
    json!({"role": role, "parts": parts})
}

/// A tool call's arguments: the JSON they encode, else as sent.
fn arguments(raw: Option<&Value>) -> Value {
    match raw {
        Some(Value::String(text)) => {
            serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.clone()))
        }
        Some(other) => other.clone(),
        None => Value::Null,
    }
}

/// One content part or block of either API.
fn part(block: &Value) -> Value {
    match type_of(block) {
        "text" | "input_text" | "output_text" => {
            text_part(block.get("text").and_then(Value::as_str).unwrap_or(""))
        }
        "tool_use" => json!({
            "type": "tool_call",
            "id": block.get("id").cloned().unwrap_or(Value::Null),
            "name": block.get("name").cloned().unwrap_or(Value::Null),
            "arguments": block.get("input").cloned().unwrap_or(Value::Null),
        }),
        "tool_result" => json!({
            "type": "tool_call_response",
            "id": block.get("tool_use_id").cloned().unwrap_or(Value::Null),
            "response": block.get("content").cloned().unwrap_or(Value::Null),
        }),
        other => json!({"type": other}),
    }
}

/// The answer's messages, gathered from a whole body or a stream's events.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Output {
    /// One message per choice (Anthropic: one), by index.
    choices: Vec<Choice>,
}

#[derive(Debug, Clone, Default, PartialEq)]
struct Choice {
    parts: Vec<Value>,
    /// Text streamed so far into the last text part.
    text: String,
    finish_reason: Option<String>,
}

impl Choice {
    fn at(choices: &mut Vec<Choice>, index: usize) -> &mut Choice {
        if choices.len() <= index {
            choices.resize_with(index + 1, Choice::default);
        }
        &mut choices[index]
    }

    fn flush_text(&mut self) {
        if !self.text.is_empty() {
            let text = std::mem::take(&mut self.text);
            self.parts.push(text_part(&text));
        }
    }
}

impl Output {
    /// Reads a whole answer: a chat completion, a legacy completion or an
    /// Anthropic message.
    pub fn body(&mut self, body: &[u8]) {
        let Ok(answer) = serde_json::from_slice::<Value>(body) else {
            return;
        };
        if let Some(choices) = answer.get("choices").and_then(Value::as_array) {
            for (i, c) in choices.iter().enumerate() {
                let choice = Choice::at(&mut self.choices, i);
                if let Some(message) = c.get("message") {
                    let Value::Object(m) = message else { continue };
                    let parts = message_parts(m);
                    choice.parts.extend(parts);
                } else if let Some(text) = c.get("text").and_then(Value::as_str) {
                    choice.parts.push(text_part(text));
                }
                choice.finish_reason = finish(c.get("finish_reason"));
            }
        } else if let Some(blocks) = answer.get("content").and_then(Value::as_array) {
            let choice = Choice::at(&mut self.choices, 0);
            choice.parts.extend(blocks.iter().map(part));
            choice.finish_reason = finish(answer.get("stop_reason"));
        }
    }

    /// Reads one event's `data` (a chat completion chunk, or an Anthropic
    /// stream event).
    pub fn event(&mut self, data: &str) {
        let Ok(event) = serde_json::from_str::<Value>(data) else {
            return;
        };
        if let Some(choices) = event.get("choices").and_then(Value::as_array) {
            for c in choices {
                let index = c.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
                let choice = Choice::at(&mut self.choices, index);
                let delta = c.get("delta");
                let text = delta
                    .and_then(|d| d.get("content"))
                    .or_else(|| c.get("text"))
                    .and_then(Value::as_str);
                if let Some(text) = text {
                    choice.text.push_str(text);
                }
                if let Some(reason) = finish(c.get("finish_reason")) {
                    choice.finish_reason = Some(reason);
                }
            }
            return;
        }
        match type_of(&event) {
            "content_block_delta" => {
                let delta = event.get("delta");
                if let Some(text) = delta.and_then(|d| d.get("text")).and_then(Value::as_str) {
                    Choice::at(&mut self.choices, 0).text.push_str(text);
                }
            }
            "content_block_start" => {
                let block = event.get("content_block").cloned().unwrap_or(Value::Null);
                let choice = Choice::at(&mut self.choices, 0);
                choice.flush_text();
                if type_of(&block) != "text" {
                    choice.parts.push(part(&block));
                }
            }
            "message_delta" => {
                let reason = event.get("delta").and_then(|d| d.get("stop_reason"));
                if let Some(reason) = finish(reason) {
                    Choice::at(&mut self.choices, 0).finish_reason = Some(reason);
                }
            }
            _ => {}
        }
    }

    /// `gen_ai.output.messages`, when the answer had any.
    pub fn render(&self) -> Option<String> {
        if self.choices.is_empty() {
            return None;
        }
        let messages: Vec<Value> = self
            .choices
            .iter()
            .map(|c| {
                let mut c = c.clone();
                c.flush_text();
                let mut m = Map::new();
                m.insert("role".into(), "assistant".into());
                m.insert("parts".into(), Value::Array(c.parts));
                if let Some(reason) = c.finish_reason {
                    m.insert("finish_reason".into(), reason.into());
                }
                Value::Object(m)
            })
            .collect();
        Some(Value::Array(messages).to_string())
    }
}

/// A chat completion's message as parts: its text and its tool calls.
fn message_parts(m: &Map<String, Value>) -> Vec<Value> {
    let value = Value::Object(m.clone());
    let Value::Object(rendered) = message(&value) else {
        return Vec::new();
    };
    match rendered.get("parts") {
        Some(Value::Array(parts)) => parts.clone(),
        _ => Vec::new(),
    }
}

fn finish(v: Option<&Value>) -> Option<String> {
    v.and_then(Value::as_str).map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(s: &str) -> Value {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn chat_messages_become_parts_with_tool_calls_and_responses() {
        let body = br#"{"model":"m","messages":[
            {"role":"system","content":"Be brief."},
            {"role":"user","content":[{"type":"text","text":"Weather?"},{"type":"image_url","image_url":{"url":"data:..."}}]},
            {"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}}]},
            {"role":"tool","tool_call_id":"c1","content":"rainy"}]}"#;
        let got = input(body);
        assert_eq!(got.system_instructions, None);
        assert_eq!(
            parsed(&got.messages.unwrap()),
            json!([
                {"role": "system", "parts": [{"type": "text", "content": "Be brief."}]},
                {"role": "user", "parts": [{"type": "text", "content": "Weather?"}, {"type": "image_url"}]},
                {"role": "assistant", "parts": [{"type": "tool_call", "id": "c1", "name": "get_weather", "arguments": {"city": "Paris"}}]},
                {"role": "tool", "parts": [{"type": "tool_call_response", "id": "c1", "response": "rainy"}]},
            ])
        );
    }

    #[test]
    fn anthropic_system_and_blocks() {
        let body = br#"{"model":"m","system":[{"type":"text","text":"You are terse."}],"messages":[
            {"role":"user","content":"hi"},
            {"role":"assistant","content":[{"type":"tool_use","id":"t1","name":"ls","input":{"dir":"/"}}]},
            {"role":"user","content":[{"type":"tool_result","tool_use_id":"t1","content":"etc"}]}]}"#;
        let got = input(body);
        assert_eq!(
            parsed(&got.system_instructions.unwrap()),
            json!([{"type": "text", "content": "You are terse."}])
        );
        let messages = parsed(&got.messages.unwrap());
        assert_eq!(messages[1]["parts"][0]["type"], "tool_call");
        assert_eq!(messages[1]["parts"][0]["arguments"], json!({"dir": "/"}));
        assert_eq!(messages[2]["parts"][0]["type"], "tool_call_response");
    }

    #[test]
    fn prompts_and_non_chat_bodies() {
        let got = input(br#"{"model":"m","prompt":"Once upon"}"#);
        assert_eq!(
            parsed(&got.messages.unwrap()),
            json!([{"role": "user", "parts": [{"type": "text", "content": "Once upon"}]}])
        );
        assert_eq!(
            input(br#"{"model":"e","input":["a","b"]}"#),
            Input::default()
        );
        assert_eq!(input(b"not json"), Input::default());
    }

    #[test]
    fn a_whole_answer_and_a_stream_give_the_same_messages() {
        let mut whole = Output::default();
        whole.body(br#"{"choices":[{"index":0,"message":{"role":"assistant","content":"Hello there"},"finish_reason":"stop"}]}"#);
        let mut streamed = Output::default();
        for data in [
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"Hello"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":" there"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#,
            r#"{"choices":[],"usage":{"total_tokens":3}}"#,
        ] {
            streamed.event(data);
        }
        let expected = json!([{"role": "assistant", "parts": [{"type": "text", "content": "Hello there"}], "finish_reason": "stop"}]);
        assert_eq!(parsed(&whole.render().unwrap()), expected);
        assert_eq!(parsed(&streamed.render().unwrap()), expected);
        assert_eq!(Output::default().render(), None);
    }

    #[test]
    fn anthropic_answers_whole_and_streamed() {
        let mut whole = Output::default();
        whole.body(br#"{"id":"msg","type":"message","content":[{"type":"text","text":"Hi"},{"type":"tool_use","id":"t","name":"ls","input":{}}],"stop_reason":"tool_use"}"#);
        let got = parsed(&whole.render().unwrap());
        assert_eq!(got[0]["parts"][0], json!({"type": "text", "content": "Hi"}));
        assert_eq!(got[0]["parts"][1]["type"], "tool_call");
        assert_eq!(got[0]["finish_reason"], "tool_use");
        let mut streamed = Output::default();
        for data in [
            r#"{"type":"message_start","message":{"id":"m"}}"#,
            r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}"#,
            r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"}}"#,
        ] {
            streamed.event(data);
        }
        assert_eq!(
            parsed(&streamed.render().unwrap()),
            json!([{"role": "assistant", "parts": [{"type": "text", "content": "Hi"}], "finish_reason": "end_turn"}])
        );
    }
}
