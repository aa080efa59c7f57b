//! Provider bodies and events as the providers read them: bounded in size
//! and time, and the failures (retryable or not) that breaking a bound makes.

use super::*;
use futures_util::StreamExt;
use std::sync::atomic::{AtomicUsize, Ordering};

const CHUNK: usize = 64 << 10;

/// A response whose body is `total` bytes of `fill` in 64 KiB chunks,
/// produced lazily; `pulled` counts the bytes the reader took.
fn endless(
    status: u16,
    fill: u8,
    total: usize,
    pulled: Arc<AtomicUsize>,
) -> http::Response<impl http_body::Body<Data = Bytes, Error = std::io::Error>> {
    let chunks = futures_util::stream::iter(0..total / CHUNK).map(move |_| {
        pulled.fetch_add(CHUNK, Ordering::Relaxed);
        Ok::<_, std::io::Error>(http_body::Frame::data(Bytes::from(vec![fill; CHUNK])))
    });
    http::Response::builder()
        .status(status)
        .body(http_body_util::StreamBody::new(chunks))
        .expect("a valid response")
}

#[tokio::test]
async fn an_oversized_error_body_keeps_its_status_and_is_read_no_further() {
    for (status, retryable) in [(500, true), (400, false)] {
        let pulled = Arc::new(AtomicUsize::new(0));
        let error = openai_status_error(endless(status, b' ', 64 << 20, pulled.clone())).await;
        assert!(
            matches!(error, ProviderError::Status { status: s, .. } if s == status),
            "{error}"
        );
        assert_eq!(error.is_retryable(), retryable, "{status}");
        assert!(pulled.load(Ordering::Relaxed) <= MAX_ERROR_BODY_BYTES + CHUNK);
    }
}

#[test]
fn a_200_body_that_is_not_a_json_object_is_a_retryable_failure() {
    for body in [
        &b"<html><body>upstream unavailable</body></html>"[..],
        b"",
        b"[1, 2]",
        b"{\"id\":\"chatcmpl-1\",\"choices\":[",
    ] {
        let error = read_answer(body, false).expect_err(&String::from_utf8_lossy(body));
        assert!(error.is_retryable(), "{error}");
    }
    let ok = br#" {"id":"x","usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#;
    assert_eq!(
        read_answer(ok, false).unwrap().0.map(|u| u.total_tokens),
        Some(3)
    );
    // An unknown usage shape loses only the counts.
    assert!(read_answer(br#"{"id":"x","usage":"n/a"}"#, true)
        .unwrap()
        .0
        .is_none());
}

#[tokio::test]
async fn an_oversized_success_body_is_a_protocol_error_read_no_further() {
    let pulled = Arc::new(AtomicUsize::new(0));
    let Err(error) = read_success_body(endless(200, b' ', 256 << 20, pulled.clone())).await else {
        panic!("a body over the limit was read whole");
    };
    assert!(matches!(error, ProviderError::Protocol(_)), "{error}");
    assert!(pulled.load(Ordering::Relaxed) <= MAX_BODY_BYTES + CHUNK);
    let small = read_success_body(endless(200, b'x', CHUNK, Arc::default()))
        .await
        .expect("under the limit");
    assert_eq!(small.len(), CHUNK);
}

#[tokio::test]
async fn an_event_that_never_ends_fails_the_stream_at_the_limit() {
    let pulled = Arc::new(AtomicUsize::new(0));
    let mut events = sse_events(
        endless(200, b'x', 64 << 20, pulled.clone()),
        Duration::from_secs(60),
    );
    match events.next().await {
        Some(Err(ProviderError::Protocol(message))) => {
            assert!(message.contains("exceeds"), "{message}")
        }
        other => panic!(
            "expected a protocol error, got {:?}",
            other.map(|r| r.map(|_| ()))
        ),
    }
    assert!(events.next().await.is_none());
    assert!(pulled.load(Ordering::Relaxed) <= afr_core::sse::MAX_EVENT_BYTES + CHUNK);
}

/// A streaming 200 whose body is `pieces`, each sent after its delay,
/// then silence that never ends (the connection stays open).
fn timed_body(
    pieces: Vec<(u64, &'static [u8])>,
) -> http::Response<impl http_body::Body<Data = Bytes, Error = std::io::Error> + Send> {
    let chunks = futures_util::stream::iter(pieces)
        .then(|(delay_ms, bytes)| async move {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            Ok::<_, std::io::Error>(http_body::Frame::data(Bytes::from_static(bytes)))
        })
        .chain(futures_util::stream::pending());
    http::Response::builder()
        .status(200)
        .body(http_body_util::StreamBody::new(chunks))
        .expect("a valid response")
}

// Real time with short bounds: paused time would need tokio's test-util,
// a second build of tokio and everything above it for this one crate.
// Nothing here asserts on how long anything took; `within` only turns a
// stream that never ends (the bug) into a failure instead of a hang.
async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .expect("the stream never gave up on a stalled event")
}

#[tokio::test]
async fn an_event_stalled_after_its_first_bytes_times_out() {
    let body = timed_body(vec![
        (0, b"data: {\"a\":1}\n\n"),
        (0, b"data: {\"choices\":[{\"delta\""),
    ]);
    let mut events = sse_events(body, Duration::from_millis(100));
    let first = events.next().await.expect("an event").expect("well formed");
    assert_eq!(&first[..], b"data: {\"a\":1}\n\n");
    match within(events.next()).await {
        Some(Err(ProviderError::Timeout("event_idle"))) => {}
        other => panic!(
            "expected the event_idle timeout, got {:?}",
            other.map(|r| r.map(|_| ()))
        ),
    }
    assert!(events.next().await.is_none());
}

#[tokio::test]
async fn a_drip_times_out_even_while_bytes_keep_coming() {
    // One byte every 30 ms: each byte is in time, the event never is.
    let drip: Vec<(u64, &'static [u8])> = b"data: {\"choices\":[]}\n\n"
        .chunks(1)
        .map(|b| (30, b))
        .collect();
    let mut events = sse_events(timed_body(drip), Duration::from_millis(150));
    assert!(matches!(
        within(events.next()).await,
        Some(Err(ProviderError::Timeout("event_idle")))
    ));
}

#[tokio::test]
async fn silence_between_events_is_not_an_event_stall() {
    // A reasoning model: the role chunk, a pause longer than event_idle,
    // then content. Only an unfinished event is on the clock.
    let body = timed_body(vec![
        (0, b"data: {\"a\":1}\n\n"),
        (300, b"data: {\"b\""),
        (10, b":2}\n\n"),
    ]);
    let mut events = sse_events(body, Duration::from_millis(100));
    for expected in [&b"data: {\"a\":1}\n\n"[..], b"data: {\"b\":2}\n\n"] {
        let event = events.next().await.expect("an event").expect("in time");
        assert_eq!(&event[..], expected);
    }
}

#[test]
fn provider_messages_lose_echoed_keys() {
    let body = br#"{"error":{"message":"Incorrect API key provided: sk-proj-AbCd0123456789EfGh. You can find your API key at https://platform.openai.com/account/api-keys.","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#;
    let error = ProviderError::from_openai_body(401, body, None);
    let shown = error.to_string();
    assert!(shown.contains("provided: sk-***."), "{shown}");
    assert!(!shown.contains("AbCd0123"), "{shown}");
}
