//! Deterministic reply text and token counts.
//!
//! The formula (the same for the OpenAI, Azure and Anthropic modes, so a
//! request translated from OpenAI to Anthropic reports the same counts):
//!
//! - `words(s)` = number of whitespace-separated words in `s`. A message's text
//!   is its `content` string, or the `text` of its `{"type":"text"}` parts
//!   joined by spaces.
//! - `prompt_tokens` = Σ over messages of `1 + words(text)`; for Anthropic the
//!   top-level `system` counts as one more message.
//! - The reply is `"Mock reply to: " + <last user message text>`, whitespace
//!   collapsed. It streams as one piece per word: the first word, then
//!   `" " + word` for each following word.
//! - With `chunks = N` the reply has exactly N pieces: the words above,
//!   truncated, or padded with `" mock"`.
//! - If the request's `max_tokens` (or `max_completion_tokens`) is below the
//!   piece count, the reply is cut to that many pieces and the finish reason
//!   is `length` (`max_tokens` for Anthropic).
//! - `completion_tokens` = number of pieces; `total_tokens` = the sum.
//!
//! Every 200 response also carries `x-mock-prompt-tokens` and
//! `x-mock-completion-tokens` headers with these numbers.

use serde_json::Value;

/// Why the reply ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// The whole reply was produced.
    Stop,
    /// Cut short by the request's `max_tokens`.
    Length,
}

/// The reply to one request: its pieces (stream deltas) and token counts.
#[derive(Debug)]
pub struct Reply {
    /// Content pieces; concatenated they are the reply text.
    pub pieces: Vec<String>,
    /// Prompt tokens by the formula in the module docs.
    pub prompt_tokens: u64,
    /// Why the reply ended.
    pub finish: Finish,
}

impl Reply {
    /// Completion tokens: one per piece.
    pub fn completion_tokens(&self) -> u64 {
        self.pieces.len() as u64
    }

    /// The full reply text.
    pub fn text(&self) -> String {
        self.pieces.concat()
    }
}

/// The text of a message `content`: a string, or the text parts of an array.
pub fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter(|p| p.get("type").and_then(Value::as_str) == Some("text"))
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

fn words(s: &str) -> u64 {
    s.split_whitespace().count() as u64
}

/// Builds the reply for a request body.
///
/// `system` is Anthropic's top-level `system` field (absent for OpenAI).
pub fn build(body: &Value, system: Option<&Value>, chunks: Option<u32>) -> Reply {
    build_with(body, system, chunks, None)
}

/// [`build`], with `text` (when given) as the reply instead of
/// `Mock reply to: …`: same pieces, `chunks` and `max_tokens` rules.
pub fn build_with(
    body: &Value,
    system: Option<&Value>,
    chunks: Option<u32>,
    text: Option<String>,
) -> Reply {
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let mut prompt_tokens = 0;
    let mut last_user = String::new();
    for m in messages {
        let text = m.get("content").map(content_text).unwrap_or_default();
        prompt_tokens += 1 + words(&text);
        if m.get("role").and_then(Value::as_str) == Some("user") {
            last_user = text;
        }
    }
    if let Some(s) = system {
        prompt_tokens += 1 + words(&content_text(s));
    }
    let text = text.unwrap_or_else(|| format!("Mock reply to: {last_user}"));
    let mut pieces: Vec<String> = text
        .split_whitespace()
        .enumerate()
        .map(|(i, w)| {
            if i == 0 {
                w.to_owned()
            } else {
                format!(" {w}")
            }
        })
        .collect();
    if let Some(n) = chunks {
        let n = n as usize;
        pieces.truncate(n);
        while pieces.len() < n {
            pieces.push(" mock".to_owned());
        }
    }
    let max = body
        .get("max_tokens")
        .or_else(|| body.get("max_completion_tokens"))
        .and_then(Value::as_u64);
    let mut finish = Finish::Stop;
    if let Some(max) = max {
        if (max as usize) < pieces.len() {
            pieces.truncate(max as usize);
            finish = Finish::Length;
        }
    }
    Reply {
        pieces,
        prompt_tokens,
        finish,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn formula() {
        let body = json!({"messages":[
            {"role":"system","content":"Be brief."},
            {"role":"user","content":"Hello  there world"}]});
        let r = build(&body, None, None);
        assert_eq!(r.text(), "Mock reply to: Hello there world");
        assert_eq!(r.prompt_tokens, 3 + 4);
        assert_eq!(r.completion_tokens(), 6);
        assert_eq!(r.finish, Finish::Stop);
    }

    #[test]
    fn chunks_and_max_tokens() {
        let body = json!({"max_tokens": 4, "messages":[{"role":"user","content":[{"type":"text","text":"a b"}]}]});
        let r = build(&body, Some(&json!("sys tem")), Some(7));
        assert_eq!(r.prompt_tokens, 3 + 3);
        assert_eq!(r.pieces, ["Mock", " reply", " to:", " a"]);
        assert_eq!(r.finish, Finish::Length);
        let r = build(&json!({"messages":[]}), None, Some(5));
        assert_eq!(r.text(), "Mock reply to: mock mock");
    }
}
