//! A request's trace context and error types.

use super::*;
use opentelemetry::trace::{TraceFlags, TraceState};

#[test]
fn traceparent_is_w3c() {
    let sc = SpanContext::new(
        TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
        opentelemetry::trace::SpanId::from_hex("00f067aa0ba902b7").unwrap(),
        TraceFlags::SAMPLED,
        false,
        TraceState::default(),
    );
    assert_eq!(
        traceparent(&sc),
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    );
}

#[test]
fn error_types_are_low_cardinality() {
    assert_eq!(error_type(429), "429");
    assert_eq!(error_type(499), "client_closed");
}
