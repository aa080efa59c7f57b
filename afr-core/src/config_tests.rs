//! Tests of config parsing, validation messages and route adaptations.

use super::*;

const SHIPPED: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../conf/sidecar.toml"));

const MINIMAL: &str = r#"
[server]
listen = "127.0.0.1:0"
secret = "0123456789abcdef"
[providers.mock]
kind = "openai"
base_url = "http://127.0.0.1:1"
[models.m]
tier = "Fast"
description = "d"
[[models.m.routes]]
provider = "mock"
model = "up"
"#;

fn errors(text: &str) -> Vec<String> {
    SidecarConfig::parse(text, "test.toml")
        .expect_err("should be rejected")
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[test]
fn shipped_config_is_valid_and_lists_the_default_catalogue_in_order() {
    let config = SidecarConfig::parse(SHIPPED, "conf/sidecar.toml").unwrap();
    let ids: Vec<&str> = config.models.keys().map(String::as_str).collect();
    assert_eq!(
        ids,
        [
            "gpt-5-mini",
            "gpt-4o-mini",
            "gpt-5-chat",
            "text-embedding-3-small"
        ]
    );
    let tiers: Vec<Tier> = config.models.values().map(|m| m.tier).collect();
    assert_eq!(tiers, [Tier::Fast, Tier::Smart, Tier::Pro, Tier::Fast]);
    assert_eq!(config.breaker.cooldown, Duration::from_secs(30));
    assert_eq!(
        config.providers["openai"].timeouts.total,
        Duration::from_secs(600)
    );
    assert_eq!(
        parse_listen(&config.server.listen).unwrap(),
        Listen::Unix("/run/afr/sidecar.sock".into())
    );
}

/// The body `route` sends for `src`, parsed back for inspection.
fn adapted(route: &RouteConfig, src: &str) -> serde_json::Map<String, serde_json::Value> {
    let mut body = crate::splice::Splice::parse(src.as_bytes()).unwrap();
    route.adapt(&mut body);
    serde_json::from_slice(&body.finish()).unwrap()
}

#[test]
fn shipped_gpt5_routes_turn_defaults_into_what_gpt5_accepts() {
    let config = SidecarConfig::parse(SHIPPED, "conf/sidecar.toml").unwrap();
    let src = br#"{"model":"gpt-5-mini","messages":[{"role":"user","content":"hi"}]}"#;
    let req = crate::validate::validate_chat(src).unwrap();
    let sent = req.upstream_body(src, &config.models["gpt-5-mini"].routes[0], false);
    let body: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&sent).unwrap();
    assert!(!body.contains_key("temperature"));
    assert!(!body.contains_key("max_tokens"));
    assert_eq!(body["max_completion_tokens"], 4096);
    assert_eq!(body["model"], "gpt-5-mini");
}

#[test]
fn clamp_keeps_integers_integral() {
    let config = SidecarConfig::parse(SHIPPED, "conf/sidecar.toml").unwrap();
    let route = &config.models["gpt-4o-mini"].routes[2];
    let body = adapted(route, r#"{"max_tokens": 100000, "temperature": 1.7}"#);
    assert_eq!(body["max_tokens"], 64000);
    assert!(body["max_tokens"].is_i64());
    assert_eq!(body["temperature"], 1.0);
    assert_eq!(body["model"], "claude-haiku-4-5");
}

#[test]
fn clamp_leaves_in_range_literals_as_written() {
    let route: RouteConfig = toml::from_str(
        r#"provider = "p"
model = "m"
clamp = { temperature = { max = 1.0 } }"#,
    )
    .unwrap();
    let mut body = crate::splice::Splice::parse(br#"{"temperature":5e-1,"model":"x"}"#).unwrap();
    route.adapt(&mut body);
    assert_eq!(body.finish(), br#"{"temperature":5e-1,"model":"m"}"#);
}

#[test]
fn rename_keeps_the_clients_own_value() {
    let route: RouteConfig = toml::from_str(
        r#"provider = "p"
model = "m"
rename = { max_tokens = "max_completion_tokens" }"#,
    )
    .unwrap();
    let body = adapted(&route, r#"{"max_tokens": 1, "max_completion_tokens": 2}"#);
    assert_eq!(body["max_completion_tokens"], 2);
    assert!(!body.contains_key("max_tokens"));
}

#[test]
fn unknown_provider_names_the_route_path() {
    let text = MINIMAL.replace("provider = \"mock\"", "provider = \"azur\"");
    assert_eq!(
        errors(&text),
        [r#"models.m.routes[0]: unknown provider "azur""#]
    );
}

#[test]
fn unknown_fields_are_rejected_with_the_file_name() {
    let text = MINIMAL.replace("[server]", "[server]\nlisten_port = 3");
    let errs = errors(&text);
    assert!(errs[0].starts_with("test.toml: "), "{errs:?}");
    assert!(errs[0].contains("listen_port"), "{errs:?}");
}

#[test]
fn bad_durations_are_rejected() {
    let text = format!("{MINIMAL}\n[breaker]\ncooldown = \"soon\"\n");
    assert!(errors(&text)[0].contains("cooldown"));
}

#[test]
fn non_loopback_listen_is_rejected() {
    let text = MINIMAL.replace("127.0.0.1:0", "0.0.0.0:8080");
    assert!(errors(&text)[0].starts_with("server.listen: "));
}

#[test]
fn socket_mode_is_octal_and_defaults_to_owner_and_group() {
    let ok = SidecarConfig::parse(MINIMAL, "test.toml").expect("valid");
    assert_eq!(ok.server.socket_mode_bits(), Ok(0o660));
    let text = MINIMAL.replace("[server]\n", "[server]\nsocket_mode = \"0666\"\n");
    let wide = SidecarConfig::parse(&text, "test.toml").expect("valid");
    assert_eq!(wide.server.socket_mode_bits(), Ok(0o666));
    for bad in ["rw-rw----", "0999", "07777", ""] {
        let text = MINIMAL.replace(
            "[server]\n",
            &format!("[server]\nsocket_mode = \"{bad}\"\n"),
        );
        assert!(
            errors(&text)[0].starts_with("server.socket_mode: "),
            "{bad}"
        );
    }
}

#[test]
fn secret_is_required_and_azure_needs_an_api_version() {
    let text = MINIMAL
        .replace("secret = \"0123456789abcdef\"", "")
        .replace("kind = \"openai\"", "kind = \"azure\"");
    let errs = errors(&text);
    assert!(
        errs.iter()
            .any(|e| e.starts_with("server: a shared secret is required")),
        "{errs:?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.starts_with("providers.mock.api_version")),
        "{errs:?}"
    );
}

#[test]
fn models_list_filters_by_allow_list() {
    let config = SidecarConfig::parse(SHIPPED, "conf/sidecar.toml").unwrap();
    let all: serde_json::Value = serde_json::from_str(&config.models_list(None)).unwrap();
    assert!(config.models_list(None).starts_with(r#"{"object":"list","data":[{"id":"gpt-5-mini","object":"model","created":0,"owned_by":"aeferalow","tier":"Fast","description":"#));
    assert_eq!(all["object"], "list");
    assert_eq!(all["data"].as_array().unwrap().len(), 4);
    assert_eq!(all["data"][0]["tier"], "Fast");
    assert_eq!(all["data"][0]["object"], "model");
    let some: serde_json::Value =
        serde_json::from_str(&config.models_list(Some(&["gpt-5-chat".to_string()]))).unwrap();
    assert_eq!(some["data"].as_array().unwrap().len(), 1);
    assert_eq!(some["data"][0]["id"], "gpt-5-chat");
}

#[test]
fn stream_pacing_and_first_content_have_generous_defaults_and_must_be_positive() {
    let config = SidecarConfig::parse(MINIMAL, "test.toml").expect("valid");
    assert_eq!(config.server.stream_hold, Duration::from_secs(3));
    assert_eq!(config.server.stream_keepalive, Duration::from_secs(15));
    assert_eq!(
        config.providers["mock"].timeouts.first_content,
        Duration::from_secs(600)
    );
    let text = MINIMAL.replace(
        "[server]\n",
        "[server]\nstream_keepalive = \"0s\"\nstream_hold = \"0s\"\n",
    );
    assert_eq!(errors(&text), ["server.stream_keepalive: must be positive"]);
    let text = format!("{MINIMAL}[providers.mock.timeouts]\nfirst_content = \"0s\"\n");
    assert_eq!(
        errors(&text),
        ["providers.mock.timeouts.first_content: must be positive"]
    );
}

#[test]
fn syntax_errors_give_line_column_and_key_but_never_the_source_line() {
    // An unterminated string on the secret's line: `toml`'s own Display
    // would print that line, secret included, into the log.
    let text = MINIMAL.replace(
        "secret = \"0123456789abcdef\"",
        "secret = \"0123456789abcdef-SeCrEt",
    );
    assert_eq!(
        errors(&text),
        ["test.toml: line 4, column 34: server.secret: invalid basic string"]
    );
    // serde's type errors quote the rejected value: a secret written
    // without quotes, or a key pasted into the wrong field.
    for (line, expected) in [
        (
            "secret = 12345678901234567",
            "server.secret: invalid type: integer, expected a string",
        ),
        (
            "secret = 1.5e30",
            "server.secret: invalid type: floating point, expected a string",
        ),
        (
            "secret = \"0123456789abcdef\"\nmax_body_bytes = \"sk-proj-0123\\\"456789`abcdef\"",
            "server.max_body_bytes: invalid type: string, expected usize",
        ),
    ] {
        let text = MINIMAL.replace("secret = \"0123456789abcdef\"", line);
        let errs = errors(&text);
        assert_eq!(errs.len(), 1);
        assert!(errs[0].ends_with(expected), "{errs:?}");
        assert!(!errs[0].contains("456789"), "{errs:?}");
    }
    let text = format!("{MINIMAL}\n[breaker]\ncooldown = \"soon\"\n");
    assert_eq!(
        errors(&text),
        ["test.toml: line 16, column 12: breaker.cooldown: invalid value: string, expected a duration"]
    );
}

#[test]
fn absurd_durations_are_errors_naming_the_path() {
    let text = format!(
        "{MINIMAL}[providers.mock.timeouts]\ntotal = \"500000000 years\"\nidle = \"300000000000 years\"\n\
         [breaker]\ncooldown = \"1000 years\"\n"
    );
    let text = text.replace(
        "[server]\n",
        "[server]\nstream_hold = \"2 years\"\nstream_keepalive = \"300000000000 years\"\n",
    );
    let errs = errors(&text);
    assert_eq!(
        errs,
        [
            "breaker.cooldown: 1000years is longer than the limit of 1year",
            "server.stream_hold: 2years is longer than the limit of 1year",
            "server.stream_keepalive: 300000000000years is longer than the limit of 1year",
            "providers.mock.timeouts.idle: 300000000000years is longer than the limit of 1year",
            "providers.mock.timeouts.total: 500000000years is longer than the limit of 1year",
        ]
    );
    let text = format!("{MINIMAL}[providers.mock.timeouts]\ntotal = \"1 year\"\n");
    let config = SidecarConfig::parse(&text, "test.toml").expect("a year is accepted");
    // What validation lets through can always be added to a clock reading.
    assert!(std::time::Instant::now()
        .checked_add(config.providers["mock"].timeouts.total)
        .is_some());
}

#[test]
fn prices_cost_and_warnings() {
    let shipped = SidecarConfig::parse(SHIPPED, "conf/sidecar.toml").unwrap();
    assert!(
        shipped.warnings().is_empty(),
        "every shipped route has a price"
    );
    let p = shipped.models["gpt-5-mini"].routes[0].price.unwrap();
    // 1000 prompt (400 cached) + 500 completion at $0.25 / $0.025 / $2 per 1M.
    assert_eq!(
        p.cost_nanos(&TokenUsage {
            prompt_tokens: 1000,
            cached_tokens: 400,
            completion_tokens: 500,
            ..TokenUsage::default()
        }),
        600 * 250 + 400 * 25 + 500 * 2000
    );
    // Cache writes at 1.25x (5 min) and 2x (1 h) input unless priced; reasoning is output.
    let written = TokenUsage {
        prompt_tokens: 1000,
        cached_tokens: 100,
        cache_write_5m: 200,
        cache_write_1h: 300,
        completion_tokens: 50,
        reasoning_tokens: 20,
        ..TokenUsage::default()
    };
    assert_eq!(
        p.cost_nanos(&written),
        400 * 250 + 100 * 25 + 200 * 3125 / 10 + 300 * 500 + 50 * 2000
    );
    let priced = Price {
        cache_write: Some(0.5),
        cache_write_1h: Some(1.0),
        ..p
    };
    assert_eq!(
        priced.cost_nanos(&written),
        400 * 250 + 100 * 25 + 200 * 500 + 300 * 1000 + 50 * 2000
    );
    // The worst case prices every prompt token at the dearest class a route can bill.
    assert_eq!(p.worst_nanos(10, 1, false), 10 * 250 + 2000);
    assert_eq!(p.worst_nanos(10, 1, true), 10 * 500 + 2000);
    let minimal = SidecarConfig::parse(MINIMAL, "t").unwrap();
    let w: Vec<String> = minimal.warnings().iter().map(ToString::to_string).collect();
    assert_eq!(w.len(), 1);
    assert!(
        w[0].starts_with("models.m.routes[0].price: no price"),
        "{}",
        w[0]
    );
    let bad = format!("{MINIMAL}price = {{ input = -1, output = 1 }}\n");
    assert!(errors(&bad)[0].starts_with("models.m.routes[0].price.input: "));
}

#[test]
fn a_long_context_tier_prices_the_whole_request_above_its_threshold() {
    let text = format!(
        "{MINIMAL}price = {{ input = 3.0, output = 15.0, long_context = {{ above = 200000, input = 6.0, output = 22.5 }} }}\n"
    );
    let config = SidecarConfig::parse(&text, "t").unwrap();
    let p = config.models["m"].routes[0].price.unwrap();
    let usage = |prompt_tokens, cached_tokens| TokenUsage {
        prompt_tokens,
        cached_tokens,
        completion_tokens: 1000,
        ..TokenUsage::default()
    };
    // At the threshold: the standard prices.
    assert_eq!(
        p.cost_nanos(&usage(200_000, 0)),
        200_000 * 3000 + 1000 * 15_000
    );
    // Above it, every token at the long-context prices, cache reads
    // (which count as input) included; their default is the tier's input.
    assert_eq!(
        p.cost_nanos(&usage(200_001, 100_000)),
        200_001 * 6000 + 1000 * 22_500
    );
    // The worst case of a prompt estimated above it is the long-context one.
    assert_eq!(
        p.worst_nanos(200_000, 10, false),
        200_000 * 3000 + 10 * 15_000
    );
    assert_eq!(
        p.worst_nanos(200_001, 10, false),
        200_001 * 6000 + 10 * 22_500
    );
    let bad = format!(
        "{MINIMAL}price = {{ input = 3.0, output = 15.0, long_context = {{ above = 0, input = -6.0, output = 22.5 }} }}\n"
    );
    let e = errors(&bad);
    assert!(
        e.iter()
            .any(|e| e.starts_with("models.m.routes[0].price.long_context.input: ")),
        "{e:?}"
    );
    assert!(
        e.iter()
            .any(|e| e.starts_with("models.m.routes[0].price.long_context.above: ")),
        "{e:?}"
    );
}

#[test]
fn output_cap_follows_rename_and_clamp() {
    let config = SidecarConfig::parse(SHIPPED, "conf/sidecar.toml").unwrap();
    let cap = |model: &str, route: usize, body: &str| {
        let req = crate::validate::validate_chat(body.as_bytes()).unwrap();
        req.output_cap(&config.models[model].routes[route])
    };
    let msgs = r#""messages":[{"role":"user","content":"hi"}]"#;
    let m = r#""model":"gpt-4o-mini""#;
    assert_eq!(cap("gpt-4o-mini", 0, &format!("{{{m},{msgs}}}")), 4096);
    assert_eq!(
        cap(
            "gpt-4o-mini",
            0,
            &format!("{{{m},{msgs},\"max_tokens\":99}}")
        ),
        99
    );
    // Every one of n choices may produce the whole limit.
    assert_eq!(
        cap(
            "gpt-4o-mini",
            0,
            &format!("{{{m},{msgs},\"max_tokens\":99,\"n\":8}}")
        ),
        792
    );
    assert_eq!(
        cap("gpt-4o-mini", 0, &format!("{{{m},{msgs},\"n\":2}}")),
        8192
    );
    // Clamped to the route's 16384.
    assert_eq!(
        cap(
            "gpt-4o-mini",
            0,
            &format!("{{{m},{msgs},\"max_tokens\":90000}}")
        ),
        16384
    );
    // Renamed to max_completion_tokens, then clamped at 16384.
    assert_eq!(
        cap(
            "gpt-5-chat",
            0,
            &format!("{{{m},{msgs},\"max_tokens\":90000}}")
        ),
        16384
    );
    assert_eq!(
        cap(
            "gpt-4o-mini",
            0,
            &format!("{{{m},{msgs},\"max_completion_tokens\":700,\"max_tokens\":5}}")
        ),
        700
    );
}

#[test]
fn event_idle_defaults_under_stream_hold_and_must_be_positive() {
    let config = SidecarConfig::parse(MINIMAL, "test.toml").expect("valid");
    let route = &config.models["m"].routes[0];
    assert_eq!(route.event_idle(), DEFAULT_EVENT_IDLE);
    // A drip from the stream's start must fail over before the hold commits it.
    assert!(DEFAULT_EVENT_IDLE < config.server.stream_hold);
    let text = MINIMAL.replace("model = \"up\"", "model = \"up\"\nevent_idle = \"500ms\"");
    let config = SidecarConfig::parse(&text, "test.toml").expect("valid");
    assert_eq!(
        config.models["m"].routes[0].event_idle(),
        Duration::from_millis(500)
    );
    let text = MINIMAL.replace("model = \"up\"", "model = \"up\"\nevent_idle = \"0s\"");
    assert_eq!(
        errors(&text),
        ["models.m.routes[0].event_idle: must be positive"]
    );
}

#[test]
fn fleet_section_is_optional_and_checked() {
    assert!(SidecarConfig::parse(MINIMAL, "t").unwrap().fleet.is_none());
    let ok = SidecarConfig::parse(&format!("{MINIMAL}\n[fleet]\nnodes = 3\n"), "t").unwrap();
    let fleet = ok.fleet.unwrap();
    assert_eq!(
        (fleet.nodes, fleet.timeout),
        (3, Duration::from_millis(200))
    );
    assert_eq!(fleet.redis_url_env, "AFR_FLEET_REDIS_URL");
    let bad = errors(&format!(
        "{MINIMAL}\n[fleet]\nnodes = 0\ntimeout = \"0s\"\nredis_url_env = \"\"\n"
    ));
    assert!(bad.iter().any(|e| e.starts_with("fleet.nodes")), "{bad:?}");
    assert!(
        bad.iter().any(|e| e.starts_with("fleet.timeout")),
        "{bad:?}"
    );
    assert!(
        bad.iter().any(|e| e.starts_with("fleet.redis_url_env")),
        "{bad:?}"
    );
    let missing = errors(&format!("{MINIMAL}\n[fleet]\n"));
    assert!(missing.iter().any(|e| e.contains("nodes")), "{missing:?}");
}

#[test]
fn telemetry_section_is_optional_and_checked() {
    assert!(SidecarConfig::parse(MINIMAL, "t")
        .unwrap()
        .telemetry
        .is_none());
    let ok = SidecarConfig::parse(
        &format!("{MINIMAL}\n[telemetry]\nendpoint = \"http://127.0.0.1:4318\"\n"),
        "t",
    )
    .unwrap();
    let telemetry = ok.telemetry.unwrap();
    assert_eq!(telemetry.service_name, "afr");
    assert_eq!(telemetry.sample_ratio, 1.0);
    assert!(telemetry.traces && telemetry.metrics);
    assert!(!telemetry.capture_content, "contents are opt-in");
    let bad = errors(&format!(
        "{MINIMAL}\n[telemetry]\nendpoint = \"127.0.0.1:4318\"\nsample_ratio = 1.5\nservice_name = \" \"\n"
    ));
    for field in [
        "telemetry.endpoint",
        "telemetry.sample_ratio",
        "telemetry.service_name",
    ] {
        assert!(bad.iter().any(|e| e.starts_with(field)), "{field}: {bad:?}");
    }
    let missing = errors(&format!("{MINIMAL}\n[telemetry]\n"));
    assert!(
        missing.iter().any(|e| e.contains("endpoint")),
        "{missing:?}"
    );
    let unknown = errors(&format!(
        "{MINIMAL}\n[telemetry]\nendpoint = \"http://c:4318\"\nprotocol = \"grpc\"\n"
    ));
    assert!(
        unknown.iter().any(|e| e.contains("protocol")),
        "{unknown:?}"
    );
}
