//! The keys file before validation: the serde view read by `toml`, the
//! reader-neutral [`Document`] that both it and the fast reader produce, and
//! the [`Locator`] that turns byte offsets into `file:line: field` errors.

use serde::Deserialize;
use toml::Spanned;

use super::KeyFileError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFile {
    defaults: Option<RawDefaults>,
    #[serde(default)]
    key: Vec<Spanned<RawKey>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDefaults {
    rpm: Option<Spanned<i64>>,
    tpm: Option<Spanned<i64>>,
    max_concurrent: Option<Spanned<i64>>,
    budget: Option<Spanned<RawBudget>>,
}

/// `budget = { usd = 50, per = "month" }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBudget {
    usd: toml::Value,
    per: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKey {
    id: Spanned<String>,
    name: Spanned<String>,
    hash: Spanned<String>,
    rpm: Option<Spanned<i64>>,
    tpm: Option<Spanned<i64>>,
    max_concurrent: Option<Spanned<i64>>,
    budget: Option<Spanned<RawBudget>>,
    enabled: Option<bool>,
    expires: Option<Spanned<toml::Value>>,
    models: Option<Spanned<Vec<String>>>,
}

/// A value and the byte offset where it starts, from either parser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Val<T> {
    pub(super) v: T,
    pub(super) at: usize,
}

impl<T> Val<T> {
    pub(super) fn from_spanned(s: Spanned<T>) -> Self {
        let at = s.span().start;
        Val {
            v: s.into_inner(),
            at,
        }
    }
}

/// One `[[key]]` table before validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Entry {
    pub(super) at: usize,
    pub(super) id: Val<String>,
    pub(super) name: Val<String>,
    pub(super) hash: Val<String>,
    pub(super) rpm: Option<Val<i64>>,
    pub(super) tpm: Option<Val<i64>>,
    pub(super) max_concurrent: Option<Val<i64>>,
    pub(super) budget: Option<Val<BudgetText>>,
    pub(super) enabled: Option<bool>,
    pub(super) expires: Option<Val<String>>,
    pub(super) models: Option<Val<Vec<String>>>,
}

/// A budget before validation: the amount as TOML wrote it (`None` when it
/// is not a number) and the period name.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct BudgetText {
    pub(super) usd: Option<f64>,
    pub(super) per: String,
}

// Budgets are never NaN here (TOML's `nan` reads as a float, and validation
// refuses it before anything compares), so equality is reflexive in practice.
impl Eq for BudgetText {}

fn budget(raw: Spanned<RawBudget>) -> Val<BudgetText> {
    let at = raw.span().start;
    let b = raw.into_inner();
    let usd = match b.usd {
        toml::Value::Integer(i) => Some(i as f64),
        toml::Value::Float(f) => Some(f),
        _ => None,
    };
    Val {
        v: BudgetText { usd, per: b.per },
        at,
    }
}

/// A keys file before validation.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(super) struct Document {
    pub(super) default_rpm: Option<Val<i64>>,
    pub(super) default_tpm: Option<Val<i64>>,
    pub(super) default_max_concurrent: Option<Val<i64>>,
    pub(super) default_budget: Option<Val<BudgetText>>,
    pub(super) keys: Vec<Entry>,
}

impl From<RawFile> for Document {
    fn from(raw: RawFile) -> Self {
        let (default_rpm, default_tpm, default_max_concurrent, default_budget) = match raw.defaults
        {
            Some(d) => (
                d.rpm.map(Val::from_spanned),
                d.tpm.map(Val::from_spanned),
                d.max_concurrent.map(Val::from_spanned),
                d.budget.map(budget),
            ),
            None => (None, None, None, None),
        };
        Document {
            default_rpm,
            default_tpm,
            default_max_concurrent,
            default_budget,
            keys: raw
                .key
                .into_iter()
                .map(|spanned| {
                    let at = spanned.span().start;
                    let k = spanned.into_inner();
                    Entry {
                        at,
                        id: Val::from_spanned(k.id),
                        name: Val::from_spanned(k.name),
                        hash: Val::from_spanned(k.hash),
                        rpm: k.rpm.map(Val::from_spanned),
                        tpm: k.tpm.map(Val::from_spanned),
                        max_concurrent: k.max_concurrent.map(Val::from_spanned),
                        budget: k.budget.map(budget),
                        enabled: k.enabled,
                        expires: k.expires.map(|e| {
                            let at = e.span().start;
                            let v = match e.into_inner() {
                                toml::Value::String(s) => s,
                                toml::Value::Datetime(d) => d.to_string(),
                                _ => String::new(), // rejected by validation
                            };
                            Val { v, at }
                        }),
                        models: k.models.map(Val::from_spanned),
                    }
                })
                .collect(),
        }
    }
}

pub(super) struct Locator<'a> {
    pub(super) file: &'a str,
    pub(super) text: &'a str,
    /// Byte offsets of every newline, so a line number is a binary search
    /// (counting from the start for each of 100 000 keys was quadratic).
    pub(super) newlines: Vec<usize>,
}

impl<'a> Locator<'a> {
    pub(super) fn new(file: &'a str, text: &'a str) -> Self {
        let newlines = text
            .bytes()
            .enumerate()
            .filter(|&(_, b)| b == b'\n')
            .map(|(i, _)| i)
            .collect();
        Locator {
            file,
            text,
            newlines,
        }
    }

    pub(super) fn line_of(&self, offset: usize) -> usize {
        self.newlines.partition_point(|&nl| nl < offset) + 1
    }

    pub(super) fn err(
        &self,
        at: usize,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> KeyFileError {
        KeyFileError {
            file: self.file.to_owned(),
            line: Some(self.line_of(at)),
            field: field.into(),
            message: message.into(),
        }
    }

    /// Names the field of a serde/TOML error from the text around it: the
    /// enclosing table header and the `name =` on the error's line.
    pub(super) fn field_at(&self, offset: usize) -> String {
        let end = offset.min(self.text.len());
        let before = &self.text[..end];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let line_end = self.text[line_start..]
            .find('\n')
            .map_or(self.text.len(), |i| line_start + i);
        let line = &self.text[line_start..line_end];
        let mut section = String::new();
        let mut keys = 0usize;
        for l in self.text[..line_start].lines().chain(std::iter::once(line)) {
            let t = l.trim();
            if t.starts_with("[[") && t.trim_start_matches("[[").trim_start().starts_with("key") {
                keys += 1;
                section = format!("key[{keys}]");
            } else if t.starts_with('[') {
                section = t
                    .trim_matches(|c| c == '[' || c == ']' || c == ' ')
                    .to_owned();
            }
        }
        let name = line
            .split_once('=')
            .map(|(k, _)| k.trim().trim_matches('"').to_owned());
        match (section.is_empty(), name) {
            (false, Some(n)) if !n.starts_with('[') => format!("{section}.{n}"),
            (false, _) => section,
            (true, Some(n)) if !n.starts_with('[') => n,
            _ => "(file)".to_owned(),
        }
    }
}
