//! A fast path for the plain layout of keys files that `afr key new` writes.
//!
//! The `toml` crate needs about half a second for a 100 000-key (15 MB) file
//! on these machines; the design allows 200 ms for a reload. This reader
//! accepts only the narrow, unambiguous subset every generated or hand-written
//! keys file uses — `[defaults]`, `[[key]]`, `name = value` with plain basic
//! strings, integers, booleans and one-line string arrays, comments — and
//! returns `None` for anything else (escapes, datetimes, inline tables, dotted
//! or quoted keys, duplicates, unknown fields, wrong types). The caller then
//! parses with `toml`, which also produces the error message. The property
//! test below checks that both readers agree on every document the fast one
//! accepts.

use super::document::{Document, Entry, Val};

enum Value {
    Str(String),
    Int(i64),
    Bool(bool),
    Arr(Vec<String>),
}

#[derive(Default)]
struct Partial {
    at: usize,
    id: Option<Val<String>>,
    name: Option<Val<String>>,
    hash: Option<Val<String>>,
    rpm: Option<Val<i64>>,
    tpm: Option<Val<i64>>,
    max_concurrent: Option<Val<i64>>,
    enabled: Option<bool>,
    expires: Option<Val<String>>,
    models: Option<Val<Vec<String>>>,
}

impl Partial {
    fn finish(self) -> Option<Entry> {
        Some(Entry {
            at: self.at,
            id: self.id?,
            name: self.name?,
            hash: self.hash?,
            rpm: self.rpm,
            tpm: self.tpm,
            max_concurrent: self.max_concurrent,
            // Inline tables are outside the fast subset: `toml` reads budgets.
            budget: None,
            enabled: self.enabled,
            expires: self.expires,
            models: self.models,
        })
    }

    fn set(&mut self, name: &str, value: Value, at: usize) -> Option<()> {
        fn put<T>(slot: &mut Option<T>, v: T) -> Option<()> {
            if slot.is_some() {
                return None; // duplicate key: let toml report it
            }
            *slot = Some(v);
            Some(())
        }
        match (name, value) {
            ("id", Value::Str(v)) => put(&mut self.id, Val { v, at }),
            ("name", Value::Str(v)) => put(&mut self.name, Val { v, at }),
            ("hash", Value::Str(v)) => put(&mut self.hash, Val { v, at }),
            ("rpm", Value::Int(v)) => put(&mut self.rpm, Val { v, at }),
            ("tpm", Value::Int(v)) => put(&mut self.tpm, Val { v, at }),
            ("max_concurrent", Value::Int(v)) => put(&mut self.max_concurrent, Val { v, at }),
            ("enabled", Value::Bool(v)) => put(&mut self.enabled, v),
            ("expires", Value::Str(v)) => put(&mut self.expires, Val { v, at }),
            ("models", Value::Arr(v)) => put(&mut self.models, Val { v, at }),
            _ => None,
        }
    }
}

// One Section lives at a time; boxing the key would cost an allocation per
// key of a 100 000-key file for nothing.
#[allow(clippy::large_enum_variant)]
enum Section {
    Top,
    Defaults,
    Key(Partial),
}

/// Parses `text` if it is in the plain subset, else `None`.
pub(super) fn parse(text: &str) -> Option<Document> {
    let mut doc = Document::default();
    let mut section = Section::Top;
    let mut seen_defaults = false;
    let mut offset = 0;
    for raw in text.split_inclusive('\n') {
        let start = offset;
        offset += raw.len();
        let line = raw.strip_suffix('\n').unwrap_or(raw);
        let line = line.strip_suffix('\r').unwrap_or(line);
        let t = line.trim_start_matches([' ', '\t']);
        let indent = line.len() - t.len();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        if t.starts_with('[') {
            let header = strip_comment(t)?;
            let next = match header {
                "[[key]]" => Section::Key(Partial {
                    at: start + indent,
                    ..Partial::default()
                }),
                "[defaults]" if !seen_defaults => {
                    seen_defaults = true;
                    Section::Defaults
                }
                _ => return None,
            };
            if let Section::Key(p) = std::mem::replace(&mut section, next) {
                doc.keys.push(p.finish()?);
            }
            continue;
        }
        let (name, rest) = t.split_once('=')?;
        let name = name.trim_end_matches([' ', '\t']);
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
            return None;
        }
        let v = rest.trim_start_matches([' ', '\t']);
        let at = start + (line.len() - v.len());
        let (value, tail) = parse_value(v)?;
        strip_comment(tail).filter(|s| s.is_empty())?;
        match &mut section {
            Section::Top => return None,
            Section::Defaults => match (name, value) {
                ("rpm", Value::Int(v)) if doc.default_rpm.is_none() => {
                    doc.default_rpm = Some(Val { v, at })
                }
                ("tpm", Value::Int(v)) if doc.default_tpm.is_none() => {
                    doc.default_tpm = Some(Val { v, at })
                }
                ("max_concurrent", Value::Int(v)) if doc.default_max_concurrent.is_none() => {
                    doc.default_max_concurrent = Some(Val { v, at })
                }
                _ => return None,
            },
            Section::Key(p) => p.set(name, value, at)?,
        }
    }
    if let Section::Key(p) = section {
        doc.keys.push(p.finish()?);
    }
    Some(doc)
}

/// Drops a trailing `# comment` and whitespace; `None` if a `#` could be
/// inside a string (the caller only passes text after the value).
fn strip_comment(s: &str) -> Option<&str> {
    let s = match s.find('#') {
        Some(i) => &s[..i],
        None => s,
    };
    Some(s.trim_end_matches([' ', '\t']))
}

fn parse_value(s: &str) -> Option<(Value, &str)> {
    let first = *s.as_bytes().first()?;
    match first {
        b'"' => parse_str(s).map(|(v, rest)| (Value::Str(v), rest)),
        b'[' => {
            let mut rest = &s[1..];
            let mut items = Vec::new();
            loop {
                rest = rest.trim_start_matches([' ', '\t']);
                if let Some(r) = rest.strip_prefix(']') {
                    return Some((Value::Arr(items), r));
                }
                let (item, r) = parse_str(rest)?;
                items.push(item);
                rest = r.trim_start_matches([' ', '\t']);
                if let Some(r) = rest.strip_prefix(',') {
                    rest = r;
                } else if !rest.starts_with(']') {
                    return None;
                }
            }
        }
        b't' | b'f' => {
            let (word, rest) = split_word(s);
            match word {
                "true" => Some((Value::Bool(true), rest)),
                "false" => Some((Value::Bool(false), rest)),
                _ => None,
            }
        }
        b'0'..=b'9' => {
            let (word, rest) = split_word(s);
            if !word.bytes().all(|b| b.is_ascii_digit())
                || (word.len() > 1 && word.starts_with('0'))
            {
                return None; // underscores, floats, dates, leading zeros: toml decides
            }
            word.parse().ok().map(|v| (Value::Int(v), rest))
        }
        _ => None,
    }
}

fn split_word(s: &str) -> (&str, &str) {
    let end = s.find([' ', '\t', '#', ',', ']']).unwrap_or(s.len());
    s.split_at(end)
}

/// A basic string without escapes or control characters.
fn parse_str(s: &str) -> Option<(String, &str)> {
    let body = s.strip_prefix('"')?;
    let end = body.find('"')?;
    let content = &body[..end];
    if content
        .bytes()
        .any(|b| b == b'\\' || (b < 0x20 && b != b'\t') || b == 0x7f)
    {
        return None;
    }
    Some((content.to_owned(), &body[end + 1..]))
}

#[cfg(test)]
mod tests {
    use super::super::document::RawFile;
    use super::*;
    use proptest::prelude::*;

    fn slow(text: &str) -> Option<Document> {
        toml::from_str::<RawFile>(text).ok().map(Document::from)
    }

    #[test]
    fn plain_file_takes_the_fast_path() {
        let text = "# keys\n[defaults]\nrpm = 30 # per minute\n\n[[key]]\nid = \"a\"\nname = \"A # not a comment\"\n\
                    hash = \"sha256:00\"\nenabled = false\nmodels = [\"m1\", \"m2\",]\nexpires = \"2030-01-01T00:00:00Z\"\n";
        let fast = parse(text).expect("fast path");
        assert_eq!(Some(&fast), slow(text).as_ref());
        assert_eq!(fast.keys[0].name.v, "A # not a comment");
    }

    #[test]
    fn anything_unusual_falls_back() {
        for text in [
            "[[key]]\nid = \"a\\u0041\"\nname = \"n\"\nhash = \"h\"\n",
            "[[key]]\nid = 'a'\nname = \"n\"\nhash = \"h\"\n",
            "[[key]]\nid = \"a\"\nname = \"n\"\nhash = \"h\"\nexpires = 2030-01-01T00:00:00Z\n",
            "[[key]]\nid = \"a\"\nid = \"b\"\nname = \"n\"\nhash = \"h\"\n",
            "[[key]]\nid = \"a\"\nname = \"n\"\nhash = \"h\"\nrpm = 1_000\n",
            "[[key]]\nid = \"a\"\nname = \"n\"\nhash = \"h\"\nrpm = \"5\"\n",
            "[[key]]\nid = \"a\"\nname = \"n\"\n",
            "[[ key ]]\nid = \"a\"\nname = \"n\"\nhash = \"h\"\n",
            "rpm = 5\n",
            "[defaults]\nrpm = 1\n[defaults]\n",
            "[[key]]\nid = \"a\"\nname = \"n\"\nhash = \"h\"\nmodels = [\n\"x\"]\n",
            "[[key]]\nkey.id = \"a\"\n",
        ] {
            assert!(parse(text).is_none(), "{text}");
        }
    }

    fn word() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9 #._:-]{0,12}"
    }

    fn entry() -> impl Strategy<Value = String> {
        (
            word(),
            word(),
            word(),
            proptest::option::of(0i64..100_000),
            proptest::option::of(any::<bool>()),
            proptest::option::of(proptest::collection::vec(word(), 0..3)),
            "[ \t]{0,2}",
            proptest::option::of("# [a-z\"#]{0,5}"),
        )
            .prop_map(|(id, name, hash, rpm, enabled, models, ws, comment)| {
                let c = comment.map(|c| format!("{ws}{c}")).unwrap_or_default();
                let mut s = format!("[[key]]{c}\nid{ws}={ws}\"{id}\"{c}\nname = \"{name}\"\n{ws}hash = \"{hash}\"\n");
                if let Some(r) = rpm {
                    s.push_str(&format!("rpm = {r}{c}\n"));
                }
                if let Some(e) = enabled {
                    s.push_str(&format!("enabled = {e}\n"));
                }
                if let Some(m) = models {
                    let items: Vec<String> = m.iter().map(|x| format!("\"{x}\"")).collect();
                    s.push_str(&format!("models = [{}]{c}\n", items.join(&format!(",{ws}"))));
                }
                s
            })
    }

    proptest! {
        #[test]
        fn fast_and_toml_agree(rpm in proptest::option::of(0i64..1000), entries in proptest::collection::vec(entry(), 0..4), blank in "[\n]{0,2}") {
            let mut text = String::new();
            if let Some(r) = rpm {
                text.push_str(&format!("[defaults]\nrpm = {r}\n"));
            }
            for e in entries {
                text.push_str(&blank);
                text.push_str(&e);
            }
            let fast = parse(&text);
            prop_assert!(fast.is_some(), "fast path refused:\n{}", text);
            prop_assert_eq!(fast, slow(&text), "{}", text);
        }
    }
}
