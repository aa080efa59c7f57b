//! `afr usage`: sums of recorded usage as an aligned table, or JSON for
//! scripts. Reads the database only; never creates or migrates it.
//!
//! The database is the one `afr serve` writes: `--db`, else the `[usage]` of
//! `--config` (or of [`DEFAULT_CONFIG`] when it exists): with `backend =
//! "postgres"` the PostgreSQL database whose URL is in the environment
//! variable `postgres_url_env` names, else the SQLite file `path`; else the
//! sidecar's default (`/var/lib/afr/usage.db`). A relative path is taken from
//! the current directory, as `afr serve` does.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use afr_core::config::UsageConfig;
use anyhow::Context;
use serde::Serialize;

use super::time_arg::{format_ms, now_ms, parse_time_arg};
use super::{GroupBy, PostgresTarget, UsageQuery, UsageReader, UsageRow};

/// The config `afr serve` runs with (packaging/afr/debian/afr.service); read when
/// neither `--db` nor `--config` is given and it exists.
pub const DEFAULT_CONFIG: &str = "/etc/afr/sidecar.toml";

/// Report recorded usage, summed by key, model, provider and/or day.
#[derive(Debug, Clone, clap::Args)]
pub struct UsageArgs {
    /// The usage database [default: usage.path of the config, else /var/lib/afr/usage.db]
    #[arg(long, value_name = "PATH", conflicts_with = "config")]
    pub db: Option<PathBuf>,
    /// Read the database this sidecar config's [usage] names (SQLite path, or PostgreSQL through its URL variable) [default: /etc/afr/sidecar.toml if present]
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Only this key id
    #[arg(long, value_name = "ID")]
    pub key: Option<String>,
    /// Only this model
    #[arg(long, value_name = "MODEL")]
    pub model: Option<String>,
    /// From this time on: a duration ago (24h, 7d), an RFC 3339 time, or a date
    #[arg(long, value_name = "WHEN")]
    pub since: Option<String>,
    /// Before this time (same forms as --since)
    #[arg(long, value_name = "WHEN")]
    pub until: Option<String>,
    /// Group by these columns, comma-separated [default: key,model]
    #[arg(long, value_name = "key|model|provider|day", value_delimiter = ',')]
    pub by: Vec<GroupBy>,
    /// Print JSON instead of a table
    #[arg(long)]
    pub json: bool,
}

/// Runs `afr usage`.
pub fn run(args: UsageArgs) -> anyhow::Result<()> {
    let now = now_ms();
    let query = build_query(&args, now)?;
    let reader = match postgres_env(
        args.db.as_deref(),
        args.config.as_deref(),
        Path::new(DEFAULT_CONFIG),
    )? {
        Some((env, ca_file)) => {
            let target = PostgresTarget::from_env(&env)?;
            let tls = crate::tls::client_config(ca_file.as_deref(), "usage.postgres_ca_file")?;
            UsageReader::postgres(target.with_tls(tls))?
        }
        None => UsageReader::open(&db_path(
            args.db.as_deref(),
            args.config.as_deref(),
            Path::new(DEFAULT_CONFIG),
        )?)?,
    };
    let rows = reader.query(&query)?;
    let mut out = io::stdout().lock();
    if args.json {
        let body = JsonReport {
            object: "list",
            since: query.since_ms.map(format_ms),
            until: query.until_ms.map(format_ms),
            by: &query.group_by,
            data: &rows,
        };
        serde_json::to_writer_pretty(&mut out, &body)?;
        writeln!(out)?;
    } else {
        out.write_all(render_table(&query.group_by, &rows).as_bytes())?;
    }
    Ok(())
}

/// `afr usage --json`, fields in this order (a struct rather than a
/// `serde_json::Value`, whose map would sort them).
#[derive(Serialize)]
struct JsonReport<'a> {
    object: &'static str,
    since: Option<String>,
    until: Option<String>,
    by: &'a [GroupBy],
    data: &'a [UsageRow],
}

/// The [`UsageQuery`] the flags ask for, relative times read against `now_ms`.
pub fn build_query(args: &UsageArgs, now_ms: i64) -> anyhow::Result<UsageQuery> {
    let time = |flag: &str, value: &Option<String>| -> anyhow::Result<Option<i64>> {
        value
            .as_deref()
            .map(|v| parse_time_arg(v, now_ms).map_err(|e| anyhow::anyhow!("--{flag}: {e}")))
            .transpose()
    };
    let since_ms = time("since", &args.since)?;
    let until_ms = time("until", &args.until)?;
    if let (Some(since), Some(until)) = (since_ms, until_ms) {
        anyhow::ensure!(
            since < until,
            "--since ({}) must be before --until ({})",
            format_ms(since),
            format_ms(until)
        );
    }
    let mut group_by = Vec::new();
    for g in &args.by {
        if !group_by.contains(g) {
            group_by.push(*g);
        }
    }
    if group_by.is_empty() {
        group_by = vec![GroupBy::Key, GroupBy::Model];
    }
    Ok(UsageQuery {
        key_id: args.key.clone(),
        model: args.model.clone(),
        since_ms,
        until_ms,
        group_by,
    })
}

/// The database to read: `db`, else `[usage] path` of `config`, else of
/// `default_config` when that file exists, else the sidecar's default path.
pub fn db_path(
    db: Option<&Path>,
    config: Option<&Path>,
    default_config: &Path,
) -> anyhow::Result<PathBuf> {
    if let Some(db) = db {
        return Ok(db.to_owned());
    }
    let config = match config {
        Some(config) => config,
        None if default_config.exists() => default_config,
        None => return Ok(UsageConfig::default().path),
    };
    let text = std::fs::read_to_string(config)
        .with_context(|| format!("reading {} (or pass --db PATH)", config.display()))?;
    Ok(usage_path_from_config(&text, config)?.unwrap_or_else(|| UsageConfig::default().path))
}

/// The environment variable holding the PostgreSQL URL when the config
/// `afr usage` reads (as [`db_path`] picks it) says `backend = "postgres"`;
/// `None` for SQLite.
pub fn postgres_env(
    db: Option<&Path>,
    config: Option<&Path>,
    default_config: &Path,
) -> anyhow::Result<Option<(String, Option<PathBuf>)>> {
    if db.is_some() {
        return Ok(None);
    }
    let config = match config {
        Some(config) => config,
        None if default_config.exists() => default_config,
        None => return Ok(None),
    };
    let text = std::fs::read_to_string(config)
        .with_context(|| format!("reading {} (or pass --db PATH)", config.display()))?;
    let Some(usage) = usage_table(&text, config)? else {
        return Ok(None);
    };
    let string = |field: &str| -> anyhow::Result<Option<String>> {
        usage
            .get(field)
            .map(|v| {
                v.as_str().map(str::to_owned).with_context(|| {
                    format!("{}: usage.{field}: expected a string", config.display())
                })
            })
            .transpose()
    };
    match string("backend")?.as_deref() {
        None | Some("sqlite") => Ok(None),
        Some("postgres") => {
            let env = string("postgres_url_env")?
                .unwrap_or_else(|| UsageConfig::default().postgres_url_env);
            Ok(Some((env, string("postgres_ca_file")?.map(PathBuf::from))))
        }
        Some(other) => anyhow::bail!(
            "{}: usage.backend: `{other}` is not a backend: expected sqlite or postgres",
            config.display()
        ),
    }
}

/// The `[usage]` table of a sidecar config, if any.
fn usage_table(text: &str, config: &Path) -> anyhow::Result<Option<toml::Table>> {
    // Not `with_context`: the toml error's Display quotes the offending source
    // line, which may be `secret = "…"`.
    let doc: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        anyhow::anyhow!(
            "{}: not valid TOML: {}",
            config.display(),
            afr_core::config::describe_toml_error(text, e.span(), e.message())
        )
    })?;
    match doc.get("usage") {
        None => Ok(None),
        Some(usage) => Ok(Some(
            usage
                .as_table()
                .with_context(|| format!("{}: usage: expected a table", config.display()))?
                .clone(),
        )),
    }
}

/// `[usage] path` of a sidecar config, read leniently: every other table and
/// key is ignored, so the CLI keeps working whatever else the file holds.
fn usage_path_from_config(text: &str, config: &Path) -> anyhow::Result<Option<PathBuf>> {
    let Some(usage) = usage_table(text, config)? else {
        return Ok(None);
    };
    let path = usage.get("path");
    let Some(path) = path else {
        return Ok(None);
    };
    let path = path
        .as_str()
        .with_context(|| format!("{}: usage.path: expected a string", config.display()))?;
    Ok(Some(PathBuf::from(path)))
}

/// An aligned table: group columns left-aligned, counts right-aligned, and a
/// total line when there is more than one row. Hand-written because it is a
/// dozen lines; a table crate would bring more than it saves.
pub fn render_table(group_by: &[GroupBy], rows: &[UsageRow]) -> String {
    if rows.is_empty() {
        return "no usage recorded for this selection\n".to_owned();
    }
    let mut header: Vec<String> = group_by.iter().map(|g| g.as_str().to_uppercase()).collect();
    let counts = [
        "REQUESTS",
        "PROMPT",
        "CACHED",
        "CACHE_WRITE",
        "COMPLETION",
        "REASONING",
        "TOTAL",
        "ESTIMATED",
        "ERRORS",
        "COST_USD",
    ];
    header.extend(counts.iter().map(|s| (*s).to_owned()));
    let line = |groups: Vec<String>, row: &UsageRow| -> Vec<String> {
        let mut cells = groups;
        cells.extend(
            [
                row.requests,
                row.prompt_tokens,
                row.cached_tokens,
                row.cache_write_5m_tokens + row.cache_write_1h_tokens,
                row.completion_tokens,
                row.reasoning_tokens,
                row.total_tokens,
                row.estimated_requests,
                row.errors,
            ]
            .iter()
            .map(u64::to_string),
        );
        // Requests on unpriced routes make the sum a lower bound: say so.
        let mark = if row.unpriced_requests > 0 { "+?" } else { "" };
        cells.push(format!("{:.6}{mark}", row.cost_usd));
        cells
    };
    let mut lines = vec![header];
    let mut total = UsageRow::default();
    for row in rows {
        let groups = group_by
            .iter()
            .map(|g| match row.group(*g) {
                Some("") => "-".to_owned(),
                Some(v) => v.to_owned(),
                None => String::new(),
            })
            .collect();
        lines.push(line(groups, row));
        total.requests += row.requests;
        total.prompt_tokens += row.prompt_tokens;
        total.cached_tokens += row.cached_tokens;
        total.cache_write_5m_tokens += row.cache_write_5m_tokens;
        total.cache_write_1h_tokens += row.cache_write_1h_tokens;
        total.reasoning_tokens += row.reasoning_tokens;
        total.completion_tokens += row.completion_tokens;
        total.total_tokens += row.total_tokens;
        total.estimated_requests += row.estimated_requests;
        total.errors += row.errors;
        total.cost_usd += row.cost_usd;
        total.unpriced_requests += row.unpriced_requests;
    }
    if rows.len() > 1 && !group_by.is_empty() {
        let mut groups = vec![String::new(); group_by.len()];
        groups[0] = "(total)".to_owned();
        lines.push(line(groups, &total));
    }
    let columns = lines[0].len();
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            lines
                .iter()
                .map(|l| l[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for cells in &lines {
        let mut text = String::new();
        for (c, cell) in cells.iter().enumerate() {
            if c > 0 {
                text.push_str("  ");
            }
            let pad = widths[c] - cell.chars().count();
            if c < group_by.len() {
                text.push_str(cell);
                text.push_str(&" ".repeat(pad));
            } else {
                text.push_str(&" ".repeat(pad));
                text.push_str(cell);
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: UsageArgs,
    }

    fn args(argv: &[&str]) -> UsageArgs {
        let mut full = vec!["afr-usage"];
        full.extend_from_slice(argv);
        Cli::try_parse_from(full).expect("parse").args
    }

    const NOW: i64 = 1_795_600_800_000;

    #[test]
    fn flags_become_a_query() {
        let a = args(&[
            "--key",
            "k",
            "--model",
            "m",
            "--since",
            "24h",
            "--by",
            "day,model,day",
        ]);
        let q = build_query(&a, NOW).expect("query");
        assert_eq!(q.key_id.as_deref(), Some("k"));
        assert_eq!(q.model.as_deref(), Some("m"));
        assert_eq!(q.since_ms, Some(NOW - 86_400_000));
        assert_eq!(q.until_ms, None);
        assert_eq!(q.group_by, vec![GroupBy::Day, GroupBy::Model]);
        let q = build_query(&args(&[]), NOW).expect("default");
        assert_eq!(q.group_by, vec![GroupBy::Key, GroupBy::Model]);
    }

    #[test]
    fn a_config_syntax_error_does_not_quote_the_secret_line() {
        let text = "[server]\nsecret = \"s3cr3t-Value-0123456789\n[usage]\npath = \"/x.db\"\n";
        let e = usage_path_from_config(text, Path::new("sidecar.toml")).expect_err("invalid");
        let shown = format!("{e:#}");
        assert!(
            shown.starts_with("sidecar.toml: not valid TOML: line 2, column "),
            "{shown}"
        );
        assert!(!shown.contains("s3cr3t"), "{shown}");
    }

    #[test]
    fn bad_flags_say_which() {
        let e = build_query(&args(&["--since", "soon"]), NOW).expect_err("since");
        assert!(
            format!("{e:#}").starts_with("--since: `soon` is not a time"),
            "{e:#}"
        );
        let e = build_query(&args(&["--since", "1h", "--until", "2h"]), NOW).expect_err("range");
        assert!(e.to_string().contains("must be before --until"), "{e}");
        let cli = Cli::try_parse_from(["x", "--by", "tier"]);
        assert!(cli.is_err());
        let cli = Cli::try_parse_from(["x", "--db", "a", "--config", "b"]);
        assert!(cli.is_err());
    }

    #[test]
    fn config_usage_path_is_read_leniently() {
        let cfg = Path::new("/etc/afr/sidecar.toml");
        let text = "listen = 'x'\n[usage]\npath = 'usage.db'\nflush_ms = 50\n[other]\nz = 1\n";
        assert_eq!(
            usage_path_from_config(text, cfg).expect("ok"),
            Some(PathBuf::from("usage.db"))
        );
        assert_eq!(usage_path_from_config("a = 1", cfg).expect("ok"), None);
        assert_eq!(usage_path_from_config("[usage]\n", cfg).expect("ok"), None);
        assert!(usage_path_from_config("[usage]\npath = 3\n", cfg).is_err());
        assert!(usage_path_from_config("usage = 1\n", cfg).is_err());
        assert!(usage_path_from_config("[usage", cfg).is_err());
    }

    #[test]
    fn a_postgres_config_names_its_url_variable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = dir.path().join("sidecar.toml");
        let absent = dir.path().join("absent.toml");
        let env = |text: &str| {
            std::fs::write(&cfg, text).expect("write");
            postgres_env(None, Some(&cfg), &absent)
        };
        assert_eq!(env("[usage]\npath = 'u.db'\n").expect("sqlite"), None);
        assert_eq!(env("[usage]\nbackend = 'sqlite'\n").expect("sqlite"), None);
        assert_eq!(
            env("[usage]\nbackend = 'postgres'\n").expect("default var"),
            Some(("AFR_USAGE_POSTGRES_URL".to_owned(), None))
        );
        assert_eq!(
            env("[usage]\nbackend = 'postgres'\npostgres_url_env = 'PG'\npostgres_ca_file = 'ca.pem'\n")
                .expect("var"),
            Some(("PG".to_owned(), Some(PathBuf::from("ca.pem"))))
        );
        let e = env("[usage]\nbackend = 'mysql'\n").expect_err("mysql");
        assert!(e.to_string().contains("usage.backend"), "{e}");
        // --db names a SQLite file whatever the config says.
        assert_eq!(
            postgres_env(Some(Path::new("x.db")), Some(&cfg), &absent).expect("db"),
            None
        );
    }

    #[test]
    fn db_path_prefers_db_then_config_then_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = dir.path().join("sidecar.toml");
        std::fs::write(&cfg, "[usage]\npath = '/srv/u.db'\n").expect("write");
        let absent = dir.path().join("absent.toml");
        let sidecar_default = UsageConfig::default().path;
        let db = Path::new("x.db");
        assert_eq!(db_path(Some(db), Some(&cfg), &cfg).expect("db"), db);
        assert_eq!(
            db_path(None, Some(&cfg), &absent).expect("cfg"),
            Path::new("/srv/u.db")
        );
        assert_eq!(
            db_path(None, None, &cfg).expect("default cfg"),
            Path::new("/srv/u.db")
        );
        assert_eq!(db_path(None, None, &absent).expect("none"), sidecar_default);
        let e = db_path(None, Some(&absent), &cfg).expect_err("missing config");
        assert!(e.to_string().contains("absent.toml"), "{e}");
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf/sidecar.toml");
        assert_eq!(
            db_path(None, Some(&shipped), &absent).expect("shipped"),
            Path::new("/var/lib/afr/usage.db")
        );
    }

    #[test]
    fn table_is_aligned_with_a_total() {
        let rows = [
            UsageRow {
                model: Some("gpt-4o-mini".into()),
                requests: 12,
                total_tokens: 1200,
                ..UsageRow::default()
            },
            UsageRow {
                model: Some("m".into()),
                requests: 3,
                total_tokens: 7,
                errors: 1,
                ..UsageRow::default()
            },
        ];
        let table = render_table(&[GroupBy::Model], &rows);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert!(lines[0].starts_with("MODEL        REQUESTS"), "{table}");
        assert!(lines[3].starts_with("(total)"), "{table}");
        // Right-aligned counts end in the same column.
        let ends: Vec<usize> = lines.iter().map(|l| l.len()).collect();
        assert!(ends.iter().all(|e| *e == ends[0]), "{table}");
        assert!(render_table(&[], &[]).contains("no usage"));
    }
}
