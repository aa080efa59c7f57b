//! The histograms' aggregation and their OTLP encoding, decoded with the
//! official `opentelemetry-proto` definitions.

use super::*;
use crate::serve::telemetry::{CHUNK_BUCKETS, DURATION_BUCKETS, TOKEN_BUCKETS};
use opentelemetry::KeyValue;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::metrics::v1::{metric, HistogramDataPoint};
use opentelemetry_sdk::Resource;
use prost::Message;
use std::time::{Duration, UNIX_EPOCH};

fn series(model: &str, error: Option<&str>) -> Series {
    Series {
        operation: "chat",
        provider: Some(("gen_ai.provider.name", "openai")),
        model: model.to_owned(),
        error: error.map(str::to_owned),
        token_type: None,
    }
}

fn decode(bytes: &[u8]) -> ExportMetricsServiceRequest {
    ExportMetricsServiceRequest::decode(bytes).expect("a valid ExportMetricsServiceRequest")
}

fn attributes(point: &HistogramDataPoint) -> Vec<(String, String)> {
    point
        .attributes
        .iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(any_value::Value::StringValue(s)) => s.clone(),
                other => panic!("{}: not a string: {other:?}", kv.key),
            };
            (kv.key.clone(), value)
        })
        .collect()
}

fn resource() -> EncodedResource {
    EncodedResource::new(
        &Resource::builder_empty()
            .with_service_name("afr-test")
            .with_attribute(KeyValue::new("service.version", "1.2.3"))
            .build(),
    )
}

#[test]
fn points_are_the_conventions_histograms_decoded_by_the_official_definitions() {
    let start = UNIX_EPOCH + Duration::from_secs(1_796_000_000);
    let now = start + Duration::from_secs(60);
    let histograms = Histograms::new(start, false);
    assert!(
        histograms.export_request(&resource(), now).is_none(),
        "nothing recorded, nothing sent"
    );
    let ok = series("gpt-4o-mini", None);
    // On a boundary (0.01, 0.04), between two (0.05), past the last (100).
    for v in [0.01, 0.05, 0.04, 100.0, f64::NAN] {
        histograms.record(Instrument::Duration, &ok, v);
    }
    histograms.record(Instrument::Duration, &series("", Some("429")), 0.002);
    let mut tokens = ok.clone();
    tokens.token_type = Some("input");
    histograms.record(Instrument::Tokens, &tokens, 12.0);

    let request = decode(&histograms.export_request(&resource(), now).unwrap());
    assert_eq!(request.resource_metrics.len(), 1);
    let rm = &request.resource_metrics[0];
    let resource_keys: Vec<&str> = rm
        .resource
        .as_ref()
        .unwrap()
        .attributes
        .iter()
        .map(|kv| kv.key.as_str())
        .collect();
    assert!(resource_keys.contains(&"service.name"), "{resource_keys:?}");
    assert_eq!(rm.scope_metrics.len(), 1);
    let sm = &rm.scope_metrics[0];
    assert_eq!(sm.scope.as_ref().unwrap().name, "afr");
    let names: Vec<(&str, &str)> = sm
        .metrics
        .iter()
        .map(|m| (m.name.as_str(), m.unit.as_str()))
        .collect();
    assert_eq!(
        names,
        [
            ("gen_ai.client.operation.duration", "s"),
            ("gen_ai.client.token.usage", "{token}")
        ],
        "instruments without points are left out"
    );
    let histogram = |i: usize| match sm.metrics[i].data.as_ref() {
        Some(metric::Data::Histogram(h)) => h.clone(),
        other => panic!("not a histogram: {other:?}"),
    };
    let duration = histogram(0);
    assert_eq!(duration.aggregation_temporality, 2, "cumulative");
    let mut points = duration.data_points.clone();
    points.sort_by_key(|p| p.count);
    let (refused, served) = (&points[0], &points[1]);
    assert_eq!(
        attributes(served),
        [
            ("gen_ai.operation.name".into(), "chat".into()),
            ("gen_ai.provider.name".into(), "openai".into()),
            ("gen_ai.request.model".into(), "gpt-4o-mini".into()),
        ]
    );
    assert_eq!(served.count, 4, "NaN left out");
    assert_eq!(served.sum, Some(100.1));
    assert_eq!((served.min, served.max), (Some(0.01), Some(100.0)));
    assert_eq!(served.explicit_bounds, DURATION_BUCKETS);
    let mut expected = vec![0u64; DURATION_BUCKETS.len() + 1];
    expected[0] = 1; // 0.01: upper bounds are inclusive
    expected[2] = 1; // 0.04
    expected[3] = 1; // 0.05 in (0.04, 0.08]
    expected[DURATION_BUCKETS.len()] = 1; // 100 past the last bound
    assert_eq!(served.bucket_counts, expected);
    assert_eq!(
        (served.start_time_unix_nano, served.time_unix_nano),
        (1_796_000_000_000_000_000, 1_796_000_060_000_000_000)
    );
    assert_eq!(
        attributes(refused),
        [
            ("gen_ai.operation.name".into(), "chat".into()),
            ("gen_ai.provider.name".into(), "openai".into()),
            ("error.type".into(), "429".into()),
        ],
        "no model when the catalogue named none"
    );
    let usage = histogram(1);
    let point = &usage.data_points[0];
    assert_eq!(
        attributes(point).last().unwrap(),
        &("gen_ai.token.type".into(), "input".into())
    );
    assert_eq!((point.count, point.sum), (1, Some(12.0)));
    assert_eq!(point.explicit_bounds, TOKEN_BUCKETS);

    // Cumulative: the next export carries the totals again.
    histograms.record(Instrument::Duration, &ok, 1.0);
    let again = decode(&histograms.export_request(&resource(), now).unwrap());
    let counts: u64 = match again.resource_metrics[0].scope_metrics[0].metrics[0].data {
        Some(metric::Data::Histogram(ref h)) => h.data_points.iter().map(|p| p.count).sum(),
        _ => unreachable!(),
    };
    assert_eq!(counts, 6);
}

#[test]
fn delta_points_start_again_after_each_export() {
    let start = UNIX_EPOCH + Duration::from_secs(1_796_000_000);
    let histograms = Histograms::new(start, true);
    let ok = series("m", None);
    histograms.record(Instrument::FirstChunk, &ok, 0.2);
    let first = start + Duration::from_secs(10);
    let request = decode(&histograms.export_request(&resource(), first).unwrap());
    let metric = &request.resource_metrics[0].scope_metrics[0].metrics[0];
    assert_eq!(metric.name, "gen_ai.client.operation.time_to_first_chunk");
    let Some(metric::Data::Histogram(h)) = &metric.data else {
        panic!("not a histogram")
    };
    assert_eq!(h.aggregation_temporality, 1, "delta");
    assert_eq!(h.data_points[0].count, 1);
    assert!(
        histograms
            .export_request(&resource(), first + Duration::from_secs(10))
            .is_none(),
        "nothing new since the last export"
    );
    histograms.record(Instrument::PerChunk, &ok, 0.03);
    let second = first + Duration::from_secs(20);
    let request = decode(&histograms.export_request(&resource(), second).unwrap());
    let metric = &request.resource_metrics[0].scope_metrics[0].metrics[0];
    assert_eq!(metric.name, "gen_ai.client.operation.time_per_output_chunk");
    let Some(metric::Data::Histogram(h)) = &metric.data else {
        panic!("not a histogram")
    };
    let point = &h.data_points[0];
    assert_eq!(point.explicit_bounds, CHUNK_BUCKETS);
    assert_eq!(
        point.start_time_unix_nano, 1_796_000_020_000_000_000,
        "the window starts at the export before"
    );
}
