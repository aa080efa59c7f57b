use super::accepted;
use crate::messages::validate_messages;
use serde_json::value::RawValue;

fn body(messages: &str) -> String {
    format!(r#"{{"model":"claude","max_tokens":16,"messages":{messages}}}"#)
}

fn raw(json: &str) -> Box<RawValue> {
    RawValue::from_string(json.to_owned()).expect("valid JSON")
}

/// Turns one pass must accept (else every request went the long way).
const ACCEPTED: &[&str] = &[
    "[]",
    r#"[{"role":"user","content":"hi"}]"#,
    r#"[{"role":"user","content":[{"type":"text","text":"a\n\u00e9","cache_control":{"type":"ephemeral"}}]},{"role":"assistant","content":[{"type":"tool_use","id":"t","name":"f","input":{"n":1.5,"deep":[null,true]}}]}]"#,
    r#"[{"role":"system"}]"#,
    r#"[{"role":"system","content":null,"clear_at":3}]"#,
    r#"[{"role":"critic","content":7}]"#,
    r#"[{"content":"first","role":"user"}]"#,
    r#"[{"r\u006fle":"us\u0065r","content":"escaped keys and roles are decoded"}]"#,
    r#"[{"role":"user","content":"hi","extra":1,"extra":2}]"#,
];

/// Turns the `Value` reading refuses: the pass must never accept one.
const REFUSED: &[(&str, &str)] = &[
    ("null", "messages"),
    ("{}", "messages"),
    ("[1]", "messages.0.role"),
    (r#"[{"content":"hi"}]"#, "messages.0.role"),
    (r#"[{"role":null,"content":"hi"}]"#, "messages.0.role"),
    (r#"[{"role":7,"content":"hi"}]"#, "messages.0.role"),
    (r#"[{"role":"user"}]"#, "messages.0.content"),
    (
        r#"[{"role":"assistant","content":null}]"#,
        "messages.0.content",
    ),
    (
        r#"[{"role":"user","content":{"text":"hi"}}]"#,
        "messages.0.content",
    ),
    (
        r#"[{"role":"user","content":"ok"},{"role":"user","content":3}]"#,
        "messages.1.content",
    ),
    (r#"[{"role":"user","content":"\ud800 lone"}]"#, "messages"),
    (
        r#"[{"role":"user","content":[{"type":"tool_result","content":"\udc00"}]}]"#,
        "messages",
    ),
    (
        r#"[{"role":"user","content":"hi","meta":1e999}]"#,
        "messages",
    ),
];

/// Turns the `Value` reading decides that the pass leaves to it: a `Value`
/// keeps the last of a repeated `role` or `content`.
const LEFT_TO_THE_VALUE: &[(&str, bool)] = &[
    (
        r#"[{"role":"user","content":3,"content":"last wins"}]"#,
        true,
    ),
    (r#"[{"role":"user","content":"first","content":3}]"#, false),
    (r#"[{"role":7,"role":"user","content":"hi"}]"#, true),
];

#[test]
fn one_pass_accepts_the_usual_turns() {
    for messages in ACCEPTED {
        assert!(accepted(&raw(messages), None), "{messages}");
        validate_messages(body(messages).as_bytes(), false).expect(messages);
    }
}

#[test]
fn one_pass_never_accepts_what_the_value_reading_refuses() {
    for (messages, param) in REFUSED {
        assert!(!accepted(&raw(messages), None), "{messages}");
        let refused = validate_messages(body(messages).as_bytes(), false).expect_err(messages);
        assert_eq!(refused.param.as_deref(), Some(*param), "{messages}");
        let counting =
            crate::messages::validate_messages_counting(body(messages).as_bytes(), false);
        assert_eq!(counting.expect_err(messages), refused, "{messages}");
    }
}

#[test]
fn repeated_roles_and_contents_are_the_value_reading_s_to_decide() {
    for (messages, ok) in LEFT_TO_THE_VALUE {
        assert!(!accepted(&raw(messages), None), "{messages}");
        assert_eq!(
            validate_messages(body(messages).as_bytes(), false).is_ok(),
            *ok,
            "{messages}"
        );
    }
}

#[test]
fn the_estimate_counted_in_validation_s_pass_is_prompt_tokens_s() {
    use crate::estimate::{prompt_tokens, Wire};
    use crate::messages::validate_messages_counting;
    let b64 = "iVBORw0KGgo".repeat(100);
    let mut bodies: Vec<String> = ACCEPTED.iter().map(|m| body(m)).collect();
    bodies.extend([
        // Claude Code's shape: a system prompt in blocks, tools, tool use and
        // results, cache markers, an image whose media type comes after it.
        format!(
            r#"{{"model":"claude","max_tokens":64,"system":[{{"type":"text","text":"You are Claude Code.","cache_control":{{"type":"ephemeral"}}}}],"tools":[{{"name":"Read","description":"Reads a file","input_schema":{{"type":"object","properties":{{"path":{{"type":"string"}}}},"required":["path"]}}}}],"tool_choice":{{"type":"auto"}},"metadata":{{"user_id":"u"}},"messages":[{{"role":"user","content":[{{"type":"text","text":"look \u00e9"}},{{"type":"image","source":{{"type":"base64","data":"{b64}","media_type":"image/png"}}}}]}},{{"role":"assistant","content":[{{"type":"tool_use","id":"t1","name":"Read","input":{{"path":"a.rs","n":3}}}}]}},{{"role":"user","content":[{{"type":"tool_result","tool_use_id":"t1","content":"fn main() {{}}\n"}}]}}]}}"#
        ),
        format!(
            r#"{{"model":"claude","max_tokens":5,"system":"plain","messages":[{{"role":"user","content":[{{"type":"document","source":{{"type":"base64","media_type":"application/pdf","data":"{b64}"}}}}]}}]}}"#
        ),
        format!(r#"{{"model":"claude","max_tokens":5,"messages":[{{"role":"{b64}"}}]}}"#),
        // Nested as deep as serde_json reads: the count and `prompt_tokens`
        // must meet its limit at the same place.
        body(&format!(r#"[{{"role":"user","content":{}{}}}]"#, "[".repeat(124), "]".repeat(124))),
    ]);
    for body in bodies {
        let counted = validate_messages_counting(body.as_bytes(), false).expect(&body);
        assert_eq!(
            counted.prompt_tokens,
            Some(prompt_tokens(body.as_bytes(), Wire::Messages)),
            "{body}"
        );
        let mut plain = validate_messages(body.as_bytes(), false).expect(&body);
        assert_eq!(plain.prompt_tokens, None, "{body}");
        plain.prompt_tokens = counted.prompt_tokens;
        assert_eq!(plain, counted, "{body}");
    }
    // What the pass leaves to the `Value` reading, or a value the count
    // cannot read, leaves the estimate to `prompt_tokens`.
    for body in [
        body(r#"[{"role":"user","content":3,"content":"last wins"}]"#),
        r#"{"model":"claude","max_tokens":5,"messages":[{"role":"user","content":"hi"}],"tools":[{"x":1e999}]}"#.to_owned(),
    ] {
        let counted = validate_messages_counting(body.as_bytes(), false).expect(&body);
        assert_eq!(counted.prompt_tokens, None, "{body}");
    }
}
