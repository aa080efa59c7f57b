use super::*;
use crate::sse::EventFramer;

const EMBED_REQUEST: &str = include_str!("../../tests/fixtures/openai-embeddings-request.json");
const EMBED_BASE64: &str =
    include_str!("../../tests/fixtures/openai-embeddings-response-base64.json");
const COMPLETION: &str = include_str!("../../tests/fixtures/openai-completions-response.json");
const RESPONSE: &str = include_str!("../../tests/fixtures/openai-responses-response.json");
const RESPONSE_2026: &str =
    include_str!("../../tests/fixtures/openai-responses-response-2026-variant.json");
const STREAM: &str = include_str!("../../tests/fixtures/openai-responses-stream.sse");
const STREAM_2026: &str =
    include_str!("../../tests/fixtures/openai-responses-stream-2026-variant.sse");
const STREAM_CALL: &str =
    include_str!("../../tests/fixtures/openai-responses-stream-function-call.sse");
const STREAM_ERROR: &str = include_str!("../../tests/fixtures/openai-responses-stream-error.sse");
const CODEX: &str = include_str!("../../tests/fixtures/codex-0.171.0-responses-request.json");
const CODEX_FIRST: &str =
    include_str!("../../tests/fixtures/codex-0.171.0-responses-request-first-turn.json");

fn route(model: &str) -> RouteConfig {
    RouteConfig {
        provider: "p".into(),
        model: model.into(),
        drop: vec![],
        rename: Default::default(),
        clamp: Default::default(),
        price: None,
        event_idle: None,
        max_output_tokens: None,
    }
}

fn events(text: &str) -> Vec<Vec<u8>> {
    let mut framer = EventFramer::new();
    framer.push(text.as_bytes());
    let mut out = Vec::new();
    while let Some(e) = framer.next_event().expect("fixture events fit") {
        out.push(e);
    }
    out
}

#[test]
fn kinds_serve_their_endpoints() {
    assert!(ModelKind::Chat.serves(Endpoint::Responses));
    assert!(ModelKind::Chat.serves(Endpoint::Completions));
    assert!(!ModelKind::Chat.serves(Endpoint::Embeddings));
    assert!(ModelKind::Embedding.serves(Endpoint::Embeddings));
    assert!(!ModelKind::Embedding.serves(Endpoint::ChatCompletions));
    assert_eq!(ModelKind::Embedding.endpoints(), vec!["embeddings"]);
    let e = wrong_endpoint(
        "text-embedding-3-small",
        ModelKind::Embedding,
        Endpoint::Responses,
    );
    assert_eq!(e.param.as_deref(), Some("model"));
    assert!(e.message.contains("/v1/embeddings"), "{}", e.message);
    assert_eq!(
        Endpoint::from_path("/v1/embeddings"),
        Some(Endpoint::Embeddings)
    );
    assert_eq!(
        Endpoint::from_path("/v1/completions"),
        Some(Endpoint::Completions)
    );
    assert_eq!(Endpoint::from_path("/v1/responses/x"), None);
}

#[test]
fn the_recorded_embeddings_request_passes_and_only_model_changes() {
    let r = validate_passthrough(Endpoint::Embeddings, EMBED_REQUEST.as_bytes()).expect("valid");
    assert_eq!(r.model, "text-embedding-3-small");
    assert!(!r.stream);
    let estimate = crate::estimate::prompt_tokens(EMBED_REQUEST.as_bytes(), r.estimate_wire());
    assert_eq!(estimate, 4, "the recorded usage's prompt_tokens");
    let up = r.upstream_body(EMBED_REQUEST.as_bytes(), &route("emb-up"), false);
    assert_eq!(
        String::from_utf8(up).expect("utf-8"),
        EMBED_REQUEST.replace("text-embedding-3-small", "emb-up")
    );
}

#[test]
fn embeddings_input_and_format_are_checked_naming_the_field() {
    let bad = |body: &str| {
        validate_passthrough(Endpoint::Embeddings, body.as_bytes())
            .expect_err(body)
            .param
    };
    assert_eq!(bad(r#"{"model":"m"}"#).as_deref(), Some("input"));
    assert_eq!(bad(r#"{"model":"m","input":[]}"#).as_deref(), Some("input"));
    assert_eq!(
        bad(r#"{"model":"m","input":{"a":1}}"#).as_deref(),
        Some("input")
    );
    assert_eq!(
        bad(r#"{"model":"m","input":["a",1]}"#).as_deref(),
        Some("input")
    );
    assert_eq!(
        bad(r#"{"model":"m","input":"a","encoding_format":"hex"}"#).as_deref(),
        Some("encoding_format")
    );
    assert_eq!(
        bad(r#"{"model":"m","input":"a","dimensions":0}"#).as_deref(),
        Some("dimensions")
    );
    assert_eq!(
        bad(r#"{"model":"m","input":"a","stream":true}"#).as_deref(),
        Some("stream")
    );
    assert_eq!(bad(r#"{"input":"a"}"#).as_deref(), Some("model"));
    assert_eq!(
        bad(r#"{"model":"m","model":"n","input":"a"}"#).as_deref(),
        Some("model")
    );
    for ok in [
        r#"{"model":"m","input":["a","b"],"dimensions":256}"#,
        r#"{"model":"m","input":[1,2,3]}"#,
        r#"{"model":"m","input":[[1,2],[3]],"encoding_format":"float"}"#,
    ] {
        validate_passthrough(Endpoint::Embeddings, ok.as_bytes()).expect(ok);
    }
}

#[test]
fn a_completions_stream_asks_for_usage_keeping_the_clients_bytes() {
    let body = br#"{"model":"m", "prompt":"Say 1.0", "stream":true,"max_tokens":7}"#;
    let r = validate_passthrough(Endpoint::Completions, body).expect("valid");
    assert!(r.stream && !r.include_usage);
    let up = r.upstream_body(body, &route("davinci-002"), true);
    assert_eq!(
        String::from_utf8(up).expect("utf-8"),
        r#"{"model":"davinci-002", "prompt":"Say 1.0", "stream":true,"max_tokens":7,"stream_options":{"include_usage":true}}"#
    );
}

#[test]
fn responses_read_previous_response_id_and_leave_the_rest() {
    let body = br#"{"model":"m","input":"hi","previous_response_id":"resp_1","stream":true}"#;
    let r = validate_passthrough(Endpoint::Responses, body).expect("valid");
    assert_eq!(r.previous_response_id.as_deref(), Some("resp_1"));
    let up = r.upstream_body(body, &route("gpt-4o-mini"), true);
    assert_eq!(
        String::from_utf8(up).expect("utf-8"),
        r#"{"model":"gpt-4o-mini","input":"hi","previous_response_id":"resp_1","stream":true,"max_output_tokens":4096}"#
    );
}

#[test]
fn the_output_cap_bounds_what_each_endpoint_can_bill() {
    let mut r = route("up");
    // Responses: the client's max_output_tokens; without one, the route's cap is written in.
    let body = br#"{"model":"m","input":"hi","max_output_tokens":32000}"#;
    let req = validate_passthrough(Endpoint::Responses, body).expect("valid");
    assert_eq!(req.output_cap(&r), 32000);
    assert!(!String::from_utf8(req.upstream_body(body, &r, false))
        .unwrap()
        .contains("4096"));
    let body = br#"{"model":"m","input":"hi"}"#;
    let req = validate_passthrough(Endpoint::Responses, body).expect("valid");
    r.max_output_tokens = Some(900);
    assert_eq!(req.output_cap(&r), 900);
    assert_eq!(
        String::from_utf8(req.upstream_body(body, &r, false)).unwrap(),
        r#"{"model":"up","input":"hi","max_output_tokens":900}"#
    );
    // Completions: max_tokens (OpenAI's default 16 written in) x max(n, best_of).
    let body = br#"{"model":"m","prompt":"x","max_tokens":100,"n":2,"best_of":5}"#;
    let req = validate_passthrough(Endpoint::Completions, body).expect("valid");
    assert_eq!(req.output_cap(&r), 500);
    let body = br#"{"model":"m","prompt":"x","n":3}"#;
    let req = validate_passthrough(Endpoint::Completions, body).expect("valid");
    assert_eq!(req.output_cap(&r), 48);
    assert_eq!(
        String::from_utf8(req.upstream_body(body, &r, false)).unwrap(),
        r#"{"model":"up","prompt":"x","n":3,"max_tokens":16}"#
    );
    // A route's clamp bounds what the provider is told, and so the cap.
    r.clamp.insert(
        "max_tokens".into(),
        crate::config::Clamp {
            min: None,
            max: Some(50.0),
        },
    );
    assert_eq!(req.output_cap(&r), 48);
    let body = br#"{"model":"m","prompt":"x","max_tokens":100,"n":2}"#;
    let req = validate_passthrough(Endpoint::Completions, body).expect("valid");
    assert_eq!(req.output_cap(&r), 100);
    let bad = validate_passthrough(Endpoint::Completions, br#"{"model":"m","best_of":-1}"#);
    assert_eq!(bad.unwrap_err().param.as_deref(), Some("best_of"));
    let embed = validate_passthrough(Endpoint::Embeddings, br#"{"model":"m","input":"x"}"#);
    assert_eq!(embed.expect("valid").output_cap(&r), 0);
}

#[test]
fn usage_comes_from_each_recorded_answer() {
    let u = body_usage(Endpoint::Embeddings, EMBED_BASE64.as_bytes()).expect("usage");
    assert_eq!(
        (u.prompt_tokens, u.completion_tokens, u.total_tokens),
        (4, 0, 4)
    );
    let u = body_usage(Endpoint::Completions, COMPLETION.as_bytes()).expect("usage");
    assert_eq!(
        (u.prompt_tokens, u.completion_tokens, u.total_tokens),
        (8, 16, 24)
    );
    for body in [RESPONSE, RESPONSE_2026] {
        let u = body_usage(Endpoint::Responses, body.as_bytes()).expect("usage");
        assert!(u.prompt_tokens > 0 && u.completion_tokens > 0);
        assert_eq!(u.total_tokens, u.prompt_tokens + u.completion_tokens);
    }
}

#[test]
fn recorded_responses_streams_hold_two_preamble_events_and_end_with_usage() {
    for stream in [STREAM, STREAM_2026, STREAM_CALL] {
        let read: Vec<ResponsesEvent> = events(stream).iter().map(|e| responses_event(e)).collect();
        assert!(read.len() > 4);
        assert!(read[0].preamble && read[1].preamble, "{:?}", read[0].kind);
        assert_eq!(read[0].kind, "response.created");
        assert!(read[0]
            .response_id
            .as_deref()
            .is_some_and(|id| id.starts_with("resp_")));
        assert!(
            read[2..].iter().all(|e| !e.preamble),
            "output after the preamble"
        );
        let last = read.last().expect("events");
        assert!(last.done && !last.error);
        assert!(read[..read.len() - 1].iter().all(|e| !e.done));
        let usage = last.usage.expect("usage on response.completed");
        assert!(usage.prompt_tokens > 0 && usage.total_tokens > usage.prompt_tokens);
        assert!(read.iter().map(|e| e.content_chars).sum::<usize>() > 0);
    }
}

#[test]
fn the_recorded_error_stream_reads_as_an_error() {
    let read: Vec<ResponsesEvent> = events(STREAM_ERROR)
        .iter()
        .map(|e| responses_event(e))
        .collect();
    assert!(
        read.iter().any(|e| e.error),
        "{:?}",
        read.iter().map(|e| &e.kind).collect::<Vec<_>>()
    );
}

/// Issue 23: what Codex 0.171.0 really sends (`developer` messages,
/// `function_call`/`function_call_output` items with ids, `include`,
/// `store:false`, `reasoning`, `client_metadata`, `prompt_cache_key`, a
/// `namespace` tool, a `custom` tool) passes, and a Responses route gets the
/// client's bytes with only `model` changed and the output limit the gateway
/// writes in for a request that sets none.
#[test]
fn the_recorded_codex_requests_reach_a_responses_route_as_sent() {
    for (body, model) in [(CODEX, "gw-model"), (CODEX_FIRST, "gpt-5.5")] {
        let r = validate_passthrough(Endpoint::Responses, body.as_bytes()).expect("accepted");
        assert_eq!(r.model, model);
        assert!(r.stream);
        assert_eq!(
            (r.output_limit, r.previous_response_id.as_deref()),
            (None, None)
        );
        assert_eq!(r.special_tier, None);
        let up = r.upstream_body(body.as_bytes(), &route("gpt-5.5-2026-04-23"), true);
        let from = format!(r#"{{"model":"{model}","#);
        let renamed = body.replacen(&from, r#"{"model":"gpt-5.5-2026-04-23","#, 1);
        let expected = format!(
            "{},\"max_output_tokens\":4096}}",
            renamed.strip_suffix('}').expect("an object")
        );
        assert_eq!(String::from_utf8(up).expect("utf-8"), expected);
        assert!(crate::estimate::prompt_tokens(body.as_bytes(), r.estimate_wire()) > 0);
    }
}

/// Issue 23: `/v1/completions` takes `max_tokens: 0` (with `echo`, the classic
/// way to score a prompt) and `best_of: 0`: openai-openapi's
/// `CreateCompletionRequest` sets `minimum: 0` for both. Before: 400
/// `expected a positive integer`. Below the minimum the refusal is OpenAI's.
#[test]
fn completions_take_max_tokens_and_best_of_zero() {
    let body =
        br#"{"model":"m","prompt":"Score me","max_tokens":0,"echo":true,"logprobs":1,"best_of":0}"#;
    let r = validate_passthrough(Endpoint::Completions, body).expect("accepted");
    assert_eq!((r.output_limit, r.choices), (Some(0), 1));
    assert_eq!(r.output_cap(&route("up")), 0);
    assert_eq!(
        String::from_utf8(r.upstream_body(body, &route("davinci-002"), false)).unwrap(),
        String::from_utf8_lossy(body).replace(r#""m""#, r#""davinci-002""#)
    );
    for (bad, param, message) in [
        (
            r#"{"model":"m","prompt":"x","max_tokens":-1}"#,
            "max_tokens",
            "Invalid 'max_tokens': integer below minimum value. Expected a value >= 0, but got -1 instead.",
        ),
        (
            r#"{"model":"m","prompt":"x","best_of":-2}"#,
            "best_of",
            "Invalid 'best_of': integer below minimum value. Expected a value >= 0, but got -2 instead.",
        ),
        (
            r#"{"model":"m","prompt":"x","n":0}"#,
            "n",
            "Invalid 'n': integer below minimum value. Expected a value >= 1, but got 0 instead.",
        ),
        (
            r#"{"model":"m","prompt":"x","max_tokens":"16"}"#,
            "max_tokens",
            "Invalid type for 'max_tokens': expected an integer, but got a string.",
        ),
    ] {
        let e = validate_passthrough(Endpoint::Completions, bad.as_bytes()).expect_err(bad);
        assert_eq!(e.param.as_deref(), Some(param), "{bad}");
        assert_eq!(e.message, message, "{bad}");
    }
}

#[test]
fn the_estimate_counted_while_validating_is_prompt_tokens_s_and_checks_the_input() {
    use crate::estimate::prompt_tokens;
    let responses_fixture =
        include_str!("../../tests/fixtures/openai-responses-request.json").to_owned();
    let completions_fixture =
        include_str!("../../tests/fixtures/openai-completions-request.json").to_owned();
    let codex = include_str!("../../tests/fixtures/codex-0.171.0-responses-request.json");
    let cases = [
        (Endpoint::Responses, responses_fixture),
        (Endpoint::Responses, codex.to_owned()),
        (Endpoint::Completions, completions_fixture),
        (
            Endpoint::Responses,
            r#"{"model":"m","instructions":"be brief","input":[{"role":"user","content":[{"type":"input_text","text":"\u4f60\u597d \"q\""},{"type":"input_image","image_url":"https://x/y.png","detail":"low"}]},{"type":"function_call_output","call_id":"c","output":"42"}],"tools":[{"type":"function","name":"f","parameters":{"type":"object"}}],"text":{"format":{"type":"json_schema","schema":{}}},"metadata":{"k":"v"}}"#.to_owned(),
        ),
        (Endpoint::Completions, r#"{"model":"m","prompt":[[1,2,3],[4]],"suffix":"end"}"#.to_owned()),
    ];
    for (endpoint, body) in cases {
        let counted = validate_passthrough_counting(endpoint, body.as_bytes()).expect(&body);
        let wire = counted.estimate_wire();
        assert_eq!(
            counted.prompt_tokens,
            Some(prompt_tokens(body.as_bytes(), wire)),
            "{body}"
        );
        let mut plain = validate_passthrough(endpoint, body.as_bytes()).expect(&body);
        assert_eq!(plain.prompt_tokens, None, "{body}");
        plain.prompt_tokens = counted.prompt_tokens;
        assert_eq!(plain, counted, "{body}");
    }
    // Embeddings are left to be counted when asked (their check reads a Value).
    let embeddings = validate_passthrough_counting(Endpoint::Embeddings, EMBED_REQUEST.as_bytes());
    assert_eq!(embeddings.expect("valid").prompt_tokens, None);
    // An input no `Value` reads is refused as before, counted or not.
    for (endpoint, body) in [
        (
            Endpoint::Responses,
            r#"{"model":"m","input":[{"role":"user","content":"\ud800"}]}"#,
        ),
        (Endpoint::Completions, r#"{"model":"m","prompt":[1e999]}"#),
    ] {
        let plain = validate_passthrough(endpoint, body.as_bytes()).expect_err(body);
        let counted = validate_passthrough_counting(endpoint, body.as_bytes()).expect_err(body);
        assert_eq!(
            (plain.param, plain.message),
            (counted.param, counted.message),
            "{body}"
        );
    }
}
