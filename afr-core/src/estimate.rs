//! The prompt estimate a request reserves (design §3): everything providers
//! bill as input, counted in one pass over the client's bytes, never
//! allocating for a string without escapes.
//!
//! What counts: the prompt-bearing members of the body ([`Wire::members`]:
//! system prompts and `instructions`, every message part, tool definitions
//! and their schemas, tool calls and results, `response_format` / `text`
//! schemas) — every key and every string inside them, since providers render
//! all of it into the model's input. The rules:
//!
//! - text: an ASCII character is a quarter of a token, any other character a
//!   whole token (CJK, Cyrillic, Arabic, …: providers' tokenizers spend about
//!   one token per character on them, often more than the ASCII rule would
//!   say by 4×), a character outside the Basic Multilingual Plane (emoji) two;
//! - a number is one token (token-id arrays count their length);
//! - an image is counted by the providers' published rules, not by its bytes:
//!   85 tokens with `detail: "low"`, otherwise [`IMAGE_TOKENS`] (the largest
//!   OpenAI's tile formula gives gpt-4o, 1 445, and Anthropic's ceiling for an
//!   image it accepts unresized, about 1 600);
//! - a file given inline (base64 or a data URL that is not an image: PDFs,
//!   documents) is counted as text of its decoded size; a file by URL or id
//!   cannot be sized and counts its reference only;
//! - each request carries [`BASE_TOKENS`] of framing on message endpoints,
//!   and Anthropic's tool-use system prompt ([`ANTHROPIC_TOOLS_TOKENS`]) when
//!   a Messages request offers tools.
//!
//! Checked against the recorded provider usage in `tests/fixtures/` (see the
//! tests): it never under-counts them and stays within 2× for plain text.

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use std::fmt;

/// Tokens of an image at full detail: the larger of OpenAI's gpt-4o tile
/// formula's maximum (85 + 170 × 8 tiles = 1 445) and Anthropic's ~1 600
/// for the largest image it takes without resizing (1.15 megapixels / 750).
pub const IMAGE_TOKENS: u64 = 1_600;
/// Tokens of an image with `detail: "low"` (OpenAI's fixed 85).
pub const LOW_DETAIL_IMAGE_TOKENS: u64 = 85;
/// Framing every message-based request carries (role markers, priming).
pub const BASE_TOKENS: u64 = 8;
/// Anthropic's tool-use system prompt, added when a request offers tools
/// (346 tokens for current Claude models, per Anthropic's tool-use pricing).
pub const ANTHROPIC_TOOLS_TOKENS: u64 = 350;

/// The API a body is written for: which of its members carry the prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completions,
    /// `/v1/embeddings`.
    Embeddings,
    /// `/v1/responses`.
    Responses,
    /// `/v1/messages` (and `count_tokens`).
    Messages,
}

impl Wire {
    /// The top-level members whose content the provider bills as input.
    fn members(self) -> &'static [&'static str] {
        match self {
            Wire::Chat => &[
                "messages",
                "tools",
                "functions",
                "tool_choice",
                "function_call",
                "response_format",
                "prediction",
            ],
            Wire::Completions => &["prompt", "suffix"],
            Wire::Embeddings => &["input"],
            Wire::Responses => &["input", "instructions", "tools", "tool_choice", "text"],
            Wire::Messages => &["system", "messages", "tools", "tool_choice"],
        }
    }

    fn framed(self) -> bool {
        matches!(self, Wire::Chat | Wire::Responses | Wire::Messages)
    }
}

/// The estimated input tokens of `body` for `wire`; a body that is not a
/// JSON object estimates its bytes as text (validation refuses it anyway).
pub fn prompt_tokens(body: &[u8], wire: Wire) -> u64 {
    // Member by member from their raw values, as validation counts them
    // (`Tally`): the same values at the same depth, so the two agree.
    let mut tally = Tally::default();
    let counted = crate::splice::members(body).is_ok_and(|members| {
        members
            .iter()
            .all(|(key, raw)| tally.member(wire, key, raw))
    });
    if !counted {
        return (body.len() as u64).div_ceil(4);
    }
    tally.tokens(wire)
}

/// The tokens of a body's count: its text, its whole tokens and the framing.
fn total(count: &Count, wire: Wire) -> u64 {
    let mut tokens = count.units.div_ceil(4) + count.tokens;
    if wire.framed() {
        tokens += BASE_TOKENS;
    }
    if wire == Wire::Messages && count.tools {
        tokens += ANTHROPIC_TOOLS_TOKENS;
    }
    tokens
}

/// Quarter-tokens of `text` by the per-script rule.
pub fn text_units(text: &str) -> u64 {
    // Most prompt text is ASCII: its length is its weight, checked a word
    // at a time instead of decoding every character.
    if text.is_ascii() {
        return text.len() as u64;
    }
    text.chars()
        .map(|c| match c as u32 {
            0..=0x7f => 1,
            0x80..=0xffff => 4,
            _ => 8,
        })
        .sum()
}

#[derive(Default)]
pub(crate) struct Count {
    /// Quarter-tokens of text.
    units: u64,
    /// Whole tokens (numbers, images, files).
    tokens: u64,
    /// A non-empty `tools` member was seen.
    tools: bool,
}

/// An object key (or any string), borrowed from the body when it has no
/// escapes.
pub(crate) struct Key<'de>(pub(crate) std::borrow::Cow<'de, str>);

impl<'de> de::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(s.into()))
            }
            fn visit_str<E>(self, s: &str) -> Result<Key<'de>, E> {
                Ok(Key(s.to_owned().into()))
            }
        }
        d.deserialize_str(V)
    }
}

/// What a string looked like, for its enclosing object to decide whether it
/// is text or media.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Text {
    /// Quarter-tokens if it is text.
    units: u64,
    /// Its length in bytes.
    len: usize,
    /// A `data:` URL (its media type says `image/…` when `image`).
    data_url: bool,
    image_mime: bool,
    /// An `http(s)://` URL.
    http: bool,
    /// Long and of the base64 alphabet only: an inline file or image.
    base64: bool,
    /// A word that marks its object: an image part, a file part, `low`.
    word: Word,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Word {
    #[default]
    None,
    Image,
    File,
    Low,
    ImageMime,
}

impl Text {
    fn of(s: &str) -> Text {
        let len = s.len();
        let head = &s.as_bytes()[..len.min(64)];
        let data_url = s.starts_with("data:");
        let base64 = len >= 256
            && head.iter().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'-' | b'_')
            });
        let is_media = data_url || base64;
        let word = match s {
            "image" | "image_url" | "input_image" => Word::Image,
            "file" | "input_file" | "document" => Word::File,
            "low" => Word::Low,
            _ if s.starts_with("image/") && len < 64 => Word::ImageMime,
            _ => Word::None,
        };
        Text {
            // A media string is never text: no need to weigh every byte.
            units: if is_media { 0 } else { text_units(s) },
            len,
            data_url,
            image_mime: data_url && s[5..].starts_with("image/"),
            http: s.starts_with("http://") || s.starts_with("https://"),
            base64,
            word,
        }
    }

    fn is_media(&self) -> bool {
        self.data_url || self.base64
    }

    /// Decoded bytes of an inline file.
    fn decoded_len(&self) -> u64 {
        (self.len as u64) / 4 * 3
    }
}

/// What one value was: a string (judged by its object) or anything else
/// (already counted): an array, `null`, or another value.
pub(crate) enum Seen {
    Text(Text),
    Seq,
    Unit,
    Other,
}

/// Any value inside a prompt-bearing member. `image`: it is the value of an
/// `image_url` key, so media in it is an image.
pub(crate) struct Node<'c> {
    count: &'c mut Count,
    image: bool,
}

impl<'de> DeserializeSeed<'de> for Node<'_> {
    type Value = Seen;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Seen, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Node<'_> {
    type Value = Seen;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_str<E>(self, s: &str) -> Result<Seen, E> {
        Ok(Seen::Text(Text::of(s)))
    }
    fn visit_bool<E>(self, _: bool) -> Result<Seen, E> {
        self.count.units += 1;
        Ok(Seen::Other)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Seen, E> {
        self.count.tokens += 1;
        Ok(Seen::Other)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Seen, E> {
        self.count.tokens += 1;
        Ok(Seen::Other)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Seen, E> {
        self.count.tokens += 1;
        Ok(Seen::Other)
    }
    fn visit_unit<E>(self) -> Result<Seen, E> {
        Ok(Seen::Unit)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Seen, A::Error> {
        while let Some(seen) = seq.next_element_seed(Node {
            count: &mut *self.count,
            image: false,
        })? {
            if let Seen::Text(t) = seen {
                self.count.units += t.units;
                if t.is_media() {
                    media(self.count, &t, self.image, false);
                }
            }
        }
        Ok(Seen::Seq)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Seen, A::Error> {
        let mut object = ObjectTally::new(self.count, self.image);
        let mut first = true;
        while let Some(key) = map.next_key::<Key>()? {
            let key = key.0;
            crate::readable::refuse_raw_value_token(&key, std::mem::take(&mut first))?;
            object.key(&key);
            let seen = map.next_value_seed(object.node(&key))?;
            object.value(&key, seen);
        }
        object.finish();
        Ok(Seen::Other)
    }
}

/// The count of one JSON object's members, given key by key and value by
/// value: what [`Node`] does for every object, and what validation does for
/// each chat message it reads anyway ([`Tally`]), so the two cannot differ.
pub(crate) struct ObjectTally<'c> {
    count: &'c mut Count,
    /// Media in this object is an image (an `image_url` value, or a `type`
    /// or `media_type` that says so).
    image: bool,
    low: bool,
    /// Media strings wait for the whole object: its `type`, `media_type` or
    /// `detail` may come after them.
    pending: Option<Text>,
    url_image: bool,
}

impl<'c> ObjectTally<'c> {
    fn new(count: &'c mut Count, image: bool) -> Self {
        ObjectTally {
            count,
            image,
            low: false,
            pending: None,
            url_image: false,
        }
    }

    /// Counts a key (providers render keys into the prompt too).
    pub(crate) fn key(&mut self, key: &str) {
        self.count.units += text_units(key);
    }

    /// The seed that reads and counts the value of `key`.
    pub(crate) fn node(&mut self, key: &str) -> Node<'_> {
        Node {
            count: &mut *self.count,
            image: key == "image_url",
        }
    }

    /// Judges a value [`ObjectTally::node`] read: a string is text, or media
    /// counted once the object ends.
    pub(crate) fn value(&mut self, key: &str, seen: Seen) {
        let Seen::Text(t) = seen else { return };
        match t.word {
            Word::Image | Word::ImageMime if key == "type" || key == "media_type" => {
                self.image = true
            }
            Word::Low if key == "detail" => self.low = true,
            _ => {}
        }
        if t.is_media() || (t.http && (key == "image_url" || key == "url")) {
            if t.image_mime || key == "image_url" {
                self.image = true;
            }
            self.url_image |= t.http;
            self.pending = Some(t);
        } else {
            self.count.units += t.units;
        }
    }

    /// Judges a string value the caller read itself.
    pub(crate) fn text(&mut self, key: &str, s: &str) {
        self.value(key, Seen::Text(Text::of(s)));
    }

    /// Counts the media the object held.
    pub(crate) fn finish(self) {
        if let Some(t) = self.pending {
            if t.is_media() || (self.url_image && self.image) {
                media(self.count, &t, self.image, self.low);
            } else {
                // A reference that cannot be sized (a file by URL): its text.
                self.count.units += text_units_len(t.len);
            }
        }
    }
}

/// A chat body's estimate counted while validation reads it (see
/// [`crate::validate`]): each message through an [`ObjectTally`] inside
/// validation's own pass over `messages`, every other prompt-bearing member
/// by [`Tally::member`]. The result is [`prompt_tokens`]'s (tested).
#[derive(Default)]
pub(crate) struct Tally {
    count: Count,
}

impl Tally {
    /// A message's tally (an object directly inside a prompt member).
    pub(crate) fn object(&mut self) -> ObjectTally<'_> {
        ObjectTally::new(&mut self.count, false)
    }

    /// Counts the top-level member `key` of a `wire` body, if it is one the
    /// provider bills; `false` if it cannot be read (the caller then leaves
    /// the estimate to [`prompt_tokens`]).
    pub(crate) fn member(&mut self, wire: Wire, key: &str, raw: &RawValue) -> bool {
        if !wire.members().contains(&key) {
            return true;
        }
        let before = (self.count.units, self.count.tokens);
        let mut de = serde_json::Deserializer::from_str(raw.get());
        let seen = Node {
            count: &mut self.count,
            image: false,
        }
        .deserialize(&mut de);
        match seen {
            Ok(Seen::Text(text)) => self.count.units += text.units,
            Ok(_) => {}
            Err(_) => return false,
        }
        if key == "tools" && (self.count.units, self.count.tokens) != before {
            self.count.tools = true;
        }
        true
    }

    /// The estimated input tokens of what was counted.
    pub(crate) fn tokens(&self, wire: Wire) -> u64 {
        total(&self.count, wire)
    }
}

/// Counts one image or inline file.
fn media(count: &mut Count, t: &Text, image: bool, low: bool) {
    count.tokens += if image || t.image_mime {
        if low {
            LOW_DETAIL_IMAGE_TOKENS
        } else {
            IMAGE_TOKENS
        }
    } else {
        t.decoded_len().div_ceil(4)
    };
}

/// Quarter-tokens of an ASCII string of `len` bytes (a URL).
fn text_units_len(len: usize) -> u64 {
    len as u64
}

#[cfg(test)]
#[path = "estimate_tests.rs"]
mod tests;
