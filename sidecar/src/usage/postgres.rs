//! The PostgreSQL backend (`[usage] backend = "postgres"`): one database for
//! every node of a fleet.
//!
//! - [`PostgresTarget`]: the URL, read from an environment variable and
//!   never shown (it holds a password).
//! - [`MIGRATIONS`]: the schema, versioned in `afr_usage_migrations`; every
//!   node migrates at connect under an advisory lock, so two nodes starting
//!   together apply each migration once.
//! - [`PgRows`]: the writer thread's connection; a batch is one
//!   `INSERT … SELECT FROM UNNEST(arrays)` (one round trip, one statement
//!   prepared once), `ON CONFLICT DO NOTHING` against the unique request id.
//! - [`PgReader`]: the read side of `afr usage`, `GET /v1/usage` and the
//!   admin listener's dashboard queries.
//!
//! Each holds one connection on its own current-thread runtime, driven only
//! while a call runs, so every call is bounded by a timeout: a database that
//! hangs is a refusal like one that is down (the writer spills), never a
//! stuck writer. A failed call drops the connection; the next call connects
//! again. No TLS: reach PostgreSQL over loopback, a private network or a
//! local TLS proxy (see README "Running a fleet").

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use afr_core::usage::UsageRecord;
use tokio::runtime::Runtime;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Config, NoTls, Statement};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::columns;
use super::query::{Dialect, QueryValue};
use super::writer::RowStore;
use super::{StoreError, UsageQuery, UsageRow};

/// Ordered migrations; version N is the state after the first N ran. Append,
/// never edit.
pub(super) const MIGRATIONS: &[&str] = &[
    // v1: the SQLite schema at its version 2: one row per request, columns
    // as in `columns::COLUMNS`, one row per non-empty request id.
    "CREATE TABLE usage (
        id                BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        ts_ms             BIGINT  NOT NULL,
        request_id        TEXT    NOT NULL,
        key_id            TEXT    NOT NULL,
        model             TEXT    NOT NULL,
        provider          TEXT    NOT NULL,
        upstream_model    TEXT    NOT NULL,
        prompt_tokens     BIGINT  NOT NULL,
        completion_tokens BIGINT  NOT NULL,
        total_tokens      BIGINT  NOT NULL,
        token_source      TEXT    NOT NULL,
        latency_ms        BIGINT  NOT NULL,
        ttft_ms           BIGINT,
        status            INTEGER NOT NULL,
        stream            BOOLEAN NOT NULL,
        truncated         BOOLEAN NOT NULL
    );
    -- `afr usage --key` and GET /v1/usage (always one key), then time ranges.
    CREATE INDEX usage_key_ts ON usage (key_id, ts_ms);
    CREATE INDEX usage_ts ON usage (ts_ms);
    CREATE INDEX usage_model_ts ON usage (model, ts_ms);
    CREATE UNIQUE INDEX usage_request_id ON usage (request_id) WHERE request_id <> '';",
    // v2: cost in nano-dollars at the route's price; NULL when the route had
    // no price (unknown, not free). Older rows stay NULL.
    "ALTER TABLE usage ADD COLUMN cost_nanos BIGINT;",
    // v3: the token classes each priced apart (design §3): cache reads,
    // 5-minute and 1-hour cache writes (all part of prompt_tokens) and
    // reasoning (part of completion_tokens). Older rows read 0.
    "ALTER TABLE usage ADD COLUMN cached_tokens BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE usage ADD COLUMN cache_write_5m_tokens BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE usage ADD COLUMN cache_write_1h_tokens BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE usage ADD COLUMN reasoning_tokens BIGINT NOT NULL DEFAULT 0;",
];

/// The schema version this build writes and reads.
pub(super) const VERSION: i64 = MIGRATIONS.len() as i64;

/// Key of the advisory lock that serialises migrations across nodes
/// ("afrusage" in ASCII).
const MIGRATION_LOCK: i64 = 0x6166_7275_7361_6765;

/// Rows per statement when importing a spill file (the file may hold
/// millions; each statement's arrays stay a few MB).
const IMPORT_CHUNK: usize = 10_000;

/// Where the usage database is: the parsed URL and the variable it came from.
#[derive(Clone)]
pub struct PostgresTarget {
    config: Config,
    env: String,
    timeout: Duration,
    /// TLS, when the URL says `sslmode=require` (or `verify-full`,
    /// `verify-ca`): the certificate is always verified.
    tls: Option<MakeRustlsConnect>,
}

impl fmt::Debug for PostgresTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL holds a password: name its variable only.
        write!(f, "PostgresTarget(${})", self.env)
    }
}

impl PostgresTarget {
    /// Reads the URL from the environment variable `env`. Errors name the
    /// variable, never its value.
    pub fn from_env(env: &str) -> Result<Self, StoreError> {
        let url = std::env::var(env).map_err(|_| {
            StoreError::Postgres(format!(
                "environment variable {env} is not set (usage.postgres_url_env)"
            ))
        })?;
        Self::from_url(&url, env)
    }

    /// Parses `url` (`postgres://user:password@host:port/db` or key=value
    /// form); `env` names where it came from in messages.
    pub fn from_url(url: &str, env: &str) -> Result<Self, StoreError> {
        // libpq's verifying modes: rustls always verifies the certificate and
        // its host name, so to tokio-postgres they are `require`.
        let url = url
            .replace("sslmode=verify-full", "sslmode=require")
            .replace("sslmode=verify-ca", "sslmode=require");
        let mut config: Config = url.parse().map_err(|e| {
            StoreError::Postgres(format!("${env}: not a PostgreSQL connection URL: {e}"))
        })?;
        if config.get_application_name().is_none() {
            config.application_name("afr");
        }
        Ok(PostgresTarget {
            config,
            env: env.to_owned(),
            timeout: Duration::from_secs(5),
            tls: None,
        })
    }

    /// Whether the URL asks for TLS (`sslmode=require`, `verify-full`, `verify-ca`).
    pub fn wants_tls(&self) -> bool {
        self.config.get_ssl_mode() == tokio_postgres::config::SslMode::Require
    }

    /// Connects over TLS with `tls` (its roots decide whom to trust) when
    /// the URL asks for it; otherwise in clear text (`prefer` included).
    pub fn with_tls(mut self, tls: rustls::ClientConfig) -> Self {
        if self.wants_tls() {
            self.tls = Some(MakeRustlsConnect::new(tls));
        }
        self
    }

    /// How long connecting and each statement may take (default 5 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The environment variable the URL came from.
    pub fn env(&self) -> &str {
        &self.env
    }
}

/// Connects with `tls` (or `NoTls`) within `wait` and drives the
/// connection on `runtime`; `Err(None)` when the wait ran out. The
/// connection task runs only while a call blocks on the runtime, which is
/// the only time it has anything to do.
fn open<T>(
    runtime: &Runtime,
    config: Config,
    tls: T,
    wait: Duration,
) -> Result<Client, Option<String>>
where
    T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket> + Send + 'static,
    T::Stream: Send + 'static,
    T::TlsConnect: Send,
    <T::TlsConnect as tokio_postgres::tls::TlsConnect<tokio_postgres::Socket>>::Future: Send,
{
    let connected =
        runtime.block_on(async move { tokio::time::timeout(wait, config.connect(tls)).await });
    match connected {
        Ok(Ok((client, connection))) => {
            runtime.spawn(drive(connection));
            Ok(client)
        }
        Ok(Err(e)) => Err(Some(e.to_string())),
        Err(_) => Err(None),
    }
}

/// Drives a connection's I/O until it ends; the runtime polls it while a
/// call blocks on the runtime.
async fn drive<S, T>(connection: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if let Err(e) = connection.await {
        tracing::debug!(error = %e, "usage store: PostgreSQL connection ended");
    }
}

/// One connection on a private runtime, (re)connected on demand.
struct Session {
    target: PostgresTarget,
    /// Taken only by `Drop`.
    runtime: Option<Runtime>,
    /// `Arc` so a call's future owns its handle and may borrow what the
    /// caller lends it (a batch's arrays).
    client: Option<Arc<Client>>,
    /// The writer's prepared insert, valid for `client`.
    insert: Option<Statement>,
    /// Whether the schema version was checked (or migrated) on `client`.
    schema_ok: bool,
}

impl Session {
    fn new(target: PostgresTarget) -> Result<Self, StoreError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Postgres(format!("cannot start its runtime: {e}")))?;
        Ok(Session {
            target,
            runtime: Some(runtime),
            client: None,
            insert: None,
            schema_ok: false,
        })
    }

    /// The connection, made now if there is none (or it broke).
    fn connect(&mut self) -> Result<Arc<Client>, String> {
        if self.client.as_ref().is_some_and(|c| c.is_closed()) {
            self.drop_connection();
        }
        if let Some(client) = &self.client {
            return Ok(Arc::clone(client));
        }
        let config = self.target.config.clone();
        let wait = self.target.timeout;
        // The timer is made inside the runtime: it needs its clock.
        let Some(runtime) = &self.runtime else {
            return Err("the store is closed".to_owned());
        };
        let client = match self.target.tls.clone() {
            Some(tls) => open(runtime, config, tls, wait),
            None => open(runtime, config, NoTls, wait),
        }
        .map_err(|e| {
            e.unwrap_or_else(|| {
                format!(
                    "connecting to PostgreSQL took longer than {:?}",
                    self.target.timeout
                )
            })
        })?;
        let client = Arc::new(client);
        self.client = Some(Arc::clone(&client));
        Ok(client)
    }

    /// Forgets the connection after a failure: the next call connects anew.
    fn drop_connection(&mut self) {
        self.client = None;
        self.insert = None;
        self.schema_ok = false;
    }

    /// Runs `call` on the connection within `wait`, dropping the connection
    /// when the call fails or times out (a statement cut off by the timeout
    /// may still commit: the writer's retry skips its rows by request id).
    fn run<T, F, Fut>(&mut self, wait: Duration, call: F) -> Result<T, String>
    where
        F: FnOnce(Arc<Client>) -> Fut,
        Fut: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        let client = self.connect()?;
        let Some(runtime) = &self.runtime else {
            return Err("the store is closed".to_owned());
        };
        let call = call(client);
        let out = match runtime.block_on(async move { tokio::time::timeout(wait, call).await }) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("PostgreSQL did not answer within {wait:?}")),
        };
        if out.is_err() {
            self.drop_connection();
        }
        out
    }
}

impl Drop for Session {
    /// The sidecar drops its reader on an async thread, where dropping a
    /// runtime the normal way panics; nothing is left to wait for anyway.
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Applies the migrations past the database's version in one transaction
/// holding an advisory lock, each recorded in `afr_usage_migrations`.
/// Returns the version found before.
async fn migrate(client: Arc<Client>) -> Result<i64, tokio_postgres::Error> {
    client.batch_execute("BEGIN").await?;
    client
        .execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS afr_usage_migrations (
                version    INTEGER PRIMARY KEY,
                applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
            )",
        )
        .await?;
    let found: i64 = client
        .query_one(
            "SELECT COALESCE(MAX(version), 0)::BIGINT FROM afr_usage_migrations",
            &[],
        )
        .await?
        .get(0);
    if found <= VERSION {
        for (index, sql) in MIGRATIONS.iter().enumerate().skip(found.max(0) as usize) {
            let version = index as i32 + 1;
            client.batch_execute(sql).await?;
            client
                .execute(
                    "INSERT INTO afr_usage_migrations (version) VALUES ($1)",
                    &[&version],
                )
                .await?;
        }
    }
    client.batch_execute("COMMIT").await?;
    Ok(found)
}

/// The version of the schema in the database; `None` without one.
async fn schema_version(client: Arc<Client>) -> Result<Option<i64>, tokio_postgres::Error> {
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('afr_usage_migrations') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    if !exists {
        return Ok(None);
    }
    client
        .query_one("SELECT MAX(version)::BIGINT FROM afr_usage_migrations", &[])
        .await
        .map(|r| r.get(0))
}

/// The writer thread's PostgreSQL connection.
pub(super) struct PgRows {
    session: Session,
    /// How long one statement may take; shortened for shutdown.
    wait: Duration,
    insert_sql: String,
}

impl PgRows {
    /// A writer for `target`. It connects (and migrates) lazily; call
    /// [`PgRows::prepare`] to do it now.
    pub(super) fn new(target: PostgresTarget) -> Result<Self, StoreError> {
        let wait = target.timeout;
        Ok(PgRows {
            session: Session::new(target)?,
            wait,
            insert_sql: columns::postgres_insert(),
        })
    }

    /// Connects, migrates and prepares the insert. A schema newer than this
    /// build is [`StoreError::Postgres`] (the caller refuses to start);
    /// anything else is the database being unavailable (`Ok(Err(reason))`).
    pub(super) fn prepare(&mut self) -> Result<Result<(), String>, StoreError> {
        match self.ready() {
            Ok(()) => Ok(Ok(())),
            Err(Prepare::TooNew(reason)) => Err(StoreError::Postgres(reason)),
            Err(Prepare::Unavailable(reason)) => Ok(Err(reason)),
        }
    }

    fn ready(&mut self) -> Result<(), Prepare> {
        if !self.session.schema_ok || self.session.client.as_ref().is_some_and(|c| c.is_closed()) {
            // A migration may wait for another node's; give it time.
            let wait = self.wait.max(Duration::from_secs(30));
            let found = self
                .session
                .run(wait, migrate)
                .map_err(|e| Prepare::Unavailable(format!("migrating the schema: {e}")))?;
            if found > VERSION {
                self.session.drop_connection();
                return Err(Prepare::TooNew(format!(
                    "schema version {found} is newer than this afr knows ({VERSION})"
                )));
            }
            self.session.schema_ok = true;
        }
        if self.session.insert.is_none() {
            let sql = self.insert_sql.clone();
            let statement = self
                .session
                .run(self.wait, |c| async move { c.prepare(&sql).await })
                .map_err(Prepare::Unavailable)?;
            self.session.insert = Some(statement);
        }
        Ok(())
    }
}

enum Prepare {
    TooNew(String),
    Unavailable(String),
}

impl RowStore for PgRows {
    fn engine(&self) -> &'static str {
        "PostgreSQL"
    }

    /// One statement per batch (per [`IMPORT_CHUNK`] rows for an import):
    /// each is atomic, and a chunk stored before a failure is skipped when
    /// the whole is tried again.
    fn insert_all(&mut self, records: &[UsageRecord]) -> Result<(), String> {
        self.ready().map_err(|e| match e {
            Prepare::TooNew(r) | Prepare::Unavailable(r) => r,
        })?;
        for chunk in records.chunks(IMPORT_CHUNK) {
            let Some(statement) = self.session.insert.clone() else {
                return Err("no prepared insert".to_owned());
            };
            let arrays = columns::by_column(chunk);
            let params: Vec<&(dyn ToSql + Sync)> =
                arrays.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
            self.session.run(self.wait, |c| async move {
                c.execute(&statement, &params).await
            })?;
        }
        Ok(())
    }

    fn shorten_waits(&mut self, wait: Duration) {
        self.wait = wait;
        self.session.target.timeout = wait;
    }

    /// A committed statement is durable in PostgreSQL already.
    fn close(&mut self) {}
}

/// The read side on PostgreSQL: one connection, serialized.
pub(super) struct PgReader {
    session: Mutex<Session>,
}

impl PgReader {
    pub(super) fn new(target: PostgresTarget) -> Result<Self, StoreError> {
        Ok(PgReader {
            session: Mutex::new(Session::new(target)?),
        })
    }

    /// Runs the query layer's statement ([`Dialect::Postgres`]); a database
    /// without the schema, or with another version of it, is an error that
    /// says so.
    pub(super) fn query(&self, q: &UsageQuery) -> Result<Vec<UsageRow>, StoreError> {
        let (sql, values) = q.to_sql(Dialect::Postgres);
        let groups = q.groups();
        let rows = self.rows(&sql, values)?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let mut row = UsageRow::default();
            let read = |i: usize| -> Result<i64, StoreError> {
                r.try_get(i)
                    .map_err(|e| StoreError::Postgres(format!("reading a result: {e}")))
            };
            for (i, g) in groups.iter().enumerate() {
                let value: Option<String> = r
                    .try_get(i)
                    .map_err(|e| StoreError::Postgres(format!("reading a result: {e}")))?;
                row.set_group(*g, value.unwrap_or_default());
            }
            let mut counts = [0i64; super::query::COUNT_COLUMNS];
            for (i, count) in counts.iter_mut().enumerate() {
                *count = read(groups.len() + i)?;
            }
            row.set_counts(counts);
            out.push(row);
        }
        Ok(out)
    }

    /// Runs a statement whose result is `texts` text columns then `ints`
    /// BIGINT columns (see [`super::query::Selected`]).
    pub(super) fn select(
        &self,
        sql: &str,
        values: Vec<QueryValue>,
        texts: usize,
        ints: usize,
    ) -> Result<Vec<super::query::Selected>, StoreError> {
        let rows = self.rows(sql, values)?;
        let read_err =
            |e: tokio_postgres::Error| StoreError::Postgres(format!("reading a result: {e}"));
        rows.iter()
            .map(|r| {
                let mut row = super::query::Selected::default();
                for i in 0..texts {
                    let v: Option<String> = r.try_get(i).map_err(read_err)?;
                    row.texts.push(v.unwrap_or_default());
                }
                for i in texts..texts + ints {
                    let v: Option<i64> = r.try_get(i).map_err(read_err)?;
                    row.ints.push(v.unwrap_or(0));
                }
                Ok(row)
            })
            .collect()
    }

    /// Checks the schema once, then runs `sql` with `values` bound.
    fn rows(
        &self,
        sql: &str,
        values: Vec<QueryValue>,
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        // A panic mid-call leaves at worst a connection the next failure drops.
        let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let wait = session.target.timeout;
        if !session.schema_ok {
            let found = session
                .run(wait, schema_version)
                .map_err(|e| StoreError::Postgres(format!("reading the schema version: {e}")))?;
            match found {
                None => {
                    return Err(StoreError::Postgres(
                        "no usage schema in this database (has `afr serve` connected to it yet?)"
                            .to_owned(),
                    ))
                }
                Some(found) if found > VERSION => {
                    return Err(StoreError::Postgres(format!(
                        "schema version {found} is newer than this afr knows ({VERSION})"
                    )))
                }
                Some(found) if found < VERSION => {
                    return Err(StoreError::Postgres(format!(
                        "schema version {found} is older than this afr's ({VERSION}); \
                         start `afr serve` once to migrate it"
                    )))
                }
                Some(_) => session.schema_ok = true,
            }
        }
        let params: Vec<Box<dyn ToSql + Sync + Send>> = values
            .into_iter()
            .map(|v| -> Box<dyn ToSql + Sync + Send> {
                match v {
                    QueryValue::Text(s) => Box::new(s),
                    QueryValue::Int(n) => Box::new(n),
                }
            })
            .collect();
        let refs: Vec<&(dyn ToSql + Sync)> = params
            .iter()
            .map(|p| p.as_ref() as &(dyn ToSql + Sync))
            .collect();
        session
            .run(wait, |c| async move { c.query(sql, &refs).await })
            .map_err(|e| StoreError::Postgres(format!("query failed: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_never_shows() {
        let t = PostgresTarget::from_url("postgres://afr:s3cret@127.0.0.1:5/usage", "PGURL")
            .expect("url");
        assert_eq!(format!("{t:?}"), "PostgresTarget($PGURL)");
        let e = PostgresTarget::from_url("postgres://afr:s3cret@host:notaport/db", "PGURL")
            .expect_err("bad port");
        assert!(!e.to_string().contains("s3cret"), "{e}");
        assert!(e.to_string().contains("$PGURL"), "{e}");
    }
}
