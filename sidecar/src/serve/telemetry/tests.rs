//! Settings' resolution from the block and the OTEL_* variables, and the conventions' attributes.

use super::*;

#[test]
fn semconv_opt_in_switches_the_provider_attribute() {
    assert_eq!(Semconv::from_opt_in(None), Semconv::V1_36);
    assert_eq!(Semconv::from_opt_in(Some("http")), Semconv::V1_36);
    let latest = Semconv::from_opt_in(Some("http, gen_ai_latest_experimental"));
    assert_eq!(latest, Semconv::Latest);
    assert_eq!(latest.provider_key(), "gen_ai.provider.name");
    assert_eq!(
        latest.provider_value(ProviderKind::Azure),
        "azure.ai.openai"
    );
    assert_eq!(Semconv::V1_36.provider_key(), "gen_ai.system");
    assert_eq!(
        Semconv::V1_36.provider_value(ProviderKind::Azure),
        "az.ai.openai"
    );
}

fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
    move |name: &str| {
        pairs
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| (*v).to_owned())
    }
}

fn block(endpoint: &str) -> TelemetryConfig {
    TelemetryConfig {
        endpoint: endpoint.to_owned(),
        service_name: "gw".to_owned(),
        sample_ratio: 0.25,
        traces: true,
        metrics: false,
        capture_content: false,
    }
}

#[test]
fn an_endpoint_switches_it_on_and_sdk_disabled_off() {
    assert_eq!(Settings::resolve(None, env(&[])).unwrap(), None);
    assert_eq!(
        Settings::resolve(None, env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")])).unwrap(),
        None
    );
    let on = Settings::resolve(
        None,
        env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")]),
    )
    .unwrap()
    .unwrap();
    assert_eq!(
        (on.traces_endpoint.as_str(), on.service_name.as_deref()),
        ("http://c:4318/v1/traces", Some("afr"))
    );
    assert!(on.traces && on.metrics && on.sample_ratio.is_none());
    let traces_only = env(&[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c/t")]);
    let traces_only = Settings::resolve(None, traces_only).unwrap().unwrap();
    assert_eq!(traces_only.traces_endpoint, "http://c/t", "used as it is");
    assert_eq!(
        traces_only.metrics_endpoint,
        "http://localhost:4318/v1/metrics"
    );
    let metrics_only = env(&[("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "http://c/m")]);
    let metrics_only = Settings::resolve(None, metrics_only).unwrap().unwrap();
    assert_eq!(
        (
            metrics_only.traces_endpoint.as_str(),
            metrics_only.metrics_endpoint.as_str()
        ),
        ("http://localhost:4318/v1/traces", "http://c/m")
    );
    let disabled = env(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
        ("OTEL_SDK_DISABLED", "TRUE"),
    ]);
    assert_eq!(
        Settings::resolve(Some(&block("http://c:4318")), disabled).unwrap(),
        None
    );
}

#[test]
fn the_block_configures_and_the_variables_override_it() {
    let config = block("http://collector:4318/");
    let only = Settings::resolve(Some(&config), env(&[])).unwrap().unwrap();
    assert_eq!(only.traces_endpoint, "http://collector:4318/v1/traces");
    assert_eq!(only.metrics_endpoint, "http://collector:4318/v1/metrics");
    assert_eq!(
        (only.metric_interval, only.delta),
        (DEFAULT_METRIC_INTERVAL, false)
    );
    assert_eq!(only.service_name.as_deref(), Some("gw"));
    assert_eq!(only.sample_ratio, Some(0.25));
    assert!(only.traces && !only.metrics && !only.capture_content);
    let opted = env(&[("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "TRUE")]);
    let opted = Settings::resolve(Some(&config), opted).unwrap().unwrap();
    assert!(opted.capture_content);
    let typo = env(&[("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "yes")]);
    assert!(Settings::resolve(Some(&config), typo).is_err());
    let over = Settings::resolve(
        Some(&config),
        env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://other:4318"),
            ("OTEL_SERVICE_NAME", "edge"),
            ("OTEL_TRACES_SAMPLER", "always_on"),
            ("OTEL_METRICS_EXPORTER", "otlp"),
            ("OTEL_TRACES_EXPORTER", "none"),
        ]),
    )
    .unwrap()
    .unwrap();
    assert_eq!(
        (
            over.traces_endpoint.as_str(),
            over.metrics_endpoint.as_str()
        ),
        (
            "http://other:4318/v1/traces",
            "http://other:4318/v1/metrics"
        )
    );
    assert_eq!((over.service_name, over.sample_ratio), (None, None));
    assert!(!over.traces && over.metrics);
    let gzip = env(&[("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")]);
    let refused = Settings::resolve(Some(&config), gzip).unwrap_err();
    assert!(refused.to_string().contains("uncompressed"), "{refused}");
    let none = env(&[
        ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
        ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "none"),
        ("OTEL_EXPORTER_OTLP_METRICS_COMPRESSION", "NONE"),
    ]);
    assert!(
        Settings::resolve(Some(&config), none).is_ok(),
        "each signal's own wins"
    );
    let grpc = env(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]);
    let refused = Settings::resolve(Some(&config), grpc).unwrap_err();
    assert!(
        refused.to_string().contains("http/protobuf only"),
        "{refused}"
    );
}

#[test]
fn export_headers_are_the_specification_s_list() {
    let headers = env(&[
        ("OTEL_EXPORTER_OTLP_HEADERS", "x-general=1"),
        (
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
            " api-key = secret%3Dvalue , x-tenant=a%20b,",
        ),
    ]);
    let settings = Settings::resolve(Some(&block("http://c")), headers)
        .unwrap()
        .unwrap();
    let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    };
    assert_eq!(
        settings.traces_headers,
        pairs(&[("api-key", "secret=value"), ("x-tenant", "a b")])
    );
    assert_eq!(settings.metrics_headers, pairs(&[("x-general", "1")]));
    let general = env(&[("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer%20t")]);
    let settings = Settings::resolve(Some(&block("http://c")), general)
        .unwrap()
        .unwrap();
    assert_eq!(
        settings.traces_headers,
        pairs(&[("authorization", "Bearer t")])
    );
    for bad in ["novalue", "bad name=1", "k=%zz", "k=a%0Ab", "k=%+9"] {
        let var = move |name: &str| (name == "OTEL_EXPORTER_OTLP_HEADERS").then(|| bad.to_owned());
        let e = Settings::resolve(Some(&block("http://c")), var).unwrap_err();
        assert!(
            e.to_string().starts_with("OTEL_EXPORTER_OTLP_HEADERS: "),
            "{bad}: {e}"
        );
    }
}

#[test]
fn exporters_are_otlp_or_none() {
    assert!(exporter_on(None, "X").unwrap());
    assert!(exporter_on(Some("otlp".into()), "X").unwrap());
    assert!(!exporter_on(Some(" none ".into()), "X").unwrap());
    let refused = exporter_on(Some("zipkin".into()), "OTEL_TRACES_EXPORTER").unwrap_err();
    assert_eq!(
        refused.to_string(),
        "OTEL_TRACES_EXPORTER: expected otlp or none, got \"zipkin\""
    );
}

#[test]
fn the_metric_interval_temporality_and_timeouts_are_the_specification_s_variables() {
    let resolve = |pairs: &'static [(&'static str, &'static str)]| {
        Settings::resolve(Some(&block("http://c")), env(pairs))
    };
    let set = resolve(&[
        ("OTEL_METRIC_EXPORT_INTERVAL", " 300 "),
        ("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", "Delta"),
    ])
    .unwrap()
    .unwrap();
    assert_eq!(
        (set.metric_interval, set.delta),
        (Duration::from_millis(300), true)
    );
    let low = resolve(&[(
        "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE",
        "lowmemory",
    )]);
    assert!(low.unwrap().unwrap().delta, "low memory: delta histograms");
    let timeouts = resolve(&[
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
        ("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "700"),
    ])
    .unwrap()
    .unwrap();
    assert_eq!(
        (timeouts.traces_timeout, timeouts.metrics_timeout),
        (Duration::from_millis(2500), Duration::from_millis(700)),
        "each signal's own over the general one"
    );
    assert_eq!(set.traces_timeout, DEFAULT_EXPORT_TIMEOUT);
    assert_eq!(set.span_queue, DEFAULT_QUEUE);
    let queue = resolve(&[("OTEL_BSP_MAX_QUEUE_SIZE", " 2 ")])
        .unwrap()
        .unwrap();
    assert_eq!(queue.span_queue, 2);
    for (name, value) in [
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "10s"),
        ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "-1"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "0"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "0"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "many"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "1m"),
        ("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", "gauge"),
    ] {
        let var = move |n: &str| (n == name).then(|| value.to_owned());
        let e = Settings::resolve(Some(&block("http://c")), var).unwrap_err();
        assert!(e.to_string().starts_with(name), "{value}: {e}");
    }
}
