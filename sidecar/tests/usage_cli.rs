//! `afr usage` as an operator runs it: the real binary on a database filled
//! through the store.

#[allow(unused_imports)]
#[path = "../src/usage/mod.rs"]
mod usage;
// The usage module names `crate::tls` (its PostgreSQL TLS), as in the binary.
#[allow(dead_code)]
#[path = "../src/tls.rs"]
mod tls;

use std::path::Path;
use std::process::{Command, Output};

use afr_core::usage::{TokenSource, UsageRecord};
use serde_json::Value;
use usage::Store;

/// 2026-11-25T10:00:00Z
const T0: i64 = 1_795_600_800_000;
const DAY: i64 = 86_400_000;

fn rec(key: &str, model: &str, provider: &str, ts_ms: i64, tokens: (u64, u64)) -> UsageRecord {
    UsageRecord {
        ts_ms,
        request_id: format!("{key}-{model}-{ts_ms}"),
        key_id: key.to_owned(),
        model: model.to_owned(),
        provider: provider.to_owned(),
        upstream_model: model.to_owned(),
        prompt_tokens: tokens.0,
        completion_tokens: tokens.1,
        total_tokens: tokens.0 + tokens.1,
        token_source: TokenSource::Provider,
        latency_ms: 12,
        ttft_ms: None,
        status: 200,
        stream: false,
        truncated: false,
        cost_nanos: None,
        ..UsageRecord::default()
    }
}

/// Three keys' worth of usage over two days.
fn fill(path: &Path) {
    let store = Store::open(path).expect("open");
    let r = store.recorder();
    r.record(rec("team-a", "gpt-5-mini", "openai", T0 - DAY, (10, 5)));
    r.record(rec("team-a", "gpt-5-mini", "azure", T0, (20, 10)));
    r.record(rec("team-a", "claude", "anthropic", T0 + 1, (100, 50)));
    r.record(rec("team-b", "gpt-5-mini", "openai", T0 + 2, (1, 1)));
    let mut cut = rec("team-b", "claude", "anthropic", T0 + 3, (7, 3));
    cut.token_source = TokenSource::Estimated;
    cut.truncated = true;
    r.record(cut);
    let mut failed = rec("team-c", "claude", "", T0 + 4, (0, 0));
    failed.status = 503;
    failed.token_source = TokenSource::None;
    r.record(failed);
    store.shutdown().expect("shutdown");
}

fn afr(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_afr"))
        .arg("usage")
        .args(args)
        .output()
        .expect("run afr")
}

fn json(args: &[&str]) -> Value {
    let out = afr(args);
    assert!(
        out.status.success(),
        "afr usage {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is JSON")
}

#[test]
fn json_by_model_sums_every_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("usage.db");
    fill(&db);
    let db = db.to_str().expect("utf-8 path");
    let v = json(&["--db", db, "--by", "model", "--json"]);
    assert_eq!(v["object"], "list");
    assert_eq!(v["by"], serde_json::json!(["model"]));
    assert!(v["since"].is_null() && v["until"].is_null());
    let data = v["data"].as_array().expect("data");
    assert_eq!(data.len(), 2);
    assert_eq!(data[0]["model"], "claude");
    assert_eq!(data[0]["requests"], 3);
    assert_eq!(data[0]["total_tokens"], 160);
    assert_eq!(data[0]["estimated_requests"], 1);
    assert_eq!(data[0]["errors"], 1);
    assert_eq!(data[0]["truncated"], 1);
    assert!(data[0].get("key_id").is_none());
    assert_eq!(data[1]["model"], "gpt-5-mini");
    assert_eq!(data[1]["requests"], 3);
    assert_eq!(data[1]["prompt_tokens"], 31);
    assert_eq!(data[1]["completion_tokens"], 16);
}

#[test]
fn json_filters_by_key_model_and_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("usage.db");
    fill(&db);
    let db = db.to_str().expect("utf-8 path");
    let v = json(&[
        "--db",
        db,
        "--key",
        "team-a",
        "--since",
        "2026-11-25",
        "--by",
        "day,provider",
        "--json",
    ]);
    assert_eq!(v["since"], "2026-11-25T00:00:00Z");
    let rows: Vec<(String, String, u64)> = v["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|r| {
            (
                r["day"].as_str().unwrap_or("?").to_owned(),
                r["provider"].as_str().unwrap_or("?").to_owned(),
                r["requests"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            ("2026-11-25".into(), "anthropic".into(), 1),
            ("2026-11-25".into(), "azure".into(), 1),
        ]
    );
    let v = json(&[
        "--db",
        db,
        "--model",
        "gpt-5-mini",
        "--until",
        "2026-11-25T10:00:00Z",
        "--json",
    ]);
    let data = v["data"].as_array().expect("data");
    assert_eq!(data.len(), 1, "{v}");
    assert_eq!(data[0]["key_id"], "team-a");
    assert_eq!(data[0]["total_tokens"], 15);
    let v = json(&["--db", db, "--key", "nobody", "--json"]);
    assert_eq!(v["data"], serde_json::json!([]));
}

#[test]
fn table_is_aligned_and_config_names_the_db() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("usage.db");
    fill(&db);
    let config = dir.path().join("sidecar.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = 'unix:/x.sock'\n[usage]\npath = '{}'\n",
            db.display()
        ),
    )
    .expect("config");
    let out = afr(&["--config", config.to_str().expect("utf-8 path")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8(out.stdout).expect("utf-8");
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 1 + 5 + 1, "{table}");
    assert!(
        lines[0].starts_with("KEY      MODEL       REQUESTS"),
        "{table}"
    );
    assert!(lines[1].starts_with("team-a   claude"), "{table}");
    assert!(lines[6].starts_with("(total)"), "{table}");
    assert!(lines.iter().all(|l| l.len() == lines[0].len()), "{table}");
}

#[test]
fn operator_errors_are_clear_and_create_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing.db");
    let out = afr(&["--db", missing.to_str().expect("utf-8 path")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("missing.db") && err.contains("no such database"),
        "{err}"
    );
    assert!(!missing.exists());

    let db = dir.path().join("usage.db");
    fill(&db);
    let db = db.to_str().expect("utf-8 path");
    let out = afr(&["--db", db, "--since", "yesterday"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--since") && err.contains("`yesterday` is not a time"),
        "{err}"
    );

    let out = afr(&["--db", db, "--by", "tier"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tier"));
}
