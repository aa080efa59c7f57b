use super::*;

fn raw(json: &str) -> Box<RawValue> {
    RawValue::from_string(json.to_owned()).expect("valid JSON")
}

/// Messages one pass must accept (else every request went the long way).
const ACCEPTED: &[&str] = &[
    r#"[{"role":"user","content":"hi"}]"#,
    r#"[{"role":"system","content":"be brief"},{"role":"user","content":"a\nb \u00e9 \ud83d\ude00"}]"#,
    r#"[{"role":"user","content":[{"type":"text","text":"hi"},{"type":"image_url","image_url":{"url":"https://x/y.png"}}]}]"#,
    r#"[{"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{}"}}]},{"role":"tool","tool_call_id":"c1","content":"42"}]"#,
    r#"[{"role":"assistant","tool_calls":[]}]"#,
    r#"[{"role":"function","name":"f","content":null}]"#,
    r#"[{"role":"critic","content":7}]"#,
    r#"[{"content":"first","role":"developer","name":"n"}]"#,
    r#" [ { "role" : "user" , "content" : "" } ] "#,
    r#"[{"role":"us\u0065r","content":"escaped roles and keys are decoded"}]"#,
    r#"[{"r\u006fle":"user","content":"hi"}]"#,
];

/// Messages the long way refuses: the pass must never accept one.
const REFUSED: &[&str] = &[
    "[]",
    "null",
    "{}",
    r#""hi""#,
    "[1]",
    r#"[{"role":"user","content":"hi"}, null]"#,
    r#"[{"content":"hi"}]"#,
    r#"[{"role":null,"content":"hi"}]"#,
    r#"[{"role":7,"content":"hi"}]"#,
    r#"[{"role":"user"}]"#,
    r#"[{"role":"user","content":null}]"#,
    r#"[{"role":"user","content":7}]"#,
    r#"[{"role":"user","content":true}]"#,
    r#"[{"role":"user","content":{"text":"hi"}}]"#,
    r#"[{"role":"system","content":"\ud800 lone"}]"#,
    r#"[{"role":"user","content":"hi","role":"user"}]"#,
    r#"[{"role":"user","content":"a","content":"b"}]"#,
    r#"[{"role":"user","content":"hi","name":"a","name":"b"}]"#,
    r#"[{"role":"tool","content":null}]"#,
    r#"[{"role":"function"}]"#,
];

/// Messages the long way accepts that the pass leaves to it.
const LEFT_TO_THE_LONG_WAY: &[&str] = &[r#"[{"role":"critic","content":1e999}]"#];

#[test]
fn one_pass_accepts_the_usual_messages() {
    for json in ACCEPTED {
        assert!(fast(&raw(json), None), "{json}");
        assert!(check(Some(&raw(json)), None).is_ok(), "{json}");
        assert!(check_slowly(Some(&raw(json))).is_ok(), "{json}");
    }
}

#[test]
fn one_pass_never_accepts_what_the_long_way_refuses() {
    for json in REFUSED {
        assert!(!fast(&raw(json), None), "{json}");
        let slow = check_slowly(Some(&raw(json))).expect_err(json);
        let checked = check(Some(&raw(json)), None).expect_err(json);
        assert_eq!(checked.param, slow.param, "{json}");
        assert_eq!(checked.message, slow.message, "{json}");
    }
    assert_eq!(
        check(None, None).expect_err("absent").param.as_deref(),
        Some("messages")
    );
}

#[test]
fn what_one_pass_does_not_decide_the_long_way_does() {
    for json in LEFT_TO_THE_LONG_WAY {
        assert!(!fast(&raw(json), None), "{json}");
        let slow = check_slowly(Some(&raw(json)));
        assert_eq!(
            check(Some(&raw(json)), None).is_ok(),
            slow.is_ok(),
            "{json}"
        );
    }
}

/// Chat bodies whose prompt estimate validation counts in its pass: the
/// count must be `prompt_tokens`'s to the token.
fn counted_bodies() -> Vec<String> {
    let b64 = "iVBORw0KGgo".repeat(100);
    let mut bodies: Vec<String> = ACCEPTED
        .iter()
        .map(|m| format!(r#"{{"model":"m","messages":{m}}}"#))
        .collect();
    bodies.extend([
        // Images: by URL, inline, low detail, and a role that looks like media.
        format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":[{{"type":"text","text":"What is this?"}},{{"type":"image_url","image_url":{{"url":"data:image/png;base64,{b64}","detail":"low"}}}},{{"type":"image_url","image_url":{{"url":"https://example.com/cat.png"}}}}]}}]}}"#
        ),
        format!(r#"{{"model":"m","messages":[{{"role":"{b64}","content":"x"}}]}}"#),
        format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":[{{"type":"file","file":{{"file_data":"data:application/pdf;base64,{b64}","filename":"a.pdf"}}}}]}}]}}"#
        ),
        // Tools, a response format, a prediction and members that are no prompt.
        r#"{"model":"m","temperature":0.2,"metadata":{"a":"b"},"messages":[{"role":"user","content":"hi"}],"tools":[{"type":"function","function":{"name":"f","description":"d","parameters":{"type":"object","properties":{"n":{"type":"integer","minimum":1}}}}}],"tool_choice":"auto","response_format":{"type":"json_schema","json_schema":{"name":"s","schema":{"type":"object"}}},"prediction":{"type":"content","content":"x"}}"#.to_owned(),
        // Other scripts and escapes.
        r#"{"model":"m","messages":[{"role":"user","content":"\u4f60\u597d \u043f\u0440\u0438\u0432\u0435\u0442 \ud83d\ude00 \"q\""}]}"#.to_owned(),
    ]);
    bodies
}

#[test]
fn the_estimate_counted_in_validation_s_pass_is_prompt_tokens_s() {
    use crate::estimate::{prompt_tokens, Wire};
    use crate::validate::{validate_chat, validate_chat_counting};
    for body in counted_bodies() {
        let counted = validate_chat_counting(body.as_bytes()).expect(&body);
        assert_eq!(
            counted.prompt_tokens,
            Some(prompt_tokens(body.as_bytes(), Wire::Chat)),
            "{body}"
        );
        let plain = validate_chat(body.as_bytes()).expect(&body);
        assert_eq!(plain.prompt_tokens, None, "{body}");
        assert_eq!(
            ChatRequestSansCount::from(plain),
            ChatRequestSansCount::from(counted),
            "{body}"
        );
    }
}

/// Nested to serde_json's depth limit and past it: the count and
/// `prompt_tokens` meet the limit at the same depth (the count falls back
/// where `prompt_tokens` does).
#[test]
fn the_count_and_prompt_tokens_meet_the_depth_limit_at_one_place() {
    use crate::estimate::{prompt_tokens, Wire};
    use crate::validate::validate_chat_counting;
    let mut fell_back = 0;
    for depth in 118..=130 {
        let (open, close) = ("[".repeat(depth), "]".repeat(depth));
        let body =
            format!(r#"{{"model":"m","messages":[{{"role":"user","content":{open}{close}}}]}}"#);
        let Ok(request) = validate_chat_counting(body.as_bytes()) else {
            continue;
        };
        let estimate = prompt_tokens(body.as_bytes(), Wire::Chat);
        match request.prompt_tokens {
            Some(counted) => assert_eq!(counted, estimate, "depth {depth}"),
            None => {
                fell_back += 1;
                assert_eq!(estimate, (body.len() as u64).div_ceil(4), "depth {depth}");
            }
        }
    }
    assert!(fell_back > 0, "the limit was never reached");
}

#[test]
fn messages_the_pass_leaves_to_the_long_way_leave_the_estimate_to_prompt_tokens() {
    use crate::validate::validate_chat_counting;
    for messages in LEFT_TO_THE_LONG_WAY {
        let body = format!(r#"{{"model":"m","messages":{messages}}}"#);
        if let Ok(request) = validate_chat_counting(body.as_bytes()) {
            assert_eq!(request.prompt_tokens, None, "{body}");
        }
    }
    // A value the count cannot read (a number out of range, which only the
    // count decodes) leaves it too, in a message or in a tool.
    for body in [
        r#"{"model":"m","messages":[{"role":"user","content":"hi","tool_calls":[{"n":-1e999}]}]}"#,
        r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"tools":[{"x":1e999}]}"#,
    ] {
        let request = validate_chat_counting(body.as_bytes()).expect(body);
        assert_eq!(request.prompt_tokens, None, "{body}");
    }
}

/// A validated request less its counted estimate: counting changes nothing else.
#[derive(Debug, PartialEq)]
struct ChatRequestSansCount(crate::validate::ChatRequest);

impl From<crate::validate::ChatRequest> for ChatRequestSansCount {
    fn from(mut request: crate::validate::ChatRequest) -> Self {
        request.prompt_tokens = None;
        ChatRequestSansCount(request)
    }
}
