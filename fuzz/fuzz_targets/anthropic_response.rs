//! Anthropic -> OpenAI translation of responses, errors and streams on
//! arbitrary bytes: never a panic; every chunk and error the stream translator
//! emits is JSON, and nothing follows an error or `[DONE]`.
#![no_main]
use afr_core::anthropic::{error_to_openai, response_to_openai, StreamItem, StreamTranslator};
use afr_core::sse::EventFramer;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = response_to_openai(data, 1_700_000_000);
    let status = data.first().map_or(500, |b| 400 + u16::from(*b) % 200);
    let _ = error_to_openai(status, data);
    let mut translator = StreamTranslator::new(data.len() % 2 == 0, 1_700_000_000);
    let mut items = Vec::new();
    let mut framer = EventFramer::new();
    framer.push(data);
    while let Ok(Some(event)) = framer.next_event() {
        items.extend(translator.push_raw(&event));
    }
    items.extend(translator.finish());
    let mut ended = false;
    for item in &items {
        assert!(!ended, "an item after the stream ended: {items:?}");
        match item {
            StreamItem::Chunk { json, .. } | StreamItem::Error(json) => {
                serde_json::from_str::<serde_json::Value>(json).expect("items are JSON");
                ended = matches!(item, StreamItem::Error(_));
            }
            StreamItem::Done => ended = true,
        }
    }
});
