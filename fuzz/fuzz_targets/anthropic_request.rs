//! OpenAI -> Anthropic request translation on arbitrary JSON: never a panic;
//! a translated request is a JSON object for the route's model.
#![no_main]
use afr_core::anthropic::request_to_anthropic;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(request) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    if let Ok(out) = request_to_anthropic(&request, "claude-haiku-4-5") {
        assert_eq!(out["model"], "claude-haiku-4-5");
        serde_json::to_vec(&out).expect("serialisable");
    }
});
