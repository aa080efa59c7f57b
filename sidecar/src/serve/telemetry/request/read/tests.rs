//! The request's parameters and the answer's id, model and finish reasons,
//! as the span reads them.

use super::*;

#[test]
fn answers_give_id_model_and_finish_reasons_on_every_wire() {
    let read = |json: &str| {
        let mut info = ResponseInfo::default();
        info.read(serde_json::from_str(json).unwrap());
        (info.id, info.model, info.finish_reasons)
    };
    let chat = r#"{"id":"chatcmpl-1","model":"gpt-4o-2024","choices":[{"index":0,"finish_reason":"stop"},{"index":1,"finish_reason":"length"}]}"#;
    assert_eq!(
        read(chat),
        (
            Some("chatcmpl-1".into()),
            Some("gpt-4o-2024".into()),
            vec!["stop".into(), "length".into()]
        )
    );
    let message = r#"{"id":"msg_1","type":"message","model":"claude-x","stop_reason":"end_turn","content":[]}"#;
    assert_eq!(read(message).2, vec!["end_turn".to_owned()]);
    let start = r#"{"type":"message_start","message":{"id":"msg_2","model":"claude-y"}}"#;
    assert_eq!(read(start).0.as_deref(), Some("msg_2"));
    let delta = r#"{"type":"message_delta","delta":{"stop_reason":"max_tokens"}}"#;
    assert_eq!(read(delta).2, vec!["max_tokens".to_owned()]);
    let done = r#"{"type":"response.completed","response":{"id":"resp_1","model":"gpt-5","status":"completed"}}"#;
    assert_eq!(
        read(done),
        (
            Some("resp_1".into()),
            Some("gpt-5".into()),
            vec!["completed".into()]
        )
    );
}

#[test]
fn request_parameters_become_the_conventions_attributes() {
    let params: RequestParams = serde_json::from_str(
        r#"{"model":"m","max_completion_tokens":50,"temperature":0.5,"stop":"END","n":2,"seed":7,"messages":[]}"#,
    )
    .unwrap();
    let attributes = params.attributes();
    let get = |k: &str| {
        attributes
            .iter()
            .find(|kv| kv.key.as_str() == k)
            .map(|kv| kv.value.clone())
    };
    assert_eq!(get("gen_ai.request.max_tokens"), Some(Value::I64(50)));
    assert_eq!(get("gen_ai.request.temperature"), Some(Value::F64(0.5)));
    assert_eq!(get("gen_ai.request.choice.count"), Some(Value::I64(2)));
    assert_eq!(get("gen_ai.request.seed"), Some(Value::I64(7)));
    assert!(get("gen_ai.request.stop_sequences").is_some());
    assert!(get("gen_ai.request.top_p").is_none());
    // Read from validation's member spans, the same as off the whole body.
    for body in [
        r#"{"model":"m","max_completion_tokens":50,"temperature":0.5,"stop":"END","n":2,"seed":7,"messages":[]}"#,
        r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":9,"top_p":1,"stop":["a","b"],"frequency_penalty":-0.5,"presence_penalty":0.25,"top_k":40}"#,
        r#"{"model":"m","stop_sequences":["x"],"max_output_tokens":3,"temperature":null}"#,
    ] {
        let spans = afr_core::splice::ObjectSpans::parse(body.as_bytes()).unwrap();
        let whole: RequestParams = serde_json::from_str(body).unwrap_or_default();
        let members = RequestParams::from_members(body.as_bytes(), &spans);
        assert_eq!(members.model, whole.model, "{body}");
        assert_eq!(members.attributes(), whole.attributes(), "{body}");
    }
    // One value of an unexpected type loses that value, not the others.
    let body = br#"{"model":"m","seed":"bad","max_tokens":3}"#;
    let spans = afr_core::splice::ObjectSpans::parse(body).unwrap();
    let lenient = RequestParams::from_members(body, &spans);
    assert_eq!(
        (lenient.model.as_deref(), lenient.seed, lenient.max_tokens),
        (Some("m"), None, Some(3))
    );
    let one: RequestParams = serde_json::from_str(r#"{"n":1}"#).unwrap();
    assert!(
        one.attributes().is_empty(),
        "n = 1 is the default and not recorded"
    );
}
