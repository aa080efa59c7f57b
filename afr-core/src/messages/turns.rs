//! One pass over a Messages body's `messages` that accepts what
//! [`super::validate_messages`]'s reading of them as a `Value` accepts.
//!
//! That reading built a `serde_json::Value` of every turn: an allocation for
//! every string and object of the conversation, which for Claude Code is the
//! whole session so far. This pass reads the same values with the same
//! decoding ([`Readable`]) and keeps only each turn's role and the kind of its
//! content. Anything it does not accept at once (a refusal, a turn that
//! repeats `role` or `content`) is left to the `Value` reading, which decides
//! and words the refusal.

use crate::estimate::{Key, Seen, Tally};
use crate::readable::Readable;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use std::fmt;

/// Whether one pass accepts `messages`; `false` is "not decided here".
/// With a `tally`, the pass counts the turns' prompt estimate as it reads them
/// (see [`crate::estimate::Tally`]).
pub(super) fn accepted(messages: &RawValue, tally: Option<&mut Tally>) -> bool {
    let mut de = serde_json::Deserializer::from_str(messages.get());
    de.deserialize_seq(Turns { tally }).is_ok() && de.end().is_ok()
}

/// The list of turns (an empty list is Anthropic's to refuse, as before).
struct Turns<'t> {
    tally: Option<&'t mut Tally>,
}

impl<'de> Visitor<'de> for Turns<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of turns")
    }
    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        while seq
            .next_element_seed(Turn {
                tally: self.tally.as_deref_mut(),
            })?
            .is_some()
        {}
        Ok(())
    }
}

/// What a turn's `role` or `content` is, as far as the rules care.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A string; `user` or `assistant` (roles that need a content) when
    /// `user_or_assistant`.
    String {
        user_or_assistant: bool,
    },
    Array,
    Other,
}

/// One turn: an object with a string `role` and, for `user` and `assistant`,
/// a string or list `content`; counted into `tally` when there is one.
struct Turn<'t> {
    tally: Option<&'t mut Tally>,
}

impl<'de> DeserializeSeed<'de> for Turn<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Turn<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a turn")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let (mut role, mut content) = (None, None);
        let mut object = self.tally.map(Tally::object);
        let mut first = true;
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            // A `Value` reads such an object its own way (see `readable`).
            crate::readable::refuse_raw_value_token(&key, std::mem::take(&mut first))?;
            if let Some(object) = &mut object {
                object.key(&key);
            }
            let slot = match key.as_ref() {
                "role" => &mut role,
                "content" => &mut content,
                _ => {
                    match &mut object {
                        Some(object) => {
                            let seen = map.next_value_seed(object.node(&key))?;
                            object.value(&key, seen);
                        }
                        None => map.next_value_seed(Readable)?,
                    }
                    continue;
                }
            };
            // A `Value` keeps the last of repeated keys: left to it.
            if slot.is_some() {
                return Err(de::Error::custom("a repeated key"));
            }
            *slot = Some(match (&mut object, key.as_ref()) {
                (None, _) => map.next_value_seed(Classify)?,
                // Counted as the estimate counts any string; a role that is
                // no string fails the pass, as it is refused.
                (Some(object), "role") => {
                    let Key(text) = map.next_value::<Key<'de>>()?;
                    object.text("role", &text);
                    Kind::String {
                        user_or_assistant: matches!(text.as_ref(), "user" | "assistant"),
                    }
                }
                (Some(object), _) => {
                    let seen = map.next_value_seed(object.node("content"))?;
                    let kind = match &seen {
                        Seen::Text(_) => Kind::String {
                            user_or_assistant: false,
                        },
                        Seen::Seq => Kind::Array,
                        Seen::Unit | Seen::Other => Kind::Other,
                    };
                    object.value("content", seen);
                    kind
                }
            });
        }
        if let Some(object) = object {
            object.finish();
        }
        let Some(Kind::String {
            user_or_assistant: needs_content,
        }) = role
        else {
            return Err(de::Error::custom("no string role"));
        };
        match content {
            Some(Kind::String { .. } | Kind::Array) => Ok(()),
            _ if !needs_content => Ok(()),
            _ => Err(de::Error::custom("no content")),
        }
    }
}

/// Reads a role or a content, fully (as [`Readable`]), into its [`Kind`].
struct Classify;

impl<'de> DeserializeSeed<'de> for Classify {
    type Value = Kind;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Kind, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Classify {
    type Value = Kind;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a role or a content")
    }
    fn visit_str<E>(self, s: &str) -> Result<Kind, E> {
        Ok(Kind::String {
            user_or_assistant: matches!(s, "user" | "assistant"),
        })
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Kind, A::Error> {
        Readable.visit_seq(seq)?;
        Ok(Kind::Array)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Kind, A::Error> {
        Readable.visit_map(map)?;
        Ok(Kind::Other)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Kind, E> {
        Ok(Kind::Other)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Kind, E> {
        Ok(Kind::Other)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Kind, E> {
        Ok(Kind::Other)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Kind, E> {
        Ok(Kind::Other)
    }
    fn visit_unit<E>(self) -> Result<Kind, E> {
        Ok(Kind::Other)
    }
}

#[cfg(test)]
#[path = "turns_tests.rs"]
mod tests;
