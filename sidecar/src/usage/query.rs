//! The read side: a [`UsageQuery`] (filters plus grouping) becomes one
//! aggregate SQL statement whose values are always bound parameters, and
//! comes back as [`UsageRow`] sums.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use rusqlite::types::Value;
use rusqlite::{params_from_iter, Connection};
use serde::Serialize;

use super::{schema, StoreError};

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
    fn sql(self) -> &'static str {
        match self {
            GroupBy::Key => "key_id",
            GroupBy::Model => "model",
            GroupBy::Provider => "provider",
            GroupBy::Day => "strftime('%Y-%m-%d', ts_ms / 1000, 'unixepoch')",
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
    /// The statement and its bound values.
    fn to_sql(&self) -> (String, Vec<Value>) {
        let groups: Vec<&str> = self.groups().iter().map(|g| g.sql()).collect();
        let mut sql = String::from("SELECT ");
        for g in &groups {
            sql.push_str(g);
            sql.push_str(", ");
        }
        sql.push_str(
            "COUNT(*), COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0), \
             COALESCE(SUM(total_tokens), 0), COALESCE(SUM(token_source = 'estimated'), 0), \
             COALESCE(SUM(status >= 400), 0), COALESCE(SUM(truncated), 0) FROM usage",
        );
        let mut filters = Vec::new();
        let mut values = Vec::new();
        if let Some(key) = &self.key_id {
            filters.push("key_id = ?");
            values.push(Value::Text(key.clone()));
        }
        if let Some(model) = &self.model {
            filters.push("model = ?");
            values.push(Value::Text(model.clone()));
        }
        if let Some(since) = self.since_ms {
            filters.push("ts_ms >= ?");
            values.push(Value::Integer(since));
        }
        if let Some(until) = self.until_ms {
            filters.push("ts_ms < ?");
            values.push(Value::Integer(until));
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
            sql.push_str(&positions.join(", "));
        }
        (sql, values)
    }

    /// The grouping without repeats, as the result columns come back.
    fn groups(&self) -> Vec<GroupBy> {
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
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
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

    fn set_group(&mut self, g: GroupBy, value: String) {
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
    path: PathBuf,
    conn: Arc<Mutex<Connection>>,
}

impl fmt::Debug for UsageReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UsageReader")
            .field("path", &self.path)
            .finish()
    }
}

impl UsageReader {
    /// Opens an existing database for reading; fails with
    /// [`StoreError::Missing`] rather than creating one.
    pub fn open(path: &Path) -> Result<UsageReader, StoreError> {
        let conn = schema::open_reader(path)?;
        Ok(UsageReader {
            path: path.to_owned(),
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sums of the rows matching `q`, one [`UsageRow`] per group, ordered by
    /// the group columns; no row when nothing matched.
    pub fn query(&self, q: &UsageQuery) -> Result<Vec<UsageRow>, StoreError> {
        let (sql, values) = q.to_sql();
        let groups = q.groups();
        // A panic while holding the lock cannot leave the connection half-used
        // in a way SQLite cares about, so a poisoned lock is still usable.
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let mut stmt = conn.prepare_cached(&sql).map_err(StoreError::Query)?;
        let rows = stmt
            .query_map(params_from_iter(values), |r| {
                let mut row = UsageRow::default();
                for (i, g) in groups.iter().enumerate() {
                    row.set_group(*g, r.get::<_, Option<String>>(i)?.unwrap_or_default());
                }
                let n = groups.len();
                let count = |i: usize| -> rusqlite::Result<u64> {
                    Ok(u64::try_from(r.get::<_, i64>(n + i)?).unwrap_or(0))
                };
                row.requests = count(0)?;
                row.prompt_tokens = count(1)?;
                row.completion_tokens = count(2)?;
                row.total_tokens = count(3)?;
                row.estimated_requests = count(4)?;
                row.errors = count(5)?;
                row.truncated = count(6)?;
                Ok(row)
            })
            .map_err(StoreError::Query)?;
        let mut out = Vec::new();
        for row in rows {
            let row = row.map_err(StoreError::Query)?;
            if row.requests > 0 {
                out.push(row);
            }
        }
        Ok(out)
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
        let (sql, values) = UsageQuery::default().to_sql();
        assert!(sql.starts_with("SELECT COUNT(*)"), "{sql}");
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
        let (sql, values) = q.to_sql();
        assert!(!sql.contains("DROP"), "{sql}");
        assert!(
            sql.contains("WHERE key_id = ? AND model = ? AND ts_ms >= ? AND ts_ms < ?"),
            "{sql}"
        );
        assert!(sql.ends_with("GROUP BY 1, 2 ORDER BY 1, 2"), "{sql}");
        assert_eq!(values.len(), 4);
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
