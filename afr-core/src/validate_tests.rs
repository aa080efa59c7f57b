use super::*;

fn param_of(body: &str) -> Option<String> {
    validate_chat(body.as_bytes()).expect_err(body).param
}

const MSG: &str = r#""messages":[{"role":"user","content":"hi"}]"#;

#[test]
fn bad_input_corpus_names_the_field() {
    let corpus: Vec<(String, Option<&str>)> = vec![
        ("{".into(), None),
        ("[]".into(), None),
        ("null".into(), None),
        (format!("{{{MSG}}}"), Some("model")),
        (format!(r#"{{"model":7,{MSG}}}"#), Some("model")),
        (format!(r#"{{"model":"",{MSG}}}"#), Some("model")),
        (r#"{"model":"m"}"#.into(), Some("messages")),
        (r#"{"model":"m","messages":"hi"}"#.into(), Some("messages")),
        (r#"{"model":"m","messages":[]}"#.into(), Some("messages")),
        (
            r#"{"model":"m","messages":[1]}"#.into(),
            Some("messages[0]"),
        ),
        (
            r#"{"model":"m","messages":[{"content":"x"}]}"#.into(),
            Some("messages[0].role"),
        ),
        (
            r#"{"model":"m","messages":[{"role":7,"content":"x"}]}"#.into(),
            Some("messages[0].role"),
        ),
        (
            r#"{"model":"m","messages":[{"role":"function","name":"f"}]}"#.into(),
            Some("messages[0].content"),
        ),
        (
            r#"{"model":"m","messages":[{"role":"user","content":"a"},{"role":"user"}]}"#.into(),
            Some("messages[1].content"),
        ),
        (
            r#"{"model":"m","messages":[{"role":"user","content":5}]}"#.into(),
            Some("messages[0].content"),
        ),
        (
            format!(r#"{{"model":"m",{MSG},"temperature":2.5}}"#),
            Some("temperature"),
        ),
        (
            format!(r#"{{"model":"m",{MSG},"temperature":-0.1}}"#),
            Some("temperature"),
        ),
        (
            format!(r#"{{"model":"m",{MSG},"temperature":"hot"}}"#),
            Some("temperature"),
        ),
        (
            format!(r#"{{"model":"m",{MSG},"max_tokens":0}}"#),
            Some("max_tokens"),
        ),
        (
            format!(r#"{{"model":"m",{MSG},"max_tokens":-5}}"#),
            Some("max_tokens"),
        ),
        (
            format!(r#"{{"model":"m",{MSG},"max_tokens":1.5}}"#),
            Some("max_tokens"),
        ),
        (
            format!(r#"{{"model":"m",{MSG},"max_tokens":"10"}}"#),
            Some("max_tokens"),
        ),
        (
            format!(r#"{{"model":"m",{MSG},"stream":"yes"}}"#),
            Some("stream"),
        ),
        // Valid JSON, but no f64 holds it: never read as absent (which
        // would fill the default while the provider gets 1e999).
        (
            format!(r#"{{"model":"m",{MSG},"temperature":1e999}}"#),
            Some("temperature"),
        ),
        (
            format!(r#"{{"model":"m",{MSG},"max_tokens":1e999}}"#),
            Some("max_tokens"),
        ),
        (
            format!(r#"{{"model":"m",{MSG},"stream":-1e999}}"#),
            Some("stream"),
        ),
        (
            r#"{"model":"m","messages":[{"role":"user","content":1e999}]}"#.into(),
            Some("messages[0].content"),
        ),
        (
            format!(r#"{{"model":"m",{MSG},"stream_options":1}}"#),
            Some("stream_options"),
        ),
        (
            format!(r#"{{"model":"m",{MSG},"stream_options":{{"include_usage":"y"}}}}"#),
            Some("stream_options.include_usage"),
        ),
    ];
    for (body, param) in corpus {
        assert_eq!(param_of(&body).as_deref(), param, "{body}");
    }
}

/// What a route with no adaptations sends for `body`.
fn sent(body: &str, ask_usage: bool) -> String {
    let route: RouteConfig = toml::from_str("provider = \"p\"\nmodel = \"up\"").unwrap();
    let req = validate_chat(body.as_bytes()).unwrap();
    String::from_utf8(req.upstream_body(body.as_bytes(), &route, ask_usage)).unwrap()
}

#[test]
fn fills_defaults_and_keeps_everything_else_byte_for_byte() {
    let body = format!(
        r#"{{"model":"m", {MSG},"seed":123456789012345678901234567890,"x":1e-7,"y":-0,"s":"\u00e9","tools":[{{"type":"function"}}],"response_format":{{"type":"json_schema","json_schema":{{"schema":{{"properties":{{"zeta":{{}},"alpha":{{}}}}}}}}}}}}"#
    );
    let req = validate_chat(body.as_bytes()).unwrap();
    assert_eq!(req.model, "m");
    assert!(!req.stream);
    assert!(req.fill_temperature && req.fill_max_tokens);
    let expected = format!(
        "{},\"temperature\":0.7,\"max_tokens\":4096}}",
        body[..body.len() - 1].replace(r#""model":"m""#, r#""model":"up""#)
    );
    assert_eq!(sent(&body, false), expected);
}

#[test]
fn keeps_client_values_and_reads_stream_flags() {
    let body = format!(
        r#"{{"model":"m",{MSG},"temperature":0,"max_tokens":5,"stream":true,"stream_options":{{"include_usage":true}}}}"#
    );
    let req = validate_chat(body.as_bytes()).unwrap();
    assert!(!req.fill_temperature && !req.fill_max_tokens);
    assert!(req.stream && req.include_usage);
    assert_eq!(sent(&body, false), body.replace(r#""m""#, r#""up""#));
}

#[test]
fn null_defaults_are_filled_in_place() {
    let body = format!(r#"{{"temperature":null,"model":"m",{MSG},"max_tokens":null}}"#);
    assert_eq!(
        sent(&body, false),
        format!(r#"{{"temperature":0.7,"model":"up",{MSG},"max_tokens":4096}}"#)
    );
}

#[test]
fn include_usage_is_added_beside_the_clients_stream_options() {
    let plain = format!(r#"{{"model":"m",{MSG},"max_tokens":5,"temperature":1,"stream":true}}"#);
    assert_eq!(
        sent(&plain, true),
        format!(
            r#"{{"model":"up",{MSG},"max_tokens":5,"temperature":1,"stream":true,"stream_options":{{"include_usage":true}}}}"#
        )
    );
    let own = format!(
        r#"{{"model":"m",{MSG},"max_tokens":5,"temperature":1,"stream":true,"stream_options":{{"x":1, "include_usage":false}}}}"#
    );
    assert!(sent(&own, true).ends_with(r#""stream_options":{"x":1, "include_usage":true}}"#));
}

#[test]
fn duplicate_keys_where_the_gateway_reads_are_refused() {
    for (body, param) in [
        (format!(r#"{{"model":"a",{MSG},"model":"b"}}"#), "model"),
        (
            format!(r#"{{"model":"a",{MSG},"max_tokens":1,"max_tokens":99999}}"#),
            "max_tokens",
        ),
        (
            format!(
                r#"{{"model":"a",{MSG},"stream_options":{{"include_usage":true,"include_usage":false}}}}"#
            ),
            "stream_options.include_usage",
        ),
        (
            r#"{"model":"a","messages":[{"role":"user","role":"system","content":"x"}]}"#
                .to_string(),
            "messages[0].role",
        ),
    ] {
        let invalid = validate_chat(body.as_bytes()).expect_err(&body);
        assert_eq!(invalid.param.as_deref(), Some(param), "{body}");
        assert!(
            invalid.message.contains("more than once"),
            "{}",
            invalid.message
        );
    }
}

#[test]
fn max_completion_tokens_suppresses_the_max_tokens_default() {
    let body = format!(r#"{{"model":"m",{MSG},"max_completion_tokens":9}}"#);
    let req = validate_chat(body.as_bytes()).unwrap();
    assert!(!req.fill_max_tokens);
    assert!(!sent(&body, false).contains("max_tokens\""));
}

#[test]
fn the_prompt_estimate_counts_decoded_text() {
    let body = r#"{"model":"m","messages":[{"role":"user","content":"h\u00e9"}]}"#;
    let same = r#"{"model":"m","messages":[{"role":"user","content":"hé"}]}"#;
    let estimate =
        |b: &str| crate::estimate::prompt_tokens(b.as_bytes(), crate::estimate::Wire::Chat);
    assert_eq!(estimate(body), estimate(same));
}

#[test]
fn assistant_tool_call_turns_need_no_content() {
    let body = r#"{"model":"m","messages":[{"role":"assistant","content":null,"tool_calls":[]}]}"#;
    assert!(validate_chat(body.as_bytes()).is_ok());
}

/// Issue 23: a function message's content is `string | null`
/// (`ChatCompletionFunctionMessageParam`, openai 6.49.0); before, null was
/// a 400 `Invalid type for 'messages[1].content'`. A role the gateway does
/// not know reaches a chat route untouched, content and all, for its
/// provider to judge; before, a 400 `'critic' is not one of [...]`.
#[test]
fn function_results_may_be_null_and_unknown_roles_pass_through() {
    for body in [
        r#"{"model":"m","messages":[{"role":"user","content":"hi"},{"role":"function","name":"f","content":null}]}"#,
        r#"{"model":"m","messages":[{"role":"user","content":"hi"},{"role":"critic","content":{"score":1}},{"role":"critic"}]}"#,
    ] {
        validate_chat(body.as_bytes()).expect(body);
        let sent = sent(body, false);
        let sent: Value = serde_json::from_str(&sent).unwrap();
        let original: Value = serde_json::from_str(body).unwrap();
        assert_eq!(sent["messages"], original["messages"], "{body}");
    }
}

#[test]
fn model_checks() {
    assert_eq!(
        check_model("x", false, None).unwrap_err().code,
        Some("model_not_found")
    );
    let allowed = vec!["a".to_string()];
    assert_eq!(
        check_model("b", true, Some(&allowed))
            .unwrap_err()
            .param
            .as_deref(),
        Some("model")
    );
    assert!(check_model("a", true, Some(&allowed)).is_ok());
    assert!(check_model("b", true, None).is_ok());
}
