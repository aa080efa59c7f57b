//! A provider's "come back later" (design §4): `retry-after-ms` (float
//! milliseconds, sent by Azure and honoured first by the OpenAI SDKs), then
//! `Retry-After` as delay-seconds or an HTTP-date (RFC 9110 §10.2.3). It sets
//! how long the provider's breaker stays open and the `Retry-After` the client
//! gets when every route was rate limited.

use std::time::{Duration, SystemTime};

/// The wait a provider asked for, from its `retry-after-ms` and `Retry-After`
/// header values, with `now` for an HTTP-date. `None` when neither is given
/// or readable; a date in the past is a zero wait.
pub fn parse(
    retry_after_ms: Option<&str>,
    retry_after: Option<&str>,
    now: SystemTime,
) -> Option<Duration> {
    if let Some(ms) = retry_after_ms.and_then(|v| non_negative(v.trim())) {
        return Some(Duration::from_secs_f64(ms / 1000.0));
    }
    let value = retry_after?.trim();
    if let Some(secs) = non_negative(value) {
        return Some(Duration::from_secs_f64(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// A finite, non-negative number within a bound far beyond any real wait
/// (larger is a broken header, and `Duration::from_secs_f64` must not panic).
fn non_negative(value: &str) -> Option<f64> {
    let n: f64 = value.parse().ok()?;
    (0.0..=1e12).contains(&n).then_some(n)
}

/// Whole seconds for a `Retry-After` header, rounded up so a client that
/// waits that long is not early.
pub fn ceil_secs(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
}

/// Whole milliseconds for a `retry-after-ms` header, rounded up.
pub fn ceil_millis(wait: Duration) -> u64 {
    u64::try_from(wait.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> SystemTime {
        // Sun, 06 Nov 1994 08:49:37 GMT, RFC 9110's example date.
        SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777)
    }

    #[test]
    fn milliseconds_win_over_seconds() {
        assert_eq!(
            parse(Some("1500.5"), Some("9"), now()),
            Some(Duration::from_micros(1_500_500))
        );
    }

    #[test]
    fn seconds_as_integer_or_float() {
        assert_eq!(parse(None, Some("7"), now()), Some(Duration::from_secs(7)));
        assert_eq!(
            parse(None, Some(" 2.5 "), now()),
            Some(Duration::from_millis(2500))
        );
    }

    #[test]
    fn http_date_is_relative_to_now_and_never_negative() {
        assert_eq!(
            parse(None, Some("Sun, 06 Nov 1994 08:50:07 GMT"), now()),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse(None, Some("Sun, 06 Nov 1994 08:00:00 GMT"), now()),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn unreadable_values_are_ignored() {
        assert_eq!(parse(None, None, now()), None);
        for bad in ["soon", "-3", "NaN", "inf", "1e300", ""] {
            assert_eq!(parse(Some(bad), Some(bad), now()), None, "{bad}");
        }
        // An unreadable ms value falls back to Retry-After.
        assert_eq!(
            parse(Some("x"), Some("4"), now()),
            Some(Duration::from_secs(4))
        );
    }

    #[test]
    fn header_values_round_up() {
        assert_eq!(ceil_secs(Duration::from_millis(2001)), 3);
        assert_eq!(ceil_secs(Duration::from_secs(2)), 2);
        assert_eq!(ceil_millis(Duration::from_micros(1500)), 2);
        assert_eq!(ceil_millis(Duration::from_millis(7)), 7);
    }
}
