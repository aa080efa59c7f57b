//! Masking of key-shaped text before it reaches a log line or an error body
//! (design §7: secrets never appear in logs or error bodies).
//!
//! Providers echo credentials back in their error messages ("Incorrect API
//! key provided: sk-proj-…"), and serde errors quote the value they could not
//! read. [`mask_secrets`] is the one place that decides what looks like a
//! credential; every message the gateway did not write itself goes through it.

use std::borrow::Cow;

/// Prefixes of credentials the gateway knows: OpenAI (`sk-`, `sk-proj-`),
/// Anthropic (`sk-ant-`), Stripe-style `sk_`, Groq (`gsk_`) and the gateway's
/// own client keys (`afr_`). The prefix itself is kept: it says which key it was.
const PREFIXES: [&str; 4] = ["sk-", "sk_", "gsk_", "afr_"];

/// Characters a prefixed key needs after its prefix to count as one (so the
/// words "sk-" or "afr_" alone stay readable).
const MIN_AFTER_PREFIX: usize = 8;

/// A bare token this long, with letters and digits, right after a word such
/// as "key", "token" or "secret" is taken for a credential.
const MIN_BARE: usize = 16;

/// A token this long made of letters and digits is masked wherever it stands
/// (a base62 or hex secret pasted without any label).
const MIN_ANYWHERE: usize = 40;

/// What replaces a credential (after its kept prefix).
const MASK: &str = "***";

/// `text` with anything key-shaped replaced by `***` (a known prefix such as
/// `sk-` is kept): tokens with a credential prefix, long letter-and-digit
/// tokens within a few words after "key", "token", "secret", "bearer" or
/// "password", and very long letter-and-digit tokens anywhere.
/// Borrowed when nothing was masked.
pub fn mask_secrets(text: &str) -> Cow<'_, str> {
    let mut out = String::new();
    // Bytes of `text` already copied to `out`.
    let mut copied = 0;
    // Tokens since the last label word; a label arms the next few tokens.
    let mut since_label = usize::MAX;
    for (start, token) in tokens(text) {
        let keep = if let Some(prefix) = PREFIXES.iter().find(|p| {
            token.len() >= p.len() + MIN_AFTER_PREFIX && starts_with_ignore_case(token, p)
        }) {
            Some(prefix.len())
        } else if is_letters_and_digits(token)
            && (token.len() >= MIN_ANYWHERE || (token.len() >= MIN_BARE && since_label <= 3))
        {
            Some(0)
        } else {
            None
        };
        since_label = if is_label(token) {
            0
        } else {
            since_label.saturating_add(1)
        };
        if let Some(keep) = keep {
            out.push_str(&text[copied..start + keep]);
            out.push_str(MASK);
            copied = start + token.len();
        }
    }
    if copied == 0 {
        return Cow::Borrowed(text);
    }
    out.push_str(&text[copied..]);
    Cow::Owned(out)
}

/// Maximal runs of `[A-Za-z0-9_-]` with their byte offsets: the alphabet of
/// base62, hex, base64url and every prefix above.
fn tokens(text: &str) -> impl Iterator<Item = (usize, &str)> {
    let is_token = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'-';
    let bytes = text.as_bytes();
    let mut i = 0;
    std::iter::from_fn(move || {
        while i < bytes.len() && !is_token(bytes[i]) {
            i += 1;
        }
        if i == bytes.len() {
            return None;
        }
        let start = i;
        while i < bytes.len() && is_token(bytes[i]) {
            i += 1;
        }
        // Token bytes are ASCII, so both ends are char boundaries.
        Some((start, &text[start..i]))
    })
}

fn starts_with_ignore_case(token: &str, prefix: &str) -> bool {
    token
        .get(..prefix.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
}

/// Both letters and digits: words ("authentication_error") are not secrets,
/// random strings almost always mix both.
fn is_letters_and_digits(token: &str) -> bool {
    token.bytes().any(|b| b.is_ascii_digit()) && token.bytes().any(|b| b.is_ascii_alphabetic())
}

/// Words after which a long token is a credential: "key", "api-key",
/// "x-api-key", "api_key", "apikey", "token", "secret", "bearer", "password".
fn is_label(token: &str) -> bool {
    let lower = token.to_ascii_lowercase();
    ["key", "token", "secret", "bearer", "password"]
        .iter()
        .any(|label| {
            lower == *label
                || lower.ends_with(&format!("-{label}"))
                || lower.ends_with(&format!("_{label}"))
                || lower == format!("api{label}")
        })
}

#[cfg(test)]
mod tests {
    use super::mask_secrets;

    #[test]
    fn masks_prefixed_keys_keeping_the_prefix() {
        assert_eq!(
            mask_secrets("Incorrect API key provided: sk-proj-AbCdEf0123456789xyz. You can find your API key at https://platform.openai.com/account/api-keys."),
            "Incorrect API key provided: sk-***. You can find your API key at https://platform.openai.com/account/api-keys."
        );
        assert_eq!(
            mask_secrets("bad key sk-ant-api03-Zz9_yy-XX"),
            "bad key sk-***"
        );
        assert_eq!(
            mask_secrets("key afr_0123456789abcdefABCDEF0123456789ab is disabled"),
            "key afr_*** is disabled"
        );
        assert_eq!(mask_secrets("gsk_abcdefgh12345678"), "gsk_***");
    }

    #[test]
    fn masks_long_tokens_after_a_label() {
        assert_eq!(
            mask_secrets("invalid api-key: 0123456789abcdef0123 given"),
            "invalid api-key: *** given"
        );
        assert_eq!(
            mask_secrets("x-api-key=Ab12Cd34Ef56Gh78Ij90"),
            "x-api-key=***"
        );
        assert_eq!(
            mask_secrets("Bearer token provided was eyJhbGciOi1234567890"),
            "Bearer token provided was ***"
        );
        assert_eq!(
            mask_secrets("api_key \"5f4dcc3b5aa765d61d8327deb882cf99\" is revoked"),
            "api_key \"***\" is revoked"
        );
    }

    #[test]
    fn masks_very_long_random_tokens_anywhere() {
        let hex = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        assert_eq!(mask_secrets(&format!("got {hex}.")), "got ***.");
    }

    #[test]
    fn leaves_ordinary_messages_alone() {
        for text in [
            "Rate limit reached for gpt-4o-mini in organization org-abc on requests per min (RPM): Limit 3, Used 3.",
            "Access denied due to invalid subscription key or wrong API endpoint.",
            "invalid x-api-key",
            "The model `gpt-5-chat` does not exist or you do not have access to it.",
            "unknown field `secrett`, expected one of `listen`, `secret`, `secret_env`",
            "authentication_error: invalid_request_error_with_a_very_long_name_without_digits",
            "sk- and afr_ are prefixes",
            "key 12345",
            "",
            "ünïcödé key: ✓",
        ] {
            assert_eq!(mask_secrets(text), text, "{text}");
            assert!(matches!(mask_secrets(text), std::borrow::Cow::Borrowed(_)));
        }
    }

    #[test]
    fn a_label_arms_only_the_next_few_words() {
        let far = "key is not what we need here for Ab12Cd34Ef56Gh78Ij90";
        assert_eq!(mask_secrets(far), far);
    }
}
