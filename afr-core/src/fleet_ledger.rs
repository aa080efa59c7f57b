//! The pure half of the fleet's token and budget limits (design §9): where a
//! key's counts live in Redis, and when a node that lost Redis asks again.
//!
//! Each sidecar reserves a request's worst case in Redis with one atomic
//! script that applies the [`crate::ledger::Ledger`]'s rule to the fleet's
//! counts, and adopts what the script read so its headers report the fleet.
//! While Redis is unreachable every node decides alone on its share of each
//! limit ([`crate::limits::KeyLimits::share`]); [`Health`] says when to try
//! Redis again. The Redis calls themselves live in the sidecar's `serve/fleet.rs`.

use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::limits::Period;

/// How often a node that lost Redis tries it again (one request's call).
pub const PROBE_EVERY: Duration = Duration::from_secs(1);

/// A key's names in Redis: `afr:{<hash of the id>}:t` (+ `:<window start>`)
/// for tokens and `afr:{…}:b:<day|month>:<period start>` for spend. The id
/// is hashed so that Redis holds no key ids; the braces keep one key's names
/// in one cluster slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisKeys {
    /// Prefix of the key's token-window counters; the script appends `:<window start>`.
    pub tokens: String,
    /// The key's spend counter for one budget period.
    pub budget: String,
    /// Prefix of the key's reservation holds; a hold appends its id.
    pub holds: String,
}

impl RedisKeys {
    /// The names of `key_id`'s counters, the budget's for the `per` period starting `period_start`.
    pub fn new(key_id: &str, per: Option<Period>, period_start: u64) -> Self {
        let digest = Sha256::digest(key_id.as_bytes());
        let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        let budget = match per {
            Some(per) => format!("afr:{{{hex}}}:b:{}:{period_start}", per.as_str()),
            None => format!("afr:{{{hex}}}:b:none"),
        };
        RedisKeys {
            tokens: format!("afr:{{{hex}}}:t"),
            budget,
            holds: format!("afr:{{{hex}}}:h:"),
        }
    }

    /// The hold of reservation `id` (what it counted, until it is settled).
    pub fn hold(&self, id: &str) -> String {
        format!("{}{id}", self.holds)
    }

    /// The token counter of the window starting `window_start`.
    pub fn window(&self, window_start: u64) -> String {
        format!("{}:{window_start}", self.tokens)
    }
}

/// Whether this node is using Redis, and when it asks again if not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Health {
    up: bool,
    next_try: Option<Instant>,
}

/// What a change of [`Health`] asks the caller to log (once per change).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Redis just became unreachable: local shares from now on.
    Lost,
    /// Redis answered again: global limits are back.
    Back,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            up: true,
            next_try: None,
        }
    }
}

impl Health {
    /// Whether Redis is believed reachable.
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Whether the request arriving `now` should call Redis: always while it
    /// is up; while it is down, one request per [`PROBE_EVERY`] (the others
    /// decide locally without waiting).
    pub fn should_try(&mut self, now: Instant) -> bool {
        if self.up {
            return true;
        }
        match self.next_try {
            Some(at) if now < at => false,
            _ => {
                self.next_try = Some(now + PROBE_EVERY);
                true
            }
        }
    }

    /// A Redis call failed or timed out at `now`.
    pub fn failed(&mut self, now: Instant) -> Option<Change> {
        self.next_try = Some(now + PROBE_EVERY);
        std::mem::replace(&mut self.up, false).then_some(Change::Lost)
    }

    /// Redis answered, but without the counts it held (it restarted empty
    /// or failed over): the node decides alone until `until` (the end of
    /// the window those counts were of), as when Redis is down.
    pub fn lost_counters(&mut self, until: Instant) -> Option<Change> {
        self.next_try = Some(until);
        std::mem::replace(&mut self.up, false).then_some(Change::Lost)
    }

    /// A Redis call succeeded.
    pub fn answered(&mut self) -> Option<Change> {
        self.next_try = None;
        (!std::mem::replace(&mut self.up, true)).then_some(Change::Back)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_hide_the_id_and_keep_one_slot() {
        let k = RedisKeys::new("team-a", Some(Period::Month), 1_800_000_000_000);
        assert!(!k.tokens.contains("team-a") && !k.budget.contains("team-a"));
        let tag = &k.tokens[..k.tokens.find('}').unwrap() + 1];
        assert!(k.budget.starts_with(tag), "{k:?}");
        assert_eq!(k.window(60_000), format!("{}:60000", k.tokens));
        assert!(k.budget.ends_with(":b:month:1800000000000"));
        let day = RedisKeys::new("team-a", Some(Period::Day), 1_800_000_000_000);
        assert_ne!(
            day.budget, k.budget,
            "a day and a month starting together differ"
        );
        assert_ne!(RedisKeys::new("team-b", None, 0).tokens, k.tokens);
    }

    #[test]
    fn a_lost_redis_is_logged_once_and_probed_once_a_second() {
        let t0 = Instant::now();
        let mut h = Health::default();
        assert!(h.should_try(t0));
        assert_eq!(h.failed(t0), Some(Change::Lost));
        assert_eq!(h.failed(t0), None, "logged once");
        assert!(!h.should_try(t0 + Duration::from_millis(999)));
        assert!(h.should_try(t0 + PROBE_EVERY));
        assert!(!h.should_try(t0 + PROBE_EVERY), "one probe per interval");
        assert_eq!(h.answered(), Some(Change::Back));
        assert_eq!(h.answered(), None);
        assert!(h.should_try(t0 + PROBE_EVERY));
    }
}
