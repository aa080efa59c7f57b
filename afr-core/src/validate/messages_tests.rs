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
const LEFT_TO_THE_LONG_WAY: &[&str] = &[
    r#"[{"role":"us\u0065r","content":"hi"}]"#,
    r#"[{"r\u006fle":"user","content":"hi"}]"#,
    r#"[{"role":"critic","content":1e999}]"#,
];

#[test]
fn one_pass_accepts_the_usual_messages() {
    for json in ACCEPTED {
        assert!(fast(&raw(json)), "{json}");
        assert!(check(Some(&raw(json))).is_ok(), "{json}");
        assert!(check_slowly(Some(&raw(json))).is_ok(), "{json}");
    }
}

#[test]
fn one_pass_never_accepts_what_the_long_way_refuses() {
    for json in REFUSED {
        assert!(!fast(&raw(json)), "{json}");
        let slow = check_slowly(Some(&raw(json))).expect_err(json);
        let checked = check(Some(&raw(json))).expect_err(json);
        assert_eq!(checked.param, slow.param, "{json}");
        assert_eq!(checked.message, slow.message, "{json}");
    }
    assert_eq!(
        check(None).expect_err("absent").param.as_deref(),
        Some("messages")
    );
}

#[test]
fn what_one_pass_does_not_decide_the_long_way_does() {
    for json in LEFT_TO_THE_LONG_WAY {
        assert!(!fast(&raw(json)), "{json}");
        let slow = check_slowly(Some(&raw(json)));
        assert_eq!(check(Some(&raw(json))).is_ok(), slow.is_ok(), "{json}");
    }
}
