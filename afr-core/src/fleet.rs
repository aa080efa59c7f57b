//! Fleet limits: one key's requests-per-minute held exactly across nginx
//! nodes through Redis, without the access phase ever waiting on the network
//! for a key that is far from its limit.
//!
//! Each node takes *leases* — chunks of a key's window budget — from Redis
//! with one atomic script (INCRBY capped by the same sliding-window rule as
//! [`RateWindow`]); the lease sits in the key's slot of the node's shared zone
//! and its workers spend it without any Redis traffic. Redis counts every
//! leased token as admitted, so the sum over all nodes can never exceed the
//! limit. Chunks shrink with the global remaining budget
//! ([`chunk`]), down to one token near the limit, where every admission is
//! one exact round trip. A lease lapses at the end of the Redis window it was
//! granted in: unspent tokens are lost (an under-admission bounded by the
//! chunk size), never carried into a window where they were not counted.
//!
//! This file holds the arithmetic only; the Redis script and the nginx
//! plumbing live in the module's `fleet.rs`. Times are on the caller's
//! monotonic clock (ms), as for [`RateWindow`].

use crate::ratelimit::{RateWindow, Verdict, WINDOW_MS};

/// Largest chunk as a fraction of the limit: with 16, a node holds at most a
/// sixteenth of a key's budget it has not spent, so tokens lost at a window's
/// end stay small while far from the limit a round trip still buys many
/// admissions.
pub const MAX_CHUNK_DIVISOR: u32 = 16;

/// What the Redis lease script answered for one key, interpreted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grant {
    /// Tokens granted (counted as admitted in Redis).
    pub granted: u32,
    /// Admissions still possible fleet-wide after this grant, beyond the
    /// tokens granted.
    pub remaining: u32,
    /// Milliseconds until the Redis window of this grant ends: the tokens
    /// lapse then.
    pub window_left_ms: u64,
    /// When `remaining` is 0: milliseconds until one more request fits.
    pub retry_after_ms: u64,
}

impl Grant {
    /// Interprets the script's counts: `granted` tokens, the previous and
    /// current window's totals (`curr` including this grant) and how far
    /// (`elapsed_ms`) into the current window Redis's clock was.
    pub fn from_counts(limit: u32, granted: u32, prev: u32, curr: u32, elapsed_ms: u64) -> Self {
        let e = elapsed_ms.min(WINDOW_MS - 1);
        // The same window, placed at an arbitrary origin of our own clock.
        let window = RateWindow {
            start_ms: WINDOW_MS,
            prev,
            curr,
        };
        let t = WINDOW_MS + e;
        let mut probe = window;
        let v = probe.hit(limit, t);
        // `hit` counts the probe when it fits: what remains without it is
        // one more than the verdict says.
        let remaining = if v.admitted {
            v.remaining.saturating_add(1).min(limit)
        } else {
            0
        };
        Grant {
            granted,
            remaining,
            window_left_ms: WINDOW_MS - e,
            retry_after_ms: if v.admitted { 0 } else { v.reset_after_ms },
        }
    }
}

/// How many tokens to ask for when `remaining` admissions are left
/// fleet-wide and `nodes` nodes share them: half of a fair share, at most
/// `limit / MAX_CHUNK_DIVISOR`, at least one. Asking for half leaves the other
/// nodes room; near the limit the chunk is one, so the last admissions are
/// counted one by one and the global count is exact.
pub fn chunk(limit: u32, remaining: u32, nodes: u32) -> u32 {
    let fair = remaining / nodes.max(1).saturating_mul(2);
    fair.min(limit / MAX_CHUNK_DIVISOR).max(1)
}

/// How a fleet node decided one request (`$afr_fleet`, `X-Afr-Fleet`):
/// from a lease Redis counted, or on the node's local share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// From a lease: counted fleet-wide.
    Global,
    /// On the local share (Redis unreachable, or a wait that reached its deadline).
    Local,
}

impl Path {
    /// The variable's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Path::Global => "global",
            Path::Local => "local",
        }
    }
}

/// The limit a node enforces on its own while Redis is unreachable: its
/// share `limit ÷ nodes`, at least one request (a limit below the node count
/// would otherwise lock the key out fleet-wide).
pub fn local_share(limit: u32, nodes: u32) -> u32 {
    (limit / nodes.max(1)).max(1)
}

/// A node's lease on one key: lives in the key's shared-zone slot, so it is
/// `repr(C)` and `Copy`; zeroed means "no lease".
///
/// It holds up to two granted ranges of the key's global count (the one
/// being spent and one refilled ahead of need), so that
/// `X-RateLimit-Remaining` stays exact: a token of a range granted when `R`
/// admissions remained beyond it, with `t` tokens of the range left after
/// it, is the admission that leaves exactly `R + t`. A third grant landing
/// while two are held (workers refilling at once) joins the second with the
/// smaller remaining: the count stays exact and Remaining errs low.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lease {
    /// When the tokens lapse (end of their Redis window), caller's clock.
    pub expires_ms: u64,
    /// Until then Redis has nothing left for this key: deny without asking.
    pub denied_until_ms: u64,
    /// A refill ahead of need is in flight until then (one per node).
    pub refill_until_ms: u64,
    /// Tokens of the range being spent.
    pub tokens: u32,
    /// Fleet-wide admissions left beyond that range when it was granted.
    pub remaining: u32,
    /// Tokens of the range refilled ahead.
    pub next_tokens: u32,
    /// Its fleet-wide remaining when granted.
    pub next_remaining: u32,
    /// Size of the last grant, for refilling ahead of need.
    pub last_grant: u32,
    /// Fleet-wide remaining as of the last grant, for sizing the next one.
    pub last_remaining: u32,
}

/// What a lease says about one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Take {
    /// Admitted on a leased token.
    Admit(Verdict),
    /// Redis said the key is exhausted until the verdict's reset.
    Deny(Verdict),
    /// No token and no known exhaustion: ask Redis.
    Empty,
}

impl Lease {
    /// Decides one request of a key with `limit` at `now_ms` from the lease alone.
    pub fn take(&mut self, limit: u32, now_ms: u64) -> Take {
        if now_ms >= self.expires_ms {
            self.tokens = 0;
            self.next_tokens = 0;
        }
        if self.tokens == 0 {
            self.tokens = std::mem::take(&mut self.next_tokens);
            self.remaining = self.next_remaining;
        }
        if self.tokens > 0 {
            self.tokens -= 1;
            return Take::Admit(Verdict {
                admitted: true,
                limit,
                remaining: self.remaining.saturating_add(self.tokens).min(limit),
                // Counted in the lease's window, it weighs until the next one ends.
                reset_after_ms: self.expires_ms - now_ms + WINDOW_MS,
            });
        }
        if now_ms < self.denied_until_ms {
            return Take::Deny(Verdict {
                admitted: false,
                limit,
                remaining: 0,
                reset_after_ms: self.denied_until_ms - now_ms,
            });
        }
        Take::Empty
    }

    /// True when a refill should be asked for now, before the tokens run out
    /// (half of the last grant spent, nothing refilled ahead yet, none in
    /// flight), so that requests rarely wait for one.
    pub fn wants_refill(&self, now_ms: u64) -> bool {
        now_ms < self.expires_ms
            && now_ms >= self.refill_until_ms
            && self.tokens > 0
            && self.next_tokens == 0
            && self.last_remaining > 0
            && self.tokens <= self.last_grant / 2
    }

    /// Notes that a refill ahead of need was sent at `now_ms` and may take
    /// until `until_ms`: other workers of the node do not send another.
    pub fn refill_sent(&mut self, until_ms: u64) {
        self.refill_until_ms = until_ms;
    }

    /// How many tokens to ask for: a [`chunk`] of what the last grant said
    /// remains (the whole limit when nothing is known for this window).
    pub fn want(&self, limit: u32, nodes: u32, now_ms: u64) -> u32 {
        let known = if now_ms < self.expires_ms {
            self.last_remaining
        } else {
            limit
        };
        chunk(limit, known, nodes)
    }

    /// Adds a grant obtained by a request sent at `sent_ms`. The lapse time
    /// is counted from the send, which is before Redis read its clock, so the
    /// tokens lapse no later than their window ends. Tokens of an older
    /// window are dropped when a newer window's grant lands, and a late
    /// grant of an older window is ignored: both only under-admit.
    pub fn apply(&mut self, g: &Grant, sent_ms: u64) {
        let expires = sent_ms + g.window_left_ms;
        let half = WINDOW_MS / 2;
        if expires + half < self.expires_ms {
            return;
        }
        if expires > self.expires_ms + half || sent_ms >= self.expires_ms {
            self.tokens = 0;
            self.next_tokens = 0;
            self.expires_ms = expires;
        } else {
            self.expires_ms = self.expires_ms.min(expires);
        }
        self.refill_until_ms = 0;
        if g.granted > 0 {
            if self.tokens == 0 && self.next_tokens == 0 {
                (self.tokens, self.remaining) = (g.granted, g.remaining);
            } else if self.next_tokens == 0 {
                (self.next_tokens, self.next_remaining) = (g.granted, g.remaining);
            } else {
                self.next_tokens = self.next_tokens.saturating_add(g.granted);
                self.next_remaining = self.next_remaining.min(g.remaining);
            }
        }
        self.last_remaining = g.remaining;
        self.last_grant = g.granted;
        self.denied_until_ms = if g.remaining == 0 {
            sent_ms + g.retry_after_ms
        } else {
            0
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The table the Lua twin is run against too (sidecar/tests/fleet.rs).
    const VECTORS: &str = include_str!("../vectors/sliding-window.json");

    #[test]
    fn the_sliding_window_vectors_hold_in_rust() {
        let doc: serde_json::Value = serde_json::from_str(VECTORS).unwrap();
        assert_eq!(doc["window_ms"], WINDOW_MS);
        let n = |v: &serde_json::Value, k: &str| v[k].as_i64().unwrap_or_else(|| panic!("{k}"));
        let rule = doc["rule"].as_array().unwrap();
        assert!(rule.len() >= 10);
        for v in rule {
            let name = v["name"].as_str().unwrap();
            let room = crate::ratelimit::room(
                n(v, "limit") as u64,
                n(v, "prev") as u64,
                n(v, "curr") as u64,
                n(v, "elapsed_ms") as u64,
            );
            assert_eq!(room, i128::from(n(v, "room")), "{name}");
            let grant = room.min(i128::from(n(v, "want"))).max(0);
            assert_eq!(grant, i128::from(n(v, "grant")), "{name}");
        }
        for v in doc["lease"].as_array().unwrap() {
            let name = v["name"].as_str().unwrap();
            let limit = n(v, "limit") as u32;
            let mut lease = Lease::default();
            for step in v["steps"].as_array().unwrap() {
                if let Some(g) = step.get("apply") {
                    let c = |k| n(g, k) as u32;
                    let grant = Grant::from_counts(
                        limit,
                        c("granted"),
                        c("prev"),
                        c("curr"),
                        n(g, "elapsed_ms") as u64,
                    );
                    lease.apply(&grant, n(step, "sent_ms") as u64);
                } else {
                    let at = n(step, "take_at_ms") as u64;
                    let got = match lease.take(limit, at) {
                        Take::Admit(_) => "admit",
                        Take::Deny(_) => "deny",
                        Take::Empty => "empty",
                    };
                    assert_eq!(got, step["expect"].as_str().unwrap(), "{name}, at {at} ms");
                }
            }
        }
    }

    #[test]
    fn chunks_shrink_to_one_near_the_limit() {
        assert_eq!(chunk(50, 50, 2), 3); // capped at 50/16
        assert_eq!(chunk(6000, 6000, 2), 375);
        assert_eq!(chunk(6000, 800, 2), 200);
        assert_eq!(chunk(50, 5, 2), 1);
        assert_eq!(chunk(50, 0, 2), 1);
        assert_eq!(chunk(1, 1, 0), 1);
    }

    #[test]
    fn local_share_divides_and_never_locks_out() {
        assert_eq!(local_share(50, 2), 25);
        assert_eq!(local_share(60, 4), 15);
        assert_eq!(local_share(1, 3), 1);
        assert_eq!(local_share(10, 0), 10);
    }

    #[test]
    fn grant_counts_read_like_the_sliding_window() {
        // Fresh window, 3 of 50 granted: 47 left, lapses at the window end.
        let g = Grant::from_counts(50, 3, 0, 3, 10_000);
        assert_eq!(g.remaining, 47);
        assert_eq!(g.window_left_ms, 50_000);
        assert_eq!(g.retry_after_ms, 0);
        // Exhausted: nothing left, retry when the current window is over.
        let g = Grant::from_counts(50, 0, 0, 50, 10_000);
        assert_eq!((g.granted, g.remaining), (0, 0));
        assert_eq!(g.retry_after_ms, 50_000 + 1_200);
        // A full previous window weighs by the part still covered.
        let g = Grant::from_counts(50, 0, 50, 0, 30_000);
        assert_eq!(g.remaining, 25);
    }

    #[test]
    fn lease_spends_tokens_then_asks_then_denies() {
        let mut l = Lease::default();
        assert_eq!(l.take(50, 1_000), Take::Empty);
        l.apply(&Grant::from_counts(50, 3, 0, 3, 0), 1_000);
        assert_eq!(l.expires_ms, 61_000);
        let mut seen = vec![];
        while let Take::Admit(v) = l.take(50, 2_000) {
            seen.push(v.remaining);
        }
        assert_eq!(seen, vec![49, 48, 47]);
        // Exhausted fleet-wide: denied locally until Redis says it fits.
        l.apply(&Grant::from_counts(50, 0, 0, 50, 2_000), 2_000);
        match l.take(50, 3_000) {
            Take::Deny(v) => assert_eq!(v.reset_after_ms, 58_000 + 1_200 - 1_000),
            other => panic!("{other:?}"),
        }
        assert_eq!(l.take(50, 61_200), Take::Empty);
    }

    #[test]
    fn tokens_lapse_with_their_window_and_late_grants_are_dropped() {
        let mut l = Lease::default();
        l.apply(&Grant::from_counts(50, 3, 0, 3, 59_000), 0);
        assert_eq!(l.expires_ms, 1_000);
        assert_eq!(l.take(50, 1_000), Take::Empty);
        // A grant of the next window replaces the lapsed tokens.
        l.apply(&Grant::from_counts(50, 2, 3, 2, 10), 1_000);
        assert_eq!(l.tokens, 2);
        // A grant from the old window arriving late adds nothing.
        l.apply(&Grant::from_counts(50, 3, 0, 6, 59_000), 0);
        assert_eq!(l.tokens, 2);
    }

    #[test]
    fn refills_ahead_after_half_the_grant() {
        let mut l = Lease::default();
        l.apply(&Grant::from_counts(1000, 10, 0, 10, 0), 0);
        for _ in 0..4 {
            assert!(matches!(l.take(1000, 5), Take::Admit(_)));
            assert!(!l.wants_refill(5));
        }
        assert!(matches!(l.take(1000, 5), Take::Admit(_)));
        assert!(l.wants_refill(5));
        assert_eq!(l.want(1000, 2, 5), 62);
        assert_eq!(l.want(1000, 2, 70_000), 62);
    }

    /// A model of Redis: one window, the script's capped INCRBY.
    fn script(curr: &mut u32, limit: u32, want: u32) -> Grant {
        let room = crate::ratelimit::room(limit.into(), 0, (*curr).into(), 1_000);
        let g = want.min(room.max(0) as u32);
        *curr += g;
        Grant::from_counts(limit, g, 0, *curr, 1_000)
    }

    proptest! {
        /// Whatever order nodes refill and spend in (grants landing in any
        /// order), admissions never exceed the limit and no client is told
        /// more remain than do: sorted from the largest, the i-th Remaining
        /// seen is at most `limit − 1 − i`. Without contention (one grant
        /// held at a time) every value is distinct.
        #[test]
        fn never_over_admits_and_remaining_never_overstates(
            limit in 1u32..200,
            nodes in 1u32..5,
            steps in proptest::collection::vec((0usize..4, 0u8..4), 1..600),
        ) {
            let mut curr = 0;
            let mut leases = [Lease::default(); 4];
            // Grants taken from Redis but not yet landed, per node.
            let mut inflight: Vec<Vec<Grant>> = vec![vec![]; 4];
            let mut remainings = vec![];
            for (n, op) in steps {
                let l = &mut leases[n];
                match op {
                    0 => {
                        let want = l.want(limit, nodes, 1_000);
                        inflight[n].push(script(&mut curr, limit, want));
                    }
                    1 => {
                        if !inflight[n].is_empty() {
                            let g = inflight[n].remove(0);
                            l.apply(&g, 1_000);
                        }
                    }
                    2 => {
                        if let Some(g) = inflight[n].pop() {
                            l.apply(&g, 1_000);
                        }
                    }
                    _ => {
                        if l.wants_refill(1_000) {
                            let want = l.want(limit, nodes, 1_000);
                            let g = script(&mut curr, limit, want);
                            l.apply(&g, 1_000);
                        }
                        if let Take::Admit(v) = l.take(limit, 1_000) {
                            remainings.push(v.remaining);
                        }
                    }
                }
            }
            prop_assert!(remainings.len() as u32 <= limit);
            remainings.sort_unstable_by(|a, b| b.cmp(a));
            for (i, r) in remainings.iter().enumerate() {
                prop_assert!(*r + 1 + i as u32 <= limit, "{:?}", remainings);
            }
        }

        #[test]
        fn remaining_is_the_global_count_without_contention(
            limit in 1u32..200,
            nodes in 1u32..5,
            order in proptest::collection::vec(0usize..4, 1..600),
        ) {
            let mut curr = 0;
            let mut leases = [Lease::default(); 4];
            let mut remainings = vec![];
            for n in order {
                let l = &mut leases[n];
                let mut t = l.take(limit, 1_000);
                if t == Take::Empty {
                    let want = l.want(limit, nodes, 1_000);
                    l.apply(&script(&mut curr, limit, want), 1_000);
                    t = l.take(limit, 1_000);
                }
                if let Take::Admit(v) = t {
                    remainings.push(v.remaining);
                }
            }
            let mut sorted = remainings.clone();
            sorted.sort_unstable();
            sorted.dedup();
            prop_assert_eq!(sorted.len(), remainings.len());
        }
    }
}
