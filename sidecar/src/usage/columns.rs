//! The usage row's columns, declared once for both backends: the INSERT of
//! SQLite and of PostgreSQL are generated from [`COLUMNS`], and each value is
//! a [`Cell`] both drivers know how to bind. Adding a column to
//! [`UsageRecord`] is one line here plus one migration per backend
//! (`schema.rs`, `postgres.rs`).

use std::error::Error;

use afr_core::usage::{TokenSource, UsageRecord};
use bytes::BytesMut;
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};

/// One value of a row, as both drivers bind it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Cell<'a> {
    /// An integer (SQLite INTEGER; PostgreSQL SMALLINT, INTEGER or BIGINT).
    Int(i64),
    /// An integer or NULL.
    OptInt(Option<i64>),
    /// Text.
    Text(&'a str),
    /// A flag (SQLite 0/1; PostgreSQL BOOLEAN).
    Bool(bool),
}

/// A column of the `usage` table.
pub(super) struct Column {
    /// The column's name in both databases.
    pub(super) name: &'static str,
    /// Its PostgreSQL type, for the typed arrays of the batched insert.
    pub(super) pg_type: &'static str,
    /// Its value in a record.
    pub(super) value: for<'a> fn(&'a UsageRecord) -> Cell<'a>,
}

/// Every column a record fills (the surrogate `id` is the database's), in
/// insert order.
pub(super) const COLUMNS: &[Column] = &[
    Column {
        name: "ts_ms",
        pg_type: "BIGINT",
        value: |r| Cell::Int(r.ts_ms),
    },
    Column {
        name: "request_id",
        pg_type: "TEXT",
        value: |r| Cell::Text(&r.request_id),
    },
    Column {
        name: "key_id",
        pg_type: "TEXT",
        value: |r| Cell::Text(&r.key_id),
    },
    Column {
        name: "model",
        pg_type: "TEXT",
        value: |r| Cell::Text(&r.model),
    },
    Column {
        name: "provider",
        pg_type: "TEXT",
        value: |r| Cell::Text(&r.provider),
    },
    Column {
        name: "upstream_model",
        pg_type: "TEXT",
        value: |r| Cell::Text(&r.upstream_model),
    },
    Column {
        name: "prompt_tokens",
        pg_type: "BIGINT",
        value: |r| Cell::Int(saturating_i64(r.prompt_tokens)),
    },
    Column {
        name: "completion_tokens",
        pg_type: "BIGINT",
        value: |r| Cell::Int(saturating_i64(r.completion_tokens)),
    },
    Column {
        name: "total_tokens",
        pg_type: "BIGINT",
        value: |r| Cell::Int(saturating_i64(r.total_tokens)),
    },
    Column {
        name: "token_source",
        pg_type: "TEXT",
        value: |r| Cell::Text(token_source_str(r.token_source)),
    },
    Column {
        name: "latency_ms",
        pg_type: "BIGINT",
        value: |r| Cell::Int(saturating_i64(r.latency_ms)),
    },
    Column {
        name: "ttft_ms",
        pg_type: "BIGINT",
        value: |r| Cell::OptInt(r.ttft_ms.map(saturating_i64)),
    },
    Column {
        name: "status",
        pg_type: "INTEGER",
        value: |r| Cell::Int(i64::from(r.status)),
    },
    Column {
        name: "stream",
        pg_type: "BOOLEAN",
        value: |r| Cell::Bool(r.stream),
    },
    Column {
        name: "truncated",
        pg_type: "BOOLEAN",
        value: |r| Cell::Bool(r.truncated),
    },
    Column {
        name: "cost_nanos",
        pg_type: "BIGINT",
        value: |r| Cell::OptInt(r.cost_nanos.map(saturating_i64)),
    },
    Column {
        name: "cached_tokens",
        pg_type: "BIGINT",
        value: |r| Cell::Int(saturating_i64(r.cached_tokens)),
    },
    Column {
        name: "cache_write_5m_tokens",
        pg_type: "BIGINT",
        value: |r| Cell::Int(saturating_i64(r.cache_write_5m_tokens)),
    },
    Column {
        name: "cache_write_1h_tokens",
        pg_type: "BIGINT",
        value: |r| Cell::Int(saturating_i64(r.cache_write_1h_tokens)),
    },
    Column {
        name: "reasoning_tokens",
        pg_type: "BIGINT",
        value: |r| Cell::Int(saturating_i64(r.reasoning_tokens)),
    },
];

/// Database integers are i64; counts beyond that are clamped, not wrapped.
fn saturating_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The `token_source` column's spelling, the same as the serde form.
pub(super) fn token_source_str(source: TokenSource) -> &'static str {
    match source {
        TokenSource::Provider => "provider",
        TokenSource::Estimated => "estimated",
        TokenSource::None => "none",
    }
}

fn names() -> String {
    COLUMNS
        .iter()
        .map(|c| c.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// SQLite's one-row insert; a request id already stored is skipped (a spill
/// file imported again).
pub(super) fn sqlite_insert() -> String {
    let params: Vec<String> = (1..=COLUMNS.len()).map(|i| format!("?{i}")).collect();
    format!(
        "INSERT OR IGNORE INTO usage ({}) VALUES ({})",
        names(),
        params.join(", ")
    )
}

/// PostgreSQL's batched insert: one typed array per column, unnested into
/// rows, so a batch of any size is one prepared statement and one round trip.
/// A request id already stored is skipped (the partial unique index).
pub(super) fn postgres_insert() -> String {
    let arrays: Vec<String> = COLUMNS
        .iter()
        .enumerate()
        .map(|(i, c)| format!("${}::{}[]", i + 1, c.pg_type))
        .collect();
    format!(
        "INSERT INTO usage ({}) SELECT * FROM UNNEST({}) \
         ON CONFLICT (request_id) WHERE request_id <> '' DO NOTHING",
        names(),
        arrays.join(", ")
    )
}

/// The values of `records`, one `Vec` per column (the arrays of
/// [`postgres_insert`]).
pub(super) fn by_column(records: &[UsageRecord]) -> Vec<Vec<Cell<'_>>> {
    COLUMNS
        .iter()
        .map(|c| records.iter().map(|r| (c.value)(r)).collect())
        .collect()
}

/// The values of one record, in column order (the parameters of
/// [`sqlite_insert`]).
pub(super) fn row(record: &UsageRecord) -> Vec<Cell<'_>> {
    COLUMNS.iter().map(|c| (c.value)(record)).collect()
}

impl rusqlite::ToSql for Cell<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, Value, ValueRef};
        Ok(match *self {
            Cell::Int(v) => ToSqlOutput::Owned(Value::Integer(v)),
            Cell::OptInt(Some(v)) => ToSqlOutput::Owned(Value::Integer(v)),
            Cell::OptInt(None) => ToSqlOutput::Owned(Value::Null),
            Cell::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
            Cell::Bool(b) => ToSqlOutput::Owned(Value::Integer(i64::from(b))),
        })
    }
}

impl ToSql for Cell<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        let mismatch = || format!("a {self:?} does not fit a PostgreSQL {ty} column").into();
        match *self {
            Cell::OptInt(None) => Ok(IsNull::Yes),
            Cell::Int(v) | Cell::OptInt(Some(v)) => match *ty {
                Type::INT8 => v.to_sql(ty, out),
                Type::INT4 => i32::try_from(v)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(v)?.to_sql(ty, out),
                _ => Err(mismatch()),
            },
            Cell::Text(s) if <&str as ToSql>::accepts(ty) => s.to_sql(ty, out),
            Cell::Bool(b) if *ty == Type::BOOL => b.to_sql(ty, out),
            Cell::Text(_) | Cell::Bool(_) => Err(mismatch()),
        }
    }

    fn accepts(ty: &Type) -> bool {
        // The variant is checked against the column's type in `to_sql`.
        matches!(*ty, Type::INT2 | Type::INT4 | Type::INT8 | Type::BOOL)
            || <&str as ToSql>::accepts(ty)
    }

    to_sql_checked!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inserts_name_every_column_once() {
        let sqlite = sqlite_insert();
        let pg = postgres_insert();
        let names = names();
        let listed: Vec<&str> = names.split(", ").collect();
        let declared: Vec<&str> = COLUMNS.iter().map(|c| c.name).collect();
        assert_eq!(listed, declared);
        assert!(sqlite.contains(&format!("({names})")), "{sqlite}");
        assert!(pg.contains(&format!("({names})")), "{pg}");
        assert!(
            sqlite.ends_with(&format!("?{})", COLUMNS.len())),
            "{sqlite}"
        );
        assert!(
            pg.contains(&format!(
                "${}::{}[])",
                COLUMNS.len(),
                COLUMNS[COLUMNS.len() - 1].pg_type
            )),
            "{pg}"
        );
    }
}
