//! The usage dashboard's queries on a real SQLite file and a real PostgreSQL
//! cluster: the operator's every-key spend (`GET /api/usage?by=key…` on the
//! admin listener) and each provider's answers, errors and latency by day
//! (`/api/providers`). The same rows go into both backends and must come back
//! with the same numbers.

#[allow(unused_imports)]
#[path = "../src/usage/mod.rs"]
mod usage;
// The usage module names `crate::tls` (its PostgreSQL TLS), as in the binary.
#[allow(dead_code)]
#[path = "../src/tls.rs"]
mod tls;

mod pg;

use afr_core::usage::{TokenSource, UsageRecord};
use usage::http::{parse_scoped, render_usage, Scope};
use usage::providers::{ProviderQuery, ProviderRow};
use usage::{PostgresTarget, Store, UsageReader};

/// 2026-11-25T10:00:00Z.
const DAY1: i64 = 1_795_600_800_000;
const DAY_MS: i64 = 86_400_000;

enum TestDb {
    Sqlite(tempfile::TempDir),
    Postgres(tempfile::TempDir, String),
}

impl TestDb {
    fn sqlite() -> TestDb {
        TestDb::Sqlite(tempfile::tempdir().expect("tempdir"))
    }

    fn postgres() -> TestDb {
        TestDb::Postgres(
            tempfile::tempdir().expect("tempdir"),
            pg::shared().database(),
        )
    }

    fn target(url: &str) -> PostgresTarget {
        PostgresTarget::from_url(url, "AFR_TEST_POSTGRES_URL").expect("url")
    }

    /// Writes `records` and returns a reader of its own, as the sidecar has.
    fn with(&self, records: Vec<UsageRecord>) -> UsageReader {
        let store = match self {
            TestDb::Sqlite(dir) => Store::open(&dir.path().join("usage.db")).expect("open"),
            TestDb::Postgres(dir, url) => Store::open_postgres(
                Self::target(url),
                &dir.path().join("usage.db"),
                Default::default(),
            )
            .expect("open"),
        };
        let recorder = store.recorder();
        for r in records {
            recorder.record(r);
        }
        store.shutdown().expect("shutdown");
        match self {
            TestDb::Sqlite(dir) => UsageReader::open(&dir.path().join("usage.db")).expect("reader"),
            TestDb::Postgres(_, url) => UsageReader::postgres(Self::target(url)).expect("reader"),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn row(
    id: &str,
    ts_ms: i64,
    key: &str,
    model: &str,
    provider: &str,
    status: u16,
    latency_ms: u64,
    ttft_ms: Option<u64>,
    cost_nanos: Option<u64>,
) -> UsageRecord {
    UsageRecord {
        ts_ms,
        request_id: id.into(),
        key_id: key.into(),
        model: model.into(),
        provider: provider.into(),
        upstream_model: model.into(),
        prompt_tokens: 10,
        completion_tokens: 20,
        total_tokens: 30,
        token_source: TokenSource::Provider,
        latency_ms,
        ttft_ms,
        status,
        stream: ttft_ms.is_some(),
        cost_nanos,
        ..UsageRecord::default()
    }
}

/// Two keys over two days; one request failed over from `alpha` (its
/// attempt row answered 502) to `beta`; one refused before any provider.
fn records() -> Vec<UsageRecord> {
    vec![
        row(
            "r1",
            DAY1,
            "team-a",
            "m1",
            "alpha",
            200,
            100,
            None,
            Some(1_000_000),
        ),
        row(
            "r2",
            DAY1 + 1,
            "team-a",
            "m1",
            "alpha",
            200,
            300,
            Some(40),
            Some(2_000_000),
        ),
        row(
            "r3/attempt-1",
            DAY1 + 2,
            "team-b",
            "m2",
            "alpha",
            502,
            50,
            None,
            Some(0),
        ),
        row(
            "r3",
            DAY1 + 3,
            "team-b",
            "m2",
            "beta",
            200,
            200,
            None,
            Some(5_000_000),
        ),
        row(
            "r4",
            DAY1 + DAY_MS,
            "team-b",
            "m2",
            "beta",
            429,
            10,
            None,
            None,
        ),
        row(
            "r5",
            DAY1 + DAY_MS + 1,
            "team-c",
            "m1",
            "",
            413,
            1,
            None,
            None,
        ),
    ]
}

fn operator_spend_by_key(db: &TestDb) {
    let reader = db.with(records());
    let q = parse_scoped("by=key", Scope::Operator, DAY1 + 2 * DAY_MS).expect("parse");
    let rows = reader.query(&q).expect("query");
    let spend: Vec<(String, u64, u64)> = rows
        .iter()
        .map(|r| {
            (
                r.key_id.clone().unwrap_or_default(),
                r.requests,
                r.cost_nanos,
            )
        })
        .collect();
    // The attempt row is billed to team-b but is no request of its own.
    assert_eq!(
        spend,
        vec![
            ("team-a".into(), 2, 3_000_000),
            ("team-b".into(), 2, 5_000_000),
            ("team-c".into(), 1, 0),
        ]
    );
    let body = render_usage(&q, &rows);
    assert_eq!(body["object"], "list");
    assert_eq!(body["data"][1]["key_id"], "team-b");
    assert_eq!(body["data"][1]["cost_usd"], 0.005);

    // Filtered to one key, by day: what the top spenders' chart draws.
    let q = parse_scoped(
        "key=team-b&by=key,day&since=2026-11-25",
        Scope::Operator,
        DAY1,
    )
    .expect("parse");
    let days: Vec<(Option<String>, u64)> = reader
        .query(&q)
        .expect("query")
        .iter()
        .map(|r| (r.day.clone(), r.errors))
        .collect();
    assert_eq!(
        days,
        vec![
            (Some("2026-11-25".into()), 0),
            (Some("2026-11-26".into()), 1)
        ]
    );
}

fn provider_errors_and_latency_by_day(db: &TestDb) {
    let reader = db.with(records());
    let rows = reader
        .providers(ProviderQuery::default())
        .expect("providers");
    let expect = vec![
        ProviderRow {
            provider: "alpha".into(),
            day: "2026-11-25".into(),
            attempts: 3,
            errors: 1,
            provider_errors: 1,
            latency_avg_ms: 150.0,
            latency_max_ms: 300,
            ttft_avg_ms: Some(40.0),
        },
        ProviderRow {
            provider: "beta".into(),
            day: "2026-11-25".into(),
            attempts: 1,
            errors: 0,
            provider_errors: 0,
            latency_avg_ms: 200.0,
            latency_max_ms: 200,
            ttft_avg_ms: None,
        },
        ProviderRow {
            provider: "beta".into(),
            day: "2026-11-26".into(),
            attempts: 1,
            errors: 1,
            provider_errors: 1,
            latency_avg_ms: 10.0,
            latency_max_ms: 10,
            ttft_avg_ms: None,
        },
    ];
    assert_eq!(rows, expect);

    // The range bounds: the second day only.
    let since = ProviderQuery {
        since_ms: Some(DAY1 + DAY_MS),
        until_ms: None,
    };
    let rows = reader.providers(since).expect("providers");
    assert_eq!(rows, expect[2..].to_vec());
    let until = ProviderQuery {
        since_ms: None,
        until_ms: Some(DAY1),
    };
    assert!(reader.providers(until).expect("providers").is_empty());
}

macro_rules! both {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[test] fn $name() { super::$name(&super::TestDb::sqlite()) } )*
        }
        mod postgres {
            $( #[test] fn $name() { super::$name(&super::TestDb::postgres()) } )*
        }
    };
}

both!(operator_spend_by_key, provider_errors_and_latency_by_day);
