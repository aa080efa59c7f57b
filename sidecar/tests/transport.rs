//! How the sidecar reaches providers (design §4): an HTTP/1.1 keep-alive pool
//! by default, HTTP/2 only when a provider opts in, a private CA trusted
//! through `ca_file`. The mock serves TLS with ALPN and an HTTP/2
//! concurrent-stream limit of 100, as real providers do.

mod common;

use common::*;
use serde_json::json;
use tokio::task::JoinSet;

/// A TLS provider trusting the mock's CA, with room for a slow machine.
fn tls_provider(name: &str, mock: &Mock, extra: &str) -> String {
    format!(
        "[providers.{name}]\nkind = \"openai\"\nbase_url = \"{}/v1\"\nca_file = \"{}\"\n{extra}\n\
         [providers.{name}.timeouts]\nconnect = \"10s\"\nfirst_byte = \"3s\"\nidle = \"10s\"\ntotal = \"60s\"\n",
        mock.tls_base(),
        mock.ca_file().display()
    )
}

async fn versions(mock: &Mock) -> Vec<String> {
    mock.requests()
        .await
        .iter()
        .map(|r| r["version"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Opens `n` streams of `model` at once and returns each one's status and
/// whole text once all have ended.
async fn concurrent_streams(sidecar: &Sidecar, model: &str, n: usize) -> Vec<(u16, String)> {
    let mut streams = JoinSet::new();
    for i in 0..n {
        let request = sidecar
            .request(reqwest::Method::POST, "/v1/chat/completions")
            .json(&json!({"model": model, "stream": true,
                          "messages": [{"role": "user", "content": format!("stream {i}")}]}));
        streams.spawn(async move {
            let response = request.send().await.expect("sidecar answers");
            let status = response.status().as_u16();
            (status, response.text().await.unwrap_or_default())
        });
    }
    let mut ended = Vec::with_capacity(n);
    while let Some(joined) = streams.join_next().await {
        ended.push(joined.expect("stream task"));
    }
    ended
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_concurrent_streams_through_one_tls_provider_all_complete() {
    // Each stream lasts ~5 s, longer than first_byte (3 s): over one h2
    // connection limited to 100 streams, streams 101–300 would wait for a
    // slot until first_byte expired.
    let mock = Mock::start_tls(&["--chunks", "10", "--chunk-interval-ms", "500"]);
    let sidecar = Sidecar::start(&format!(
        "{}{}",
        tls_provider("upstream", &mock, ""),
        model("m", &[("upstream", "up")])
    ));
    let mut failed = Vec::new();
    for (status, text) in concurrent_streams(&sidecar, "m", 300).await {
        let complete = status == 200
            && text.ends_with("data: [DONE]\n\n")
            && !text.contains("\"error\"")
            && text.matches("\"content\":\"").count() > 10;
        if !complete {
            failed.push(format!(
                "{status}: {}",
                text.chars().take(200).collect::<String>()
            ));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of 300 streams failed, e.g. {}",
        failed.len(),
        failed[0]
    );
    let versions = versions(&mock).await;
    assert_eq!(versions.len(), 300);
    assert!(versions.iter().all(|v| v == "HTTP/1.1"), "{versions:?}");
}

#[tokio::test]
async fn http2_is_spoken_only_with_providers_that_opt_in() {
    let mock = Mock::start_tls(&[]);
    let sidecar = Sidecar::start(&format!(
        "{}{}{}{}",
        tls_provider("pooled", &mock, ""),
        tls_provider("multiplexed", &mock, "http2 = true"),
        model("h1", &[("pooled", "up")]),
        model("h2", &[("multiplexed", "up")]),
    ));
    for model in ["h1", "h2"] {
        let text = sidecar
            .chat_text(json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}))
            .await;
        assert!(text.contains("chat.completion"), "{model}: {text}");
    }
    assert_eq!(versions(&mock).await, ["HTTP/1.1", "HTTP/2.0"]);
}

#[tokio::test]
async fn a_private_ca_is_trusted_only_through_ca_file() {
    let mock = Mock::start_tls(&[]);
    let untrusting = format!(
        "[providers.plain]\nkind = \"openai\"\nbase_url = \"{}/v1\"\n",
        mock.tls_base()
    );
    let sidecar = Sidecar::start(&format!("{untrusting}{}", model("m", &[("plain", "up")])));
    let response = sidecar
        .chat(json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}))
        .await;
    assert_eq!(response.status(), 500, "the mock's CA is not a public root");
    assert!(mock.requests().await.is_empty());
}

#[test]
fn an_unreadable_ca_file_is_a_start_up_error_naming_the_provider() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sidecar.toml");
    let missing = dir.path().join("no-such-ca.pem");
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "just text\n").unwrap();
    for (ca, expected) in [
        (&missing, "providers.p: ca_file: cannot read"),
        (&not_pem, "providers.p: ca_file: "),
    ] {
        let body = format!(
            "[providers.p]\nkind = \"openai\"\nbase_url = \"https://localhost:9/v1\"\nca_file = \"{}\"\n{}",
            ca.display(),
            model("m", &[("p", "up")])
        );
        std::fs::write(&path, Sidecar::config_text(dir.path(), &body, 5, "30s")).unwrap();
        let stderr = serve_refuses(&path);
        assert!(stderr.contains(expected), "{stderr}");
        assert!(stderr.contains(&ca.display().to_string()), "{stderr}");
    }
}

/// A TLS mock allowing `streams` HTTP/2 streams a connection, each stream
/// lasting ~4 s (longer than the providers' first_byte here, 3 s).
fn slow_streams_allowing(streams: u32) -> Mock {
    let streams = streams.to_string();
    Mock::start_tls(&[
        "--h2-max-streams",
        &streams,
        "--chunks",
        "8",
        "--chunk-interval-ms",
        "500",
    ])
}

/// With `http2 = true`, the streams past the server's concurrent-stream limit
/// open another HTTP/2 connection. hyper's pool keeps one HTTP/2 connection
/// per host and never opens a second, so at first the streams past the limit
/// waited for a free stream until `first_byte` expired, failed over and
/// counted against the provider's breaker (150 streams against a limit of
/// 100: 50 failed); then they went over HTTP/1.1, one connection (and ~24 KiB
/// of the sidecar's memory) each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_past_the_servers_limit_open_another_http2_connection() {
    let mock = slow_streams_allowing(4);
    let sidecar = Sidecar::start(&format!(
        "{}{}",
        tls_provider("multiplexed", &mock, "http2 = true\nhttp2_max_streams = 4"),
        model("m", &[("multiplexed", "up")])
    ));
    for (status, text) in concurrent_streams(&sidecar, "m", 10).await {
        assert_eq!(status, 200, "{text}");
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
        assert!(!text.contains("\"error\""), "{text}");
    }
    let requests = mock.requests().await;
    assert!(
        requests.iter().all(|r| r["version"] == "HTTP/2.0"),
        "{:?}",
        versions(&mock).await
    );
    // 10 streams at 4 a connection need at least three connections, and
    // none waited for a stream (each would have failed at first_byte). How
    // many more there were is timing: the requests racing onto a new
    // connection before its ALPN settles may each open one (hyper-util shares
    // a connection attempt only with HTTP/2 forced), and the spares go.
    let mut per_connection = std::collections::BTreeMap::<u64, usize>::new();
    for r in &requests {
        *per_connection
            .entry(r["connection"].as_u64().expect("connection"))
            .or_default() += 1;
    }
    assert!(per_connection.len() >= 3, "{per_connection:?}");
    assert!(
        per_connection.values().all(|&n| n <= 4),
        "{per_connection:?}"
    );
    // The streams are given back as they end: the next request takes a
    // connection already open rather than opening another.
    let text = sidecar
        .chat_text(json!({"model": "m", "messages": [{"role": "user", "content": "after"}]}))
        .await;
    assert!(text.contains("chat.completion"), "{text}");
    let last = mock.requests().await.last().cloned().expect("a request");
    assert_eq!(last["version"], "HTTP/2.0");
    assert!(
        per_connection.contains_key(&last["connection"].as_u64().expect("connection")),
        "{last}"
    );
}

/// Past `http2_max_connections` full connections, requests go over HTTP/1.1
/// instead of waiting for a stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_past_the_connection_limit_go_over_http1() {
    let mock = slow_streams_allowing(2);
    let sidecar = Sidecar::start(&format!(
        "{}{}",
        tls_provider(
            "multiplexed",
            &mock,
            "http2 = true\nhttp2_max_streams = 2\nhttp2_max_connections = 2"
        ),
        model("m", &[("multiplexed", "up")])
    ));
    for (status, text) in concurrent_streams(&sidecar, "m", 7).await {
        assert_eq!(status, 200, "{text}");
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    }
    let mut seen = versions(&mock).await;
    seen.sort();
    assert_eq!(
        seen,
        ["HTTP/1.1", "HTTP/1.1", "HTTP/1.1", "HTTP/2.0", "HTTP/2.0", "HTTP/2.0", "HTTP/2.0"]
    );
}

#[test]
fn http2_max_streams_of_zero_is_a_start_up_error_naming_the_field() {
    let stderr = serve_refuses_body(&format!(
        "[providers.p]\nkind = \"openai\"\nbase_url = \"https://localhost:9/v1\"\nhttp2 = true\nhttp2_max_streams = 0\n{}",
        model("m", &[("p", "up")])
    ));
    assert!(stderr.contains("providers.p.http2_max_streams"), "{stderr}");
}

#[test]
fn http2_max_connections_of_zero_is_a_start_up_error_naming_the_field() {
    let stderr = serve_refuses_body(&format!(
        "[providers.p]\nkind = \"openai\"\nbase_url = \"https://localhost:9/v1\"\nhttp2 = true\nhttp2_max_connections = 0\n{}",
        model("m", &[("p", "up")])
    ));
    assert!(
        stderr.contains("providers.p.http2_max_connections"),
        "{stderr}"
    );
}

/// However a request on the HTTP/2 connection ends, its stream is given back:
/// the client gone mid-stream, the provider's error status, the provider's
/// stream cut. With room for one stream on one connection, a stream kept
/// after any of them would send every later request over HTTP/1.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_ending_of_an_http2_request_gives_its_stream_back() {
    let mock = Mock::start_tls(&[]);
    let sidecar = Sidecar::start(&format!(
        "{}{}",
        tls_provider(
            "multiplexed",
            &mock,
            "http2 = true\nhttp2_max_streams = 1\nhttp2_max_connections = 1"
        ),
        model("m", &[("multiplexed", "up")])
    ));
    let stream = || {
        sidecar
            .request(reqwest::Method::POST, "/v1/chat/completions")
            .json(&chat_body("m", true))
    };
    // The next request goes over HTTP/2 (a client gone is noticed a moment
    // after it went, so this waits up to 10 s for it).
    let back_on_http2 = |after: &'static str| {
        let (sidecar, mock) = (&sidecar, &mock);
        async move {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            loop {
                let text = sidecar.chat_text(chat_body("m", false)).await;
                assert!(text.contains("chat.completion"), "after {after}: {text}");
                let versions = versions(mock).await;
                if versions.last().map(String::as_str) == Some("HTTP/2.0") {
                    return;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "after {after} every request goes over HTTP/1.1 ({} requests since: {:?})",
                    versions.len(),
                    &versions[versions.len().saturating_sub(3)..]
                );
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    };
    back_on_http2("nothing").await;

    mock.set(json!({"chunks": 50, "chunk_interval_ms": 200}))
        .await;
    let mut gone = stream().send().await.expect("sidecar answers");
    assert_eq!(gone.status(), 200);
    assert!(gone.chunk().await.expect("first chunk").is_some());
    drop(gone);
    mock.set(json!({})).await;
    back_on_http2("a client gone mid-stream").await;

    mock.set(json!({"status": 500})).await;
    let failed = sidecar.chat(chat_body("m", false)).await;
    assert!(failed.status().is_server_error(), "{}", failed.status());
    mock.set(json!({})).await;
    back_on_http2("the provider's 500").await;

    mock.set(json!({"chunks": 5, "reset_after_chunks": 2}))
        .await;
    let cut = stream().send().await.expect("sidecar answers");
    let _ = cut.text().await;
    mock.set(json!({})).await;
    back_on_http2("the provider's stream cut").await;
}
