//! Tests of SSE framing against the recorded fixtures, plus property tests.

use super::*;
use proptest::prelude::*;

const WITH_USAGE: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/openai-chat-stream.sse"
));
const NO_USAGE: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/openai-chat-stream-no-usage.sse"
));
const VARIANT_2024: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/openai-chat-stream-2024-variant.sse"
));
const ANTHROPIC: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/anthropic-messages-stream.sse"
));

fn frame_all(input: &[u8], split: &[usize]) -> (Vec<Vec<u8>>, Vec<u8>) {
    let mut framer = EventFramer::new();
    let (events, failed) = frame_with(&mut framer, input, split);
    assert_eq!(failed, None);
    (events, framer.pending().to_vec())
}

/// Pushes `input` cut at `split`, taking every complete event after each
/// push; stops at the first error.
fn frame_with(
    framer: &mut EventFramer,
    input: &[u8],
    split: &[usize],
) -> (Vec<Vec<u8>>, Option<EventTooLarge>) {
    let mut events = Vec::new();
    let mut last = 0;
    for &cut in split.iter().chain(std::iter::once(&input.len())) {
        let cut = cut.clamp(last, input.len());
        framer.push(&input[last..cut]);
        last = cut;
        loop {
            match framer.next_event() {
                Ok(Some(e)) => events.push(e),
                Ok(None) => break,
                Err(e) => return (events, Some(e)),
            }
        }
    }
    (events, None)
}

#[test]
fn frames_the_recorded_stream_into_its_events() {
    let (events, rest) = frame_all(WITH_USAGE, &[]);
    assert_eq!(events.len(), 14);
    assert!(rest.is_empty());
    assert_eq!(events.concat(), WITH_USAGE);
    assert!(inspect_chunk(&events[13]).done);
    let usage = inspect_chunk(&events[12]);
    assert!(usage.usage_only);
    assert_eq!(
        usage.usage,
        Some(TokenUsage {
            prompt_tokens: 26,
            completion_tokens: 10,
            total_tokens: 36,
            cached_tokens: 0,
            ..TokenUsage::default()
        })
    );
    assert!(!inspect_chunk(&events[11]).usage_only);
    assert!(inspect_chunk(&events[1]).content_chars > 0);
}

#[test]
fn stripping_usage_gives_the_stream_without_include_usage() {
    let (events, _) = frame_all(WITH_USAGE, &[]);
    let stripped: Vec<u8> = events
        .iter()
        .filter(|e| !inspect_chunk(e).usage_only)
        .flat_map(|e| strip_null_usage(e))
        .collect();
    assert_eq!(stripped, NO_USAGE);
}

#[test]
fn tolerates_the_2024_shape_without_null_usage() {
    let (events, rest) = frame_all(VARIANT_2024, &[]);
    assert!(rest.is_empty());
    assert_eq!(events.concat(), VARIANT_2024);
    assert!(events.iter().any(|e| inspect_chunk(e).usage.is_some()));
    assert_eq!(strip_null_usage(&events[0]), events[0]);
}

#[test]
fn reads_anthropic_event_names_and_data() {
    let (events, _) = frame_all(ANTHROPIC, &[]);
    assert_eq!(event_name(&events[0]).as_deref(), Some("message_start"));
    assert!(event_data(&events[0]).is_some_and(|d| d.starts_with("{\"type\":\"message_start\"")));
}

#[test]
fn classifies_done_error_and_usage_only_events() {
    let (events, _) = frame_all(WITH_USAGE, &[]);
    assert!(is_done(&events[13]));
    assert!(is_done(b"data:[DONE]\n\n"));
    assert!(!is_done(&events[0]));
    assert!(is_usage_only(&events[12]));
    assert_eq!(events.iter().filter(|e| is_usage_only(e)).count(), 1);
    let spaced = b"data: {\"choices\": [], \"usage\": {\"prompt_tokens\": 1}}\n\n";
    assert!(is_usage_only(spaced));
    assert!(is_error_event(b"data: {\"error\":{}}\n\n"));
    assert!(is_error_event(b"data:{\"error\":{}}\n\n"));
    assert!(!is_error_event(&events[1]));
}

#[test]
fn only_the_role_chunk_is_preamble() {
    let (events, _) = frame_all(WITH_USAGE, &[]);
    assert!(is_preamble(&events[0]));
    assert!(events[1..].iter().all(|e| !is_preamble(e)));
    assert!(is_preamble(b": keep-alive\n\n"));
    assert!(!is_preamble(b"data: [DONE]\n\n"));
    assert!(!is_preamble(b"data: {\"error\":{}}\n\n"));
    let tool = br#"data: {"choices":[{"index":0,"delta":{"role":"assistant","tool_calls":[{"index":0}]},"finish_reason":null}]}

"#;
    assert!(!is_preamble(tool));
}

#[test]
fn azure_prompt_filter_annotation_is_preamble() {
    // The first event of an Azure stream (tests/fixtures/azure-openai-notes.md): no
    // content yet, so a provider failing right after it may still be failed over.
    let annotation = br#"data: {"choices":[],"created":0,"id":"","model":"","object":"","prompt_filter_results":[{"prompt_index":0,"content_filter_results":{"hate":{"filtered":false,"severity":"safe"}}}]}

"#;
    assert!(is_preamble(annotation));
    let usage =
        br#"data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}

"#;
    assert!(!is_preamble(usage));
}

#[test]
fn decodes_data_like_the_sdks() {
    assert_eq!(
        event_data(b": comment\ndata:a\ndata: b\n\n").as_deref(),
        Some("a\nb")
    );
    assert_eq!(event_data(b"event: x\n\n"), None);
    assert_eq!(event_data(b"data\r\n\r\n").as_deref(), Some(""));
}

#[test]
fn handles_crlf_and_cr_line_ends() {
    let input = b"data: 1\r\n\r\ndata: 2\r\rdata: 3\n\n";
    let (events, rest) = frame_all(input, &[8, 9, 10, 11]);
    assert_eq!(
        events,
        vec![
            b"data: 1\r\n\r\n".to_vec(),
            b"data: 2\r\r".to_vec(),
            b"data: 3\n\n".to_vec()
        ]
    );
    assert!(rest.is_empty());
}

#[test]
fn error_event_has_no_event_line() {
    assert_eq!(
        error_event("{\"error\":{}}"),
        b"data: {\"error\":{}}\n\n".to_vec()
    );
    assert!(inspect_chunk(&error_event("{\"error\":{\"message\":\"x\"}}")).error);
}

proptest! {
    /// However the bytes are split into reads, the same events come out and
    /// together they are the input, byte for byte.
    #[test]
    fn framing_is_independent_of_read_boundaries(mut cuts in proptest::collection::vec(0usize..WITH_USAGE.len(), 0..40)) {
        cuts.sort_unstable();
        let (whole, _) = frame_all(WITH_USAGE, &[]);
        let (split, rest) = frame_all(WITH_USAGE, &cuts);
        prop_assert_eq!(&split, &whole);
        prop_assert!(rest.is_empty());
    }

    /// Arbitrary input never panics, and events plus pending bytes reassemble the input.
    #[test]
    fn framing_loses_no_bytes(input in proptest::collection::vec(prop_oneof![Just(b'\n'), Just(b'\r'), Just(b'd'), any::<u8>()], 0..300),
                              mut cuts in proptest::collection::vec(0usize..300, 0..10)) {
        cuts.sort_unstable();
        let (events, rest) = frame_all(&input, &cuts);
        let mut joined = events.concat();
        joined.extend_from_slice(&rest);
        prop_assert_eq!(joined, input);
        for e in &events {
            prop_assert!(e.ends_with(b"\n") || e.ends_with(b"\r"));
        }
    }
}

#[test]
fn an_event_without_its_blank_line_fails_at_the_limit() {
    let mut framer = EventFramer::with_max_event(64);
    framer.push(b"data: ok\n\n");
    assert_eq!(framer.next_event(), Ok(Some(b"data: ok\n\n".to_vec())));
    framer.push(&[b'x'; 64]);
    assert_eq!(
        framer.next_event(),
        Ok(None),
        "64 bytes pending is the limit"
    );
    framer.push(b"x");
    assert_eq!(framer.next_event(), Err(EventTooLarge { limit: 64 }));
    // A provider that keeps sending: nothing more is buffered, the error stays.
    framer.push(&[b'x'; 1000]);
    framer.push(b"\n\ndata: late\n\n");
    assert!(framer.pending().len() <= 65);
    assert_eq!(framer.next_event(), Err(EventTooLarge { limit: 64 }));
}

#[test]
fn a_complete_event_over_the_limit_fails_too() {
    let mut framer = EventFramer::with_max_event(10);
    framer.push(b"data: 0123456789\n\ndata: 1\n\n");
    assert_eq!(framer.next_event(), Err(EventTooLarge { limit: 10 }));
    assert_eq!(framer.next_event(), Err(EventTooLarge { limit: 10 }));
    let mut exact = EventFramer::with_max_event(10);
    exact.push(b"data: 12\n\n");
    assert_eq!(exact.next_event(), Ok(Some(b"data: 12\n\n".to_vec())));
}

#[test]
fn a_read_holding_many_events_is_not_shifted_per_event() {
    // One read of 10 000 events: handing each out must not move the ones
    // behind it (that is quadratic: ~10 000²/2 events' worth of bytes).
    let event = b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n";
    let input = event.repeat(10_000);
    let mut framer = EventFramer::new();
    let (events, failed) = frame_with(&mut framer, &input, &[]);
    assert_eq!((events.len(), failed), (10_000, None));
    assert!(
        framer.moved <= input.len(),
        "moved {} bytes for {} pushed",
        framer.moved,
        input.len()
    );
}

proptest! {
    /// Whatever the events and reads, compaction moves no more bytes than
    /// were pushed (so framing is linear in the stream's length), and with
    /// a limit the framer never buffers an unfinished event past it.
    #[test]
    fn framing_work_and_memory_are_bounded(
        sizes in proptest::collection::vec(0usize..200, 0..60),
        mut cuts in proptest::collection::vec(0usize..12_000, 0..60),
        limit in 1usize..250,
    ) {
        let input: Vec<u8> = sizes
            .iter()
            .flat_map(|&n| {
                let mut e = b"data: ".to_vec();
                e.extend(vec![b'x'; n]);
                e.extend_from_slice(b"\n\n");
                e
            })
            .collect();
        cuts.sort_unstable();
        let mut framer = EventFramer::with_max_event(limit);
        let mut last = 0;
        let mut events = Vec::new();
        let mut failed = false;
        for &cut in cuts.iter().chain(std::iter::once(&input.len())) {
            let cut = cut.clamp(last, input.len());
            framer.push(&input[last..cut]);
            last = cut;
            loop {
                match framer.next_event() {
                    Ok(Some(e)) => events.push(e),
                    Ok(None) => {
                        prop_assert!(framer.pending().len() <= limit);
                        break;
                    }
                    Err(_) => {
                        failed = true;
                        break;
                    }
                }
            }
            if failed {
                break;
            }
        }
        prop_assert!(framer.moved <= input.len());
        prop_assert!(events.iter().all(|e| e.len() <= limit));
        let first_too_large = sizes.iter().position(|&n| n + 8 > limit);
        match first_too_large {
            // Every event fits: all come out, byte for byte.
            None => {
                prop_assert!(!failed);
                prop_assert_eq!(events.concat(), input);
            }
            // The first one that does not ends the stream, with the ones before it out.
            Some(i) => {
                prop_assert!(failed);
                prop_assert_eq!(events.len(), i);
            }
        }
    }
}

#[test]
fn keep_alive_comments_have_no_data_and_events_do() {
    for raw in [
        &b": keep-alive\n\n"[..],
        b": OPENROUTER PROCESSING\r\n\r\n",
        b"\n\n",
    ] {
        assert!(!has_data(raw));
        assert_eq!(event_data(raw), None);
    }
    let (events, _) = frame_all(WITH_USAGE, &[]);
    assert!(events.iter().all(|e| has_data(e)));
    assert!(has_data(b": note\ndata: {}\n\n"));
    assert!(has_data(b"data\n\n"));
}

#[test]
fn null_token_counts_are_zero_not_a_lost_usage() {
    let chunk = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":null,\"total_tokens\":null}}\n\n";
    let usage = inspect_chunk(chunk).usage.expect("usage is read");
    assert_eq!(usage.prompt_tokens, 7);
    assert_eq!(usage.completion_tokens, 0);
}

#[test]
fn usage_reads_cached_prompt_tokens() {
    let chunk = br#"data: {"choices":[],"usage":{"prompt_tokens":20,"completion_tokens":3,"total_tokens":23,"prompt_tokens_details":{"cached_tokens":16}}}

"#;
    assert_eq!(
        inspect_chunk(chunk).usage.map(|u| u.cached_tokens),
        Some(16)
    );
    let null = br#"data: {"choices":[],"usage":{"prompt_tokens":20,"completion_tokens":3,"total_tokens":23,"prompt_tokens_details":null}}

"#;
    assert_eq!(inspect_chunk(null).usage.map(|u| u.cached_tokens), Some(0));
}

#[test]
fn recorded_events_are_well_formed_and_cut_json_is_not() {
    let responses: &[u8] = include_bytes!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/openai-responses-stream.sse"
    ));
    let completions: &[u8] = include_bytes!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/openai-completions-stream.sse"
    ));
    for fixture in [
        WITH_USAGE,
        NO_USAGE,
        VARIANT_2024,
        ANTHROPIC,
        responses,
        completions,
    ] {
        let (events, rest) = frame_all(fixture, &[]);
        assert!(rest.is_empty());
        for event in events {
            assert!(!is_malformed(&event), "{}", String::from_utf8_lossy(&event));
        }
    }
    // Keep-alive comments and `[DONE]` carry no JSON and are fine.
    assert!(!is_malformed(b": keep-alive\n\n"));
    assert!(!is_malformed(b"data:[DONE]\n\n"));
    // A JSON value split over two `data:` lines is one value (joined with `\n`).
    assert!(!is_malformed(b"data: {\"a\":\ndata: 1}\n\n"));
    assert!(is_malformed(
        b"data: {\"id\":\"x\",\"choices\":[{\"delta\":{\"content\":\"trunc\n\n"
    ));
    assert!(is_malformed(b"event: message_delta\ndata: {\"type\":\n\n"));
    assert!(is_malformed(b"data: <html>\n\n"));
    assert!(is_malformed(b"data\n\n"));
}

#[test]
fn a_cut_streams_estimate_sees_every_kind_of_generated_output() {
    let chars = |data: &str| inspect_chunk(format!("data: {data}\n\n").as_bytes()).content_chars;
    assert_eq!(
        chars(r#"{"choices":[{"index":0,"delta":{"content":"four"}}]}"#),
        4
    );
    assert_eq!(
        chars(
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"name":"get","arguments":"{\"a\":1}"}}]}}]}"#
        ),
        3 + 7
    );
    assert_eq!(
        chars(r#"{"choices":[{"index":0,"delta":{"reasoning":"hmm"}}]}"#),
        3
    );
    assert_eq!(
        chars(r#"{"choices":[{"index":0,"delta":{"reasoning_content":"hmm"}}]}"#),
        3
    );
    assert_eq!(
        chars(r#"{"choices":[{"index":0,"delta":{"refusal":"no"}}]}"#),
        2
    );
    // Legacy completions streams, n choices.
    assert_eq!(
        chars(r#"{"choices":[{"index":0,"text":"ab"},{"index":1,"text":"cde"}]}"#),
        5
    );
}
