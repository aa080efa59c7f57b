//! The request validator on arbitrary bytes: never a panic; a body it accepts
//! becomes, for a route with every kind of adaptation, an upstream body that
//! is one JSON object naming the route's model.
#![no_main]
use afr_core::config::RouteConfig;
use afr_core::splice::members;
use afr_core::validate::validate_chat;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn route() -> &'static RouteConfig {
    static ROUTE: OnceLock<RouteConfig> = OnceLock::new();
    ROUTE.get_or_init(|| {
        serde_json::from_value(serde_json::json!({
            "provider": "p",
            "model": "upstream-model",
            "drop": ["temperature", "n"],
            "rename": {"max_tokens": "max_completion_tokens"},
            "clamp": {"max_completion_tokens": {"max": 16384.0}, "top_p": {"min": 0.1, "max": 0.9}}
        }))
        .expect("a valid route")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(request) = validate_chat(data) else {
        return;
    };
    for ask_usage in [false, true] {
        let body = request.upstream_body(data, route(), ask_usage);
        // Read as the gateway reads it: raw members (a 1e400 stays as sent,
        // which serde_json::Value could not hold).
        let top = members(&body).expect("the upstream body is one JSON object");
        let get = |key: &str| top.iter().find(|(k, _)| k == key).map(|(_, r)| r.get());
        assert_eq!(get("model"), Some("\"upstream-model\""));
        assert!(get("temperature").is_none() && get("max_tokens").is_none());
    }
});
