//! What validating and forwarding one chat body costs: the byte-faithful path
//! (`validate_chat` + `upstream_body`) against parsing into a `serde_json::Value`
//! and re-serialising it (what the gateway did before, minus its field checks).
//! Bounded: a fixed number of iterations per body. Numbers only; nothing asserts.
//!
//!   cargo run --release -p afr-core --example forward_cost

use afr_core::config::RouteConfig;
use afr_core::validate::validate_chat;
use std::hint::black_box;
use std::time::Instant;

fn body(messages: usize, text: usize) -> String {
    let content = "lorem ipsum dolor sit amet ".repeat(text / 27 + 1);
    let turns: Vec<String> = (0..messages)
        .map(|i| {
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            format!(r#"{{"role":"{role}","content":"{content}"}}"#)
        })
        .collect();
    format!(
        r#"{{"model":"gpt-4o-mini","messages":[{}],"stream":true,"seed":123456789012345678901234567890,"response_format":{{"type":"json_schema","json_schema":{{"name":"s","schema":{{"type":"object","properties":{{"zeta":{{"type":"string"}},"alpha":{{"type":"number"}}}}}}}}}}}}"#,
        turns.join(",")
    )
}

fn per_call(iterations: u32, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    for _ in 0..iterations {
        f();
    }
    start.elapsed().as_secs_f64() * 1e6 / f64::from(iterations)
}

fn main() {
    let route: RouteConfig =
        toml::from_str("provider = \"p\"\nmodel = \"gpt-4o-mini-2024-07-18\"").expect("route");
    for (label, messages, text) in [
        ("small (1 message)", 1, 20),
        ("chat (10 turns x 400 chars)", 10, 400),
        ("long context (40 turns x 4 kB)", 40, 4000),
    ] {
        let src = body(messages, text);
        let n = (20_000_000 / src.len()).clamp(200, 200_000) as u32;
        let faithful = per_call(n, || {
            let req = validate_chat(black_box(src.as_bytes())).expect("valid");
            black_box(req.upstream_body(src.as_bytes(), &route, true));
        });
        let reserialised = per_call(n, || {
            let mut v: serde_json::Map<String, serde_json::Value> =
                serde_json::from_slice(black_box(src.as_bytes())).expect("valid");
            v.insert("model".into(), route.model.clone().into());
            black_box(serde_json::to_vec(&v).expect("serialises"));
        });
        println!(
            "{label:32} {:>7} bytes  byte-faithful {faithful:8.2} us   parse+reserialise {reserialised:8.2} us   ({:.1}x)",
            src.len(),
            reserialised / faithful
        );
    }
}
