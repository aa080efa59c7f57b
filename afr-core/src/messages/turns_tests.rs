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
        assert!(accepted(&raw(messages)), "{messages}");
        validate_messages(body(messages).as_bytes(), false).expect(messages);
    }
}

#[test]
fn one_pass_never_accepts_what_the_value_reading_refuses() {
    for (messages, param) in REFUSED {
        assert!(!accepted(&raw(messages)), "{messages}");
        let refused = validate_messages(body(messages).as_bytes(), false).expect_err(messages);
        assert_eq!(refused.param.as_deref(), Some(*param), "{messages}");
    }
}

#[test]
fn repeated_roles_and_contents_are_the_value_reading_s_to_decide() {
    for (messages, ok) in LEFT_TO_THE_VALUE {
        assert!(!accepted(&raw(messages)), "{messages}");
        assert_eq!(
            validate_messages(body(messages).as_bytes(), false).is_ok(),
            *ok,
            "{messages}"
        );
    }
}
