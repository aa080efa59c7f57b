//! Whether serde_json would read a value into a [`serde_json::Value`], found
//! without building it.
//!
//! Validation refuses what the gateway cannot read (a lone surrogate in an
//! escape, a number out of `f64`'s range, nesting past serde_json's limit),
//! anywhere inside members such as Anthropic's `messages` or the Responses
//! API's `input`. Building a `Value` tree for that allocated every string and
//! every object of an agent's prompt; [`Readable`] walks the same values with
//! the same decoding (strings' escapes decoded, numbers parsed) and keeps
//! nothing. serde's `IgnoredAny` would not do: it skips escapes and numbers
//! without checking them.

use crate::estimate::Key;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use std::fmt;

/// The key serde_json's `raw_value` feature (which this crate turns on)
/// gives a meaning of its own: an object whose first key it is reads as a
/// `Value` only if its value is a string holding JSON, and then as that JSON
/// alone. No client sends one; it is refused wherever a `Value` would read
/// it, so a pass that stands in for a `Value` never accepts more.
const RAW_VALUE_TOKEN: &str = "$serde_json::private::RawValue";

/// `Err` for an object's `first` key that is [`RAW_VALUE_TOKEN`].
pub(crate) fn refuse_raw_value_token<E: de::Error>(key: &str, first: bool) -> Result<(), E> {
    if first && key == RAW_VALUE_TOKEN {
        return Err(E::custom("serde_json's raw value key"));
    }
    Ok(())
}

/// Whether `raw` reads as a `serde_json::Value`.
pub(crate) fn readable(raw: &RawValue) -> bool {
    let mut de = serde_json::Deserializer::from_str(raw.get());
    Readable.deserialize(&mut de).is_ok() && de.end().is_ok()
}

/// Any JSON value, read as a `serde_json::Value` would be and dropped.
#[derive(Clone, Copy)]
pub(crate) struct Readable;

impl<'de> DeserializeSeed<'de> for Readable {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Readable {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Readable)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Some(Key(first)) = map.next_key::<Key>()? else {
            return Ok(());
        };
        refuse_raw_value_token(&first, true)?;
        map.next_value_seed(Readable)?;
        while map.next_key_seed(Readable)?.is_some() {
            map.next_value_seed(Readable)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readable_is_what_a_value_reads() {
        let corpus = [
            r#""plain""#,
            r#""\u00e9 \ud83d\ude00 \n""#,
            r#""\ud800 lone""#,
            r#""\udc00""#,
            "1e999",
            "-1e999",
            "1e308",
            "18446744073709551616",
            "-9223372036854775809",
            "0.5",
            r#"[1, "a", null, true, {"k": [{}]}]"#,
            r#"{"a": 1, "a": 2}"#,
            r#"{"\ud800": 1}"#,
            r#"[{"deep": "\ud800"}]"#,
            r#"{"$serde_json::private::RawValue": 0}"#,
            r#"{"$serde_json::private::RawValue": "1", "k": 2}"#,
            r#"{"k": 2, "$serde_json::private::RawValue": 0}"#,
            r#"[{"\u0024serde_json::private::RawValue": 0}]"#,
            &format!("{}{}", "[".repeat(127), "]".repeat(127)),
            &format!("{}{}", "[".repeat(129), "]".repeat(129)),
        ];
        for json in corpus {
            let raw: Box<RawValue> = serde_json::from_str(json).expect("valid JSON syntax");
            let value = serde_json::from_str::<serde_json::Value>(raw.get()).is_ok();
            assert_eq!(readable(&raw), value, "{json}");
        }
        // A raw-value object that a `Value` does read is still refused here:
        // refusing more sends the body the `Value` way, never accepts more.
        let raw: Box<RawValue> =
            serde_json::from_str(r#"{"$serde_json::private::RawValue": "[1]"}"#).expect("raw");
        assert!(serde_json::from_str::<serde_json::Value>(raw.get()).is_ok());
        assert!(!readable(&raw));
        // The corpus has both answers, so neither side is constant.
        assert!(!readable(
            &serde_json::from_str::<Box<RawValue>>(r#""\ud800""#).expect("raw")
        ));
        assert!(readable(
            &serde_json::from_str::<Box<RawValue>>("[1]").expect("raw")
        ));
    }
}
