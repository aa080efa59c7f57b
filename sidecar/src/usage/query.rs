//! The read side: a [`UsageQuery`] (filters plus grouping) becomes one
//! aggregate SQL statement whose values are always bound parameters, and
//! comes back as [`UsageRow`] sums. One query layer for both backends: the
//! statement is the same text for SQLite and PostgreSQL except the
//! placeholders and the day expression ([`Dialect`]), so both answer with the
//! same numbers.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use rusqlite::types::Value as SqliteValue;
use rusqlite::{params_from_iter, Connection};
use serde::Serialize;

use super::postgres::{PgReader, PostgresTarget};
use super::{schema, StoreError};

/// The SQL spelling of one backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Dialect {
    /// `?` placeholders, `strftime`.
    Sqlite,
    /// `$n` placeholders, `to_char`.
    Postgres,
}

/// A bound value of a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum QueryValue {
    /// Text (a key id, a model).
    Text(String),
    /// An integer (a time in Unix milliseconds).
    Int(i64),
}

/// A column usage is summed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupBy {
    /// The key id.
    Key,
    /// The catalogue model the client asked for.
    Model,
    /// The provider that served the request.
    Provider,
    /// The UTC day (`YYYY-MM-DD`) the request arrived.
    Day,
}

impl GroupBy {
    /// Every grouping, in the order the `--by` help lists them.
    pub const ALL: [GroupBy; 4] = [
        GroupBy::Key,
        GroupBy::Model,
        GroupBy::Provider,
        GroupBy::Day,
    ];

    /// The spelling on the command line, in query strings and as the JSON field.
    pub fn as_str(self) -> &'static str {
        match self {
            GroupBy::Key => "key",
            GroupBy::Model => "model",
            GroupBy::Provider => "provider",
            GroupBy::Day => "day",
        }
    }

    /// The SQL expression grouped on (fixed text, never user input).
    pub(super) fn sql(self, dialect: Dialect) -> &'static str {
        match (self, dialect) {
            (GroupBy::Key, _) => "key_id",
            (GroupBy::Model, _) => "model",
            (GroupBy::Provider, _) => "provider",
            (GroupBy::Day, Dialect::Sqlite) => "strftime('%Y-%m-%d', ts_ms / 1000, 'unixepoch')",
            // Integer division first, as SQLite does, so both agree on a
            // request in the last millisecond of a day.
            (GroupBy::Day, Dialect::Postgres) => {
                "to_char(to_timestamp(ts_ms / 1000) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
            }
        }
    }
}

impl fmt::Display for GroupBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A grouping name that is not key, model, provider or day.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a grouping: expected key, model, provider or day")]
pub struct GroupByError(pub String);

impl FromStr for GroupBy {
    type Err = GroupByError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        GroupBy::ALL
            .into_iter()
            .find(|g| g.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| GroupByError(s.to_owned()))
    }
}

/// Which rows to sum and how to group them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageQuery {
    /// Only this key.
    pub key_id: Option<String>,
    /// Only this catalogue model.
    pub model: Option<String>,
    /// Only requests at or after this Unix time (ms).
    pub since_ms: Option<i64>,
    /// Only requests before this Unix time (ms).
    pub until_ms: Option<i64>,
    /// Group columns, in output order; empty sums everything into one row.
    pub group_by: Vec<GroupBy>,
}

impl UsageQuery {
    /// The statement and its bound values. Every sum is cast to BIGINT
    /// (PostgreSQL sums BIGINTs to NUMERIC) and counts conditions with CASE
    /// (PostgreSQL does not add booleans), so both backends return the same
    /// integer columns.
    pub(super) fn to_sql(&self, dialect: Dialect) -> (String, Vec<QueryValue>) {
        let groups: Vec<&str> = self.groups().iter().map(|g| g.sql(dialect)).collect();
        let mut sql = String::from("SELECT ");
        for g in &groups {
            sql.push_str(g);
            sql.push_str(", ");
        }
        // A failed-over attempt's row (`afr_core::usage::ATTEMPT_ROW`) counts
        // in tokens and cost, not as a request of its own.
        sql.push_str(
            "CAST(COALESCE(SUM(CASE WHEN request_id LIKE '%/attempt-%' THEN 0 ELSE 1 END), 0) AS BIGINT), \
             CAST(COALESCE(SUM(prompt_tokens), 0) AS BIGINT), \
             CAST(COALESCE(SUM(completion_tokens), 0) AS BIGINT), \
             CAST(COALESCE(SUM(total_tokens), 0) AS BIGINT), \
             CAST(COALESCE(SUM(CASE WHEN token_source = 'estimated' AND request_id NOT LIKE '%/attempt-%' THEN 1 ELSE 0 END), 0) AS BIGINT), \
             CAST(COALESCE(SUM(CASE WHEN status >= 400 AND request_id NOT LIKE '%/attempt-%' THEN 1 ELSE 0 END), 0) AS BIGINT), \
             CAST(COALESCE(SUM(CASE WHEN truncated AND request_id NOT LIKE '%/attempt-%' THEN 1 ELSE 0 END), 0) AS BIGINT), \
             CAST(COALESCE(SUM(cost_nanos), 0) AS BIGINT), \
             CAST(COALESCE(SUM(CASE WHEN cost_nanos IS NULL AND token_source <> 'none' AND request_id NOT LIKE '%/attempt-%' THEN 1 ELSE 0 END), 0) AS BIGINT), \
             CAST(COALESCE(SUM(cached_tokens), 0) AS BIGINT), \
             CAST(COALESCE(SUM(cache_write_5m_tokens), 0) AS BIGINT), \
             CAST(COALESCE(SUM(cache_write_1h_tokens), 0) AS BIGINT), \
             CAST(COALESCE(SUM(reasoning_tokens), 0) AS BIGINT) FROM usage",
        );
        let mut filters = Vec::new();
        let mut values = Vec::new();
        let mut filter = |column: &str, op: &str, value: QueryValue| {
            values.push(value);
            filters.push(match dialect {
                Dialect::Sqlite => format!("{column} {op} ?"),
                Dialect::Postgres => format!("{column} {op} ${}", values.len()),
            });
        };
        if let Some(key) = &self.key_id {
            filter("key_id", "=", QueryValue::Text(key.clone()));
        }
        if let Some(model) = &self.model {
            filter("model", "=", QueryValue::Text(model.clone()));
        }
        if let Some(since) = self.since_ms {
            filter("ts_ms", ">=", QueryValue::Int(since));
        }
        if let Some(until) = self.until_ms {
            filter("ts_ms", "<", QueryValue::Int(until));
        }
        if !filters.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&filters.join(" AND "));
        }
        if !groups.is_empty() {
            let positions: Vec<String> = (1..=groups.len()).map(|i| i.to_string()).collect();
            sql.push_str(" GROUP BY ");
            sql.push_str(&positions.join(", "));
            sql.push_str(" ORDER BY ");
            match dialect {
                Dialect::Sqlite => sql.push_str(&positions.join(", ")),
                // Byte order, as SQLite sorts, whatever the database's locale.
                Dialect::Postgres => {
                    let ordered: Vec<String> = groups
                        .iter()
                        .map(|g| format!("{g} COLLATE \"C\""))
                        .collect();
                    sql.push_str(&ordered.join(", "));
                }
            }
        }
        (sql, values)
    }

    /// The grouping without repeats, as the result columns come back.
    pub(super) fn groups(&self) -> Vec<GroupBy> {
        let mut out: Vec<GroupBy> = Vec::new();
        for g in &self.group_by {
            if !out.contains(g) {
                out.push(*g);
            }
        }
        out
    }
}

/// Sums over one group; the group fields not asked for are `None` (and left
/// out of the JSON).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct UsageRow {
    /// The key id, when grouped by key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// The model, when grouped by model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The provider (empty when none was tried), when grouped by provider.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// The UTC day `YYYY-MM-DD`, when grouped by day.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub day: Option<String>,
    /// Requests.
    pub requests: u64,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// Total tokens.
    pub total_tokens: u64,
    /// Requests whose counts the gateway estimated (stream cut short before usage).
    pub estimated_requests: u64,
    /// Requests answered with an HTTP status of 400 or more.
    pub errors: u64,
    /// Streams that ended early.
    pub truncated: u64,
    /// Cost in US dollars at the routes' prices.
    pub cost_usd: f64,
    /// The same cost in nano-dollars, exact (what the ledger counts in).
    #[serde(skip)]
    pub cost_nanos: u64,
    /// Requests that consumed tokens on a route without a price: their cost
    /// is unknown and not in `cost_usd`.
    pub unpriced_requests: u64,
    /// Of the prompt tokens, those read from a provider's cache.
    pub cached_tokens: u64,
    /// Of the prompt tokens, those written to a 5-minute cache.
    pub cache_write_5m_tokens: u64,
    /// Of the prompt tokens, those written to a 1-hour cache.
    pub cache_write_1h_tokens: u64,
    /// Of the completion tokens, those spent reasoning.
    pub reasoning_tokens: u64,
}

impl UsageRow {
    /// The value of one group column.
    pub fn group(&self, g: GroupBy) -> Option<&str> {
        match g {
            GroupBy::Key => self.key_id.as_deref(),
            GroupBy::Model => self.model.as_deref(),
            GroupBy::Provider => self.provider.as_deref(),
            GroupBy::Day => self.day.as_deref(),
        }
    }

    pub(super) fn set_group(&mut self, g: GroupBy, value: String) {
        let slot = match g {
            GroupBy::Key => &mut self.key_id,
            GroupBy::Model => &mut self.model,
            GroupBy::Provider => &mut self.provider,
            GroupBy::Day => &mut self.day,
        };
        *slot = Some(value);
    }
}

/// A read connection to the usage database. Clone it freely; calls are
/// serialized on one connection and block, so async code runs them in
/// `spawn_blocking`.
#[derive(Clone)]
pub struct UsageReader {
    inner: Arc<ReaderInner>,
}

enum ReaderInner {
    Sqlite {
        path: PathBuf,
        conn: Mutex<Connection>,
    },
    Postgres(Box<PgReader>),
}

impl fmt::Debug for UsageReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &*self.inner {
            ReaderInner::Sqlite { path, .. } => {
                f.debug_struct("UsageReader").field("path", path).finish()
            }
            // Never the URL: it holds a password.
            ReaderInner::Postgres(_) => f.write_str("UsageReader(PostgreSQL)"),
        }
    }
}

impl UsageReader {
    /// Opens an existing SQLite database for reading; fails with
    /// [`StoreError::Missing`] rather than creating one.
    pub fn open(path: &Path) -> Result<UsageReader, StoreError> {
        let conn = schema::open_reader(path)?;
        Ok(UsageReader {
            inner: Arc::new(ReaderInner::Sqlite {
                path: path.to_owned(),
                conn: Mutex::new(conn),
            }),
        })
    }

    /// A reader of the PostgreSQL database `target`. It connects at its first
    /// query (and again after the connection broke), so a database that is
    /// down now only fails the queries made while it is down.
    pub fn postgres(target: PostgresTarget) -> Result<UsageReader, StoreError> {
        Ok(UsageReader {
            inner: Arc::new(ReaderInner::Postgres(Box::new(PgReader::new(target)?))),
        })
    }

    /// Sums of the rows matching `q`, one [`UsageRow`] per group, ordered by
    /// the group columns; no row when nothing matched.
    pub fn query(&self, q: &UsageQuery) -> Result<Vec<UsageRow>, StoreError> {
        let rows = match &*self.inner {
            ReaderInner::Sqlite { conn, .. } => {
                // A panic while holding the lock cannot leave the connection
                // half-used in a way SQLite cares about, so a poisoned lock is
                // still usable.
                let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
                sqlite_query(&conn, q)?
            }
            ReaderInner::Postgres(pg) => pg.query(q)?,
        };
        Ok(rows.into_iter().filter(|row| row.requests > 0).collect())
    }
}

/// One result row of [`UsageReader::select`]: its text columns, then its
/// integer columns, in statement order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Selected {
    /// The text columns (NULL read as "").
    pub(super) texts: Vec<String>,
    /// The integer columns (NULL read as 0).
    pub(super) ints: Vec<i64>,
}

impl UsageReader {
    /// Runs a statement the other read queries of this module build (the
    /// dashboard's provider figures): `statement` gives its text in a
    /// backend's dialect and its bound values; the result is `texts` text
    /// columns followed by `ints` integer columns (cast to BIGINT, so both
    /// backends return the same types).
    pub(super) fn select(
        &self,
        statement: impl Fn(Dialect) -> (String, Vec<QueryValue>),
        texts: usize,
        ints: usize,
    ) -> Result<Vec<Selected>, StoreError> {
        match &*self.inner {
            ReaderInner::Sqlite { conn, .. } => {
                let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
                let (sql, values) = statement(Dialect::Sqlite);
                let values = values.into_iter().map(|v| match v {
                    QueryValue::Text(s) => SqliteValue::Text(s),
                    QueryValue::Int(n) => SqliteValue::Integer(n),
                });
                let mut stmt = conn.prepare_cached(&sql).map_err(StoreError::Query)?;
                let rows = stmt
                    .query_map(params_from_iter(values), |r| {
                        let mut row = Selected::default();
                        for i in 0..texts {
                            row.texts
                                .push(r.get::<_, Option<String>>(i)?.unwrap_or_default());
                        }
                        for i in texts..texts + ints {
                            row.ints.push(r.get::<_, Option<i64>>(i)?.unwrap_or(0));
                        }
                        Ok(row)
                    })
                    .map_err(StoreError::Query)?;
                rows.collect::<Result<_, _>>().map_err(StoreError::Query)
            }
            ReaderInner::Postgres(pg) => {
                let (sql, values) = statement(Dialect::Postgres);
                pg.select(&sql, values, texts, ints)
            }
        }
    }
}

fn sqlite_query(conn: &Connection, q: &UsageQuery) -> Result<Vec<UsageRow>, StoreError> {
    let (sql, values) = q.to_sql(Dialect::Sqlite);
    let values = values.into_iter().map(|v| match v {
        QueryValue::Text(s) => SqliteValue::Text(s),
        QueryValue::Int(n) => SqliteValue::Integer(n),
    });
    let groups = q.groups();
    let mut stmt = conn.prepare_cached(&sql).map_err(StoreError::Query)?;
    let rows = stmt
        .query_map(params_from_iter(values), |r| {
            let mut row = UsageRow::default();
            for (i, g) in groups.iter().enumerate() {
                row.set_group(*g, r.get::<_, Option<String>>(i)?.unwrap_or_default());
            }
            let mut counts = [0i64; COUNT_COLUMNS];
            for (i, count) in counts.iter_mut().enumerate() {
                *count = r.get(groups.len() + i)?;
            }
            row.set_counts(counts);
            Ok(row)
        })
        .map_err(StoreError::Query)?;
    rows.collect::<Result<_, _>>().map_err(StoreError::Query)
}

/// The sums after the group columns in every usage query.
pub(super) const COUNT_COLUMNS: usize = 13;

impl UsageRow {
    /// Sets the sums from the statement's count columns, in order.
    pub(super) fn set_counts(&mut self, counts: [i64; COUNT_COLUMNS]) {
        let [requests, prompt, completion, total, estimated, errors, truncated, cost, unpriced, cached, write_5m, write_1h, reasoning] =
            counts.map(|n| u64::try_from(n).unwrap_or(0));
        self.cached_tokens = cached;
        self.cache_write_5m_tokens = write_5m;
        self.cache_write_1h_tokens = write_1h;
        self.reasoning_tokens = reasoning;
        self.cost_usd = cost as f64 / afr_core::limits::NANOS_PER_USD as f64;
        self.cost_nanos = cost;
        self.unpriced_requests = unpriced;
        self.requests = requests;
        self.prompt_tokens = prompt;
        self.completion_tokens = completion;
        self.total_tokens = total;
        self.estimated_requests = estimated;
        self.errors = errors;
        self.truncated = truncated;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_by_parses_case_insensitively_and_refuses_others() {
        assert_eq!("Model".parse::<GroupBy>(), Ok(GroupBy::Model));
        assert_eq!(" day ".parse::<GroupBy>(), Ok(GroupBy::Day));
        let e = "tier".parse::<GroupBy>().expect_err("tier");
        assert!(e.to_string().contains("key, model, provider or day"));
    }

    #[test]
    fn no_filter_no_group_is_one_total() {
        let (sql, values) = UsageQuery::default().to_sql(Dialect::Sqlite);
        assert!(
            sql.starts_with("SELECT CAST(COALESCE(SUM(CASE WHEN request_id LIKE '%"),
            "{sql}"
        );
        let attempt = format!("'%{}%'", afr_core::usage::ATTEMPT_ROW);
        assert_eq!(sql.matches(&attempt).count(), 5, "{sql}");
        assert!(!sql.contains("WHERE") && !sql.contains("GROUP BY"), "{sql}");
        assert!(values.is_empty());
    }

    #[test]
    fn filters_are_bound_never_spliced() {
        let q = UsageQuery {
            key_id: Some("k'; DROP TABLE usage; --".into()),
            model: Some("gpt-4o".into()),
            since_ms: Some(10),
            until_ms: Some(20),
            group_by: vec![GroupBy::Model, GroupBy::Day, GroupBy::Model],
        };
        let (sql, values) = q.to_sql(Dialect::Sqlite);
        assert!(!sql.contains("DROP"), "{sql}");
        assert!(
            sql.contains("WHERE key_id = ? AND model = ? AND ts_ms >= ? AND ts_ms < ?"),
            "{sql}"
        );
        assert!(sql.ends_with("GROUP BY 1, 2 ORDER BY 1, 2"), "{sql}");
        assert_eq!(values.len(), 4);
        let (sql, pg_values) = q.to_sql(Dialect::Postgres);
        assert!(!sql.contains("DROP"), "{sql}");
        assert!(
            sql.contains("WHERE key_id = $1 AND model = $2 AND ts_ms >= $3 AND ts_ms < $4"),
            "{sql}"
        );
        assert_eq!(pg_values, values);
        assert_eq!(q.groups(), vec![GroupBy::Model, GroupBy::Day]);
    }

    #[test]
    fn row_json_leaves_out_groups_not_asked_for() {
        let row = UsageRow {
            model: Some("m".into()),
            requests: 2,
            ..UsageRow::default()
        };
        let json = serde_json::to_value(&row).expect("json");
        assert_eq!(json["model"], "m");
        assert!(json.get("key_id").is_none() && json.get("day").is_none());
        assert_eq!(json["requests"], 2);
    }
}
