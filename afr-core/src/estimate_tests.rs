use super::*;

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/../tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn json_field(name: &str, pointer: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(&fixture(name)).unwrap();
    v.pointer(pointer)
        .and_then(serde_json::Value::as_u64)
        .unwrap()
}

/// Every recorded request whose provider usage we have: the estimate never
/// under-counts it and stays within 2x (these are plain text).
#[test]
fn recorded_usage_is_never_under_counted_and_plain_text_stays_within_2x() {
    let cases = [
        (
            "openai-responses-request.json",
            Wire::Responses,
            json_field("openai-responses-response.json", "/usage/input_tokens"),
        ),
        (
            "anthropic-count-tokens-request.json",
            Wire::Messages,
            json_field("anthropic-count-tokens-response.json", "/input_tokens"),
        ),
        (
            "openai-completions-request.json",
            Wire::Completions,
            json_field("openai-completions-response.json", "/usage/prompt_tokens"),
        ),
        (
            "openai-embeddings-request.json",
            Wire::Embeddings,
            json_field(
                "openai-embeddings-response-base64.json",
                "/usage/prompt_tokens",
            ),
        ),
    ];
    for (request, wire, billed) in cases {
        let estimate = prompt_tokens(&fixture(request), wire);
        eprintln!("{request}: estimate {estimate}, billed {billed}");
        assert!(estimate >= billed, "{request}: {estimate} < {billed}");
        assert!(
            estimate <= 2 * billed,
            "{request}: {estimate} > 2 x {billed}"
        );
    }
}

#[test]
fn tools_schemas_and_tool_calls_count() {
    let plain =
        br#"{"model":"m","messages":[{"role":"user","content":"What is the weather in Paris?"}]}"#;
    let with_tools = br#"{"model":"m","messages":[{"role":"user","content":"What is the weather in Paris?"}],
        "tools":[{"type":"function","function":{"name":"get_weather","description":"Current weather at a location",
        "parameters":{"type":"object","properties":{"location":{"type":"string","description":"City and country"}},"required":["location"]}}}]}"#;
    let p = prompt_tokens(plain, Wire::Chat);
    let t = prompt_tokens(with_tools, Wire::Chat);
    assert!(t >= p + 40, "{p} -> {t}: the schema's keys and text count");
    let call = br#"{"model":"m","messages":[{"role":"assistant","tool_calls":[{"id":"c1","type":"function",
        "function":{"name":"get_weather","arguments":"{\"location\":\"Paris, France, Europe, Earth\"}"}}]},
        {"role":"tool","tool_call_id":"c1","content":"Sunny and 25 degrees with a light breeze from the west"}]}"#;
    assert!(prompt_tokens(call, Wire::Chat) >= BASE_TOKENS + 30);
    // Anthropic adds its tool-use system prompt.
    let m = br#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"hi"}],"tools":[{"name":"t","input_schema":{"type":"object"}}]}"#;
    assert!(prompt_tokens(m, Wire::Messages) >= ANTHROPIC_TOOLS_TOKENS);
    // Fields that are not prompt do not count.
    let meta = br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"metadata":{"a":"a very long value that is not part of any prompt at all, not at all"}}"#;
    assert_eq!(
        prompt_tokens(meta, Wire::Chat),
        prompt_tokens(
            br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
            Wire::Chat
        )
    );
}

#[test]
fn scripts_other_than_latin_count_a_token_a_character() {
    let cjk = "你好世界，今天天气很好。".repeat(10); // 120 characters
    let body = format!(r#"{{"model":"m","messages":[{{"role":"user","content":"{cjk}"}}]}}"#);
    assert!(prompt_tokens(body.as_bytes(), Wire::Chat) >= 120);
    assert_eq!(text_units("ab"), 2);
    assert_eq!(text_units("é"), 4);
    assert_eq!(text_units("😀"), 8);
    // Escaped text counts as what it decodes to.
    let escaped = br#"{"model":"m","messages":[{"role":"user","content":"\u4f60\u597d"}]}"#;
    let raw = "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"你好\"}]}";
    assert_eq!(
        prompt_tokens(escaped, Wire::Chat),
        prompt_tokens(raw.as_bytes(), Wire::Chat)
    );
}

#[test]
fn images_count_by_the_published_rules_not_their_bytes() {
    let b64 = "iVBORw0KGgo".repeat(10_000); // ~110 KB of base64
    let chat = |detail: &str| {
        format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":[{{"type":"text","text":"What is this?"}},
            {{"type":"image_url","image_url":{{"url":"data:image/png;base64,{b64}"{detail}}}}}]}}]}}"#
        )
    };
    let high = prompt_tokens(chat("").as_bytes(), Wire::Chat);
    assert!((IMAGE_TOKENS..IMAGE_TOKENS + 60).contains(&high), "{high}");
    let low = prompt_tokens(chat(r#","detail":"low""#).as_bytes(), Wire::Chat);
    assert!(
        (LOW_DETAIL_IMAGE_TOKENS..LOW_DETAIL_IMAGE_TOKENS + 60).contains(&low),
        "{low}"
    );
    let by_url = br#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"https://example.com/cat.png"}}]}]}"#;
    assert!(prompt_tokens(by_url, Wire::Chat) >= IMAGE_TOKENS);
    // Responses: input_image with the image as a string.
    let responses = format!(
        r#"{{"model":"m","input":[{{"role":"user","content":[{{"type":"input_image","image_url":"data:image/jpeg;base64,{b64}"}}]}}]}}"#
    );
    let r = prompt_tokens(responses.as_bytes(), Wire::Responses);
    assert!((IMAGE_TOKENS..IMAGE_TOKENS + 60).contains(&r), "{r}");
    // Anthropic: the media type comes after the data.
    let anthropic = format!(
        r#"{{"model":"m","max_tokens":5,"messages":[{{"role":"user","content":[{{"type":"image","source":{{"type":"base64","data":"{b64}","media_type":"image/png"}}}}]}}]}}"#
    );
    let a = prompt_tokens(anthropic.as_bytes(), Wire::Messages);
    assert!((IMAGE_TOKENS..IMAGE_TOKENS + 60).contains(&a), "{a}");
    // An inline PDF counts as text of its decoded size.
    let pdf = format!(
        r#"{{"model":"m","max_tokens":5,"messages":[{{"role":"user","content":[{{"type":"document","source":{{"type":"base64","media_type":"application/pdf","data":"{b64}"}}}}]}}]}}"#
    );
    let d = prompt_tokens(pdf.as_bytes(), Wire::Messages);
    assert!(d >= (b64.len() as u64 / 4 * 3) / 4, "{d}");
}

#[test]
fn token_id_arrays_count_their_length() {
    let ids: Vec<String> = (0..500).map(|i| (i * 37 % 50_000).to_string()).collect();
    let body = format!(r#"{{"model":"m","input":[[{}]]}}"#, ids.join(","));
    assert_eq!(prompt_tokens(body.as_bytes(), Wire::Embeddings), 500);
}

#[test]
fn a_body_that_is_no_object_counts_its_bytes() {
    assert_eq!(prompt_tokens(b"[1,2,3]", Wire::Chat), 2);
}
