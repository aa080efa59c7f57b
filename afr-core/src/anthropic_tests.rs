//! Tests of the Anthropic translation against the recorded fixtures.

use super::*;
use crate::sse::EventFramer;

const REQUEST: &str = include_str!("../../tests/fixtures/anthropic-messages-request.json");
const RESPONSE: &str = include_str!("../../tests/fixtures/anthropic-messages-response.json");
const STREAM: &str = include_str!("../../tests/fixtures/anthropic-messages-stream.sse");
const ERROR_400: &str = include_str!("../../tests/fixtures/anthropic-error.json");
const ERROR_529: &str = include_str!("../../tests/fixtures/anthropic-error-529.json");
const ERROR_STREAM: &str = include_str!("../../tests/fixtures/anthropic-error-stream.sse");
const STREAM_TEXT: &str = "The weather in San Francisco, CA is currently:\n- **Temperature:** 68°F\n- **Condition:** Sunny\n\nIt's a nice sunny day!";

fn v(s: &str) -> Value {
    serde_json::from_str(s).unwrap()
}

#[test]
fn request_translates_to_the_recorded_request() {
    let openai = json!({
        "model": "claude-fast",
        "max_tokens": 1024,
        "messages": [
            {"role": "system", "content": "Today's date is 2024-06-01."},
            {"role": "user", "content": "Hello, world"}
        ]
    });
    let out = request_to_anthropic(&openai, "claude-haiku-4-5").unwrap();
    assert_eq!(out, v(REQUEST));
}

#[test]
fn request_maps_params_and_drops_what_anthropic_cannot_take() {
    let openai = json!({
        "model": "x", "temperature": 1.6, "top_p": 0.5, "stop": "END", "stream": true,
        "stream_options": {"include_usage": true}, "presence_penalty": 0.1, "seed": 3, "n": 1,
        "user": "u1", "response_format": {"type": "json_object"},
        "messages": [
            {"role": "developer", "content": [{"type": "text", "text": "A"}]},
            {"role": "system", "content": "B"},
            {"role": "user", "content": [{"type": "text", "text": "hi"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\":\"SF\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "20°C"}
        ],
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "d",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
        "tool_choice": "required"
    });
    let out = request_to_anthropic(&openai, "claude-haiku-4-5").unwrap();
    assert_eq!(out["max_tokens"], DEFAULT_MAX_TOKENS);
    assert_eq!(out["system"], "A\n\nB");
    assert_eq!(out["temperature"], 1.0);
    assert!(out.get("top_p").is_none());
    assert_eq!(out["stop_sequences"], json!(["END"]));
    assert_eq!(out["stream"], true);
    assert_eq!(out["metadata"]["user_id"], "u1");
    for gone in [
        "stream_options",
        "presence_penalty",
        "seed",
        "n",
        "response_format",
        "user",
    ] {
        assert!(out.get(gone).is_none(), "{gone}");
    }
    let m = out["messages"].as_array().unwrap();
    assert_eq!(m.len(), 3);
    assert_eq!(
        m[0]["content"][1]["source"],
        json!({"type": "base64", "media_type": "image/png", "data": "AAAA"})
    );
    assert_eq!(
        m[1]["content"][0],
        json!({"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "SF"}})
    );
    assert_eq!(
        m[2],
        json!({"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "20°C"}]})
    );
    assert_eq!(
        out["tools"][0]["input_schema"]["properties"]["city"]["type"],
        "string"
    );
    assert_eq!(out["tool_choice"], json!({"type": "any"}));
}

#[test]
fn request_errors_name_the_field() {
    let e = request_to_anthropic(&json!({"messages": "no"}), "m").unwrap_err();
    assert_eq!(e.status(), 400);
    assert_eq!(e.to_error_body().param.as_deref(), Some("messages"));
    let e = request_to_anthropic(
        &json!({"messages": [{"role": "user", "content": "x"}], "n": 2}),
        "m",
    )
    .unwrap_err();
    assert_eq!(e.to_error_body().param.as_deref(), Some("n"));
    let e = request_to_anthropic(
        &json!({"messages": [{"role": "function", "content": "x"}]}),
        "m",
    )
    .unwrap_err();
    assert_eq!(e.to_error_body().param.as_deref(), Some("messages[0].role"));
    let body: Value = serde_json::from_str(&e.to_error_body().to_json()).unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let top_p = request_to_anthropic(&json!({"messages": [], "top_p": 0.9}), "m").unwrap();
    assert_eq!(top_p["top_p"], 0.9);
}

#[test]
fn response_translates_the_recorded_body() {
    let out = response_to_openai(RESPONSE.as_bytes(), 1_700_000_000).unwrap();
    let body = v(&out.body);
    assert!(out.body.starts_with(r#"{"id":"msg_01LzoWDaDa7jiMvVbBiguxJy","object":"chat.completion","created":1700000000,"model":"claude-haiku-4-5-20251001","choices":"#));
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "The weather in SF is currently **20°C** (68°F) and **Sunny**!"
    );
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"]["prompt_tokens"], 705);
    assert_eq!(body["usage"]["completion_tokens"], 25);
    assert_eq!(body["usage"]["total_tokens"], 730);
    assert_eq!(out.usage.total_tokens, 730);
}

#[test]
fn response_tool_use_and_finish_reasons() {
    let body = json!({"id": "msg_1", "model": "m", "type": "message", "role": "assistant",
        "content": [{"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}}],
        "stop_reason": "tool_use", "usage": {"input_tokens": 10, "cache_read_input_tokens": 5, "output_tokens": 3}});
    let out = v(&response_to_openai(body.to_string().as_bytes(), 0)
        .unwrap()
        .body);
    let msg = &out["choices"][0]["message"];
    assert!(msg["content"].is_null());
    assert_eq!(msg["tool_calls"][0]["function"]["arguments"], "{\"a\":1}");
    assert_eq!(msg["tool_calls"][0]["type"], "function");
    assert_eq!(out["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(out["usage"]["prompt_tokens"], 15);
    assert_eq!(out["usage"]["prompt_tokens_details"]["cached_tokens"], 5);
    for (a, o) in [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
    ] {
        assert_eq!(finish_reason(a), o);
    }
    let e = response_to_openai(b"<html>", 0).unwrap_err();
    assert_eq!(e.status(), 502);
}

#[test]
fn errors_keep_status_and_map_type() {
    let e = error_to_openai(400, ERROR_400.as_bytes());
    assert_eq!(e.status, 400);
    assert_eq!(e.body.kind, "invalid_request_error");
    assert!(e
        .body
        .message
        .starts_with("messages.0.content.1: unexpected `tool_use_id`"));
    let e = error_to_openai(529, ERROR_529.as_bytes());
    assert_eq!(
        (e.status, e.body.kind, e.body.code),
        (529, "server_error", Some("overloaded"))
    );
    assert_eq!(e.body.message, "Overloaded");
    let e = error_to_openai(
        429,
        br#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#,
    );
    assert_eq!(
        (e.body.kind, e.body.code),
        ("requests", Some("rate_limit_exceeded"))
    );
    let e = error_to_openai(503, b"upstream connect error");
    assert_eq!(e.body.kind, "server_error");
    assert!(e.body.message.contains("503"));
}

/// Feeds `input` cut at `cuts` through the framer and the translator.
fn translate(input: &str, include_usage: bool, cuts: &[usize]) -> Vec<StreamItem> {
    let bytes = input.as_bytes();
    let mut framer = EventFramer::new();
    let mut t = StreamTranslator::new(include_usage, 7);
    let mut out = Vec::new();
    let mut last = 0;
    for &cut in cuts.iter().chain(std::iter::once(&bytes.len())) {
        framer.push(&bytes[last..cut]);
        last = cut;
        while let Some(raw) = framer.next_event().expect("events fit the limit") {
            out.extend(t.push_raw(&raw));
        }
    }
    out.extend(t.finish());
    out
}

fn chunks(items: &[StreamItem]) -> Vec<Value> {
    items
        .iter()
        .filter_map(|i| match i {
            StreamItem::Chunk { json, .. } => Some(v(json)),
            _ => None,
        })
        .collect()
}

#[test]
fn recorded_stream_becomes_openai_chunks_with_usage() {
    let items = translate(STREAM, true, &[]);
    assert_eq!(items.last(), Some(&StreamItem::Done));
    let c = chunks(&items);
    // role + 9 text deltas + finish + usage
    assert_eq!(c.len(), 12);
    let first = match &items[0] {
        StreamItem::Chunk { json, content } => {
            assert!(!content);
            json.clone()
        }
        other => panic!("{other:?}"),
    };
    assert!(first.starts_with(r#"{"id":"msg_016HxyUMAncysqX7dn1kWNRx","object":"chat.completion.chunk","created":7,"model":"claude-haiku-4-5-20251001","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],"usage":null}"#));
    let text: String = c
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, STREAM_TEXT);
    assert!(c[..11].iter().all(|c| c.get("usage") == Some(&Value::Null)));
    assert_eq!(c[10]["choices"][0]["finish_reason"], "stop");
    assert_eq!(c[10]["choices"][0]["delta"], json!({}));
    assert_eq!(c[11]["choices"], json!([]));
    assert_eq!(c[11]["usage"]["prompt_tokens"], 770);
    assert_eq!(c[11]["usage"]["completion_tokens"], 38);
    assert_eq!(c[11]["usage"]["total_tokens"], 808);
    let sse = items[1].to_sse();
    assert!(sse.starts_with("data: {") && sse.ends_with("}\n\n"));
    assert_eq!(StreamItem::Done.to_sse(), "data: [DONE]\n\n");
}

#[test]
fn without_include_usage_there_is_no_usage_key_or_chunk() {
    let items = translate(STREAM, false, &[]);
    let c = chunks(&items);
    assert_eq!(c.len(), 11);
    assert!(c.iter().all(|c| c.get("usage").is_none()));
    let mut t = StreamTranslator::new(false, 0);
    let mut f = EventFramer::new();
    f.push(STREAM.as_bytes());
    while let Some(raw) = f.next_event().expect("events fit the limit") {
        t.push_raw(&raw);
    }
    assert_eq!(t.usage().map(|u| u.total_tokens), Some(808));
    assert!(t.is_finished());
}

#[test]
fn translation_does_not_depend_on_how_bytes_arrive() {
    let whole = translate(STREAM, true, &[]);
    let len = STREAM.len();
    for step in [1, 3, 17, 64] {
        let cuts: Vec<usize> = (step..len).step_by(step).collect();
        assert_eq!(translate(STREAM, true, &cuts), whole, "step {step}");
    }
}

#[test]
fn error_event_ends_the_stream_with_an_openai_error() {
    let head: String = STREAM.split_inclusive("\n\n").take(4).collect();
    let items = translate(&format!("{head}{ERROR_STREAM}"), false, &[]);
    let StreamItem::Error(json) = items.last().unwrap() else {
        panic!("{items:?}")
    };
    let e = v(json);
    assert_eq!(e["error"]["type"], "server_error");
    assert_eq!(e["error"]["code"], "overloaded");
    assert_eq!(e["error"]["message"], "Overloaded");
    assert!(!items.contains(&StreamItem::Done));
}

#[test]
fn truncated_or_malformed_streams_end_with_an_error() {
    let head: String = STREAM.split_inclusive("\n\n").take(6).collect();
    let items = translate(&head, false, &[]);
    assert!(matches!(items.last(), Some(StreamItem::Error(e)) if e.contains("stream_truncated")));
    let mut t = StreamTranslator::new(false, 0);
    let items = t.push_event(Some("content_block_delta"), "{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"trunc");
    assert!(matches!(&items[..], [StreamItem::Error(e)] if e.contains("bad_upstream_response")));
    assert!(t
        .push_event(Some("message_stop"), "{\"type\":\"message_stop\"}")
        .is_empty());
}

#[test]
fn tool_use_stream_becomes_tool_call_deltas() {
    // Event shapes from Anthropic's streaming docs (no recording with tools).
    let events = [
        (
            "message_start",
            r#"{"type":"message_start","message":{"id":"msg_1","model":"m","usage":{"input_tokens":5,"output_tokens":1}}}"#,
        ),
        (
            "content_block_start",
            r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
        ),
        (
            "content_block_delta",
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Let me check."}}"#,
        ),
        (
            "content_block_stop",
            r#"{"type":"content_block_stop","index":0}"#,
        ),
        (
            "content_block_start",
            r#"{"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_1","name":"get_weather","input":{}}}"#,
        ),
        (
            "content_block_delta",
            r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"city\":"}}"#,
        ),
        (
            "content_block_delta",
            r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"\"SF\"}"}}"#,
        ),
        (
            "message_delta",
            r#"{"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":20}}"#,
        ),
        ("message_stop", r#"{"type":"message_stop"}"#),
    ];
    let mut t = StreamTranslator::new(false, 0);
    let items: Vec<StreamItem> = events
        .iter()
        .flat_map(|(e, d)| t.push_event(Some(e), d))
        .collect();
    let c = chunks(&items);
    let call = &c[2]["choices"][0]["delta"]["tool_calls"][0];
    assert_eq!(call["index"], 0);
    assert_eq!(call["id"], "toolu_1");
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    let args: String = c[3..5]
        .iter()
        .map(|c| {
            c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
                .as_str()
                .unwrap()
        })
        .collect();
    assert_eq!(args, "{\"city\":\"SF\"}");
    assert!(c[3]["choices"][0]["delta"]["tool_calls"][0]
        .get("id")
        .is_none());
    assert_eq!(c[5]["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(t.usage().unwrap().completion_tokens, 20);
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    /// An Anthropic stream carrying `pieces` as text deltas, framed as SSE.
    fn stream_of(pieces: &[String]) -> String {
        let mut s = String::from("event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_p\",\"model\":\"m\",\"usage\":{\"input_tokens\":3,\"output_tokens\":1}}   }\n\nevent: ping\ndata: {\"type\": \"ping\"}\n\n");
        for p in pieces {
            let data = json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}});
            s.push_str(&format!("event: content_block_delta\ndata: {data}  \n\n"));
        }
        s.push_str(&format!("event: message_delta\ndata: {{\"type\":\"message_delta\",\"delta\":{{\"stop_reason\":\"end_turn\"}},\"usage\":{{\"output_tokens\":{}}}}}\n\nevent: message_stop\ndata: {{\"type\":\"message_stop\"}}\n\n", pieces.len()));
        s
    }

    proptest! {
        #[test]
        fn any_text_survives_any_split(
            pieces in proptest::collection::vec("[a-z °\"\\\\\n{}é😀]{0,12}", 0..8),
            cuts in proptest::collection::vec(0usize..4000, 0..6),
        ) {
            let input = stream_of(&pieces);
            let mut cuts: Vec<usize> = cuts.into_iter().filter(|c| *c <= input.len()).collect();
            cuts.sort_unstable();
            let items = translate(&input, true, &cuts);
            prop_assert_eq!(items.last(), Some(&StreamItem::Done));
            let c = chunks(&items);
            let text: String = c.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
            prop_assert_eq!(text, pieces.concat());
            let usage = &c.last().unwrap()["usage"];
            prop_assert_eq!(usage["completion_tokens"].as_u64(), Some(pieces.len() as u64));
            prop_assert_eq!(usage["prompt_tokens"].as_u64(), Some(3));
        }
    }
}
