//! Tests of Messages validation, event reading and the Messages ↔ chat
//! translation, against the recorded fixtures; round trips as properties.

use super::*;
use crate::anthropic::{
    request_to_openai, response_to_anthropic, response_to_openai, ChatToMessages, StreamItem,
    StreamTranslator,
};
use crate::config::SidecarConfig;
use crate::sse::EventFramer;
use proptest::prelude::*;
use serde_json::json;

const REQUEST: &str = include_str!("../../tests/fixtures/anthropic-messages-request.json");
const RESPONSE: &str = include_str!("../../tests/fixtures/anthropic-messages-response.json");
const STREAM: &str = include_str!("../../tests/fixtures/anthropic-messages-stream.sse");
const TOOL_STREAM: &str =
    include_str!("../../tests/fixtures/anthropic-messages-stream-tool-use.sse");
const COUNT: &str = include_str!("../../tests/fixtures/anthropic-count-tokens-request.json");
const CLAUDE_CODE: &str =
    include_str!("../../tests/fixtures/claude-code-2.1.332-messages-request.json");
const OPENAI_STREAM: &str = include_str!("../../tests/fixtures/openai-chat-stream.sse");
const OPENAI_COMPLETION: &str = include_str!("../../tests/fixtures/openai-chat-completion.json");

fn events(sse: &str) -> Vec<Vec<u8>> {
    let mut framer = EventFramer::new();
    framer.push(sse.as_bytes());
    std::iter::from_fn(|| framer.next_event().unwrap()).collect()
}

fn route(model: &str, extra: &str) -> crate::config::RouteConfig {
    let text = format!(
        "[server]\nsecret = \"0123456789abcdef\"\n[providers.a]\nkind = \"anthropic\"\nbase_url = \"http://x\"\n[models.m]\ntier = \"Fast\"\ndescription = \"d\"\n[[models.m.routes]]\nprovider = \"a\"\nmodel = \"{model}\"\n{extra}\n"
    );
    let cfg = SidecarConfig::parse(&text, "t.toml").unwrap();
    cfg.models["m"].routes[0].clone()
}

#[test]
fn the_recorded_requests_validate() {
    let r = validate_messages(REQUEST.as_bytes(), false).unwrap();
    assert_eq!(r.model, "claude-haiku-4-5");
    assert!(!r.stream);
    assert!(estimate_input_tokens(REQUEST.as_bytes()) >= "Hello, world".len() as u64 / 4);
    let c = validate_messages(COUNT.as_bytes(), true).unwrap();
    assert_eq!(c.model, "claude-sonnet-4-5");
    // count_tokens has no max_tokens; messages needs it.
    assert_eq!(
        validate_messages(COUNT.as_bytes(), false)
            .unwrap_err()
            .param
            .as_deref(),
        Some("max_tokens")
    );
}

#[test]
fn bad_bodies_name_the_field() {
    let cases = [
        ("{", None),
        ("[]", None),
        (r#"{"max_tokens":5,"messages":[]}"#, Some("model")),
        (r#"{"model":7,"max_tokens":5,"messages":[]}"#, Some("model")),
        (r#"{"model":"m","max_tokens":5}"#, Some("messages")),
        (
            r#"{"model":"m","max_tokens":5,"messages":{}}"#,
            Some("messages"),
        ),
        (
            r#"{"model":"m","max_tokens":-1,"messages":[]}"#,
            Some("max_tokens"),
        ),
        (
            r#"{"model":"m","max_tokens":1.5,"messages":[]}"#,
            Some("max_tokens"),
        ),
        (
            r#"{"model":"m","max_tokens":5,"messages":[{"content":"x"}]}"#,
            Some("messages.0.role"),
        ),
        (
            r#"{"model":"m","max_tokens":5,"messages":[{"role":7,"content":"x"}]}"#,
            Some("messages.0.role"),
        ),
        (
            r#"{"model":"m","max_tokens":5,"messages":[{"role":"user"}]}"#,
            Some("messages.0.content"),
        ),
        (
            r#"{"model":"m","max_tokens":5,"messages":[],"stream":"yes"}"#,
            Some("stream"),
        ),
        (
            r#"{"model":"m","model":"n","max_tokens":5,"messages":[]}"#,
            Some("model"),
        ),
    ];
    for (body, param) in cases {
        let e = validate_messages(body.as_bytes(), false).expect_err(body);
        assert_eq!(e.param.as_deref(), param, "{body}: {}", e.message);
        assert!(!e.message.is_empty());
    }
}

/// Issue 23: Claude Code's first request of a session carries a `system`
/// message inside `messages`, which Anthropic accepts; roles the gateway does
/// not know are the provider's to judge too. All reach an Anthropic route as
/// sent (before: 400 `messages.1.role: Unexpected role "system"`).
#[test]
fn roles_the_gateway_does_not_check_reach_an_anthropic_route_untouched() {
    let body = br#"{"model":"claude-fast","max_tokens":9,"messages":[{"role":"user","content":"hi"},{"role":"system","content":[{"type":"text","text":"From here on, be brief."}]},{"role":"user","content":"and?"},{"role":"narrator","content":"later"}]}"#;
    let r = validate_messages(body, false).expect("accepted");
    let out = r.upstream_body(body, &route("claude-haiku-4-5", ""));
    let sent: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let original: serde_json::Value = serde_json::from_slice(body).unwrap();
    assert_eq!(sent["messages"], original["messages"]);
}

/// Issue 23: what Claude Code 2.1.332 really sends (a system message inside
/// `messages`, `tool_use` with `caller`, `tool_result` with `cache_control`,
/// `defer_loading`, `thinking`, `context_management`, `output_config`)
/// passes, and an Anthropic route gets it with only `model` changed.
#[test]
fn the_recorded_claude_code_request_reaches_an_anthropic_route_as_sent() {
    let r = validate_messages(CLAUDE_CODE.as_bytes(), false).expect("accepted");
    assert_eq!(r.model, "gw-model");
    assert!(r.stream);
    assert_eq!(r.max_tokens, 32000);
    let out = r.upstream_body(CLAUDE_CODE.as_bytes(), &route("claude-opus-5", ""));
    assert_eq!(
        String::from_utf8(out).unwrap(),
        CLAUDE_CODE.replacen(r#""model":"gw-model""#, r#""model":"claude-opus-5""#, 1)
    );
    assert!(estimate_input_tokens(CLAUDE_CODE.as_bytes()) > 1);
    // The same body (without max_tokens and stream) as a count_tokens request.
    let mut count: Value = serde_json::from_str(CLAUDE_CODE).unwrap();
    let map = count.as_object_mut().unwrap();
    map.remove("max_tokens");
    map.remove("stream");
    let count = serde_json::to_vec(&count).unwrap();
    assert!(validate_messages(&count, true).is_ok());
}

/// Issue 23: `max_tokens: 0` populates the prompt cache without generating
/// (the SDK's `MessageCreateParams.max_tokens`, @anthropic-ai/sdk 1.14.0).
/// Before: 400 `max_tokens: Input should be an integer greater than or equal to 1`.
#[test]
fn max_tokens_zero_warms_the_cache_and_reserves_no_output() {
    let body = br#"{"model":"m","max_tokens":0,"system":[{"type":"text","text":"long","cache_control":{"type":"ephemeral"}}],"messages":[{"role":"user","content":"hi"}]}"#;
    let r = validate_messages(body, false).expect("accepted");
    assert_eq!(r.max_tokens, 0);
    let route = route("claude-haiku-4-5", "");
    assert_eq!(r.output_cap(&route), 0);
    assert_eq!(
        r.upstream_body(body, &route),
        String::from_utf8_lossy(body)
            .replace(r#""m""#, r#""claude-haiku-4-5""#)
            .into_bytes()
    );
    // Below zero or not an integer is still refused, in Anthropic's words.
    for (bad, message) in [
        (
            r#"{"model":"m","max_tokens":-1,"messages":[]}"#,
            "max_tokens: Input should be greater than or equal to 0",
        ),
        (
            r#"{"model":"m","max_tokens":"9","messages":[]}"#,
            "max_tokens: Input should be a valid integer",
        ),
        (
            r#"{"model":"m","messages":[]}"#,
            "max_tokens: Field required",
        ),
    ] {
        let e = validate_messages(bad.as_bytes(), false).expect_err(bad);
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        assert_eq!(e.message, message);
    }
}

/// Issue 23: a beta system message needs no `content` (`BetaSystemMessageParam`:
/// `content?`, with `clear_at` and `output_config`), and roles the gateway does
/// not know carry whatever content they carry: both pass untouched. `user` and
/// `assistant` messages still need a string or a list of blocks, as Anthropic says.
/// Before: 400 `messages.1.content: Field required`.
#[test]
fn only_user_and_assistant_messages_need_content() {
    let body = br#"{"model":"m","max_tokens":9,"messages":[{"role":"user","content":"hi"},{"role":"system","clear_at":"next_user_message","output_config":{"effort":"low"}},{"role":"system","content":"x","clear_at":"never"},{"role":"narrator","content":{"odd":true}},{"role":"user","content":"and?"}]}"#;
    let r = validate_messages(body, false).expect("accepted");
    let out = r.upstream_body(body, &route("claude-haiku-4-5", ""));
    let sent: Value = serde_json::from_slice(&out).unwrap();
    let original: Value = serde_json::from_slice(body).unwrap();
    assert_eq!(sent["messages"], original["messages"]);
    for (bad, param) in [
        (
            r#"{"model":"m","max_tokens":9,"messages":[{"role":"assistant"}]}"#,
            "messages.0.content",
        ),
        (
            r#"{"model":"m","max_tokens":9,"messages":[{"role":"user","content":null}]}"#,
            "messages.0.content",
        ),
    ] {
        let e = validate_messages(bad.as_bytes(), false).expect_err(bad);
        assert_eq!(e.param.as_deref(), Some(param), "{}", e.message);
    }
}

#[test]
fn an_anthropic_route_gets_the_clients_bytes_with_only_the_model_edited() {
    let body = br#"{ "model" : "claude-fast","max_tokens":1000,"top_p":1e-1,"temperature":1.5, "x_unknown":{"b":1,"a":2},
 "messages":[{"role":"user","content":[{"type":"text","text":"caf\u00e9","cache_control":{"type":"ephemeral"}}]}]}"#;
    let r = validate_messages(body, false).unwrap();
    let out = r.upstream_body(body, &route("claude-haiku-4-5", ""));
    let expected = String::from_utf8_lossy(body).replace("\"claude-fast\"", "\"claude-haiku-4-5\"");
    assert_eq!(String::from_utf8(out).unwrap(), expected);
    // The route's adaptations apply as on chat routes.
    let clamped = r.upstream_body(body, &route("c", "clamp = { temperature = { max = 1.0 } }"));
    assert!(String::from_utf8(clamped)
        .unwrap()
        .contains(r#""temperature":1.0"#));
}

#[test]
fn the_recorded_streams_read_right() {
    for (sse, content_events) in [(STREAM, 9), (TOOL_STREAM, 11)] {
        let infos: Vec<EventInfo> = events(sse).iter().map(|e| inspect_event(e)).collect();
        // Preamble: message_start, the empty text block's start, ping; a tool
        // call's start is output (it names the tool).
        let first_content = infos.iter().position(|i| !i.preamble).unwrap();
        assert!(infos[..first_content].iter().all(|i| !i.done && !i.error));
        assert_eq!(
            infos.iter().filter(|i| !i.preamble).count(),
            content_events + 3,
            "content + content_block_stop + message_delta + message_stop"
        );
        assert!(infos.last().unwrap().done);
        assert_eq!(infos.iter().filter(|i| i.done).count(), 1);
        let mut usage = StreamUsage::default();
        infos.iter().for_each(|i| usage.update(i));
        let u = usage.usage().unwrap();
        assert_eq!(u.total_tokens, u.prompt_tokens + u.completion_tokens);
        if sse == TOOL_STREAM {
            assert_eq!((u.prompt_tokens, u.completion_tokens), (656, 74));
        }
    }
    let error = inspect_event(include_bytes!(
        "../../tests/fixtures/anthropic-error-stream.sse"
    ));
    assert!(error.error && !error.preamble);
    assert!(inspect_event(b": keep-alive\n\n").preamble);
}

#[test]
fn response_usage_counts_cache_as_input() {
    let u = response_usage(RESPONSE.as_bytes()).unwrap();
    let v: Value = serde_json::from_str(RESPONSE).unwrap();
    let input = v["usage"]["input_tokens"].as_u64().unwrap()
        + v["usage"]["cache_read_input_tokens"].as_u64().unwrap()
        + v["usage"]["cache_creation_input_tokens"].as_u64().unwrap();
    assert_eq!(u.prompt_tokens, input);
    assert_eq!(
        u.completion_tokens,
        v["usage"]["output_tokens"].as_u64().unwrap()
    );
}

/// Issue 23: a `system` message inside `messages` keeps its place on an
/// OpenAI-wire route (chat completions take system messages anywhere); a
/// role chat completions have no equivalent for, or a system block that is
/// not text, is refused naming it.
#[test]
fn a_system_message_inside_messages_keeps_its_place_in_chat() {
    let req = json!({"model": "m", "max_tokens": 5, "system": "A", "messages": [
        {"role": "user", "content": "hi"},
        {"role": "system", "content": [{"type": "text", "text": "B"}, {"type": "text", "text": "C"}]},
        {"role": "user", "content": "and?"},
    ]});
    let out = request_to_openai(&req, "x").unwrap();
    assert_eq!(
        out["messages"],
        json!([
            {"role": "system", "content": "A"},
            {"role": "user", "content": "hi"},
            {"role": "system", "content": "B\nC"},
            {"role": "user", "content": "and?"},
        ])
    );
    let refused = |req: Value, param: &str| match request_to_openai(&req, "x") {
        Err(crate::anthropic::TranslateError::InvalidRequest { param: p, message }) => {
            assert_eq!(p.as_deref(), Some(param), "{message}");
            assert!(message.contains("cannot be translated"), "{message}");
        }
        other => panic!("{other:?}"),
    };
    refused(
        json!({"model": "m", "max_tokens": 5, "messages": [{"role": "narrator", "content": "x"}]}),
        "messages.0.role",
    );
    refused(
        json!({"model": "m", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}),
        "max_tokens",
    );
    refused(
        json!({"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": [{"type": "image", "source": {}}]}]}),
        "messages.0.content.0.type",
    );
}

#[test]
fn requests_translate_to_chat_with_tools() {
    let req = json!({
        "model": "claude-fast", "max_tokens": 300, "system": [{"type": "text", "text": "Be brief."}],
        "temperature": 0.2, "top_k": 5, "stop_sequences": ["END"], "stream": true,
        "metadata": {"user_id": "u1"},
        "tools": [{"name": "get_weather", "description": "Weather", "input_schema": {"type": "object", "properties": {"location": {"type": "string"}}}}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
        "messages": [
            {"role": "user", "content": "Weather in SF?"},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": "s"}, {"type": "text", "text": "Checking."}, {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"location": "SF"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "68F"}]}, {"type": "text", "text": "Thanks"}]},
        ]
    });
    let out = request_to_openai(&req, "gpt-4o-mini").unwrap();
    assert_eq!(
        out,
        json!({
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Weather in SF?"},
                {"role": "assistant", "content": "Checking.", "tool_calls": [{"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"location\":\"SF\"}"}}]},
                {"role": "tool", "tool_call_id": "toolu_1", "content": "68F"},
                {"role": "user", "content": [{"type": "text", "text": "Thanks"}]},
            ],
            "max_tokens": 300, "temperature": 0.2, "stop": ["END"],
            "stream": true, "stream_options": {"include_usage": true},
            "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}}}],
            "tool_choice": "required", "parallel_tool_calls": false, "user": "u1",
        })
    );
    let long_user = json!({"model": "m", "max_tokens": 5, "messages": [], "metadata": {"user_id": "u".repeat(65)}});
    assert!(request_to_openai(&long_user, "x")
        .unwrap()
        .get("user")
        .is_none());
    let server_tool = json!({"model": "m", "max_tokens": 5, "messages": [], "tools": [{"type": "web_search_20250305", "name": "web_search"}]});
    match request_to_openai(&server_tool, "x") {
        Err(crate::anthropic::TranslateError::InvalidRequest { param, .. }) => {
            assert_eq!(param.as_deref(), Some("tools.0"))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_recorded_completion_translates() {
    let out = response_to_anthropic(OPENAI_COMPLETION.as_bytes()).unwrap();
    let v: Value = serde_json::from_str(&out.body).unwrap();
    let c: Value = serde_json::from_str(OPENAI_COMPLETION).unwrap();
    assert_eq!(v["type"], "message");
    assert_eq!(
        v["content"][0]["text"],
        c["choices"][0]["message"]["content"]
    );
    assert_eq!(v["stop_reason"], "end_turn");
    assert_eq!(
        out.usage.unwrap().prompt_tokens,
        c["usage"]["prompt_tokens"].as_u64().unwrap()
    );
    assert_eq!(
        out.usage.unwrap().completion_tokens,
        c["usage"]["completion_tokens"].as_u64().unwrap()
    );
}

/// Text, tool inputs and usage as an Anthropic client accumulates them.
fn accumulate(events: &[String]) -> (String, Vec<(String, String)>, Option<String>, TokenUsage) {
    let mut text = String::new();
    let mut tools: Vec<(String, String)> = Vec::new();
    let mut stop = None;
    let mut usage = StreamUsage::default();
    for e in events {
        let info = inspect_event(e.as_bytes());
        usage.update(&info);
        let data: Value = serde_json::from_str(&event_data(e.as_bytes()).unwrap()).unwrap();
        match data["type"].as_str().unwrap() {
            "content_block_start" if data["content_block"]["type"] == "tool_use" => tools.push((
                data["content_block"]["name"].as_str().unwrap().to_owned(),
                String::new(),
            )),
            "content_block_delta" => match data["delta"]["type"].as_str().unwrap() {
                "text_delta" => text.push_str(data["delta"]["text"].as_str().unwrap()),
                "input_json_delta" => tools
                    .last_mut()
                    .unwrap()
                    .1
                    .push_str(data["delta"]["partial_json"].as_str().unwrap()),
                _ => {}
            },
            "message_delta" => stop = data["delta"]["stop_reason"].as_str().map(str::to_owned),
            _ => {}
        }
    }
    (text, tools, stop, usage.usage().unwrap_or_default())
}

/// An Anthropic stream → OpenAI chunks (the existing translator) → back.
fn round_trip(sse: &str) -> Vec<String> {
    let mut there = StreamTranslator::new(true, 0);
    let mut back = ChatToMessages::new();
    let mut out = Vec::new();
    for e in events(sse) {
        for item in there.push_raw(&e) {
            out.extend(back.push_raw(item.to_sse().as_bytes()));
            if let StreamItem::Error(_) = item {
                return out;
            }
        }
    }
    assert!(back.is_finished());
    out
}

#[test]
fn recorded_streams_survive_the_round_trip() {
    for sse in [STREAM, TOOL_STREAM] {
        let original: Vec<String> = events(sse)
            .into_iter()
            .map(|e| String::from_utf8(e).unwrap())
            .collect();
        let back = round_trip(sse);
        assert_eq!(accumulate(&back), accumulate(&original));
        let names: Vec<String> = back
            .iter()
            .filter_map(|e| crate::sse::event_name(e.as_bytes()))
            .collect();
        assert_eq!(names.first().map(String::as_str), Some("message_start"));
        assert_eq!(&names[names.len() - 2..], ["message_delta", "message_stop"]);
    }
}

#[test]
fn the_recorded_openai_stream_becomes_anthropic_events() {
    let mut t = ChatToMessages::new();
    let out: Vec<String> = events(OPENAI_STREAM)
        .iter()
        .flat_map(|e| t.push_raw(e))
        .collect();
    let (text, tools, stop, usage) = accumulate(&out);
    let expected: String = events(OPENAI_STREAM)
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(&event_data(e).unwrap()).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(text, expected);
    assert!(tools.is_empty());
    assert_eq!(stop.as_deref(), Some("end_turn"));
    assert!(usage.prompt_tokens > 0 && usage.completion_tokens > 0);
    // A cut stream ends with an error event, never silently.
    let mut cut = ChatToMessages::new();
    let first = &events(OPENAI_STREAM)[1];
    assert!(!cut.push_raw(first).is_empty());
    let end = cut.finish();
    assert!(end[0].starts_with("event: error\n"), "{end:?}");
}

#[test]
fn the_recorded_response_survives_the_round_trip() {
    let there = response_to_openai(RESPONSE.as_bytes(), 0).unwrap();
    let back = response_to_anthropic(there.body.as_bytes()).unwrap();
    let (a, b): (Value, Value) = (
        serde_json::from_str(RESPONSE).unwrap(),
        serde_json::from_str(&back.body).unwrap(),
    );
    assert_eq!(a["content"], b["content"]);
    assert_eq!(a["stop_reason"], b["stop_reason"]);
    assert_eq!(a["usage"]["output_tokens"], b["usage"]["output_tokens"]);
    assert_eq!(Some(there.usage), back.usage);
}

proptest! {
    /// Any text and any tool input, split anywhere, comes back whole.
    #[test]
    fn generated_streams_round_trip(
        pieces in prop::collection::vec("[a-zA-Z0-9 °é\"\\\\\n{}]{0,12}", 1..8),
        location in "[a-zA-Z ,]{0,20}",
        split in 1usize..6,
        input_tokens in 0u64..100_000,
        output_tokens in 1u64..10_000,
    ) {
        let mut sse = format!("event: message_start\ndata: {}\n\n", json!({"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","model":"m","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":input_tokens,"output_tokens":1}}}));
        sse += "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n";
        for p in &pieces {
            sse += &format!("event: content_block_delta\ndata: {}\n\n", json!({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":p}}));
        }
        sse += "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n";
        sse += "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_1\",\"name\":\"get_weather\",\"input\":{}}}\n\n";
        let args = json!({"location": location}).to_string();
        let chars: Vec<char> = args.chars().collect();
        for chunk in chars.chunks(split) {
            let part: String = chunk.iter().collect();
            sse += &format!("event: content_block_delta\ndata: {}\n\n", json!({"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":part}}));
        }
        sse += "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":1}\n\n";
        sse += &format!("event: message_delta\ndata: {}\n\n", json!({"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":output_tokens}}));
        sse += "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        let original: Vec<String> = events(&sse).into_iter().map(|e| String::from_utf8(e).unwrap()).collect();
        let (text, tools, stop, usage) = accumulate(&round_trip(&sse));
        let (otext, otools, ostop, _) = accumulate(&original);
        prop_assert_eq!(text, otext);
        prop_assert_eq!(tools, otools);
        prop_assert_eq!(stop, ostop);
        prop_assert_eq!((usage.prompt_tokens, usage.completion_tokens), (input_tokens, output_tokens));
    }
}
