//! A provider's whole (non-streamed) answer body: one pass that checks it
//! is a JSON object and reads its usage and, for a sampled span, what it
//! says of itself.

use super::ProviderError;
use afr_core::sse::TokenUsage;
use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

/// What a whole answer says of itself: its id, model and why it stopped
/// (`choices[].finish_reason`, Anthropic's `stop_reason`, the Responses
/// API's `status`), for the request's span (`gen_ai.response.*`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AnswerFacts {
    /// `id`.
    pub id: Option<String>,
    /// `model`.
    pub model: Option<String>,
    /// Every finish reason, in order.
    pub finish_reasons: Vec<String>,
}

/// Reads usage from an OpenAI-shaped completion body, which must be a JSON
/// object: a 200 whose body is not one (a captive portal's or a misrouted
/// proxy's HTML page) is a provider failure, failed over like a 5xx, never
/// relayed to the client as its answer. With `facts`, also what the answer
/// says of itself, in the same pass: a second serde pass over the body for
/// the span cost a traced request ~16 000 instructions (callgrind, issue 26).
pub(crate) fn read_answer(
    body: &[u8],
    facts: bool,
) -> Result<(Option<TokenUsage>, Option<Box<AnswerFacts>>), ProviderError> {
    /// The usage is read leniently (a usage shape we do not know only loses
    /// the counts), the body strictly: it must be one JSON object. One pass
    /// checks the body and borrows the usage's bytes (the other members are
    /// skipped, and so checked, by serde); the usage is then read from those
    /// bytes straight into `TokenUsage`, never through a `Value` tree (which
    /// cost a fifth of a non-streamed request's instructions).
    #[derive(serde::Deserialize)]
    struct WithUsage<'a> {
        #[serde(default, borrow)]
        usage: Option<&'a RawValue>,
    }
    /// The same pass for a span, borrowing what it wants as well (as cheap
    /// as skipping it). Stricter than [`WithUsage`] on odd bodies (a
    /// duplicated `id`, a number out of range among the choices): those are
    /// read again the plain way, so a span never decides what is an answer.
    #[derive(serde::Deserialize)]
    struct Whole<'a> {
        #[serde(default, borrow)]
        usage: Option<&'a RawValue>,
        #[serde(default, borrow)]
        id: Option<&'a RawValue>,
        #[serde(default, borrow)]
        model: Option<&'a RawValue>,
        #[serde(default, borrow)]
        stop_reason: Option<&'a RawValue>,
        #[serde(default, borrow)]
        status: Option<&'a RawValue>,
        #[serde(default, borrow)]
        choices: FinishReasons<'a>,
    }
    // A derived struct also reads a JSON array, member by member.
    if body.trim_ascii_start().first() != Some(&b'{') {
        return Err(not_an_object("it does not start with {"));
    }
    let read_usage =
        |raw: Option<&RawValue>| raw.and_then(|r| serde_json::from_str::<TokenUsage>(r.get()).ok());
    let plain = |body: &[u8]| match serde_json::from_slice::<WithUsage>(body) {
        Ok(with) => Ok((read_usage(with.usage), None)),
        Err(e) => Err(not_an_object(&e.to_string())),
    };
    if !facts {
        return plain(body);
    }
    let Ok(whole) = serde_json::from_slice::<Whole>(body) else {
        return plain(body);
    };
    let usage = read_usage(whole.usage);
    let text =
        |raw: Option<&RawValue>| raw.and_then(|r| serde_json::from_str::<String>(r.get()).ok());
    let finish_reasons = whole
        .choices
        .0
        .into_iter()
        .chain(whole.stop_reason)
        .filter_map(|r| text(Some(r)))
        .chain(text(whole.status).filter(|s| s != "in_progress"))
        .collect();
    let facts = AnswerFacts {
        id: text(whole.id),
        model: text(whole.model),
        finish_reasons,
    };
    Ok((usage, Some(Box::new(facts))))
}

fn not_an_object(why: &str) -> ProviderError {
    ProviderError::Protocol(format!(
        "the provider answered 200 with a body that is not a JSON object ({why})"
    ))
}

/// `choices[].finish_reason` of a chat completion, borrowed while the
/// choices are skipped anyway. `choices` of another shape is skipped as it
/// was before (a shape we do not know loses the reasons, never the answer).
#[derive(Default)]
struct FinishReasons<'a>(Vec<&'a RawValue>);

/// Accepts any JSON value that is not the one the visitor is for, skipping it.
macro_rules! skip_other_values {
    () => {
        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
        fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
        fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
        fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
    };
}

impl<'de: 'a, 'a> Deserialize<'de> for FinishReasons<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Choices<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for Choices<'a> {
            type Value = FinishReasons<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut reasons = Vec::new();
                while let Some(Choice(reason)) = seq.next_element::<Choice<'a>>()? {
                    reasons.extend(reason);
                }
                Ok(FinishReasons(reasons))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(FinishReasons::default())
            }
            skip_other_values!();
        }
        d.deserialize_any(Choices(PhantomData))
    }
}

/// One choice's `finish_reason` (`None`: absent, null, or not an object).
#[derive(Default)]
struct Choice<'a>(Option<&'a RawValue>);

impl<'de: 'a, 'a> Deserialize<'de> for Choice<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct One<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for One<'a> {
            type Value = Choice<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut reason = None;
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    if key == "finish_reason" {
                        reason = map.next_value::<Option<&'a RawValue>>()?;
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(Choice(reason))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Choice::default())
            }
            skip_other_values!();
        }
        d.deserialize_any(One(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_pass_reads_usage_and_what_the_answer_says_of_itself() {
        let chat = br#"{"id":"chatcmpl-1","object":"chat.completion","model":"gpt-4o-2024-08-06",
            "choices":[{"index":0,"message":{"role":"assistant","content":"hi \"finish_reason\":\"x\"",
            "tool_calls":[{"id":"call_1","type":"function"}]},"finish_reason":"stop"},
            {"index":1,"finish_reason":null},{"index":2,"finish_reason":"length"}],
            "usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#;
        let (usage, facts) = read_answer(chat, true).unwrap();
        assert_eq!(usage.map(|u| u.total_tokens), Some(5));
        assert_eq!(
            *facts.unwrap(),
            AnswerFacts {
                id: Some("chatcmpl-1".into()),
                model: Some("gpt-4o-2024-08-06".into()),
                finish_reasons: vec!["stop".into(), "length".into()],
            }
        );
        assert!(
            read_answer(chat, false).unwrap().1.is_none(),
            "only when asked"
        );
        let anthropic = br#"{"id":"msg_1","type":"message","model":"claude-sonnet-4-5",
            "content":[{"type":"tool_use","id":"toolu_1"}],"stop_reason":"tool_use"}"#;
        let facts = read_answer(anthropic, true).unwrap().1.unwrap();
        assert_eq!(
            (facts.id.as_deref(), facts.finish_reasons.as_slice()),
            (Some("msg_1"), &["tool_use".to_owned()][..])
        );
        let responses =
            br#"{"id":"resp_1","object":"response","status":"completed","model":"gpt-4.1",
            "output":[{"type":"message","status":"completed"}]}"#;
        let facts = read_answer(responses, true).unwrap().1.unwrap();
        assert_eq!(facts.finish_reasons, ["completed"]);
        let embeddings = br#"{"object":"list","data":[],"model":"text-embedding-3-small"}"#;
        let facts = read_answer(embeddings, true).unwrap().1.unwrap();
        assert_eq!(
            (facts.id, facts.model.as_deref()),
            (None, Some("text-embedding-3-small"))
        );
    }

    #[test]
    fn what_the_plain_pass_accepts_the_span_s_pass_accepts() {
        for body in [
            r#"{"id":"a","id":"b","usage":{"total_tokens":1}}"#,
            r#"{"choices":[1e400],"usage":{"total_tokens":1}}"#,
            r#"{"choices":[{"\ud800":1,"finish_reason":"stop"}],"usage":{"total_tokens":1}}"#,
        ] {
            let (usage, facts) = read_answer(body.as_bytes(), true).expect(body);
            assert_eq!(usage.map(|u| u.total_tokens), Some(1), "{body}");
            assert!(facts.is_none(), "{body}");
            assert!(read_answer(body.as_bytes(), false).is_ok(), "{body}");
        }
    }

    #[test]
    fn choices_of_another_shape_lose_the_reasons_not_the_answer() {
        for choices in [
            r#""n/a""#,
            "null",
            "7",
            r#"{"a":[1]}"#,
            r#"[1,"x",[2],null,{"finish_reason":3}]"#,
        ] {
            let body = format!(r#"{{"id":"x","choices":{choices},"usage":{{"total_tokens":1}}}}"#);
            let (usage, facts) = read_answer(body.as_bytes(), true).expect(choices);
            assert_eq!(usage.map(|u| u.total_tokens), Some(1), "{choices}");
            assert!(facts.unwrap().finish_reasons.is_empty(), "{choices}");
        }
        // Still one JSON object, or a failure the route fails over on.
        assert!(read_answer(b"<html>", true).is_err());
        assert!(read_answer(br#"{"choices":[{"finish_reason":"stop"}"#, true).is_err());
    }
}
