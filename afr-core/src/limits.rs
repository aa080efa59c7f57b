//! A key's limits beyond requests per minute — tokens per minute, a spend
//! budget per UTC day or month, requests in flight — and how they travel
//! from the module (which reads `keys.toml`) to the sidecar (which reserves
//! tokens and money): one `X-Afr-Limits` request header, written and read here
//! so both ends agree by construction.
//!
//! Money is counted in integer nano-dollars (10⁻⁹ USD): a price of $0.025 per
//! million tokens is 25 nano-dollars per token, so costs and budgets add up
//! without floating-point drift.

use std::fmt;

/// Nano-dollars in one US dollar.
pub const NANOS_PER_USD: u64 = 1_000_000_000;
/// Largest budget a key may have, in dollars.
pub const MAX_BUDGET_USD: f64 = 1e9;
/// Largest `tpm`.
pub const MAX_TPM: i64 = 10_000_000_000;
/// Largest `max_concurrent`.
pub const MAX_CONCURRENT: i64 = 1_000_000;

/// The period a budget renews over, in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    /// A UTC calendar day.
    Day,
    /// A UTC calendar month.
    Month,
}

impl Period {
    /// `"day"` or `"month"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Month => "month",
        }
    }

    /// Parses `"day"` or `"month"`.
    pub fn parse(text: &str) -> Option<Period> {
        match text {
            "day" => Some(Period::Day),
            "month" => Some(Period::Month),
            _ => None,
        }
    }

    /// Start and end (Unix ms, end exclusive) of the period holding `now_ms`.
    pub fn bounds(self, now_ms: u64) -> (u64, u64) {
        const DAY_MS: u64 = 86_400_000;
        let day_start = now_ms - now_ms % DAY_MS;
        match self {
            Period::Day => (day_start, day_start + DAY_MS),
            Period::Month => {
                let days = (now_ms / DAY_MS) as i64;
                let (y, m, _) = civil_from_days(days);
                let start = days_from_civil(y, m, 1);
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                let end = days_from_civil(ny, nm, 1);
                (start as u64 * DAY_MS, end as u64 * DAY_MS)
            }
        }
    }
}

// Howard Hinnant's civil-date algorithms (public domain): two small pure
// functions, cheaper to read than pulling calendar types through the ledger.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Spend allowed per period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// The amount in nano-dollars.
    pub nanos: u64,
    /// The period it renews over.
    pub per: Period,
}

impl Budget {
    /// Checks a budget as written in `keys.toml` (`usd` dollars per `per`).
    pub fn from_usd(usd: Option<f64>, per: &str) -> Result<Budget, String> {
        let per = Period::parse(per)
            .ok_or_else(|| format!("per must be \"day\" or \"month\", got {per:?}"))?;
        match usd {
            Some(v) if v.is_finite() && v > 0.0 && v <= MAX_BUDGET_USD => Ok(Budget {
                nanos: (v * NANOS_PER_USD as f64).round() as u64,
                per,
            }),
            _ => Err(format!(
                "usd must be a number above 0 and at most {MAX_BUDGET_USD}"
            )),
        }
    }

    /// The amount in dollars.
    pub fn usd(&self) -> f64 {
        self.nanos as f64 / NANOS_PER_USD as f64
    }
}

/// The limits of one key that the sidecar enforces (tokens and money) and the
/// one the module enforces (`max_concurrent`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyLimits {
    /// Tokens per minute (prompt + completion), sliding window.
    pub tpm: Option<u64>,
    /// Spend per period.
    pub budget: Option<Budget>,
    /// Requests in flight at once.
    pub max_concurrent: Option<u32>,
}

impl KeyLimits {
    /// Whether a request of this key reserves tokens or money (a `tpm` or a
    /// budget), and so needs its prompt estimate.
    pub fn reserves(&self) -> bool {
        self.tpm.is_some() || self.budget.is_some()
    }

    /// The `X-Afr-Limits` value the module sends for this key, `None` when the
    /// sidecar has nothing to enforce. Only what the sidecar needs travels.
    pub fn header_value(&self) -> Option<String> {
        let mut parts = Vec::new();
        if let Some(t) = self.tpm {
            parts.push(format!("tpm={t}"));
        }
        if let Some(b) = self.budget {
            parts.push(format!("budget={}/{}", b.nanos, b.per.as_str()));
        }
        if parts.is_empty() {
            None
        } else {
            Some(parts.join(";"))
        }
    }

    /// What one of `nodes` fleet nodes enforces on its own while the
    /// fleet's Redis is unreachable: every limit divided by the node count
    /// (at least one token and one nano-dollar, as the module's
    /// `local_share` keeps at least one request), so the fleet together
    /// never exceeds the limit.
    pub fn share(&self, nodes: u32) -> KeyLimits {
        let n = u64::from(nodes.max(1));
        KeyLimits {
            tpm: self.tpm.map(|t| (t / n).max(1)),
            budget: self.budget.map(|b| Budget {
                nanos: (b.nanos / n).max(1),
                per: b.per,
            }),
            max_concurrent: self.max_concurrent,
        }
    }

    /// Reads an `X-Afr-Limits` value (`tpm=N;budget=NANOS/day|month`).
    pub fn parse_header(value: &str) -> Result<KeyLimits, HeaderError> {
        let mut limits = KeyLimits::default();
        for part in value.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let bad = || HeaderError(part.to_owned());
            let (name, v) = part.split_once('=').ok_or_else(bad)?;
            match name {
                "tpm" => limits.tpm = Some(v.parse().map_err(|_| bad())?),
                "budget" => {
                    let (n, per) = v.split_once('/').ok_or_else(bad)?;
                    limits.budget = Some(Budget {
                        nanos: n.parse().map_err(|_| bad())?,
                        per: Period::parse(per).ok_or_else(bad)?,
                    });
                }
                _ => return Err(bad()),
            }
        }
        Ok(limits)
    }
}

/// An `X-Afr-Limits` part the sidecar cannot read (a module and sidecar of
/// different versions).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct HeaderError(pub String);

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unreadable X-Afr-Limits part {:?}", self.0)
    }
}

/// A duration in OpenAI's `x-ratelimit-reset-*` format: `6m0s`, `1s`, `20ms`,
/// `1h2m3s`. Below a second it is whole milliseconds; above, whole seconds
/// rounded up, so a client that waits that long is never early.
pub fn openai_duration(ms: u64) -> String {
    DurationText::new(ms).as_str().to_owned()
}

/// [`openai_duration`] in a buffer of its own: no allocation and no
/// formatting machinery, for the module's header filter, which writes it on
/// every response (`format!` there cost ~800 instructions a response,
/// callgrind).
#[derive(Clone, Copy)]
pub struct DurationText {
    buf: [u8; 40],
    len: usize,
}

impl DurationText {
    /// The text of `ms` milliseconds.
    pub fn new(ms: u64) -> Self {
        let mut text = DurationText {
            buf: [0; 40],
            len: 0,
        };
        if ms < 1000 {
            text.push(ms, b"ms");
            return text;
        }
        let s = ms.div_ceil(1000);
        let (h, m, s) = (s / 3600, s / 60 % 60, s % 60);
        if h > 0 {
            text.push(h, b"h");
        }
        if h > 0 || m > 0 {
            text.push(m, b"m");
        }
        text.push(s, b"s");
        text
    }

    /// Appends `n` and its `unit` (at most 20 digits and 2 bytes, three
    /// times: within the buffer).
    fn push(&mut self, n: u64, unit: &[u8]) {
        let mut digits = itoa::Buffer::new();
        for part in [digits.format(n).as_bytes(), unit] {
            self.buf[self.len..self.len + part.len()].copy_from_slice(part);
            self.len += part.len();
        }
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        // Only ASCII digits and unit letters were written.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default()
    }
}

/// Nano-dollars as US dollars with six decimals (`12.345679`), rounded half
/// up to the micro-dollar: integer arithmetic, so exact where `{:.6}` of an
/// f64 would round through a binary fraction (and cost a float formatting,
/// ~2 700 instructions, on every budgeted response's header).
pub fn usd_micros(nanos: u64) -> String {
    let micros = nanos / 1000 + u64::from(nanos % 1000 >= 500);
    // Written by digits: a budgeted key's every response carries it, and
    // `format!("{}.{:06}")` cost ~1 200 instructions there (callgrind).
    let mut text = String::with_capacity(27);
    text.push_str(itoa::Buffer::new().format(micros / 1_000_000));
    text.push('.');
    let frac = micros % 1_000_000;
    for place in [100_000, 10_000, 1_000, 100, 10, 1] {
        text.push(char::from(b'0' + (frac / place % 10) as u8));
    }
    text
}

/// A Unix time in seconds as RFC 3339 in UTC (`2026-12-06T17:05:00Z`), the
/// form of Anthropic's `anthropic-ratelimit-*-reset` headers.
pub fn rfc3339_seconds(unix_s: u64) -> String {
    let (days, rem) = (unix_s / 86_400, unix_s % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_reserves_with_a_tpm_or_a_budget_only() {
        let budget = Some(Budget {
            nanos: 1,
            per: Period::Day,
        });
        assert!(!KeyLimits::default().reserves());
        assert!(!KeyLimits {
            max_concurrent: Some(2),
            ..KeyLimits::default()
        }
        .reserves());
        assert!(KeyLimits {
            tpm: Some(1),
            ..KeyLimits::default()
        }
        .reserves());
        assert!(KeyLimits {
            budget,
            ..KeyLimits::default()
        }
        .reserves());
    }

    #[test]
    fn usd_micros_rounds_half_up_to_the_micro_dollar_exactly() {
        assert_eq!(usd_micros(0), "0.000000");
        assert_eq!(usd_micros(499), "0.000000");
        assert_eq!(usd_micros(500), "0.000001");
        assert_eq!(usd_micros(1_000_000_000), "1.000000");
        assert_eq!(usd_micros(12_345_678_901), "12.345679");
        // Ties f64 cannot hold: {:.6} of 3.5e-6 gives 0.000003, of 5e-7 0.000000.
        assert_eq!(usd_micros(3_500), "0.000004");
        assert_eq!(usd_micros(2_500), "0.000003");
        assert_eq!(usd_micros(u64::MAX), "18446744073.709552");
        assert_eq!(usd_micros(1_000_500), "0.001001");
        assert_eq!(usd_micros(10_000_000), "0.010000");
    }

    #[test]
    fn rfc3339_seconds_in_utc() {
        assert_eq!(rfc3339_seconds(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_seconds(1_796_576_679), "2026-12-06T17:04:39Z");
        assert_eq!(rfc3339_seconds(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn a_nodes_share_divides_tokens_and_budget() {
        let l = KeyLimits {
            tpm: Some(1000),
            budget: Some(Budget {
                nanos: 50_000_000_000,
                per: Period::Month,
            }),
            max_concurrent: Some(4),
        };
        let s = l.share(3);
        assert_eq!(s.tpm, Some(333));
        assert_eq!(s.budget.unwrap().nanos, 16_666_666_666);
        assert_eq!(s.max_concurrent, Some(4));
        assert_eq!(KeyLimits { tpm: Some(1), ..l }.share(4).tpm, Some(1));
    }

    #[test]
    fn header_round_trip() {
        let l = KeyLimits {
            tpm: Some(1000),
            budget: Some(Budget {
                nanos: 5 * NANOS_PER_USD,
                per: Period::Month,
            }),
            max_concurrent: Some(3),
        };
        let h = l.header_value().unwrap();
        assert_eq!(h, "tpm=1000;budget=5000000000/month");
        let back = KeyLimits::parse_header(&h).unwrap();
        assert_eq!(back.tpm, l.tpm);
        assert_eq!(back.budget, l.budget);
        assert_eq!(KeyLimits::default().header_value(), None);
        assert!(KeyLimits::parse_header("tpm=x").is_err());
        assert!(KeyLimits::parse_header("budget=5/week").is_err());
        assert!(KeyLimits::parse_header("rpm=5").is_err());
    }

    #[test]
    fn durations_in_openai_format() {
        assert_eq!(openai_duration(20), "20ms");
        assert_eq!(openai_duration(1000), "1s");
        assert_eq!(openai_duration(1001), "2s");
        assert_eq!(openai_duration(360_000), "6m0s");
        assert_eq!(openai_duration(3_723_000), "1h2m3s");
        assert_eq!(openai_duration(3_600_000), "1h0m0s");
        assert_eq!(openai_duration(0), "0ms");
        assert_eq!(openai_duration(u64::MAX), "5124095576030h25m52s");
    }

    #[test]
    fn periods_are_utc_days_and_months() {
        // 2026-11-30T17:00:00Z
        let t = 1_796_058_000_000;
        let (s, e) = Period::Day.bounds(t);
        assert_eq!((s, e), (1_795_996_800_000, 1_796_083_200_000));
        let (s, e) = Period::Month.bounds(t);
        assert_eq!(s, 1_793_491_200_000); // 2026-11-01
        assert_eq!(e, 1_796_083_200_000); // 2026-12-01
        let (s, e) = Period::Month.bounds(1_796_169_600_000); // 2026-12-02
        assert_eq!((s, e), (1_796_083_200_000, 1_798_761_600_000)); // → 2027-01-01
        let (s, e) = Period::Month.bounds(1_835_395_200_000); // 2028-02-29 (leap)
        assert_eq!((s, e), (1_832_976_000_000, 1_835_481_600_000));
    }

    #[test]
    fn budgets_are_checked() {
        assert_eq!(
            Budget::from_usd(Some(0.5), "day").unwrap().nanos,
            500_000_000
        );
        assert!(Budget::from_usd(Some(0.0), "day").is_err());
        assert!(Budget::from_usd(None, "day").is_err());
        assert!(Budget::from_usd(Some(f64::NAN), "day").is_err());
        assert!(Budget::from_usd(Some(1.0), "week")
            .unwrap_err()
            .contains("per"));
    }
}
