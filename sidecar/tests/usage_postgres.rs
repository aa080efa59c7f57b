//! PostgreSQL as a fleet's usage store, on real clusters: two `afr serve`
//! processes (two nodes) writing to one database read back by `afr usage`,
//! and the database going down and coming back under a store that keeps
//! recording.

#[allow(unused_imports)]
#[path = "../src/usage/mod.rs"]
mod usage;
// The usage module names `crate::tls` (its PostgreSQL TLS), as in the binary.
#[allow(dead_code)]
#[path = "../src/tls.rs"]
mod tls;

mod common;
mod pg;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use afr_core::usage::{TokenSource, UsageRecord};
use common::*;
use serde_json::{json, Value};
use usage::store::StoreOptions;
use usage::{PostgresTarget, Store, StoreError, UsageQuery, UsageReader};

const URL_ENV: &str = "AFR_TEST_USAGE_URL";

fn record(i: u64) -> UsageRecord {
    UsageRecord {
        ts_ms: 1_795_600_800_000 + i as i64,
        request_id: format!("req-{i}"),
        key_id: "k".into(),
        model: "m".into(),
        provider: "p".into(),
        upstream_model: "u".into(),
        prompt_tokens: 1,
        completion_tokens: 2,
        total_tokens: 3,
        token_source: TokenSource::Provider,
        latency_ms: 4,
        ttft_ms: None,
        status: 200,
        stream: false,
        truncated: false,
        cost_nanos: None,
        ..UsageRecord::default()
    }
}

fn requests(reader: &UsageReader) -> u64 {
    reader
        .query(&UsageQuery::default())
        .expect("query")
        .iter()
        .map(|r| r.requests)
        .sum()
}

fn spilled_lines(base: &std::path::Path) -> usize {
    std::fs::read_to_string(usage::spill::spill_path(base))
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

#[test]
fn records_spill_while_postgres_is_down_and_land_exactly_once_when_it_is_back() {
    // Its own cluster: this test stops it.
    let cluster = pg::Cluster::start();
    let url = cluster.database();
    let db = pg::db_name(&url).to_owned();
    let target = || PostgresTarget::from_url(&url, URL_ENV).expect("url");
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("usage.db");
    let options = StoreOptions {
        busy_timeout: Duration::from_secs(2),
        retry_delay: Duration::from_millis(20),
        shutdown_busy_timeout: Duration::from_millis(500),
        ..StoreOptions::default()
    };
    let store = Store::open_postgres(target(), &base, options).expect("open");
    let recorder = store.recorder();
    for i in 0..10 {
        recorder.record(record(i));
    }
    store.flush().expect("flush while up");

    // Down: records go to the spill file, none is kept in memory or lost.
    cluster.stop();
    for i in 10..30 {
        recorder.record(record(i));
    }
    let err = store.flush().expect_err("down");
    assert!(
        matches!(err, StoreError::Unflushed { unwritten: 20, .. }),
        "{err}"
    );
    assert_eq!((recorder.pending(), recorder.dropped()), (0, 0));
    assert_eq!(spilled_lines(&base), 20);
    assert!(
        store.query(&UsageQuery::default()).is_err(),
        "reads fail while it is down"
    );

    // Back: the next write (or flush) imports the spill file, once.
    cluster.run();
    store.flush().expect("flush when back");
    assert_eq!(spilled_lines(&base), 0);
    assert_eq!(requests(&store.reader()), 30, "the reader reconnects too");

    // Down at shutdown and at the next start: the rows wait in the file and
    // the next store imports them when the database is back.
    cluster.stop();
    for i in 30..35 {
        recorder.record(record(i));
    }
    let err = store.shutdown().expect_err("down at shutdown");
    assert!(
        matches!(err, StoreError::Spilled { unwritten: 5, .. }),
        "{err}"
    );
    let store = Store::open_postgres(target(), &base, options).expect("opens while down");
    store.recorder().record(record(35));
    assert!(store.flush().is_err(), "still down");
    assert_eq!(spilled_lines(&base), 6);
    cluster.run();
    store.flush().expect("back");
    assert_eq!(spilled_lines(&base), 0);
    store.shutdown().expect("shutdown");
    assert_eq!(
        cluster.psql(
            &db,
            "SELECT COUNT(*) || ' ' || COUNT(DISTINCT request_id) FROM usage"
        ),
        "36 36",
        "every record exactly once"
    );
    cluster.stop();
}

#[test]
fn a_database_of_a_newer_afr_is_refused_and_no_schema_is_named() {
    let cluster = pg::shared();
    let url = cluster.database();
    let db = pg::db_name(&url).to_owned();
    let target = || PostgresTarget::from_url(&url, URL_ENV).expect("url");
    let err = UsageReader::postgres(target())
        .expect("reader")
        .query(&UsageQuery::default())
        .expect_err("no schema yet");
    assert!(err.to_string().contains("no usage schema"), "{err}");
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("usage.db");
    drop(Store::open_postgres(target(), &base, StoreOptions::default()).expect("migrates"));
    // Two nodes starting at once apply the migrations once.
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| Store::open_postgres(target(), &base, StoreOptions::default()));
        let b = s.spawn(|| Store::open_postgres(target(), &base, StoreOptions::default()));
        (a.join().expect("a"), b.join().expect("b"))
    });
    drop((a.expect("a"), b.expect("b")));
    cluster.psql(
        &db,
        "INSERT INTO afr_usage_migrations (version) VALUES (99)",
    );
    let err = Store::open_postgres(target(), &base, StoreOptions::default())
        .err()
        .expect("too new");
    assert!(
        err.to_string().contains("schema version 99 is newer"),
        "{err}"
    );
    let err = UsageReader::postgres(target())
        .expect("reader")
        .query(&UsageQuery::default())
        .expect_err("too new");
    assert!(
        err.to_string().contains("schema version 99 is newer"),
        "{err}"
    );
}

/// The keys and models of the two-node workload.
const KEYS: [&str; 3] = ["team-a", "team-b", "team-c"];
const MODELS: [(&str, &str); 2] = [("small", "up-small"), ("large", "up-large")];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_sidecars_write_one_postgres_and_afr_usage_counts_what_the_mock_saw() {
    let cluster = pg::shared();
    let url = cluster.database();
    let mock = Mock::start(&[]);
    // One in five answers is a 500: failures are rows too.
    mock.set(json!({"fail_percent": 20})).await;
    let body = format!(
        "{}{}{}",
        openai_provider("mock", &mock.base(), ""),
        model("small", &[("mock", "up-small")]),
        model("large", &[("mock", "up-large")]),
    );
    let usage = format!("backend = \"postgres\"\npostgres_url_env = \"{URL_ENV}\"\n");
    let mut nodes: Vec<Sidecar> = (0..2)
        .map(|n| {
            // Each node's spill file in its own directory, as on two machines.
            let usage = format!("{usage}path = \"{{dir}}/usage-{n}.db\"\n");
            Sidecar::start_with_usage_env(&body, 1000, &usage, &[(URL_ENV, url.as_str())])
        })
        .collect();
    assert!(
        !nodes[0].log().contains(&url) && !nodes[0].log().contains("postgres://"),
        "the URL is never logged"
    );

    let mut sent = 0usize;
    let mut tasks = Vec::new();
    for i in 0..120usize {
        let node = &nodes[i % 2];
        let key = KEYS[i % 3];
        let (model, _) = MODELS[(i / 3) % 2];
        let stream = i % 5 < 2;
        // The key rides in the prompt too, so the mock's log says whose it was.
        let body = json!({"model": model, "stream": stream,
            "messages": [{"role": "user", "content": format!("from {key}")}]});
        let request = node
            .client
            .post(node.url("/v1/chat/completions"))
            .header("X-Afr-Secret", SECRET)
            .header("X-Afr-Key-Id", key)
            .json(&body);
        tasks.push(tokio::spawn(async move {
            let response = request.send().await.expect("sidecar answered");
            let status = response.status().as_u16();
            // Read streams to their end.
            let _ = response.bytes().await;
            status
        }));
        sent += 1;
    }
    let mut statuses = BTreeMap::new();
    for t in tasks {
        *statuses.entry(t.await.expect("task")).or_insert(0usize) += 1;
    }
    assert!(
        statuses.len() > 1,
        "a mix of successes and failures: {statuses:?}"
    );
    // SIGTERM flushes each node's queue.
    for node in &mut nodes {
        assert!(node.terminate().success(), "{}", node.log());
    }

    // What the mock saw, per (key, catalogue model).
    let upstream_to_model: BTreeMap<&str, &str> = MODELS.iter().map(|(m, u)| (*u, *m)).collect();
    let mut seen: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
    let log = mock.requests().await;
    assert_eq!(log.len(), sent, "every request reached the mock once");
    for r in &log {
        let content = r["body"]["messages"][0]["content"]
            .as_str()
            .expect("prompt");
        let key = content.trim_start_matches("from ").to_owned();
        let upstream = r["body"]["model"].as_str().expect("model");
        let model = upstream_to_model[upstream].to_owned();
        let entry = seen.entry((key, model)).or_default();
        entry.0 += 1;
        if r["status"].as_u64().unwrap_or(0) >= 400 {
            entry.1 += 1;
        }
    }

    // What `afr usage --json` reads from PostgreSQL, through a node's config.
    let config = nodes[1].dir.path().join("sidecar.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_afr"))
        .args(["usage", "--json", "--by", "key,model", "--config"])
        .arg(&config)
        .env(URL_ENV, &url)
        .output()
        .expect("afr usage");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("json");
    let mut stored: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
    for row in report["data"].as_array().expect("data") {
        let key = row["key_id"].as_str().expect("key").to_owned();
        let model = row["model"].as_str().expect("model").to_owned();
        let requests = row["requests"].as_u64().expect("requests");
        let errors = row["errors"].as_u64().expect("errors");
        if errors < requests {
            assert!(row["total_tokens"].as_u64().expect("tokens") > 0, "{row}");
        }
        stored.insert((key, model), (requests, errors));
    }
    assert_eq!(stored, seen, "(requests, errors) per key and model");
    assert_eq!(stored.len(), KEYS.len() * MODELS.len());

    // `GET /v1/usage` reads the same store from any node.
    nodes[0].restart();
    let body: Value = nodes[0]
        .client
        .get(nodes[0].url("/v1/usage?by=model"))
        .header("X-Afr-Secret", SECRET)
        .header("X-Afr-Key-Id", "team-b")
        .send()
        .await
        .expect("usage")
        .json()
        .await
        .expect("json");
    let by_model: BTreeMap<String, u64> = body["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|r| {
            (
                r["model"].as_str().unwrap_or("").to_owned(),
                r["requests"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    let expected: BTreeMap<String, u64> = seen
        .iter()
        .filter(|((k, _), _)| k == "team-b")
        .map(|((_, m), (n, _))| (m.clone(), *n))
        .collect();
    assert_eq!(by_model, expected);
}

/// A chat request for `key` under `limits` (X-Afr-Limits): status, error
/// code and `Retry-After`.
async fn limited_chat(
    sidecar: &Sidecar,
    key: &str,
    limits: &str,
) -> (u16, Option<String>, Option<String>) {
    let mut request = sidecar
        .client
        .post(sidecar.url("/v1/chat/completions"))
        .header("X-Afr-Secret", SECRET)
        .header("X-Afr-Key-Id", key)
        .json(&json!({"model": "m", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}));
    if !limits.is_empty() {
        request = request.header("X-Afr-Limits", limits);
    }
    let resp = request.send().await.expect("sidecar answered");
    let status = resp.status().as_u16();
    let retry = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok().map(str::to_owned));
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    (
        status,
        body["error"]["code"].as_str().map(str::to_owned),
        retry,
    )
}

#[tokio::test]
async fn a_ledger_that_cannot_be_seeded_refuses_budgets_until_the_store_answers() {
    // Its own cluster, down when the sidecar starts.
    let cluster = pg::Cluster::start();
    let url = cluster.database();
    cluster.stop();
    let mock = Mock::start(&[]);
    let body = format!(
        "{}{}price = {{ input = 1.0, output = 1.0 }}\n",
        openai_provider("mock", &mock.base(), ""),
        model("m", &[("mock", "up")]),
    );
    let usage = format!(
        "backend = \"postgres\"\npostgres_url_env = \"{URL_ENV}\"\npath = \"{{dir}}/usage.db\"\n"
    );
    let sidecar = Sidecar::start_with_usage_env(&body, 1000, &usage, &[(URL_ENV, url.as_str())]);
    let budget = "budget=1000000000/day";
    // Budgets fail closed: starting the day at $0 would renew every budget.
    let (status, code, retry) = limited_chat(&sidecar, "budgeted", budget).await;
    assert_eq!(
        (status, code.as_deref(), retry.as_deref()),
        (503, Some("budget_unavailable"), Some("5")),
        "{}",
        sidecar.log()
    );
    // Keys without a budget are served meanwhile (their rows wait in the spill file).
    assert_eq!(limited_chat(&sidecar, "plain", "").await.0, 200);
    assert!(
        sidecar
            .log()
            .contains("keys with a budget are refused until the ledger can be seeded"),
        "{}",
        sidecar.log()
    );
    // The database comes back: the seed is retried (every 5 s) and budgets are held again.
    cluster.run();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, code, _) = limited_chat(&sidecar, "budgeted", budget).await;
        if status == 200 {
            break;
        }
        assert_eq!(code.as_deref(), Some("budget_unavailable"));
        assert!(
            std::time::Instant::now() < deadline,
            "never seeded: {}",
            sidecar.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        sidecar.log().contains("ledger seeded from the usage store"),
        "{}",
        sidecar.log()
    );
    cluster.stop();
}

#[tokio::test]
async fn postgres_over_tls_is_verified_against_the_ca_file() {
    let cluster = pg::Cluster::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca, crt, key) = certificates(dir.path(), "pg");
    let (other_ca, _, _) = certificates(dir.path(), "other");
    cluster.enable_ssl(&crt, &key);
    let url = cluster.database().replace(
        "?connect_timeout=5",
        "?connect_timeout=5&sslmode=verify-full",
    );
    let db = pg::db_name(&url).to_owned();
    let mock = Mock::start(&[]);
    let body = format!(
        "{}{}",
        openai_provider("mock", &mock.base(), ""),
        model("m", &[("mock", "up")]),
    );
    let usage = |ca: &std::path::Path, n: u32| {
        format!(
            "backend = \"postgres\"\npostgres_url_env = \"{URL_ENV}\"\npostgres_ca_file = \"{}\"\npath = \"{{dir}}/usage-{n}.db\"\n",
            ca.display()
        )
    };
    // Trusting the CA that signed the server's certificate: rows land, over TLS.
    let mut trusted =
        Sidecar::start_with_usage_env(&body, 1000, &usage(&ca, 0), &[(URL_ENV, url.as_str())]);
    assert_eq!(trusted.chat(chat_body("m", false)).await.status(), 200);
    // Its connections are encrypted.
    let encrypted = cluster.psql(
        "postgres",
        "SELECT COUNT(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE s.ssl AND a.application_name = 'afr'",
    );
    assert_ne!(encrypted, "0", "{}", trusted.log());
    assert!(trusted.terminate().success(), "{}", trusted.log());
    assert_eq!(cluster.psql(&db, "SELECT COUNT(*) FROM usage"), "1");
    // Trusting another CA: the server's certificate is refused; rows wait in the spill file.
    let mut wary = Sidecar::start_with_usage_env(
        &body,
        1000,
        &usage(&other_ca, 1),
        &[(URL_ENV, url.as_str())],
    );
    assert_eq!(wary.chat(chat_body("m", false)).await.status(), 200);
    let _ = wary.terminate();
    assert!(wary.log().contains("TLS handshake"), "{}", wary.log());
    assert_eq!(cluster.psql(&db, "SELECT COUNT(*) FROM usage"), "1");
    cluster.stop();
}
