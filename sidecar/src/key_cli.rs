//! `afr key new|list|disable`: manages the keys file that the nginx module
//! reads (format in `afr_core::keys`).
//!
//! Secrets come from the OS CSPRNG, are printed once and never stored: the file
//! gets only their SHA-256. Every edit is validated with the same parser the
//! module uses and written atomically (temp file + rename), so a running nginx
//! never hot-reloads a half-written or invalid file. Edits keep the operator's
//! comments and layout (`new` appends, `disable` edits one value in place).

use std::io::Write;
use std::path::{Path, PathBuf};

use afr_core::keys::{self, format_hash, KeyTable, MIN_TOKEN_CHARS, TOKEN_PREFIX};
use anyhow::{bail, Context};
use clap::{Args, Subcommand};

/// Base62 characters after `afr_` in a new key (~256 bits of entropy).
const TOKEN_CHARS: usize = 43;
const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Arguments of `afr key`.
#[derive(Args)]
pub struct KeyArgs {
    /// The keys file to read and edit.
    #[arg(long, global = true, default_value = "keys.toml")]
    file: PathBuf,
    #[command(subcommand)]
    command: KeyCommand,
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Create a key, append it to the file and print its secret once.
    New {
        /// Stable identifier (sent upstream as X-Afr-Key-Id; shown in logs and usage).
        #[arg(long)]
        id: String,
        /// Human-readable label.
        #[arg(long)]
        name: String,
        /// Requests per minute (default: the file's [defaults] rpm, else 60).
        #[arg(long)]
        rpm: Option<u32>,
        /// Expiry as an RFC 3339 date-time, e.g. 2027-01-01T00:00:00Z.
        #[arg(long)]
        expires: Option<String>,
        /// Comma-separated model allow-list (default: every model).
        #[arg(long, value_delimiter = ',')]
        models: Option<Vec<String>>,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Change a key's limits by id (takes effect within 2 s on a running nginx).
    Set {
        /// The key's id.
        id: String,
        /// Requests per minute.
        #[arg(long)]
        rpm: Option<u32>,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// List the keys in the file (never secrets: they are not stored).
    List,
    /// Disable a key by id (takes effect within 2 s on a running nginx).
    Disable {
        /// The key's id.
        id: String,
    },
}

/// The limits beyond `rpm` that `afr key new` and `afr key set` write.
#[derive(Args, Default)]
struct LimitArgs {
    /// Tokens per minute (prompt + completion), reserved before dispatch.
    #[arg(long)]
    tpm: Option<i64>,
    /// Spend allowed per --budget-per, in US dollars at the routes' prices.
    #[arg(long)]
    budget_usd: Option<f64>,
    /// The budget's period, in UTC: day or month.
    #[arg(long, default_value = "month", requires = "budget_usd")]
    budget_per: String,
    /// Requests in flight at once (streams included).
    #[arg(long)]
    max_concurrent: Option<i64>,
}

impl LimitArgs {
    /// Checks each flag with the keys file's own rules, naming the flag.
    fn check(&self) -> anyhow::Result<()> {
        if let Some(t) = self.tpm {
            keys::check_tpm(t).map_err(|e| anyhow::anyhow!("--tpm: {e}"))?;
        }
        if let Some(usd) = self.budget_usd {
            afr_core::limits::Budget::from_usd(Some(usd), &self.budget_per)
                .map_err(|e| anyhow::anyhow!("--budget-usd/--budget-per: {e}"))?;
        }
        if let Some(n) = self.max_concurrent {
            keys::check_max_concurrent(n).map_err(|e| anyhow::anyhow!("--max-concurrent: {e}"))?;
        }
        Ok(())
    }

    /// Sets the given limits on a key's table.
    fn apply(&self, entry: &mut toml_edit::Table) {
        if let Some(t) = self.tpm {
            entry["tpm"] = toml_edit::value(t);
        }
        if let Some(usd) = self.budget_usd {
            let mut budget = toml_edit::InlineTable::new();
            budget.insert("usd", usd.into());
            budget.insert("per", self.budget_per.as_str().into());
            entry["budget"] = toml_edit::value(budget);
        }
        if let Some(n) = self.max_concurrent {
            entry["max_concurrent"] = toml_edit::value(n);
        }
    }
}

/// Runs `afr key …`.
pub fn run(args: KeyArgs) -> anyhow::Result<()> {
    match args.command {
        KeyCommand::New {
            id,
            name,
            rpm,
            expires,
            models,
            limits,
        } => {
            let entry = NewKey {
                id: &id,
                name: &name,
                rpm,
                expires: expires.as_deref(),
                models: models.as_deref(),
                limits: &limits,
            };
            // Everything that can refuse the key is checked before its
            // secret exists: an error never follows a printed secret.
            check_new_key(&args.file, &entry)?;
            let token = generate_token()?;
            add_key(&args.file, &entry, &token)?;
            println!("{token}");
            eprintln!(
                "afr: key \"{id}\" added to {}. The secret above is shown only once: store it now.",
                args.file.display()
            );
            Ok(())
        }
        KeyCommand::Set { id, rpm, limits } => {
            if let Some(rpm) = rpm {
                keys::check_rpm(i64::from(rpm)).map_err(|e| anyhow::anyhow!("--rpm: {e}"))?;
            }
            limits.check()?;
            edit_key(&args.file, &id, |entry| {
                if let Some(rpm) = rpm {
                    entry["rpm"] = toml_edit::value(i64::from(rpm));
                }
                limits.apply(entry);
            })?;
            eprintln!("afr: key \"{id}\" updated in {}", args.file.display());
            Ok(())
        }
        KeyCommand::List => {
            let table = load(&args.file, &read_existing(&args.file)?)?;
            print!("{}", render_list(&table));
            Ok(())
        }
        KeyCommand::Disable { id } => {
            disable_key(&args.file, &id)?;
            eprintln!("afr: key \"{id}\" disabled in {}", args.file.display());
            Ok(())
        }
    }
}

/// Fields of a key being created.
struct NewKey<'a> {
    id: &'a str,
    name: &'a str,
    rpm: Option<u32>,
    expires: Option<&'a str>,
    models: Option<&'a [String]>,
    limits: &'a LimitArgs,
}

/// Checks the arguments of `afr key new` with the keys file's own rules
/// (`afr_core::keys`), and the file they go into, naming the flag at fault.
fn check_new_key(path: &Path, k: &NewKey<'_>) -> anyhow::Result<()> {
    keys::check_id(k.id).map_err(|e| anyhow::anyhow!("--id {:?}: {e}", k.id))?;
    if let Some(rpm) = k.rpm {
        keys::check_rpm(i64::from(rpm)).map_err(|e| anyhow::anyhow!("--rpm: {e}"))?;
    }
    if let Some(expires) = k.expires {
        keys::check_expires(expires).map_err(|e| anyhow::anyhow!("--expires: {e}"))?;
    }
    for m in k.models.unwrap_or_default() {
        keys::check_model(m.trim()).map_err(|e| anyhow::anyhow!("--models: {e}"))?;
    }
    k.limits.check()?;
    let table = load(path, &read_existing(path)?)
        .context("the keys file is invalid; fix it before adding keys")?;
    if let Some(other) = table.entries().iter().find(|e| e.id == k.id) {
        bail!(
            "--id: a key with id \"{}\" already exists ({}:{})",
            k.id,
            path.display(),
            other.line
        );
    }
    Ok(())
}

/// `afr_` + 43 base62 characters from the OS CSPRNG (rejection sampling, so
/// every character is uniform).
fn generate_token() -> anyhow::Result<String> {
    let mut out = String::with_capacity(TOKEN_PREFIX.len() + TOKEN_CHARS);
    out.push_str(TOKEN_PREFIX);
    let mut buf = [0u8; 64];
    while out.len() < TOKEN_PREFIX.len() + TOKEN_CHARS {
        getrandom::getrandom(&mut buf)
            .map_err(|e| anyhow::anyhow!("reading the OS random number generator: {e}"))?;
        for &b in &buf {
            // 248 = 4 · 62: bytes above it would bias the first characters.
            if b < 248 && out.len() < TOKEN_PREFIX.len() + TOKEN_CHARS {
                out.push(BASE62[usize::from(b % 62)] as char);
            }
        }
    }
    debug_assert!(out.len() - TOKEN_PREFIX.len() >= MIN_TOKEN_CHARS);
    Ok(out)
}

fn read_existing(path: &Path) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn load(path: &Path, text: &str) -> anyhow::Result<KeyTable> {
    Ok(KeyTable::parse(&path.display().to_string(), text)?)
}

fn quote(s: &str) -> String {
    toml_edit::Value::from(s).to_string().trim().to_owned()
}

fn entry_toml(k: &NewKey<'_>, token: &str) -> String {
    let mut s = format!(
        "[[key]]\nid = {}\nname = {}\nhash = {}\n",
        quote(k.id),
        quote(k.name),
        quote(&format_hash(token.as_bytes()))
    );
    if let Some(rpm) = k.rpm {
        s.push_str(&format!("rpm = {rpm}\n"));
    }
    s.push_str("enabled = true\n");
    if let Some(e) = k.expires {
        s.push_str(&format!("expires = {}\n", quote(e)));
    }
    if let Some(m) = k.models {
        let list: Vec<String> = m.iter().map(|x| quote(x.trim())).collect();
        s.push_str(&format!("models = [{}]\n", list.join(", ")));
    }
    let mut limits = toml_edit::Table::new();
    k.limits.apply(&mut limits);
    for (name, item) in limits.iter() {
        s.push_str(&format!("{name} = {}\n", item.to_string().trim()));
    }
    s
}

fn add_key(path: &Path, k: &NewKey<'_>, token: &str) -> anyhow::Result<()> {
    let old = read_existing(path)?;
    load(path, &old).context("the keys file is invalid; fix it before adding keys")?;
    let mut text = old;
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    if !text.is_empty() {
        text.push('\n');
    }
    text.push_str(&entry_toml(k, token));
    load(path, &text)?;
    write_atomically(path, &text)
}

fn disable_key(path: &Path, id: &str) -> anyhow::Result<()> {
    edit_key(path, id, |entry| entry["enabled"] = toml_edit::value(false))
}

/// Edits the key `id` in place (comments and layout kept), validating the
/// result with the file's own rules before it replaces the file.
fn edit_key(path: &Path, id: &str, edit: impl FnOnce(&mut toml_edit::Table)) -> anyhow::Result<()> {
    let text = read_existing(path)?;
    load(path, &text)?;
    let mut doc: toml_edit::DocumentMut = text
        .parse()
        .with_context(|| format!("parsing {}", path.display()))?;
    let keys = doc
        .get_mut("key")
        .and_then(|k| k.as_array_of_tables_mut())
        .with_context(|| format!("{} has no [[key]] entries", path.display()))?;
    let Some(entry) = keys
        .iter_mut()
        .find(|t| t.get("id").and_then(|v| v.as_str()) == Some(id))
    else {
        bail!("no key with id \"{id}\" in {}", path.display());
    };
    edit(entry);
    let new_text = doc.to_string();
    load(path, &new_text)?;
    write_atomically(path, &new_text)
}

/// Writes beside the target and renames over it, keeping the old file's mode.
fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .context("the keys file path has no file name")?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.afr-tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        if let Ok(meta) = std::fs::metadata(path) {
            std::fs::set_permissions(&tmp, meta.permissions())?;
            // Keep the owner and group too: a `root:www-data 0640` file rewritten
            // by `sudo afr key new` must stay readable by nginx's workers. Only
            // root may give a file away; anyone else already owns what they write.
            use std::os::unix::fs::MetadataExt;
            match std::os::unix::fs::fchown(&f, Some(meta.uid()), Some(meta.gid())) {
                Err(e) if e.kind() != std::io::ErrorKind::PermissionDenied => return Err(e),
                _ => {}
            }
        }
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))
}

fn render_list(table: &KeyTable) -> String {
    let mut out = format!(
        "{:<24} {:<28} {:>7} {:<8} {:<20} MODELS\n",
        "ID", "NAME", "RPM", "ENABLED", "EXPIRES"
    );
    for k in table.entries() {
        let expires = k
            .expires
            .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_else(|| "-".to_owned());
        out.push_str(&format!(
            "{:<24} {:<28} {:>7} {:<8} {:<20} {}\n",
            k.id,
            k.name,
            k.rpm,
            if k.enabled { "yes" } else { "no" },
            expires,
            k.models_header().unwrap_or_else(|| "*".to_owned())
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_key<'a>(id: &'a str, models: Option<&'a [String]>) -> NewKey<'a> {
        NewKey {
            id,
            name: "A \"quoted\" name",
            rpm: Some(5),
            expires: Some("2030-01-01T00:00:00Z"),
            models,
            limits: &NO_LIMITS,
        }
    }

    static NO_LIMITS: LimitArgs = LimitArgs {
        tpm: None,
        budget_usd: None,
        budget_per: String::new(),
        max_concurrent: None,
    };

    #[test]
    fn new_and_set_write_token_budget_and_concurrency_limits() {
        let dir = std::env::temp_dir().join(format!("afr-key-limits-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys.toml");
        std::fs::write(&path, "# kept\n").unwrap();
        let limits = LimitArgs {
            tpm: Some(5000),
            budget_usd: Some(2.5),
            budget_per: "day".into(),
            max_concurrent: Some(3),
        };
        add_key(
            &path,
            &NewKey {
                limits: &limits,
                ..new_key("a", None)
            },
            &generate_token().unwrap(),
        )
        .unwrap();
        let table = KeyTable::parse("k", &std::fs::read_to_string(&path).unwrap()).unwrap();
        let l = table.entries()[0].limits;
        assert_eq!((l.tpm, l.max_concurrent), (Some(5000), Some(3)));
        assert_eq!(l.budget.map(|b| b.nanos), Some(2_500_000_000));

        let set = LimitArgs {
            tpm: Some(100),
            budget_usd: Some(10.0),
            budget_per: "month".into(),
            max_concurrent: None,
        };
        edit_key(&path, "a", |e| set.apply(e)).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("# kept\n"));
        let l = KeyTable::parse("k", &text).unwrap().entries()[0].limits;
        assert_eq!((l.tpm, l.max_concurrent), (Some(100), Some(3)));
        assert_eq!(
            l.budget.map(|b| (b.nanos, b.per.as_str())),
            Some((10_000_000_000, "month"))
        );

        let bad = LimitArgs {
            tpm: Some(0),
            ..LimitArgs::default()
        };
        assert!(format!("{:#}", bad.check().unwrap_err()).starts_with("--tpm: must be between"));
        let week = LimitArgs {
            budget_usd: Some(1.0),
            budget_per: "week".into(),
            ..LimitArgs::default()
        };
        assert!(format!("{:#}", week.check().unwrap_err()).contains("per must be"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tokens_are_well_formed_and_distinct() {
        let a = generate_token().unwrap();
        let b = generate_token().unwrap();
        assert!(afr_core::keys::is_well_formed(a.as_bytes()));
        assert_eq!(a.len(), 4 + TOKEN_CHARS);
        assert_ne!(a, b);
    }

    #[test]
    fn new_list_disable_round_trip() {
        let dir = std::env::temp_dir().join(format!("afr-key-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys.toml");
        std::fs::write(&path, "# operator comment\n[defaults]\nrpm = 30\n").unwrap();
        let models = vec!["gpt-5-mini".to_owned(), "gpt-4o-mini".to_owned()];
        add_key(
            &path,
            &new_key("a", Some(&models)),
            "afr_0123456789abcdefghijABCDEFGHIJxyzXYZ",
        )
        .unwrap();
        add_key(
            &path,
            &NewKey {
                rpm: None,
                expires: None,
                ..new_key("b", None)
            },
            &generate_token().unwrap(),
        )
        .unwrap();
        let dup = add_key(&path, &new_key("a", None), &generate_token().unwrap()).unwrap_err();
        assert!(format!("{dup:#}").contains("duplicate id"), "{dup:#}");

        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("# operator comment\n"));
        assert!(!text.contains("afr_0123"), "secret must not be stored");
        let table = KeyTable::parse("k", &text).unwrap();
        assert!(table
            .find(b"afr_0123456789abcdefghijABCDEFGHIJxyzXYZ")
            .is_some());
        assert_eq!(table.entries()[1].rpm, 30);
        let listing = render_list(&table);
        assert!(
            listing.contains("gpt-5-mini,gpt-4o-mini") && listing.contains("2030-01-01T00:00:00Z")
        );

        disable_key(&path, "a").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let table = KeyTable::parse("k", &text).unwrap();
        assert!(!table.entries()[0].enabled && table.entries()[1].enabled);
        assert!(text.starts_with("# operator comment\n"));
        assert!(disable_key(&path, "nope").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
