//! Points in time as operators and clients write them: `24h` (ago), an RFC
//! 3339 time, or a UTC date. `now` is a parameter so tests never read the clock.

use std::time::Duration;

use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{Date, OffsetDateTime};

/// A time argument that is none of the accepted forms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{value}` is not a time: expected a duration ago like 24h, 30m or 7d, \
     an RFC 3339 time like 2026-11-25T09:00:00Z, or a date like 2026-11-25"
)]
pub struct TimeArgError {
    /// The text as given.
    pub value: String,
}

/// Parses `value` into Unix milliseconds: a duration (`humantime` syntax)
/// counts back from `now_ms`, an RFC 3339 time is absolute, a bare date is
/// its midnight UTC.
pub fn parse_time_arg(value: &str, now_ms: i64) -> Result<i64, TimeArgError> {
    let value = value.trim();
    let err = || TimeArgError {
        value: value.to_owned(),
    };
    if value.is_empty() {
        return Err(err());
    }
    if value.starts_with(|c: char| c.is_ascii_digit()) && !value.contains(['-', ':']) {
        let ago = humantime::parse_duration(value).map_err(|_| err())?;
        return Ok(now_ms.saturating_sub(duration_ms(ago)));
    }
    if let Ok(t) = OffsetDateTime::parse(value, &Rfc3339) {
        return i64::try_from(t.unix_timestamp_nanos() / 1_000_000).map_err(|_| err());
    }
    let date =
        Date::parse(value, format_description!("[year]-[month]-[day]")).map_err(|_| err())?;
    Ok(date.midnight().assume_utc().unix_timestamp() * 1000)
}

/// Unix milliseconds as RFC 3339 UTC (`2026-11-25T09:00:00Z`, with a
/// fraction only when there is one).
pub fn format_ms(ms: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| ms.to_string())
}

/// The current time in Unix milliseconds.
pub fn now_ms() -> i64 {
    let now = OffsetDateTime::now_utc();
    i64::try_from(now.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-11-25T10:00:00Z
    const NOW: i64 = 1_795_600_800_000;

    #[test]
    fn durations_count_back_from_now() {
        assert_eq!(parse_time_arg("24h", NOW), Ok(NOW - 86_400_000));
        assert_eq!(parse_time_arg("30m", NOW), Ok(NOW - 1_800_000));
        assert_eq!(parse_time_arg("7d", NOW), Ok(NOW - 7 * 86_400_000));
        assert_eq!(parse_time_arg("1h 30m", NOW), Ok(NOW - 5_400_000));
    }

    #[test]
    fn rfc3339_and_dates_are_absolute() {
        assert_eq!(parse_time_arg("2026-11-25T10:00:00Z", 0), Ok(NOW));
        assert_eq!(parse_time_arg("2026-11-25T11:00:00+01:00", 0), Ok(NOW));
        assert_eq!(parse_time_arg("2026-11-25T10:00:00.250Z", 0), Ok(NOW + 250));
        assert_eq!(parse_time_arg("2026-11-25", 0), Ok(NOW - 10 * 3_600_000));
    }

    #[test]
    fn nonsense_is_refused_with_the_value() {
        for bad in [
            "",
            "yesterday",
            "24",
            "24x",
            "2026-13-01",
            "2026-11-25T25:00:00Z",
            "-1h",
        ] {
            let e = parse_time_arg(bad, NOW).expect_err(bad);
            assert_eq!(e.value, bad.trim());
            assert!(e.to_string().contains("24h"), "{e}");
        }
    }

    #[test]
    fn format_round_trips() {
        assert_eq!(format_ms(NOW), "2026-11-25T10:00:00Z");
        assert_eq!(parse_time_arg(&format_ms(NOW + 5), 0), Ok(NOW + 5));
    }
}
