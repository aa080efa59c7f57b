//! Token classes of one answer — prompt, cache reads, cache writes, output,
//! reasoning, choices — the `usage` objects each wire reports for them, and
//! what the mock billed (`billed` in the request log, `GET /_mock/billing`).
//!
//! - `cache_read` of the prompt tokens are cache reads (clamped to the
//!   prompt). Anthropic only: `cache_write_5m` then `cache_write_1h` are
//!   cache writes, clamped to what the reads left of the prompt.
//! - `completion` = tokens of one choice × billed choices + `reasoning`:
//!   `n` choices for chat, `max(n, best_of)` for `/v1/completions`.
//! - Billed: `input` = every prompt token (cache reads and writes
//!   included), `cached_input` = reads, `output` = the completion (reasoning
//!   included). A stream that ends before its last content delta bills the
//!   deltas it sent (across choices) plus the reasoning instead.
//!
//! The JSON is written by hand so the keys come in the providers' order.

use serde::Serialize;
use serde_json::Value;

use crate::knobs::Knobs;

/// What the mock billed for one answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Billed {
    /// Every prompt token, cache reads and writes included.
    pub input: u64,
    /// Prompt tokens read from the cache.
    pub cached_input: u64,
    /// Prompt tokens written to the 5-minute cache (Anthropic).
    pub cache_write_5m: u64,
    /// Prompt tokens written to the 1-hour cache (Anthropic).
    pub cache_write_1h: u64,
    /// Output tokens, reasoning included.
    pub output: u64,
    /// Output tokens billed as reasoning.
    pub reasoning: u64,
}

impl Billed {
    /// Only prompt tokens (embeddings).
    pub fn input(input: u64) -> Billed {
        Billed {
            input,
            ..Billed::default()
        }
    }

    /// Adds `o` field by field.
    pub fn add(&mut self, o: &Billed) {
        self.input += o.input;
        self.cached_input += o.cached_input;
        self.cache_write_5m += o.cache_write_5m;
        self.cache_write_1h += o.cache_write_1h;
        self.output += o.output;
        self.reasoning += o.reasoning;
    }
}

/// The token classes of one answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tokens {
    /// Every prompt token (the formula of [`crate::reply`]).
    pub prompt: u64,
    /// Of those, cache reads.
    pub cache_read: u64,
    /// Of those, 5-minute cache writes (Anthropic).
    pub cache_write_5m: u64,
    /// Of those, 1-hour cache writes (Anthropic).
    pub cache_write_1h: u64,
    /// Content tokens of one choice.
    pub per_choice: u64,
    /// Choices billed: `n`, or `max(n, best_of)` for text completions.
    pub billed_choices: u64,
    /// Reasoning tokens, on top of the content.
    pub reasoning: u64,
}

impl Tokens {
    /// The classes the request's knobs ask for. Cache writes only exist on
    /// the Anthropic wire (`anthropic`).
    pub fn new(k: &Knobs, prompt: u64, per_choice: u64, anthropic: bool) -> Tokens {
        let cache_read = k.cache_read.min(prompt);
        let (w5, w1) = if anthropic {
            let left = prompt - cache_read;
            let w5 = k.cache_write_5m.min(left);
            (w5, k.cache_write_1h.min(left - w5))
        } else {
            (0, 0)
        };
        Tokens {
            prompt,
            cache_read,
            cache_write_5m: w5,
            cache_write_1h: w1,
            per_choice,
            billed_choices: 1,
            reasoning: k.reasoning_tokens,
        }
    }

    /// Bills `choices` choices.
    pub fn with_choices(mut self, choices: u64) -> Tokens {
        self.billed_choices = choices;
        self
    }

    /// Completion (output) tokens: content of every billed choice plus reasoning.
    pub fn completion(&self) -> u64 {
        self.per_choice * self.billed_choices + self.reasoning
    }

    /// Prompt plus completion.
    pub fn total(&self) -> u64 {
        self.prompt + self.completion()
    }

    /// Cache writes, both lifetimes.
    pub fn cache_writes(&self) -> u64 {
        self.cache_write_5m + self.cache_write_1h
    }

    /// Anthropic's `input_tokens`: the prompt without cache reads and writes.
    pub fn anthropic_input(&self) -> u64 {
        self.prompt - self.cache_read - self.cache_writes()
    }

    /// What a complete answer bills.
    pub fn billed(&self) -> Billed {
        Billed {
            input: self.prompt,
            cached_input: self.cache_read,
            cache_write_5m: self.cache_write_5m,
            cache_write_1h: self.cache_write_1h,
            output: self.completion(),
            reasoning: self.reasoning,
        }
    }

    /// Chat completions' `usage`, with both detail objects as the recording has them.
    pub fn chat_json(&self) -> String {
        format!(
            r#"{{"prompt_tokens":{},"completion_tokens":{},"total_tokens":{},"prompt_tokens_details":{{"cached_tokens":{},"audio_tokens":0}},"completion_tokens_details":{{"reasoning_tokens":{},"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}}"#,
            self.prompt,
            self.completion(),
            self.total(),
            self.cache_read,
            self.reasoning,
        )
    }

    /// `/v1/completions`' (and the tool calls') plain `usage`; a detail
    /// object is added only when its count is not zero.
    pub fn plain_json(&self) -> String {
        let mut s = format!(
            r#"{{"prompt_tokens":{},"completion_tokens":{},"total_tokens":{}"#,
            self.prompt,
            self.completion(),
            self.total()
        );
        if self.cache_read > 0 {
            s.push_str(&format!(
                r#","prompt_tokens_details":{{"cached_tokens":{}}}"#,
                self.cache_read
            ));
        }
        if self.reasoning > 0 {
            s.push_str(&format!(
                r#","completion_tokens_details":{{"reasoning_tokens":{}}}"#,
                self.reasoning
            ));
        }
        s.push('}');
        s
    }

    /// The Responses API's `usage`.
    pub fn responses_json(&self) -> String {
        format!(
            r#"{{"input_tokens":{},"input_tokens_details":{{"cached_tokens":{}}},"output_tokens":{},"output_tokens_details":{{"reasoning_tokens":{}}},"total_tokens":{}}}"#,
            self.prompt,
            self.cache_read,
            self.completion(),
            self.reasoning,
            self.total()
        )
    }

    fn anthropic_cache(&self) -> String {
        format!(
            r#""cache_creation_input_tokens":{},"cache_read_input_tokens":{}"#,
            self.cache_writes(),
            self.cache_read
        )
    }

    fn anthropic_cache_creation(&self) -> String {
        format!(
            r#""cache_creation":{{"ephemeral_5m_input_tokens":{},"ephemeral_1h_input_tokens":{}}}"#,
            self.cache_write_5m, self.cache_write_1h
        )
    }

    /// Anthropic's full `usage` (a message body, `message_start`), with
    /// `output_tokens` given.
    pub fn anthropic_json(&self, output_tokens: u64) -> String {
        format!(
            r#"{{"input_tokens":{},{},{},"output_tokens":{output_tokens},"service_tier":"standard","inference_geo":"not_available"}}"#,
            self.anthropic_input(),
            self.anthropic_cache(),
            self.anthropic_cache_creation(),
        )
    }

    /// Anthropic's `message_delta` `usage`: as recorded, no `cache_creation`
    /// breakdown there.
    pub fn anthropic_delta_json(&self) -> String {
        format!(
            r#"{{"input_tokens":{},{},"output_tokens":{}}}"#,
            self.anthropic_input(),
            self.anthropic_cache(),
            self.completion()
        )
    }

    /// The tool-call replies' Anthropic `usage` (built as a `Value`), with
    /// `output_tokens` given; the `cache_creation` breakdown only when there
    /// are cache writes.
    pub fn anthropic_value(&self, output_tokens: u64) -> Value {
        let mut v = serde_json::json!({
            "input_tokens": self.anthropic_input(),
            "cache_creation_input_tokens": self.cache_writes(),
            "cache_read_input_tokens": self.cache_read,
            "output_tokens": output_tokens,
        });
        if self.cache_writes() > 0 {
            v["cache_creation"] = serde_json::json!({
                "ephemeral_5m_input_tokens": self.cache_write_5m,
                "ephemeral_1h_input_tokens": self.cache_write_1h,
            });
        }
        v
    }
}

/// The request's `n` (and, for `/v1/completions`, `best_of`) as
/// `(choices sent, choices billed)`; an invalid value names its field.
pub fn choices(
    body: &Value,
    completions: bool,
) -> Result<(u64, u64), (&'static str, &'static str)> {
    let n = match body.get("n") {
        None | Some(Value::Null) => 1,
        Some(v) => match v.as_u64() {
            Some(n @ 1..=128) => n,
            _ => return Err(("Invalid 'n': integer between 1 and 128 expected.", "n")),
        },
    };
    if !completions {
        return Ok((n, n));
    }
    let best_of = match body.get("best_of") {
        None | Some(Value::Null) => n,
        Some(v) => match v.as_u64() {
            Some(b @ 1..=20) if b >= n => b,
            Some(1..=20) => return Err(("best_of must be greater than or equal to n.", "best_of")),
            _ => {
                return Err((
                    "Invalid 'best_of': integer between 1 and 20 expected.",
                    "best_of",
                ))
            }
        },
    };
    Ok((n, best_of))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cache_reads_and_writes_are_clamped_to_the_prompt() {
        let k = Knobs {
            cache_read: 6,
            cache_write_5m: 3,
            cache_write_1h: 5,
            reasoning_tokens: 2,
            ..Knobs::default()
        };
        let t = Tokens::new(&k, 10, 4, true);
        assert_eq!(
            (t.cache_read, t.cache_write_5m, t.cache_write_1h),
            (6, 3, 1)
        );
        assert_eq!(t.anthropic_input(), 0);
        assert_eq!(t.completion(), 6);
        let t = Tokens::new(&k, 4, 4, false);
        assert_eq!(
            (t.cache_read, t.cache_writes()),
            (4, 0),
            "OpenAI: no writes"
        );
        let t = Tokens::new(&k, 10, 3, false).with_choices(4);
        assert_eq!(t.completion(), 3 * 4 + 2);
        assert_eq!(
            t.billed(),
            Billed {
                input: 10,
                cached_input: 6,
                cache_write_5m: 0,
                cache_write_1h: 0,
                output: 14,
                reasoning: 2
            }
        );
    }

    #[test]
    fn usage_objects_parse_and_carry_the_classes() {
        let k = Knobs {
            cache_read: 2,
            cache_write_5m: 1,
            cache_write_1h: 3,
            reasoning_tokens: 5,
            ..Knobs::default()
        };
        let t = Tokens::new(&k, 10, 4, true);
        let v: Value = serde_json::from_str(&t.anthropic_json(1)).unwrap();
        assert_eq!(v["input_tokens"], 4);
        assert_eq!(v["cache_read_input_tokens"], 2);
        assert_eq!(v["cache_creation_input_tokens"], 4);
        assert_eq!(
            v["cache_creation"],
            json!({"ephemeral_5m_input_tokens":1,"ephemeral_1h_input_tokens":3})
        );
        let v: Value = serde_json::from_str(&t.anthropic_delta_json()).unwrap();
        assert_eq!(v["output_tokens"], 9);
        let t = Tokens::new(&k, 10, 4, false);
        let v: Value = serde_json::from_str(&t.chat_json()).unwrap();
        assert_eq!(v["prompt_tokens_details"]["cached_tokens"], 2);
        assert_eq!(v["completion_tokens_details"]["reasoning_tokens"], 5);
        assert_eq!(v["total_tokens"], 19);
        let v: Value = serde_json::from_str(&t.responses_json()).unwrap();
        assert_eq!(v["input_tokens_details"]["cached_tokens"], 2);
        assert_eq!(v["output_tokens"], 9);
        let plain = Tokens::new(&Knobs::default(), 3, 2, false).plain_json();
        assert_eq!(
            plain,
            r#"{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}"#
        );
    }

    #[test]
    fn n_and_best_of() {
        assert_eq!(choices(&json!({}), false), Ok((1, 1)));
        assert_eq!(choices(&json!({"n": 3}), false), Ok((3, 3)));
        assert_eq!(choices(&json!({"n": 2, "best_of": 5}), true), Ok((2, 5)));
        assert_eq!(choices(&json!({"best_of": 5}), false), Ok((1, 1)));
        assert_eq!(choices(&json!({"n": 0}), false).unwrap_err().1, "n");
        assert_eq!(
            choices(&json!({"n": 3, "best_of": 2}), true).unwrap_err().1,
            "best_of"
        );
    }
}
