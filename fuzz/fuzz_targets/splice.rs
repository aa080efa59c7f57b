//! The byte-faithful splicer on arbitrary bytes: never a panic; an edited
//! object is still one JSON object, with the edits made and every member it
//! did not touch byte for byte as it was.
#![no_main]
use afr_core::splice::{members, Splice};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(mut edit) = Splice::parse(data) else {
        return;
    };
    edit.set("model", b"\"m\"".to_vec());
    edit.remove("temperature");
    edit.rename("max_tokens", "max_completion_tokens");
    let out = edit.finish();
    let before = members(data).expect("parsed once already");
    let after = members(&out).expect("the edited body is one JSON object");
    let get = |key: &str| after.iter().find(|(k, _)| k == key).map(|(_, r)| r.get());
    assert_eq!(get("model"), Some("\"m\""));
    assert!(get("temperature").is_none() && get("max_tokens").is_none());
    for (key, raw) in &before {
        if matches!(
            key.as_ref(),
            "model" | "temperature" | "max_tokens" | "max_completion_tokens"
        ) {
            continue;
        }
        let kept = after.iter().find(|(k, _)| k == key).map(|(_, r)| r.get());
        assert_eq!(kept, Some(raw.get()), "member {key:?} changed");
    }
});
