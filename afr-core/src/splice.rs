//! Byte-faithful editing of a JSON object (design §3): the gateway reads a
//! client's body through a borrowed view of its top-level members and splices
//! in only the edits it owns, so field order, number literals (`1e-7`, 30-digit
//! integers, `-0`), string escapes, whitespace and unknown fields reach the
//! provider exactly as the client wrote them.
//!
//! Parsing is serde_json's (each member's value is a `RawValue` borrowed from
//! the input, which gives its byte range); the only hand-written scanning is
//! finding the comma between two members, in text serde_json has already
//! validated.

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;
use std::ops::Range;

/// Why bytes are not an editable JSON object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ObjectError {
    /// Not JSON at all.
    #[error("{0}")]
    Syntax(String),
    /// Valid JSON, but not an object.
    #[error("expected a JSON object")]
    NotObject,
    /// The same key twice: the gateway and a provider could read different values.
    #[error("duplicate key '{0}'")]
    Duplicate(String),
}

/// A key with no escapes borrowed from the input, else decoded.
#[derive(Deserialize)]
struct Key<'a>(#[serde(borrow)] Cow<'a, str>);

/// The members of one object, in order, as (key, raw value) pairs.
struct Members<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MembersVisitor;
        impl<'de> Visitor<'de> for MembersVisitor {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some((key, value)) = map.next_entry::<Key<'de>, &'de RawValue>()? {
                    members.push((key.0, value));
                }
                Ok(Members(members))
            }
        }
        deserializer.deserialize_map(MembersVisitor)
    }
}

/// The members of the JSON object `src`, in order, each with its raw value.
/// Fails on invalid JSON, on anything but an object and on a repeated key.
pub fn members(src: &[u8]) -> Result<Vec<(Cow<'_, str>, &RawValue)>, ObjectError> {
    if src.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(match serde_json::from_slice::<serde::de::IgnoredAny>(src) {
            Ok(_) => ObjectError::NotObject,
            Err(e) => ObjectError::Syntax(e.to_string()),
        });
    }
    let Members(members) =
        serde_json::from_slice(src).map_err(|e| ObjectError::Syntax(e.to_string()))?;
    check_unique(&members)?;
    Ok(members)
}

fn check_unique(members: &[(Cow<'_, str>, &RawValue)]) -> Result<(), ObjectError> {
    if members.len() < 2 {
        return Ok(());
    }
    let mut seen = HashSet::with_capacity(members.len());
    for (key, _) in members {
        if !seen.insert(key.as_ref()) {
            return Err(ObjectError::Duplicate(key.to_string()));
        }
    }
    Ok(())
}

/// One top-level member's place in the source.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Span {
    key: String,
    /// The comma (and whitespace around it) before this member; empty for the first.
    sep: Range<usize>,
    /// Whitespace, the quoted key, the colon: everything up to the value.
    head: Range<usize>,
    value: Range<usize>,
}

/// Where each top-level member of a JSON object lies in its source bytes.
/// Holds no borrow, so it can be kept beside the body (an owned `Bytes`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectSpans {
    /// Bytes up to and including the opening `{`.
    open_end: usize,
    spans: Vec<Span>,
    /// Where the bytes after the last member (`}` and whitespace) start.
    tail: usize,
}

impl ObjectSpans {
    /// The spans of an object's members; `members` are those of `src`, as
    /// [`members`] returned them.
    pub fn new(src: &[u8], members: &[(Cow<'_, str>, &RawValue)]) -> Self {
        let base = src.as_ptr() as usize;
        let open_end = src.iter().position(|&b| b == b'{').map_or(0, |i| i + 1);
        let mut spans = Vec::with_capacity(members.len());
        let mut prev_end = open_end;
        for (key, raw) in members {
            let start = raw.get().as_ptr() as usize - base;
            let end = start + raw.get().len();
            let sep = if spans.is_empty() {
                prev_end..prev_end
            } else {
                // Validated JSON: after a member's value, whitespace then a comma.
                let comma = prev_end
                    + src[prev_end..start]
                        .iter()
                        .position(|&b| b == b',')
                        .unwrap_or(0);
                prev_end..comma + 1
            };
            spans.push(Span {
                key: key.to_string(),
                head: sep.end..start,
                sep,
                value: start..end,
            });
            prev_end = end;
        }
        ObjectSpans {
            open_end,
            spans,
            tail: prev_end,
        }
    }

    /// Parses `src` (see [`members`]) and records where its members lie.
    pub fn parse(src: &[u8]) -> Result<Self, ObjectError> {
        let members = members(src)?;
        Ok(Self::new(src, &members))
    }

    /// The raw bytes of member `key`'s value in `src`.
    pub fn get<'a>(&self, src: &'a [u8], key: &str) -> Option<&'a [u8]> {
        self.spans
            .iter()
            .find(|s| s.key == key)
            .map(|s| &src[s.value.clone()])
    }

    /// An editor over `src`, which must be the bytes these spans came from.
    pub fn edit<'a>(&self, src: &'a [u8]) -> Splice<'a> {
        Splice {
            prefix: &src[..self.open_end],
            parts: self
                .spans
                .iter()
                .map(|s| Part {
                    key: Cow::Owned(s.key.clone()),
                    sep: Some(&src[s.sep.clone()]),
                    head: Cow::Borrowed(&src[s.head.clone()]),
                    value: Cow::Borrowed(&src[s.value.clone()]),
                })
                .collect(),
            tail: &src[self.tail..],
        }
    }
}

/// One member as it will be written.
#[derive(Debug, Clone)]
struct Part<'a> {
    key: Cow<'a, str>,
    /// The original separator; `None` for a member the gateway added.
    sep: Option<&'a [u8]>,
    head: Cow<'a, [u8]>,
    value: Cow<'a, [u8]>,
}

/// An object being edited: untouched members are written from the source
/// bytes, edited ones from the new bytes.
#[derive(Debug, Clone)]
pub struct Splice<'a> {
    prefix: &'a [u8],
    parts: Vec<Part<'a>>,
    tail: &'a [u8],
}

/// `"key":` with the key JSON-escaped.
fn head_for(key: &str) -> Vec<u8> {
    let mut head = serde_json::to_vec(key).unwrap_or_else(|_| b"\"\"".to_vec());
    head.push(b':');
    head
}

impl<'a> Splice<'a> {
    /// An editor over the JSON object `src` (parsed here).
    pub fn parse(src: &'a [u8]) -> Result<Self, ObjectError> {
        Ok(ObjectSpans::parse(src)?.edit(src))
    }

    fn position(&self, key: &str) -> Option<usize> {
        self.parts.iter().position(|p| p.key == key)
    }

    /// The current raw value of `key`.
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.position(key).map(|i| self.parts[i].value.as_ref())
    }

    /// Sets `key` to the JSON text `value`, in place if the key exists, else
    /// appended as the last member.
    pub fn set(&mut self, key: &str, value: Vec<u8>) {
        match self.position(key) {
            Some(i) => self.parts[i].value = Cow::Owned(value),
            None => self.parts.push(Part {
                key: Cow::Owned(key.to_owned()),
                sep: None,
                head: Cow::Owned(head_for(key)),
                value: Cow::Owned(value),
            }),
        }
    }

    /// Removes `key`; returns whether it was there.
    pub fn remove(&mut self, key: &str) -> bool {
        match self.position(key) {
            Some(i) => {
                self.parts.remove(i);
                true
            }
            None => false,
        }
    }

    /// Renames `from` to `to` in place. If `to` is already set, the client's
    /// own value for it wins and `from` is removed.
    pub fn rename(&mut self, from: &str, to: &str) {
        let Some(i) = self.position(from) else {
            return;
        };
        if self.position(to).is_some() {
            self.parts.remove(i);
            return;
        }
        let part = &mut self.parts[i];
        part.key = Cow::Owned(to.to_owned());
        // Keep the whitespace before the key (pretty-printed bodies stay aligned).
        let indent = part
            .head
            .iter()
            .take_while(|b| b.is_ascii_whitespace())
            .count();
        let mut head = part.head[..indent].to_vec();
        head.extend_from_slice(&head_for(to));
        part.head = Cow::Owned(head);
    }

    /// The edited object's bytes.
    pub fn finish(&self) -> Vec<u8> {
        let size = self.prefix.len()
            + self.tail.len()
            + self
                .parts
                .iter()
                .map(|p| p.sep.map_or(1, <[u8]>::len) + p.head.len() + p.value.len())
                .sum::<usize>();
        let mut out = Vec::with_capacity(size);
        out.extend_from_slice(self.prefix);
        for (n, part) in self.parts.iter().enumerate() {
            if n > 0 {
                match part.sep {
                    Some(sep) if !sep.is_empty() => out.extend_from_slice(sep),
                    _ => out.push(b','),
                }
            }
            out.extend_from_slice(&part.head);
            out.extend_from_slice(&part.value);
        }
        out.extend_from_slice(self.tail);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn edited(src: &str, f: impl FnOnce(&mut Splice)) -> String {
        let mut s = Splice::parse(src.as_bytes()).unwrap();
        f(&mut s);
        String::from_utf8(s.finish()).unwrap()
    }

    #[test]
    fn untouched_object_is_byte_identical() {
        let src = "  {\n  \"zeta\" : 1e-7,\"alpha\":-0, \"seed\":123456789012345678901234567890,\n \"s\":\"\\u00e9\\n\" }\n";
        assert_eq!(edited(src, |_| {}), src);
    }

    #[test]
    fn set_replaces_in_place_or_appends() {
        let src = r#"{"a":1, "b":null ,"c":3}"#;
        assert_eq!(
            edited(src, |s| s.set("b", b"0.7".to_vec())),
            r#"{"a":1, "b":0.7 ,"c":3}"#
        );
        assert_eq!(
            edited(src, |s| s.set("d", b"true".to_vec())),
            r#"{"a":1, "b":null ,"c":3,"d":true}"#
        );
        assert_eq!(edited("{ }", |s| s.set("d", b"1".to_vec())), r#"{"d":1 }"#);
    }

    #[test]
    fn remove_keeps_commas_right_at_every_position() {
        let src = r#"{"a":1, "b":2, "c":3}"#;
        assert_eq!(
            edited(src, |s| assert!(s.remove("a"))),
            r#"{ "b":2, "c":3}"#
        );
        assert_eq!(edited(src, |s| assert!(s.remove("b"))), r#"{"a":1, "c":3}"#);
        assert_eq!(edited(src, |s| assert!(s.remove("c"))), r#"{"a":1, "b":2}"#);
        assert_eq!(
            edited(src, |s| {
                s.remove("a");
                s.remove("b");
                s.remove("c");
            }),
            "{}"
        );
        assert!(!Splice::parse(src.as_bytes()).unwrap().remove("z"));
    }

    #[test]
    fn rename_keeps_position_and_client_value_wins() {
        let src = "{\n  \"max_tokens\": 5,\n  \"x\": 1\n}";
        assert_eq!(
            edited(src, |s| s.rename("max_tokens", "max_completion_tokens")),
            "{\n  \"max_completion_tokens\":5,\n  \"x\": 1\n}"
        );
        let both = r#"{"max_tokens":5,"max_completion_tokens":9}"#;
        assert_eq!(
            edited(both, |s| s.rename("max_tokens", "max_completion_tokens")),
            r#"{"max_completion_tokens":9}"#
        );
    }

    #[test]
    fn keys_with_escapes_are_found() {
        let src = r#"{"mo\u0064el":"x"}"#;
        let s = Splice::parse(src.as_bytes()).unwrap();
        assert_eq!(s.get("model"), Some(&b"\"x\""[..]));
    }

    #[test]
    fn duplicates_and_non_objects_are_refused() {
        assert_eq!(
            members(br#"{"model":"a","x":1,"model":"b"}"#).unwrap_err(),
            ObjectError::Duplicate("model".into())
        );
        // An escaped spelling of the same key is the same key.
        assert_eq!(
            members(br#"{"model":"a","mod\u0065l":"b"}"#).unwrap_err(),
            ObjectError::Duplicate("model".into())
        );
        assert_eq!(members(b"[1]").unwrap_err(), ObjectError::NotObject);
        assert_eq!(members(b" null").unwrap_err(), ObjectError::NotObject);
        assert!(matches!(members(b"{"), Err(ObjectError::Syntax(_))));
        assert!(matches!(members(b"nope"), Err(ObjectError::Syntax(_))));
        assert!(matches!(members(b"{} x"), Err(ObjectError::Syntax(_))));
    }

    fn json_value() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            Just("null".to_string()),
            Just("-0".to_string()),
            Just("1e-7".to_string()),
            Just("123456789012345678901234567890".to_string()),
            "[a-z\\\\\"é]{0,6}".prop_map(|s| serde_json::to_string(&s).unwrap()),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4)
                    .prop_map(|v| format!("[{}]", v.join(" , "))),
                prop::collection::vec(("[a-z]{1,3}", inner), 0..4).prop_map(|v| {
                    let members: Vec<String> = v
                        .into_iter()
                        .map(|(k, x)| format!("\"{k}\" :{x}"))
                        .collect();
                    format!("{{ {} }}", members.join(","))
                }),
            ]
        })
    }

    proptest! {
        /// Removing and re-adding members leaves exactly the JSON a
        /// parse-edit-serialise would, while every untouched value keeps its bytes.
        #[test]
        fn edits_match_a_value_model(
            members in prop::collection::btree_map("[a-e]", json_value(), 0..6),
            remove in prop::collection::vec("[a-f]", 0..3),
            set in prop::collection::vec(("[a-g]", 0u8..9), 0..3),
            ws in "[ \n]{0,2}",
        ) {
            let body: Vec<String> = members.iter().map(|(k, v)| format!("{ws}\"{k}\"{ws}:{ws}{v}{ws}")).collect();
            let src = format!("{ws}{{{}}}{ws}", body.join(","));
            let mut splice = Splice::parse(src.as_bytes()).unwrap();
            let mut model: Vec<(String, String)> = members.clone().into_iter().collect();
            for k in &remove {
                splice.remove(k);
                model.retain(|(m, _)| m != k);
            }
            for (k, v) in &set {
                splice.set(k, v.to_string().into_bytes());
                match model.iter_mut().find(|(m, _)| m == k) {
                    Some(slot) => slot.1 = v.to_string(),
                    None => model.push((k.clone(), v.to_string())),
                }
            }
            let out = String::from_utf8(splice.finish()).unwrap();
            // Still one valid object, with the model's members in the model's order.
            let parsed = super::members(out.as_bytes()).unwrap();
            prop_assert_eq!(parsed.len(), model.len());
            for ((k, raw), (mk, mv)) in parsed.iter().zip(&model) {
                prop_assert_eq!(k.as_ref(), mk.as_str());
                prop_assert_eq!(raw.get(), mv.as_str());
            }
        }
    }
}
