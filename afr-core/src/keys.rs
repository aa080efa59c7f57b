//! The key table: parsing and validating `keys.toml`, and deciding whether a
//! bearer token may pass.
//!
//! The file holds only SHA-256 hashes of the secrets, so resolving a token is
//! one hash and one map probe. Every error in the file names the file, the line
//! and the field (`keys.toml:7: key[2].hash: …`), because operators edit it by
//! hand and `nginx -t` prints the message as is.
//!
//! ```toml
//! [defaults]
//! rpm = 60                      # requests per minute for keys without their own
//!
//! [[key]]
//! id = "team-a"                 # stable, sent upstream in X-Afr-Key-Id
//! name = "Team A backend"
//! hash = "sha256:<64 hex digits>"
//! rpm = 120                     # optional
//! enabled = true                # optional, default true
//! expires = "2027-01-01T00:00:00Z"  # optional, RFC 3339
//! models = ["gpt-5-mini"]       # optional allow-list; absent = every model
//! tpm = 100000                  # optional tokens per minute (also in [defaults])
//! budget = { usd = 50, per = "month" }  # optional spend per UTC day/month
//! max_concurrent = 8            # optional requests in flight (also in [defaults])
//! ```

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::ErrorBody;
use crate::limits::{Budget, KeyLimits, MAX_CONCURRENT, MAX_TPM};

mod document;
mod fast;

use document::{BudgetText, Document, Locator, RawFile, Val};

/// Every client key starts with this.
pub const TOKEN_PREFIX: &str = "afr_";
/// Minimum number of base62 characters after [`TOKEN_PREFIX`].
pub const MIN_TOKEN_CHARS: usize = 32;
/// Longest token we hash; anything longer is malformed (bounds the work per request).
pub const MAX_TOKEN_LEN: usize = 256;
/// Requests per minute when neither the key nor `[defaults]` says otherwise.
pub const DEFAULT_RPM: u32 = 60;
const MAX_RPM: i64 = 10_000_000;
const MAX_ID_LEN: usize = 128;

/// SHA-256 of a token, as stored in `keys.toml`.
pub type TokenHash = [u8; 32];

/// One key of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyEntry {
    /// Stable identifier, forwarded upstream and used in logs (never the secret).
    pub id: String,
    /// Human-readable label.
    pub name: String,
    /// SHA-256 of the secret.
    pub hash: TokenHash,
    /// Requests per minute.
    pub rpm: u32,
    /// Disabled keys are refused with 403.
    pub enabled: bool,
    /// Unix seconds from which the key is refused with 403.
    pub expires: Option<i64>,
    /// Model allow-list; `None` allows every model.
    pub models: Option<Vec<String>>,
    /// Tokens per minute, spend budget, requests in flight.
    pub limits: KeyLimits,
    /// 1-based line of the entry's `[[key]]` header.
    pub line: usize,
}

impl KeyEntry {
    /// The allow-list as the comma-separated `X-Afr-Models` value.
    pub fn models_header(&self) -> Option<String> {
        self.models.as_ref().map(|m| m.join(","))
    }

    /// Decides whether this (known) key may be used at `now_unix` seconds.
    pub fn check(&self, now_unix: i64) -> Result<(), Denial> {
        if !self.enabled {
            return Err(Denial::Disabled);
        }
        match self.expires {
            Some(t) if now_unix >= t => Err(Denial::Expired),
            _ => Ok(()),
        }
    }
}

/// A validated key file: entries plus an index by hash.
#[derive(Debug, Default)]
pub struct KeyTable {
    entries: Vec<KeyEntry>,
    by_hash: HashMap<TokenHash, u32>,
}

/// Why a request's key is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// No `Authorization` (or `x-api-key`) header.
    Missing,
    /// Not `Bearer afr_…` with enough base62 characters, or more than one header.
    Malformed,
    /// Well-formed but not in the table.
    Unknown,
    /// In the table with `enabled = false`.
    Disabled,
    /// In the table, past its `expires`.
    Expired,
}

impl Denial {
    /// HTTP status: 401 for the first three, 403 for the last two.
    pub fn status(self) -> u16 {
        match self {
            Denial::Missing | Denial::Malformed | Denial::Unknown => 401,
            Denial::Disabled | Denial::Expired => 403,
        }
    }

    /// The OpenAI error body the SDKs turn into `AuthenticationError` /
    /// `PermissionDeniedError`.
    pub fn body(self) -> ErrorBody {
        let (kind, code, msg) = match self {
            Denial::Missing => (
                "invalid_request_error",
                "invalid_api_key",
                "Missing API key: send 'Authorization: Bearer afr_...' (or 'x-api-key: afr_...').",
            ),
            Denial::Malformed => (
                "invalid_request_error",
                "invalid_api_key",
                "Malformed API key: expected one 'Authorization: Bearer afr_...' or 'x-api-key: afr_...' header.",
            ),
            Denial::Unknown => (
                "invalid_request_error",
                "invalid_api_key",
                "Incorrect API key provided.",
            ),
            Denial::Disabled => (
                "permission_denied",
                "key_disabled",
                "This API key has been disabled.",
            ),
            Denial::Expired => (
                "permission_denied",
                "key_expired",
                "This API key has expired.",
            ),
        };
        ErrorBody::new(kind, Some(code), msg)
    }
}

/// The 429 body for a key over its limit.
pub fn rate_limited_body(limit: u32) -> ErrorBody {
    ErrorBody::new(
        "requests",
        Some("rate_limit_exceeded"),
        format!("Rate limit reached: {limit} requests per minute. Retry after the time in the Retry-After header."),
    )
}

/// The 429 body for a key with `limit` requests already in flight
/// (`max_concurrent`): the same code as the other 429s, so SDKs raise
/// `RateLimitError`, with a message naming concurrency.
pub fn concurrency_limited_body(limit: u32) -> ErrorBody {
    ErrorBody::new(
        "requests",
        Some("rate_limit_exceeded"),
        format!("Concurrency limit reached: {limit} requests in flight at once for this key. Retry when one of them has finished."),
    )
}

/// Extracts the token from an `Authorization` value: `Bearer <token>`, scheme
/// case-insensitive (RFC 7235), token `afr_` + at least 32 base62 characters.
pub fn bearer_token(value: &[u8]) -> Result<&[u8], Denial> {
    const SCHEME: &[u8] = b"bearer ";
    if value.len() < SCHEME.len() || !value[..SCHEME.len()].eq_ignore_ascii_case(SCHEME) {
        return Err(Denial::Malformed);
    }
    let token = value[SCHEME.len()..].trim_ascii();
    if is_well_formed(token) {
        Ok(token)
    } else {
        Err(Denial::Malformed)
    }
}

/// True for `afr_` followed by 32..=252 ASCII alphanumerics.
pub fn is_well_formed(token: &[u8]) -> bool {
    token.len() <= MAX_TOKEN_LEN
        && token.len() >= TOKEN_PREFIX.len() + MIN_TOKEN_CHARS
        && token.starts_with(TOKEN_PREFIX.as_bytes())
        && token[TOKEN_PREFIX.len()..]
            .iter()
            .all(u8::is_ascii_alphanumeric)
}

/// SHA-256 of a token.
pub fn hash_token(token: &[u8]) -> TokenHash {
    Sha256::digest(token).into()
}

/// The `hash = "…"` value written to `keys.toml` for a token.
pub fn format_hash(token: &[u8]) -> String {
    format!("sha256:{}", hex::encode(hash_token(token)))
}

/// A problem in a keys file, located by file, line and field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct KeyFileError {
    /// Path as given to the parser.
    pub file: String,
    /// 1-based line, when the problem has one.
    pub line: Option<usize>,
    /// Dotted field path, e.g. `key[3].rpm`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for KeyFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(
                f,
                "{}:{}: {}: {}",
                self.file, line, self.field, self.message
            ),
            None => write!(f, "{}: {}: {}", self.file, self.field, self.message),
        }
    }
}

impl KeyTable {
    /// Reads and parses a keys file.
    pub fn load(path: &Path) -> Result<KeyTable, KeyFileError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| KeyFileError {
            file: file.clone(),
            line: None,
            field: "(file)".to_owned(),
            message: format!("cannot read: {e}"),
        })?;
        KeyTable::parse(&file, &text)
    }

    /// Parses and validates the text of a keys file named `file`.
    pub fn parse(file: &str, text: &str) -> Result<KeyTable, KeyFileError> {
        let loc = Locator::new(file, text);
        let doc = match fast::parse(text) {
            Some(doc) => doc,
            None => Document::from(toml::from_str::<RawFile>(text).map_err(|e| {
                let at = e.span().map_or(0, |s| s.start);
                // serde quotes a value it could not read: a plaintext key
                // pasted into the wrong field must not reach `nginx -t` or a log.
                let message = crate::redact::mask_secrets(e.message().trim()).replace('\n', "; ");
                let mut err = loc.err(at, loc.field_at(at), message);
                if e.span().is_none() {
                    err.line = None;
                }
                err
            })?),
        };

        let default_rpm = match &doc.default_rpm {
            Some(r) => rpm_field(&loc, r, "defaults.rpm")?,
            None => DEFAULT_RPM,
        };
        let default_limits = KeyLimits {
            tpm: opt(&doc.default_tpm, |r| tpm_field(&loc, r, "defaults.tpm"))?,
            budget: opt(&doc.default_budget, |b| {
                budget_field(&loc, b, "defaults.budget")
            })?,
            max_concurrent: opt(&doc.default_max_concurrent, |r| {
                concurrent_field(&loc, r, "defaults.max_concurrent")
            })?,
        };

        let mut table = KeyTable {
            entries: Vec::with_capacity(doc.keys.len()),
            by_hash: HashMap::with_capacity(doc.keys.len()),
        };
        let mut ids: HashMap<String, usize> = HashMap::with_capacity(doc.keys.len());
        for (i, k) in doc.keys.into_iter().enumerate() {
            let line = loc.line_of(k.at);
            let f = |name: &str| format!("key[{}].{name}", i + 1);

            let id = &k.id.v;
            check_id(id).map_err(|message| loc.err(k.id.at, f("id"), message))?;
            if let Some(first) = ids.insert(id.clone(), line) {
                return Err(loc.err(
                    k.id.at,
                    f("id"),
                    format!("duplicate id \"{id}\" (first defined at line {first})"),
                ));
            }

            let hash = parse_hash(&k.hash.v).ok_or_else(|| {
                loc.err(
                    k.hash.at,
                    f("hash"),
                    "must be \"sha256:\" followed by 64 hex digits",
                )
            })?;
            if let Some(&other) = table.by_hash.get(&hash) {
                let first = &table.entries[other as usize];
                return Err(loc.err(
                    k.hash.at,
                    f("hash"),
                    format!(
                        "duplicate hash: same secret as key \"{}\" (line {})",
                        first.id, first.line
                    ),
                ));
            }

            let rpm = match &k.rpm {
                Some(r) => rpm_field(&loc, r, &f("rpm"))?,
                None => default_rpm,
            };
            let limits = KeyLimits {
                tpm: opt(&k.tpm, |r| tpm_field(&loc, r, &f("tpm")))?.or(default_limits.tpm),
                budget: opt(&k.budget, |b| budget_field(&loc, b, &f("budget")))?
                    .or(default_limits.budget),
                max_concurrent: opt(&k.max_concurrent, |r| {
                    concurrent_field(&loc, r, &f("max_concurrent"))
                })?
                .or(default_limits.max_concurrent),
            };
            let expires = match &k.expires {
                Some(v) => Some(
                    check_expires(&v.v).map_err(|message| loc.err(v.at, f("expires"), message))?,
                ),
                None => None,
            };
            let models = match k.models {
                Some(m) => {
                    if let Some(message) = m.v.iter().find_map(|s| check_model(s).err()) {
                        return Err(loc.err(m.at, f("models"), message));
                    }
                    Some(m.v)
                }
                None => None,
            };

            let index = table.entries.len() as u32;
            table.by_hash.insert(hash, index);
            table.entries.push(KeyEntry {
                id: k.id.v,
                name: k.name.v,
                hash,
                rpm,
                enabled: k.enabled.unwrap_or(true),
                expires,
                models,
                limits,
                line,
            });
        }
        Ok(table)
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the file defines no key.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// All keys in file order.
    pub fn entries(&self) -> &[KeyEntry] {
        &self.entries
    }

    /// Index of the key with this SHA-256, if any.
    pub fn find_hash(&self, hash: &TokenHash) -> Option<u32> {
        self.by_hash.get(hash).copied()
    }

    /// Index of the key whose secret is `token` (one hash, one probe).
    pub fn find(&self, token: &[u8]) -> Option<u32> {
        self.find_hash(&hash_token(token))
    }

    /// The key at an index returned by [`KeyTable::find`].
    pub fn get(&self, index: u32) -> Option<&KeyEntry> {
        self.entries.get(index as usize)
    }
}

fn rpm_field(loc: &Locator<'_>, r: &Val<i64>, field: &str) -> Result<u32, KeyFileError> {
    check_rpm(r.v).map_err(|message| loc.err(r.at, field, message))
}

fn opt<T, U, E>(v: &Option<T>, f: impl FnOnce(&T) -> Result<U, E>) -> Result<Option<U>, E> {
    v.as_ref().map(f).transpose()
}

fn tpm_field(loc: &Locator<'_>, r: &Val<i64>, field: &str) -> Result<u64, KeyFileError> {
    check_tpm(r.v).map_err(|message| loc.err(r.at, field, message))
}

fn concurrent_field(loc: &Locator<'_>, r: &Val<i64>, field: &str) -> Result<u32, KeyFileError> {
    check_max_concurrent(r.v).map_err(|message| loc.err(r.at, field, message))
}

fn budget_field(
    loc: &Locator<'_>,
    b: &Val<BudgetText>,
    field: &str,
) -> Result<Budget, KeyFileError> {
    Budget::from_usd(b.v.usd, &b.v.per).map_err(|message| loc.err(b.at, field, message))
}

/// Checks a tokens-per-minute limit (1 to 10 000 000 000).
pub fn check_tpm(tpm: i64) -> Result<u64, String> {
    match tpm {
        v @ 1..=MAX_TPM => Ok(v as u64),
        v => Err(format!("must be between 1 and {MAX_TPM}, got {v}")),
    }
}

/// Checks a requests-in-flight limit (1 to 1 000 000).
pub fn check_max_concurrent(n: i64) -> Result<u32, String> {
    match n {
        v @ 1..=MAX_CONCURRENT => Ok(v as u32),
        v => Err(format!("must be between 1 and {MAX_CONCURRENT}, got {v}")),
    }
}

// The checks below are the keys file's rules for one value, shared with
// `afr key new` so a key is refused before its secret exists, never after.

/// Checks a key id: 1-128 characters of `A-Z a-z 0-9 . _ - : @`.
pub fn check_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-:@".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "must be 1-{MAX_ID_LEN} characters of A-Z a-z 0-9 . _ - : @"
        ))
    }
}

/// Checks a requests-per-minute limit (1 to 10 000 000).
pub fn check_rpm(rpm: i64) -> Result<u32, String> {
    match rpm {
        v @ 1..=MAX_RPM => Ok(v as u32),
        v => Err(format!("must be between 1 and {MAX_RPM}, got {v}")),
    }
}

/// Parses an expiry (RFC 3339 with offset) into unix seconds.
pub fn check_expires(text: &str) -> Result<i64, String> {
    parse_expires(text).ok_or_else(|| {
        "must be an RFC 3339 date-time with offset, e.g. \"2027-01-01T00:00:00Z\"".to_owned()
    })
}

/// Checks one model name of an allow-list (it travels in a comma-separated header).
pub fn check_model(name: &str) -> Result<(), String> {
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic() && b != b',') {
        Err(format!(
            "invalid model name {name:?}: must be non-empty, printable, without commas or spaces"
        ))
    } else {
        Ok(())
    }
}

fn parse_hash(s: &str) -> Option<TokenHash> {
    let hex_part = s.strip_prefix("sha256:")?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut out).ok()?;
    Some(out)
}

fn parse_expires(text: &str) -> Option<i64> {
    let t =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    Some(t.unix_timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "afr_0123456789abcdefghijABCDEFGHIJxyz";

    fn entry(id: &str, token: &str, extra: &str) -> String {
        format!(
            "[[key]]\nid = \"{id}\"\nname = \"n\"\nhash = \"{}\"\n{extra}\n",
            format_hash(token.as_bytes())
        )
    }

    fn err(text: &str) -> String {
        KeyTable::parse("keys.toml", text).unwrap_err().to_string()
    }

    #[test]
    fn parses_defaults_and_fields() {
        let text = format!(
            "[defaults]\nrpm = 30\n{}{}",
            entry("a", TOKEN, ""),
            entry(
                "b",
                &format!("{TOKEN}b"),
                "rpm = 5\nenabled = false\nexpires = 2027-01-01T00:00:00Z\nmodels = [\"m1\", \"m2\"]"
            )
        );
        let t = KeyTable::parse("k", &text).unwrap();
        assert_eq!(t.len(), 2);
        let a = t.get(t.find(TOKEN.as_bytes()).unwrap()).unwrap();
        assert_eq!(
            (a.id.as_str(), a.rpm, a.enabled, a.line),
            ("a", 30, true, 3)
        );
        let b = &t.entries()[1];
        assert_eq!(
            (b.rpm, b.enabled, b.expires),
            (5, false, Some(1_798_761_600))
        );
        assert_eq!(b.models_header().as_deref(), Some("m1,m2"));
        assert_eq!(b.check(0), Err(Denial::Disabled));
    }

    #[test]
    fn default_rpm_is_60_and_empty_file_is_fine() {
        assert!(KeyTable::parse("k", "").unwrap().is_empty());
        let t = KeyTable::parse("k", &entry("a", TOKEN, "")).unwrap();
        assert_eq!(t.entries()[0].rpm, 60);
    }

    #[test]
    fn errors_never_quote_a_pasted_key_or_its_line() {
        // The plaintext key pasted where a boolean belongs, and on an unterminated line.
        for extra in [
            format!("enabled = \"{TOKEN}\""),
            format!("name2 = \"{TOKEN}"),
        ] {
            let e = err(&entry("a", TOKEN, &extra));
            assert!(e.starts_with("keys.toml:5: "), "{e}");
            assert!(!e.contains(&TOKEN[4..]), "{e}");
        }
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let two = format!(
            "{}{}",
            entry("a", TOKEN, ""),
            entry("a", &format!("{TOKEN}x"), "")
        );
        assert_eq!(
            err(&two),
            "keys.toml:7: key[2].id: duplicate id \"a\" (first defined at line 1)"
        );
        let dup_hash = format!("{}{}", entry("a", TOKEN, ""), entry("b", TOKEN, ""));
        assert!(
            err(&dup_hash).starts_with("keys.toml:9: key[2].hash: duplicate hash"),
            "{}",
            err(&dup_hash)
        );
        let bad_hash = "[[key]]\nid = \"a\"\nname = \"n\"\nhash = \"md5:00\"\n";
        assert!(err(bad_hash).starts_with("keys.toml:4: key[1].hash: must be"));
        assert!(err(&entry("a", TOKEN, "rpm = 0"))
            .starts_with("keys.toml:5: key[1].rpm: must be between"));
        assert!(err(&entry("a", TOKEN, "expires = \"soon\""))
            .starts_with("keys.toml:5: key[1].expires:"));
        let wrong_type = err(&entry("a", TOKEN, "rpm = \"many\""));
        assert!(
            wrong_type.starts_with("keys.toml:5: key[1].rpm: "),
            "{wrong_type}"
        );
        let unknown = err(&format!(
            "{}\n[[key]]\nid = \"b\"\nrpmm = 3\n",
            entry("a", TOKEN, "")
        ));
        assert!(
            unknown.contains("keys.toml:9: key[2].rpmm: ") && unknown.contains("rpmm"),
            "{unknown}"
        );
        let missing = err("[[key]]\nid = \"a\"\nname = \"n\"\n");
        assert!(
            missing.starts_with("keys.toml:1: key[1]") && missing.contains("hash"),
            "{missing}"
        );
        let syntax = err("[[key]\nid = 1\n");
        assert!(syntax.starts_with("keys.toml:1: "), "{syntax}");
        assert!(err(&entry("a b", TOKEN, "")).starts_with("keys.toml:2: key[1].id: "));
        assert!(err(&entry("a", TOKEN, "models = [\"a,b\"]"))
            .starts_with("keys.toml:5: key[1].models: "));
    }

    #[test]
    fn bearer_parsing() {
        let hdr = format!("Bearer {TOKEN}");
        assert_eq!(bearer_token(hdr.as_bytes()), Ok(TOKEN.as_bytes()));
        assert_eq!(
            bearer_token(format!("bearer  {TOKEN} ").as_bytes()),
            Ok(TOKEN.as_bytes())
        );
        for bad in [
            "Bearer",
            "Bearer ",
            "Basic abc",
            "Bearer afr_short",
            "Bearer sk-0123456789abcdefghijABCDEFGHIJxyz",
        ] {
            assert_eq!(
                bearer_token(bad.as_bytes()),
                Err(Denial::Malformed),
                "{bad}"
            );
        }
        assert_eq!(
            bearer_token(b"Bearer afr_0123456789abcdefghijABCDEFGHIJ\xff\xfe"),
            Err(Denial::Malformed)
        );
        let long = format!("Bearer afr_{}", "a".repeat(10_000));
        assert_eq!(bearer_token(long.as_bytes()), Err(Denial::Malformed));
    }

    #[test]
    fn denials_map_to_openai_errors() {
        assert_eq!(Denial::Unknown.status(), 401);
        assert_eq!(Denial::Unknown.body().code, Some("invalid_api_key"));
        assert_eq!(Denial::Expired.status(), 403);
        assert!(Denial::Expired.body().message.contains("expired"));
        assert!(Denial::Disabled.body().message.contains("disabled"));
        let e = KeyEntry {
            expires: Some(100),
            ..KeyTable::parse("k", &entry("a", TOKEN, ""))
                .unwrap()
                .entries()[0]
                .clone()
        };
        assert_eq!(e.check(99), Ok(()));
        assert_eq!(e.check(100), Err(Denial::Expired));
        assert_eq!(rate_limited_body(5).kind, "requests");
        let c = concurrency_limited_body(3);
        assert_eq!(c.code, Some("rate_limit_exceeded"));
        assert!(c
            .message
            .contains("Concurrency limit reached: 3 requests in flight"));
    }

    #[test]
    fn token_budget_and_concurrency_limits() {
        let text = format!(
            "[defaults]\ntpm = 1000\nmax_concurrent = 4\n{}{}",
            entry("a", TOKEN, ""),
            entry(
                "b",
                &format!("{TOKEN}b"),
                "tpm = 50\nmax_concurrent = 1\nbudget = { usd = 2.5, per = \"day\" }"
            )
        );
        let t = KeyTable::parse("k", &text).unwrap();
        let (a, b) = (&t.entries()[0].limits, &t.entries()[1].limits);
        assert_eq!(
            (a.tpm, a.max_concurrent, a.budget),
            (Some(1000), Some(4), None)
        );
        assert_eq!((b.tpm, b.max_concurrent), (Some(50), Some(1)));
        assert_eq!(b.budget.map(|b| b.nanos), Some(2_500_000_000));
        let none = KeyTable::parse("k", &entry("a", TOKEN, "")).unwrap();
        assert_eq!(none.entries()[0].limits, KeyLimits::default());
        let with_default_budget = format!(
            "[defaults]\nbudget = {{ usd = 10, per = \"month\" }}\n{}",
            entry("a", TOKEN, "")
        );
        let t = KeyTable::parse("k", &with_default_budget).unwrap();
        assert_eq!(
            t.entries()[0].limits.budget.map(|b| b.nanos),
            Some(10_000_000_000)
        );
    }

    #[test]
    fn limit_errors_name_file_line_and_field() {
        assert_eq!(
            err(&entry("a", TOKEN, "tpm = 0")),
            "keys.toml:5: key[1].tpm: must be between 1 and 10000000000, got 0"
        );
        assert!(err(&entry("a", TOKEN, "max_concurrent = -1"))
            .starts_with("keys.toml:5: key[1].max_concurrent: must be between"));
        let per = err(&entry("a", TOKEN, "budget = { usd = 5, per = \"week\" }"));
        assert!(
            per.starts_with("keys.toml:5: key[1].budget: per must be"),
            "{per}"
        );
        let usd = err(&entry(
            "a",
            TOKEN,
            "budget = { usd = \"5\", per = \"day\" }",
        ));
        assert!(
            usd.starts_with("keys.toml:5: key[1].budget: usd must be"),
            "{usd}"
        );
        let unknown = err(&entry(
            "a",
            TOKEN,
            "budget = { dollars = 5, per = \"day\" }",
        ));
        assert!(
            unknown.starts_with("keys.toml:5: key[1].budget"),
            "{unknown}"
        );
        assert!(err("[defaults]\ntpm = 0\n").starts_with("keys.toml:2: defaults.tpm: "));
    }
}

#[cfg(test)]
mod timing {
    use super::*;

    /// `cargo test --release -p afr-core -- --ignored --nocapture parse_100k`
    #[test]
    #[ignore = "timing, not a test"]
    fn parse_100k_keys() {
        let mut text = String::from("[defaults]\nrpm = 60\n");
        for i in 0..100_000 {
            text.push_str(&format!(
                "\n[[key]]\nid = \"user-{i:06}\"\nname = \"test key {i}\"\nhash = \"{}\"\nenabled = true\n",
                format_hash(format!("afr_{i:040}").as_bytes())
            ));
        }
        let t = std::time::Instant::now();
        let v: toml::Table = toml::from_str(&text).unwrap();
        eprintln!("plain toml::Table: {:?}", t.elapsed());
        drop(v);
        let t = std::time::Instant::now();
        let d = fast::parse(&text).unwrap();
        eprintln!("fast path reader: {:?}", t.elapsed());
        drop(d);
        let t0 = std::time::Instant::now();
        let table = KeyTable::parse("k", &text).unwrap();
        let took = t0.elapsed();
        let t1 = std::time::Instant::now();
        drop(table);
        eprintln!(
            "parse {} bytes: {:?}, drop: {:?}",
            text.len(),
            took,
            t1.elapsed()
        );
    }
}
