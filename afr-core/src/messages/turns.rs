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

use crate::readable::Readable;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use std::fmt;

/// Whether one pass accepts `messages`; `false` is "not decided here".
pub(super) fn accepted(messages: &RawValue) -> bool {
    let mut de = serde_json::Deserializer::from_str(messages.get());
    de.deserialize_seq(Turns).is_ok() && de.end().is_ok()
}

/// The list of turns (an empty list is Anthropic's to refuse, as before).
struct Turns;

impl<'de> Visitor<'de> for Turns {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of turns")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Turn)?.is_some() {}
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

/// A turn's key, told apart without keeping it.
enum Key {
    Role,
    Content,
    Other,
}

impl<'de> de::Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Key, D::Error> {
        struct Name;
        impl Visitor<'_> for Name {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E>(self, s: &str) -> Result<Key, E> {
                Ok(match s {
                    "role" => Key::Role,
                    "content" => Key::Content,
                    _ => Key::Other,
                })
            }
        }
        d.deserialize_str(Name)
    }
}

/// One turn: an object with a string `role` and, for `user` and `assistant`,
/// a string or list `content`.
struct Turn;

impl<'de> DeserializeSeed<'de> for Turn {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Turn {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a turn")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let (mut role, mut content) = (None, None);
        while let Some(key) = map.next_key::<Key>()? {
            let slot = match key {
                Key::Role => &mut role,
                Key::Content => &mut content,
                Key::Other => {
                    map.next_value_seed(Readable)?;
                    continue;
                }
            };
            // A `Value` keeps the last of repeated keys: left to it.
            if slot.is_some() {
                return Err(de::Error::custom("a repeated key"));
            }
            *slot = Some(map.next_value_seed(Classify)?);
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
