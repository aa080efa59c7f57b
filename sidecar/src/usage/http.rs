//! `GET /v1/usage`: a key reads its own usage, by model and UTC day by
//! default. The sidecar owns the route; this file turns the query string into
//! a [`UsageQuery`] and the rows into the response body.
//!
//! ```text
//! GET /v1/usage?since=24h&until=2026-11-25T12:00:00Z&model=gpt-4o-mini&by=model,day
//! ```
//!
//! | parameter | meaning |
//! |---|---|
//! | `since`, `until` | a duration ago (`24h`, `7d`), an RFC 3339 time, or a date; `until` is exclusive |
//! | `model` | only this model |
//! | `by` | comma-separated `model`, `provider`, `day` (default `model,day`) |
//!
//! The key is always the caller's (`X-Afr-Key-Id`); there is no parameter
//! for it. The operator's `GET /api/usage` on the admin listener reads the same
//! query string with a `key` parameter and `by=key` besides ([`Scope::Operator`]).

use serde_json::{json, Value};

use super::query::GroupByError;
use super::time_arg::{format_ms, parse_time_arg, TimeArgError};
use super::{GroupBy, StoreError, UsageQuery, UsageReader, UsageRow};
use afr_core::limits::{Budget, KeyLimits, NANOS_PER_USD};

/// Why `GET /v1/usage` failed: the client's query string (400) or the store (500).
#[derive(Debug, thiserror::Error)]
pub enum KeyUsageError {
    /// The query string; see [`UsageParamError::param`].
    #[error(transparent)]
    Param(#[from] UsageParamError),
    /// The database; the message names no key or secret, only the store.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl KeyUsageError {
    /// The HTTP status to answer with.
    pub fn status(&self) -> u16 {
        match self {
            KeyUsageError::Param(_) => 400,
            KeyUsageError::Store(_) => 500,
        }
    }

    /// The query parameter at fault, for the OpenAI error's `param`.
    pub fn param(&self) -> Option<&str> {
        match self {
            KeyUsageError::Param(e) => Some(e.param()),
            KeyUsageError::Store(_) => None,
        }
    }
}

/// The whole endpoint for the key `key_id`: parses `query` (the request's
/// query string), sums its usage and renders the body. Blocks on SQLite, so
/// the sidecar runs it in `spawn_blocking`; `now_ms` is
/// [`super::time_arg::now_ms`] outside tests.
pub fn key_usage(
    reader: &UsageReader,
    key_id: &str,
    query: &str,
    now_ms: i64,
) -> Result<Value, KeyUsageError> {
    let q = parse_query_string(query, key_id, now_ms)?;
    let rows = reader.query(&q)?;
    Ok(render_key_usage(key_id, &q, &rows))
}

/// The grouping when the client names none.
pub const DEFAULT_GROUP_BY: [GroupBy; 2] = [GroupBy::Model, GroupBy::Day];

/// A query string `GET /v1/usage` refuses; maps to a 400 OpenAI error whose
/// `param` is [`UsageParamError::param`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UsageParamError {
    /// A parameter this endpoint does not have; the second field lists those it has.
    #[error("unknown query parameter `{0}`: expected {1}")]
    Unknown(String, &'static str),
    /// The same parameter twice.
    #[error("query parameter `{0}` given more than once")]
    Repeated(String),
    /// `since` or `until` is not a time.
    #[error("{param}: {source}")]
    Time {
        /// `since` or `until`.
        param: &'static str,
        /// What was wrong.
        source: TimeArgError,
    },
    /// `by` names a grouping this scope does not have; the second field lists those it has.
    #[error("by: `{0}` is not a grouping here: expected {1}")]
    By(String, &'static str),
    /// `model` (or the operator's `key`) is empty.
    #[error("{0}: must not be empty")]
    Empty(&'static str),
    /// `since` is not before `until`.
    #[error("since: must be before until")]
    EmptyRange,
}

impl UsageParamError {
    /// The query parameter at fault, for the OpenAI error's `param`.
    pub fn param(&self) -> &str {
        match self {
            UsageParamError::Unknown(name, _) | UsageParamError::Repeated(name) => name,
            UsageParamError::Time { param, .. } => param,
            UsageParamError::By(..) => "by",
            UsageParamError::Empty(param) => param,
            UsageParamError::EmptyRange => "since",
        }
    }
}

/// Whose usage a query string may read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope<'a> {
    /// A key holder (`GET /v1/usage`): only this key, never grouped by key.
    Key(&'a str),
    /// The operator (the admin listener): every key, filtered with `key`,
    /// grouped by key too.
    Operator,
}

impl Scope<'_> {
    fn parameters(self) -> &'static str {
        match self {
            Scope::Key(_) => "since, until, model or by",
            Scope::Operator => "since, until, model, key or by",
        }
    }

    fn groupings(self) -> &'static str {
        match self {
            Scope::Key(_) => "model, provider or day",
            Scope::Operator => "key, model, provider or day",
        }
    }
}

/// Parses the query string of `GET /v1/usage` (with or without the leading
/// `?`, percent-encoded or not) for the key `key_id`, reading relative times
/// against `now_ms` (Unix milliseconds).
pub fn parse_query_string(
    query: &str,
    key_id: &str,
    now_ms: i64,
) -> Result<UsageQuery, UsageParamError> {
    parse_scoped(query, Scope::Key(key_id), now_ms)
}

/// Parses a usage query string for `scope`; see [`parse_query_string`].
pub fn parse_scoped(
    query: &str,
    scope: Scope<'_>,
    now_ms: i64,
) -> Result<UsageQuery, UsageParamError> {
    let query = query.strip_prefix('?').unwrap_or(query);
    let mut q = UsageQuery {
        key_id: match scope {
            Scope::Key(key_id) => Some(key_id.to_owned()),
            Scope::Operator => None,
        },
        ..UsageQuery::default()
    };
    let mut seen: Vec<String> = Vec::new();
    let mut by: Option<Vec<GroupBy>> = None;
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        if seen.iter().any(|s| *s == name) {
            return Err(UsageParamError::Repeated(name.into_owned()));
        }
        seen.push(name.to_string());
        match name.as_ref() {
            "since" => q.since_ms = Some(time_param("since", &value, now_ms)?),
            "until" => q.until_ms = Some(time_param("until", &value, now_ms)?),
            "model" if value.trim().is_empty() => return Err(UsageParamError::Empty("model")),
            "model" => q.model = Some(value.trim().to_owned()),
            "key" if scope == Scope::Operator => {
                if value.trim().is_empty() {
                    return Err(UsageParamError::Empty("key"));
                }
                q.key_id = Some(value.trim().to_owned());
            }
            "by" => by = Some(parse_by(&value, scope)?),
            _ => {
                return Err(UsageParamError::Unknown(
                    name.into_owned(),
                    scope.parameters(),
                ))
            }
        }
    }
    if let (Some(since), Some(until)) = (q.since_ms, q.until_ms) {
        if since >= until {
            return Err(UsageParamError::EmptyRange);
        }
    }
    q.group_by = by.unwrap_or_else(|| DEFAULT_GROUP_BY.to_vec());
    Ok(q)
}

fn time_param(param: &'static str, value: &str, now_ms: i64) -> Result<i64, UsageParamError> {
    parse_time_arg(value, now_ms).map_err(|source| UsageParamError::Time { param, source })
}

fn parse_by(value: &str, scope: Scope<'_>) -> Result<Vec<GroupBy>, UsageParamError> {
    value
        .split(',')
        .filter(|part| !part.trim().is_empty())
        .map(|part| match (part.parse::<GroupBy>(), scope) {
            (Ok(GroupBy::Key), Scope::Key(_)) | (Err(GroupByError(_)), _) => {
                Err(UsageParamError::By(part.to_owned(), scope.groupings()))
            }
            (Ok(g), _) => Ok(g),
        })
        .collect()
}

/// The response body of `GET /v1/usage` for `key_id`:
///
/// ```json
/// {"object": "list", "key_id": "team-a",
///  "since": "2026-11-24T10:00:00Z", "until": null,
///  "data": [{"model": "gpt-4o-mini", "day": "2026-11-25", "requests": 3,
///            "prompt_tokens": 30, "completion_tokens": 60, "total_tokens": 90,
///            "estimated_requests": 0, "errors": 0, "truncated": 0,
///            "cost_usd": 0.000045, "unpriced_requests": 0, "cached_tokens": 0,
///            "cache_write_5m_tokens": 0, "cache_write_1h_tokens": 0,
///            "reasoning_tokens": 0}]}
/// ```
///
/// `since`/`until` are RFC 3339 or `null` when open; each `data` item has
/// the fields of the grouping asked for plus the sums of [`UsageRow`]. The
/// handler adds the key's `limits` ([`render_limits`]).
pub fn render_key_usage(key_id: &str, q: &UsageQuery, rows: &[UsageRow]) -> Value {
    let data: Vec<Value> = rows
        .iter()
        .map(|row| {
            // The key is the caller's; repeating it in every item says nothing.
            let mut row = row.clone();
            row.key_id = None;
            serde_json::to_value(row).unwrap_or(Value::Null)
        })
        .collect();
    json!({
        "object": "list",
        "key_id": key_id,
        "since": q.since_ms.map(format_ms),
        "until": q.until_ms.map(format_ms),
        "data": data,
    })
}

/// The operator's list (`GET /api/usage` on the admin listener): the same
/// shape as [`render_key_usage`] without a `key_id`, each item with its key
/// when grouped by key.
pub fn render_usage(q: &UsageQuery, rows: &[UsageRow]) -> Value {
    json!({
        "object": "list",
        "since": q.since_ms.map(format_ms),
        "until": q.until_ms.map(format_ms),
        "data": rows,
    })
}

/// A key's token and money limits as its holder may see them, for the
/// dashboard's headroom and budget burn-down:
///
/// ```json
/// {"tpm": 10000,
///  "budget": {"limit_usd": 5.0, "per": "month",
///             "period_start": "2026-12-01T00:00:00Z", "period_end": "2027-01-01T00:00:00Z",
///             "spent_usd": 1.25, "remaining_usd": 3.75}}
/// ```
///
/// `budget_remaining` is the ledger's nano-dollars left this period (what is
/// reserved by requests in flight counts as spent); `null` for a limit the
/// key does not have.
pub fn render_limits(limits: &KeyLimits, budget_remaining: Option<u64>, now_ms: u64) -> Value {
    let budget = limits.budget.map(|budget: Budget| {
        let (start, end) = budget.per.bounds(now_ms);
        let remaining = budget_remaining.unwrap_or(budget.nanos).min(budget.nanos);
        let usd = |nanos: u64| nanos as f64 / NANOS_PER_USD as f64;
        json!({
            "limit_usd": usd(budget.nanos),
            "per": budget.per.as_str(),
            "period_start": format_ms(i64::try_from(start).unwrap_or(i64::MAX)),
            "period_end": format_ms(i64::try_from(end).unwrap_or(i64::MAX)),
            "spent_usd": usd(budget.nanos - remaining),
            "remaining_usd": usd(remaining),
        })
    });
    json!({ "tpm": limits.tpm, "budget": budget })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_795_600_800_000;

    #[test]
    fn defaults_to_own_key_by_model_and_day() {
        for qs in ["", "?"] {
            let q = parse_query_string(qs, "team-a", NOW).expect("parse");
            assert_eq!(q.key_id.as_deref(), Some("team-a"));
            assert_eq!(q.group_by, DEFAULT_GROUP_BY.to_vec());
            assert_eq!((q.since_ms, q.until_ms, q.model), (None, None, None));
        }
    }

    #[test]
    fn parses_every_parameter_percent_encoded() {
        let q = parse_query_string(
            "?since=24h&until=2026-11-25T11%3A00%3A00%2B01%3A00&model=gpt-4o%2Dmini&by=provider,day",
            "k",
            NOW,
        )
        .expect("parse");
        assert_eq!(q.since_ms, Some(NOW - 86_400_000));
        assert_eq!(q.until_ms, Some(NOW));
        assert_eq!(q.model.as_deref(), Some("gpt-4o-mini"));
        assert_eq!(q.group_by, vec![GroupBy::Provider, GroupBy::Day]);
    }

    #[test]
    fn errors_name_their_parameter() {
        let cases = [
            ("key=other", "key"),
            ("foo=1", "foo"),
            ("since=1h&since=2h", "since"),
            ("since=yesterday", "since"),
            ("until=soon", "until"),
            ("by=tier", "by"),
            ("by=key", "by"),
            ("model=", "model"),
            ("since=1h&until=2h", "since"),
        ];
        for (qs, param) in cases {
            let e = parse_query_string(qs, "k", NOW).expect_err(qs);
            assert_eq!(e.param(), param, "{qs}: {e}");
            assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn the_operator_reads_every_key_and_groups_by_key() {
        let q = parse_scoped("by=key,day&since=7d", Scope::Operator, NOW).expect("parse");
        assert_eq!(q.key_id, None);
        assert_eq!(q.group_by, vec![GroupBy::Key, GroupBy::Day]);
        assert_eq!(q.since_ms, Some(NOW - 7 * 86_400_000));
        let q = parse_scoped("key=team-a", Scope::Operator, NOW).expect("parse");
        assert_eq!(q.key_id.as_deref(), Some("team-a"));
        for (qs, param) in [("key=", "key"), ("by=tier", "by"), ("limit=3", "limit")] {
            let e = parse_scoped(qs, Scope::Operator, NOW).expect_err(qs);
            assert_eq!(e.param(), param, "{qs}: {e}");
        }
        let e = parse_scoped("by=key", Scope::Key("k"), NOW).expect_err("key scope");
        assert!(
            e.to_string().contains("expected model, provider or day"),
            "{e}"
        );
        let e = parse_scoped("foo=1", Scope::Operator, NOW).expect_err("unknown");
        assert!(e.to_string().contains("model, key or by"), "{e}");
    }

    #[test]
    fn limits_show_the_budget_period_and_what_is_left() {
        let limits = KeyLimits::parse_header("tpm=1000;budget=5000000000/month").expect("limits");
        // NOW is 2026-11-25T10:00:00Z.
        let v = render_limits(&limits, Some(3_750_000_000), NOW as u64);
        assert_eq!(v["tpm"], 1000);
        let b = &v["budget"];
        assert_eq!(b["per"], "month");
        assert_eq!(b["limit_usd"], 5.0);
        assert_eq!(b["spent_usd"], 1.25);
        assert_eq!(b["remaining_usd"], 3.75);
        assert_eq!(b["period_start"], "2026-11-01T00:00:00Z");
        assert_eq!(b["period_end"], "2026-12-01T00:00:00Z");
        let none = render_limits(&KeyLimits::default(), None, NOW as u64);
        assert!(none["tpm"].is_null() && none["budget"].is_null());
    }

    #[test]
    fn renders_the_list_shape() {
        let q = UsageQuery {
            key_id: Some("k".into()),
            since_ms: Some(NOW),
            group_by: DEFAULT_GROUP_BY.to_vec(),
            ..UsageQuery::default()
        };
        let rows = [UsageRow {
            key_id: Some("k".into()),
            model: Some("m".into()),
            day: Some("2026-11-25".into()),
            requests: 1,
            prompt_tokens: 2,
            completion_tokens: 3,
            total_tokens: 5,
            ..UsageRow::default()
        }];
        let v = render_key_usage("k", &q, &rows);
        assert_eq!(v["object"], "list");
        assert_eq!(v["key_id"], "k");
        assert_eq!(v["since"], "2026-11-25T10:00:00Z");
        assert!(v["until"].is_null());
        let item = &v["data"][0];
        assert_eq!(item["model"], "m");
        assert_eq!(item["day"], "2026-11-25");
        assert_eq!(item["total_tokens"], 5);
        assert!(item.get("key_id").is_none());
    }
}
