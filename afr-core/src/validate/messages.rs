//! The chat body's `messages`: an array of at least one object, each with a
//! string `role` and the `content` its role allows (the prompt's size is
//! `crate::estimate`'s, counted only when a request needs it).
//!
//! [`check`] reads the array once ([`Fast`]) and accepts what the long way
//! ([`check_slowly`]) would accept; anything it does not accept at once (a
//! refusal, a repeated key, a number out of range) goes the long way, which
//! decides and words the refusal. For a key with limits the same pass counts
//! the messages' prompt estimate ([`crate::estimate::Tally`]), which was a
//! pass of its own. The long way read each message's bytes three
//! times more (the array, each message's members, its content's escapes):
//! ~40% of validating a 20 KB agent body (callgrind).

use super::{field, find, missing, type_error, value, Invalid, ROLES};
use crate::estimate::{Key, Seen, Tally};
use crate::splice::members;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::Value;
use std::borrow::Cow;
use std::fmt;

/// Validates `messages`, the raw value of the body's member (if present).
/// With a `tally`, the pass counts the messages' prompt estimate as it reads
/// them; `Ok(true)` says it did (the long way counts nothing).
pub(super) fn check(
    messages: Option<&RawValue>,
    tally: Option<&mut Tally>,
) -> Result<bool, Invalid> {
    match messages {
        Some(raw) if fast(raw, tally) => Ok(true),
        _ => check_slowly(messages).map(|()| false),
    }
}

/// Whether one pass accepts `messages`; `false` is "not decided here".
fn fast(raw: &RawValue, tally: Option<&mut Tally>) -> bool {
    let mut de = serde_json::Deserializer::from_str(raw.get());
    de.deserialize_seq(Fast { tally }).is_ok() && de.end().is_ok()
}

/// The array: at least one message, each accepted by [`Message`].
struct Fast<'t> {
    tally: Option<&'t mut Tally>,
}

impl<'de> Visitor<'de> for Fast<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of messages")
    }
    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        let mut count = 0usize;
        while seq
            .next_element_seed(Message {
                tally: self.tally.as_deref_mut(),
            })?
            .is_some()
        {
            count += 1;
        }
        if count == 0 {
            return Err(de::Error::custom("no message"));
        }
        Ok(())
    }
}

/// What a message's `content` is, as far as the role rules care.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Content {
    /// A string (its escapes decoded, so checked) or an array of parts.
    Ok,
    Null,
    Other,
}

/// One message: an object whose keys are unique, with a string `role` and a
/// `content` its role allows; counted into `tally` when there is one.
struct Message<'t> {
    tally: Option<&'t mut Tally>,
}

impl<'de> DeserializeSeed<'de> for Message<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Message<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a message object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        // A message has a handful of keys: a list is cheaper than a set.
        let mut keys: Vec<Cow<'de, str>> = Vec::new();
        let mut role: Option<Cow<'de, str>> = None;
        let mut content: Option<Content> = None;
        let mut object = self.tally.map(Tally::object);
        let mut first = true;
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            // A `Value` reads such an object its own way (see `readable`).
            crate::readable::refuse_raw_value_token(&key, std::mem::take(&mut first))?;
            if keys.contains(&key) {
                return Err(de::Error::custom("a repeated key"));
            }
            if let Some(object) = &mut object {
                object.key(&key);
            }
            match (key.as_ref(), &mut object) {
                ("role", object) => {
                    let Key(text) = map.next_value::<Key<'de>>()?;
                    if let Some(object) = object {
                        object.text("role", &text);
                    }
                    role = Some(text);
                }
                ("content", None) => content = Some(map.next_value_seed(ContentKind)?),
                ("content", Some(object)) => {
                    let seen = map.next_value_seed(object.node("content"))?;
                    content = Some(match seen {
                        Seen::Text(_) | Seen::Seq => Content::Ok,
                        Seen::Unit => Content::Null,
                        Seen::Other => Content::Other,
                    });
                    object.value("content", seen);
                }
                (_, None) => {
                    map.next_value::<IgnoredAny>()?;
                }
                (key, Some(object)) => {
                    let seen = map.next_value_seed(object.node(key))?;
                    object.value(key, seen);
                }
            }
            keys.push(key);
        }
        if let Some(object) = object {
            object.finish();
        }
        let Some(role) = role else {
            return Err(de::Error::custom("no role"));
        };
        match content {
            Some(Content::Ok) => Ok(()),
            None | Some(Content::Null) if role == "assistant" => Ok(()),
            Some(Content::Null) if role == "function" => Ok(()),
            _ if !ROLES.contains(&role.as_ref()) => Ok(()),
            _ => Err(de::Error::custom("a content its role does not allow")),
        }
    }
}

/// Reads `content` as far as [`Content`] tells.
struct ContentKind;

impl<'de> DeserializeSeed<'de> for ContentKind {
    type Value = Content;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Content, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ContentKind {
    type Value = Content;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a message content")
    }
    // serde_json decodes a string's escapes before it calls these: a lone
    // surrogate fails the pass, as it fails the long way.
    fn visit_borrowed_str<E>(self, _: &'de str) -> Result<Content, E> {
        Ok(Content::Ok)
    }
    fn visit_str<E>(self, _: &str) -> Result<Content, E> {
        Ok(Content::Ok)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Content, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Content::Ok)
    }
    fn visit_unit<E>(self) -> Result<Content, E> {
        Ok(Content::Null)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Content, E> {
        Ok(Content::Other)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Content, E> {
        Ok(Content::Other)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Content, E> {
        Ok(Content::Other)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Content, E> {
        Ok(Content::Other)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Content, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Content::Other)
    }
}

/// Validates `messages` the long way, which words every refusal.
fn check_slowly(messages: Option<&RawValue>) -> Result<(), Invalid> {
    let list: Vec<&RawValue> = match messages {
        None => return Err(missing("messages")),
        Some(raw) if raw.get() == "null" => return Err(missing("messages")),
        Some(raw) => serde_json::from_str(raw.get()).map_err(|_| match value("messages", raw) {
            Ok(other) => type_error("messages", "an array", &other),
            Err(invalid) => invalid,
        })?,
    };
    if list.is_empty() {
        return Err(Invalid::field(
            "messages",
            "Invalid 'messages': empty array. Expected an array with minimum length 1.",
        ));
    }
    for (i, message) in list.iter().enumerate() {
        // Named only when refused: formatting the paths of every message up
        // front cost ~1 300 instructions a message (callgrind).
        let path = || format!("messages[{i}]");
        if !message.get().starts_with('{') {
            let path = path();
            return Err(type_error(&path, "an object", &value(&path, message)?));
        }
        let m = members(message.get().as_bytes()).map_err(|e| Invalid::object(&path(), e))?;
        // A role without escapes is borrowed as it is; anything else is read
        // the long way, which words the refusal.
        let role = match find(&m, "role").map(|r| serde_json::from_str::<&str>(r.get())) {
            Some(Ok(role)) => std::borrow::Cow::Borrowed(role),
            _ => {
                let param = format!("{}.role", path());
                match field(&m, "role", &param)? {
                    Some(Value::String(r)) => std::borrow::Cow::Owned(r),
                    None | Some(Value::Null) => return Err(missing(&param)),
                    Some(other) => return Err(type_error(&param, "a string", &other)),
                }
            }
        };
        let content = find(&m, "content");
        match content.map(|c| c.get().as_bytes()[0]) {
            Some(b'"') => {
                let raw = content.map_or("\"\"", |c| c.get());
                // Without escapes the parser has validated the text already;
                // with them, decoding is what finds a lone surrogate.
                if raw.contains('\\') {
                    serde_json::from_str::<String>(raw).map_err(|e| {
                        Invalid::field(format!("{}.content", path()), e.to_string())
                    })?;
                }
            }
            Some(b'[') => {}
            // An assistant turn that only calls tools carries no content.
            None | Some(b'n') if role == "assistant" => {}
            // A function message's content is `string | null`.
            Some(b'n') if role == "function" => {}
            // A role the gateway does not know: its provider judges the content.
            _ if !ROLES.contains(&&*role) => {}
            None => return Err(missing(&format!("{}.content", path()))),
            Some(_) => {
                let param = format!("{}.content", path());
                return Err(type_error(
                    &param,
                    "a string or an array of content parts",
                    &content
                        .map(|c| value(&param, c))
                        .transpose()?
                        .unwrap_or(Value::Null),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "messages_tests.rs"]
mod tests;
