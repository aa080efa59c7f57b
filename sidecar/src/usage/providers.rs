//! The operator's view of the providers (the dashboard's "errors and latency
//! by provider"), from the usage store: per provider and UTC day, every
//! answer a provider gave — a failed-over attempt's row included, since that
//! attempt is exactly the error the operator is looking for — with its
//! errors and latency. One statement for both backends, like [`super::query`].
//!
//! Latency comes back as sums and counts, and the averages are divided here:
//! SQLite's `AVG` is a float and PostgreSQL's a NUMERIC, which round
//! differently when cast.

use serde::Serialize;

use super::query::{Dialect, GroupBy, QueryValue};
use super::{StoreError, UsageReader};

/// Which rows to count: a time range; rows of no provider (refused before
/// any was tried) are never counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProviderQuery {
    /// Only rows at or after this Unix time (ms).
    pub since_ms: Option<i64>,
    /// Only rows before this Unix time (ms).
    pub until_ms: Option<i64>,
}

/// One provider's answers on one UTC day.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ProviderRow {
    /// The provider's name in the config.
    pub provider: String,
    /// The UTC day, `YYYY-MM-DD`.
    pub day: String,
    /// Answers recorded: requests it served and attempts failed over from it.
    pub attempts: u64,
    /// Of those, answered with an HTTP status of 400 or more.
    pub errors: u64,
    /// Of those, 429 or 5xx: the provider's own trouble, what trips its breaker.
    pub provider_errors: u64,
    /// Mean time to the whole answer, in ms.
    pub latency_avg_ms: f64,
    /// Slowest answer, in ms.
    pub latency_max_ms: u64,
    /// Mean time to the first token of streams, in ms (`null` with no stream).
    pub ttft_avg_ms: Option<f64>,
}

/// The result columns after provider and day.
const INTS: usize = 6;

impl ProviderQuery {
    /// The statement and its bound values, ordered by provider then day.
    fn to_sql(self, dialect: Dialect) -> (String, Vec<QueryValue>) {
        let day = GroupBy::Day.sql(dialect);
        let mut sql = format!(
            "SELECT provider, {day}, \
             CAST(COUNT(*) AS BIGINT), \
             CAST(COALESCE(SUM(CASE WHEN status >= 400 THEN 1 ELSE 0 END), 0) AS BIGINT), \
             CAST(COALESCE(SUM(CASE WHEN status = 429 OR status >= 500 THEN 1 ELSE 0 END), 0) AS BIGINT), \
             CAST(COALESCE(SUM(latency_ms), 0) AS BIGINT), \
             CAST(COALESCE(MAX(latency_ms), 0) AS BIGINT), \
             CAST(COALESCE(SUM(ttft_ms), 0) AS BIGINT), \
             CAST(COALESCE(SUM(CASE WHEN ttft_ms IS NULL THEN 0 ELSE 1 END), 0) AS BIGINT) \
             FROM usage WHERE provider <> ''"
        );
        let mut values = Vec::new();
        for (op, bound) in [(">=", self.since_ms), ("<", self.until_ms)] {
            if let Some(ms) = bound {
                values.push(QueryValue::Int(ms));
                match dialect {
                    Dialect::Sqlite => sql.push_str(&format!(" AND ts_ms {op} ?")),
                    Dialect::Postgres => {
                        sql.push_str(&format!(" AND ts_ms {op} ${}", values.len()))
                    }
                }
            }
        }
        sql.push_str(" GROUP BY 1, 2 ORDER BY ");
        match dialect {
            Dialect::Sqlite => sql.push_str("1, 2"),
            // Byte order, as SQLite sorts, whatever the database's locale
            // (a collation takes an expression, not a column position).
            Dialect::Postgres => {
                sql.push_str(&format!("provider COLLATE \"C\", {day} COLLATE \"C\""))
            }
        }
        (sql, values)
    }
}

impl UsageReader {
    /// Each provider's answers by UTC day in `q`'s range. Blocks; async code
    /// runs it in `spawn_blocking`.
    pub fn providers(&self, q: ProviderQuery) -> Result<Vec<ProviderRow>, StoreError> {
        let rows = self.select(|dialect| q.to_sql(dialect), 2, INTS + 1)?;
        Ok(rows
            .into_iter()
            .map(|row| {
                let n = |i: usize| u64::try_from(row.ints[i]).unwrap_or(0);
                let [attempts, errors, provider_errors, latency_sum, latency_max, ttft_sum, streams] =
                    [0, 1, 2, 3, 4, 5, 6].map(n);
                let mut texts = row.texts.into_iter();
                ProviderRow {
                    provider: texts.next().unwrap_or_default(),
                    day: texts.next().unwrap_or_default(),
                    attempts,
                    errors,
                    provider_errors,
                    latency_avg_ms: mean(latency_sum, attempts).unwrap_or(0.0),
                    latency_max_ms: latency_max,
                    ttft_avg_ms: mean(ttft_sum, streams),
                }
            })
            .collect())
    }
}

/// `sum / count` rounded to 0.1, `None` when `count` is 0.
fn mean(sum: u64, count: u64) -> Option<f64> {
    (count > 0).then(|| (sum as f64 / count as f64 * 10.0).round() / 10.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_bound_and_both_dialects_agree() {
        let q = ProviderQuery {
            since_ms: Some(10),
            until_ms: Some(20),
        };
        let (sql, values) = q.to_sql(Dialect::Sqlite);
        assert!(
            sql.contains("WHERE provider <> '' AND ts_ms >= ? AND ts_ms < ?"),
            "{sql}"
        );
        assert!(sql.ends_with("GROUP BY 1, 2 ORDER BY 1, 2"), "{sql}");
        let (pg, pg_values) = q.to_sql(Dialect::Postgres);
        assert!(pg.contains("ts_ms >= $1 AND ts_ms < $2"), "{pg}");
        assert_eq!(values, pg_values);
        let (open, none) = ProviderQuery::default().to_sql(Dialect::Postgres);
        assert!(open.contains("WHERE provider <> '' GROUP BY"), "{open}");
        assert!(none.is_empty());
    }

    #[test]
    fn means_round_and_say_when_there_is_none() {
        assert_eq!(mean(10, 3), Some(3.3));
        assert_eq!(mean(0, 0), None);
    }
}
