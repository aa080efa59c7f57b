//! The per-host ledger of token and money reservations (design §3).
//!
//! Before a request is sent to a provider its worst case — estimated prompt
//! tokens plus the effective `max_tokens`, and that at the route's price — is
//! *reserved* here; the request is refused (429) when the key's tokens-per-minute
//! window or its budget cannot hold it. When the provider's usage arrives the
//! reservation is *settled* to the real figure; a request that failed
//! *releases* it (settles at zero). Because the check and the reservation are
//! one step under the caller's lock, concurrent requests can never together
//! overshoot a limit: the property tests below drive random interleavings.
//!
//! Tokens use the same sliding window as the module's `rpm`
//! ([`crate::ratelimit`]): 60 s windows aligned to Unix time, the previous
//! window weighing in proportion to its overlap with the trailing minute. A
//! reservation counts in the window it was made in; its settlement corrects
//! that window (or the previous one, once the window rolled), so a long stream
//! is counted at admission like a request under `rpm`. Budgets are spent per
//! UTC day or month ([`Period`]).
//!
//! The ledger is pure state with a clock parameter ([`Now`]): the sidecar
//! owns one behind a mutex, which makes it the single decision point on a
//! host. Token windows run on a monotonic clock (like the module's `rpm`,
//! so a wall-clock step neither renews nor stalls a window); budget periods
//! are calendar periods and follow the wall clock of the moment a request
//! started, so a request is charged to the period it started in — the one
//! its usage row's time falls in (see [`Hold::period_start`]).

use rustc_hash::FxHashMap;

use crate::limits::{Budget, KeyLimits, Period};
use crate::ratelimit::{room, WINDOW_MS};

/// Tokens (and their cost) a request reserves, or that a settlement reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Amount {
    /// Tokens, prompt + completion.
    pub tokens: u64,
    /// Cost in nano-dollars.
    pub cost_nanos: u64,
}

/// The two clocks of a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// A monotonic clock in ms, for token windows. Any origin; the sidecar's
    /// is the Unix time at its start plus the time elapsed since, so seeds
    /// read from usage rows line up with it.
    pub mono_ms: u64,
    /// Unix ms of the moment the request started: the budget period it is
    /// charged to.
    pub unix_ms: u64,
}

impl From<u64> for Now {
    /// Both clocks at `ms` (tests, and callers whose only clock is shared).
    fn from(ms: u64) -> Now {
        Now {
            mono_ms: ms,
            unix_ms: ms,
        }
    }
}

/// A reservation held by one request until it is settled or released.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    key: String,
    /// Window start and tokens reserved in it, when the key has a `tpm`.
    tokens: Option<(u64, u64)>,
    /// Period start and nano-dollars reserved in it, when the key has a budget.
    cost: Option<(u64, u64)>,
}

impl Hold {
    /// Tokens this hold reserved (0 when the key has no `tpm`).
    pub fn tokens(&self) -> u64 {
        self.tokens.map_or(0, |(_, n)| n)
    }

    /// The key this hold is of.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Start (Unix ms) of the budget period this hold is charged to, when
    /// the key has a budget: a usage row must not be timed before it.
    pub fn period_start(&self) -> Option<u64> {
        self.cost.map(|(start, _)| start)
    }
}

/// Why a reservation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The key's tokens-per-minute window cannot hold the request now.
    Tokens {
        /// The key's `tpm`.
        limit: u64,
        /// Tokens the request needed.
        requested: u64,
        /// Milliseconds until it would fit, if nothing else arrives.
        retry_after_ms: u64,
    },
    /// The key's budget for this period cannot hold the request's worst-case cost.
    Budget {
        /// The key's budget.
        budget: Budget,
        /// Milliseconds until the period renews.
        retry_after_ms: u64,
    },
}

impl Refusal {
    /// Milliseconds until retrying can succeed.
    pub fn retry_after_ms(&self) -> u64 {
        match *self {
            Refusal::Tokens { retry_after_ms, .. } | Refusal::Budget { retry_after_ms, .. } => {
                retry_after_ms
            }
        }
    }
}

/// A request whose worst case exceeds a key's whole limit: no wait makes it
/// fit, so it is refused without a `Retry-After` (and the SDKs are told not
/// to retry it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Never {
    /// More tokens than the key's `tpm`.
    Tokens {
        /// The key's `tpm`.
        limit: u64,
        /// The request's worst case.
        requested: u64,
    },
    /// A worst-case cost above the key's whole budget for a period.
    Budget {
        /// The key's budget.
        budget: Budget,
        /// The request's worst-case cost in nano-dollars.
        requested_nanos: u64,
    },
}

/// Whether `ask` can never fit `limits`, whatever the key has used: its
/// tokens above the whole `tpm`, or its cost above the whole budget.
pub fn never_fits(limits: &KeyLimits, ask: Amount) -> Option<Never> {
    if let Some(limit) = limits.tpm {
        if ask.tokens > limit {
            return Some(Never::Tokens {
                limit,
                requested: ask.tokens,
            });
        }
    }
    match limits.budget {
        Some(budget) if ask.cost_nanos > budget.nanos => Some(Never::Budget {
            budget,
            requested_nanos: ask.cost_nanos,
        }),
        _ => None,
    }
}

/// What the `x-ratelimit-*-tokens` headers say about a key right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenState {
    /// The key's `tpm`.
    pub limit: u64,
    /// Tokens a request could still reserve now.
    pub remaining: u64,
    /// Milliseconds until the full limit is available again.
    pub reset_ms: u64,
}

/// One key's token window: tokens counted in the current and previous window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct TokenWindow {
    start_ms: u64,
    prev: u64,
    curr: u64,
}

impl TokenWindow {
    fn roll(&mut self, now_ms: u64) {
        let current = now_ms - now_ms % WINDOW_MS;
        if current <= self.start_ms {
            return; // same window, or a clock that went backwards: clamp
        }
        self.prev = if current == self.start_ms + WINDOW_MS {
            self.curr
        } else {
            0
        };
        self.curr = 0;
        self.start_ms = current;
    }

    /// Load at `now_ms` in token·ms (divide by [`WINDOW_MS`] for tokens).
    #[cfg(test)]
    fn load(&self, now_ms: u64) -> u128 {
        let elapsed = now_ms.saturating_sub(self.start_ms).min(WINDOW_MS - 1);
        u128::from(self.prev) * u128::from(WINDOW_MS - elapsed)
            + u128::from(self.curr) * u128::from(WINDOW_MS)
    }

    fn fits(&self, need: u64, limit: u64, now_ms: u64) -> bool {
        let elapsed = now_ms.saturating_sub(self.start_ms);
        room(limit, self.prev, self.curr, elapsed) >= i128::from(need)
    }

    /// Milliseconds from `now_ms` until `need` tokens fit, if nothing else
    /// is reserved meanwhile. The load only falls with time, so a binary
    /// search over the next two windows finds the first instant.
    fn wait_ms(&self, need: u64, limit: u64, now_ms: u64) -> u64 {
        let at = |dt: u64| {
            let mut w = *self;
            w.roll(now_ms + dt);
            w.fits(need, limit, now_ms + dt)
        };
        let (mut lo, mut hi) = (0, 2 * WINDOW_MS);
        if !at(hi) {
            return hi; // larger than the whole limit: it never fits
        }
        while lo < hi {
            let mid = (lo + hi) / 2;
            if at(mid) {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        lo
    }

    fn state(&self, limit: u64, now_ms: u64) -> TokenState {
        let elapsed = now_ms.saturating_sub(self.start_ms);
        let remaining = room(limit, self.prev, self.curr, elapsed).max(0) as u64;
        let reset_ms = if self.curr > 0 {
            self.start_ms + 2 * WINDOW_MS - now_ms.max(self.start_ms)
        } else if self.prev > 0 && now_ms < self.start_ms + WINDOW_MS {
            self.start_ms + WINDOW_MS - now_ms.max(self.start_ms)
        } else {
            0
        };
        TokenState {
            limit,
            remaining: remaining.min(limit),
            reset_ms,
        }
    }

    /// Replaces `reserved` tokens counted in the window starting `window`
    /// by `used`.
    fn settle(&mut self, window: u64, reserved: u64, used: u64, now_ms: u64) {
        self.roll(now_ms);
        let slot = if window == self.start_ms {
            &mut self.curr
        } else if window + WINDOW_MS == self.start_ms {
            &mut self.prev
        } else {
            return; // that window no longer weighs on any decision
        };
        *slot = slot.saturating_sub(reserved).saturating_add(used);
    }
}

/// One key's spend in the current budget period.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Spend {
    period_start: u64,
    nanos: u64,
}

impl Spend {
    /// Moves to the period of `per` holding `now_ms`; a new period starts at
    /// what `seed` says was spent in it before this ledger existed (0 when
    /// the seed is of another period). Returns the period's end.
    ///
    /// A request that started in a period this ledger has already left (a
    /// later one rolled it first) is counted in the current one.
    fn roll(&mut self, per: Period, now_ms: u64, seed: Option<&Seed>) -> u64 {
        let (start, end) = per.bounds(now_ms);
        if start > self.period_start {
            *self = Spend {
                period_start: start,
                nanos: seed.map_or(0, |s| s.spent_in(per, start)),
            };
            return end;
        }
        per.bounds(self.period_start).1.max(end)
    }
}

/// What a key used before this ledger existed, read from the usage store at
/// start-up so that a restart renews neither budgets nor token windows.
///
/// The sidecar does not read keys.toml, so at start-up it cannot know whether
/// a key's budget is per day or per month: the seed carries both sums and the
/// first reservation picks the one of its key's period.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Seed {
    /// Start (Unix ms) of the UTC day the sums below were taken in.
    pub day_start: u64,
    /// Nano-dollars spent since `day_start`.
    pub day_nanos: u64,
    /// Start (Unix ms) of the UTC month the sums were taken in.
    pub month_start: u64,
    /// Nano-dollars spent since `month_start`.
    pub month_nanos: u64,
    /// Start (Unix ms) of the token window the sums were taken in.
    pub window_start: u64,
    /// Tokens used in the window before `window_start`.
    pub prev_tokens: u64,
    /// Tokens used since `window_start`.
    pub curr_tokens: u64,
}

impl Seed {
    fn spent_in(&self, per: Period, period_start: u64) -> u64 {
        match per {
            Period::Day if period_start == self.day_start => self.day_nanos,
            Period::Month if period_start == self.month_start => self.month_nanos,
            _ => 0,
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct KeyState {
    tokens: TokenWindow,
    spend: Spend,
    seed: Option<Seed>,
}

/// A key's counts in the fleet's shared store (Redis), as its reserve
/// script answered them; see [`Ledger::adopt`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Shared {
    /// Start (Unix ms) of the token window the counts are of.
    pub window_start: u64,
    /// Tokens counted in the window before it.
    pub prev_tokens: u64,
    /// Tokens counted in it.
    pub curr_tokens: u64,
    /// Start of the budget period and nano-dollars spent in it, when the key has a budget.
    pub spend: Option<(u64, u64)>,
}

/// Reserved tokens (window start, tokens) and cost (period start, nanos).
type Reserved = (Option<(u64, u64)>, Option<(u64, u64)>);

/// The one decision: does `ask` fit `state` under `limits` at `now`? If
/// so it is counted in `state` and where it was counted is returned. Tokens
/// are checked before the budget, and nothing is counted unless both hold
/// (the fleet's Redis script follows the same order and rule).
fn admit(
    state: &mut KeyState,
    limits: &KeyLimits,
    ask: Amount,
    now: Now,
) -> Result<Reserved, Refusal> {
    let mono = now.mono_ms;
    if let Some(limit) = limits.tpm {
        state.tokens.roll(mono);
        if !state.tokens.fits(ask.tokens, limit, mono) {
            return Err(Refusal::Tokens {
                limit,
                requested: ask.tokens,
                retry_after_ms: state.tokens.wait_ms(ask.tokens, limit, mono),
            });
        }
    }
    let mut cost = None;
    if let Some(budget) = limits.budget {
        let end = state
            .spend
            .roll(budget.per, now.unix_ms, state.seed.as_ref());
        let spent = state.spend.nanos;
        if spent >= budget.nanos || spent.saturating_add(ask.cost_nanos) > budget.nanos {
            return Err(Refusal::Budget {
                budget,
                retry_after_ms: end.saturating_sub(now.unix_ms),
            });
        }
        state.spend.nanos += ask.cost_nanos;
        cost = Some((state.spend.period_start, ask.cost_nanos));
    }
    let mut tokens = None;
    if limits.tpm.is_some() {
        state.tokens.curr = state.tokens.curr.saturating_add(ask.tokens);
        tokens = Some((state.tokens.start_ms, ask.tokens));
    }
    Ok((tokens, cost))
}

/// Why a reservation was not made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserve {
    /// The key's limits cannot hold it now.
    Refused(Refusal),
    /// Its worst case exceeds the key's whole limit: it can never fit.
    Never(Never),
    /// What the key spent cannot be known now (the fleet's budget counter is
    /// missing and the usage store does not answer): budgets fail closed.
    Unavailable,
}

/// Reservations of every key on this host.
#[derive(Debug, Default)]
pub struct Ledger {
    // Key ids come from nginx's key table (trusted, bounded by keys.toml),
    // and a budget must be remembered for its whole period, so entries are
    // never evicted. Not a client's input either, so FxHash (SipHash was
    // ~300 instructions a lookup, a few lookups a governed request).
    keys: FxHashMap<String, KeyState>,
}

impl Ledger {
    /// An empty ledger.
    pub fn new() -> Self {
        Ledger::default()
    }

    /// `key`'s state, made on first use: found by the borrowed id (`entry`
    /// would allocate the id on every request for the one time it is new).
    fn state_mut(&mut self, key: &str) -> &mut KeyState {
        if !self.keys.contains_key(key) {
            self.keys.insert(key.to_owned(), KeyState::default());
        }
        let Some(state) = self.keys.get_mut(key) else {
            unreachable!("inserted above");
        };
        state
    }

    /// Reserves `ask` for `key` at `now` under `limits`, or says which
    /// limit cannot hold it. Nothing is reserved when it is refused. A key
    /// with neither `tpm` nor budget gets an empty hold (nothing to settle).
    pub fn reserve(
        &mut self,
        key: &str,
        limits: &KeyLimits,
        ask: Amount,
        now: impl Into<Now>,
    ) -> Result<Hold, Refusal> {
        let mut hold = Hold {
            key: key.to_owned(),
            tokens: None,
            cost: None,
        };
        if !limits.reserves() {
            return Ok(hold);
        }
        let state = self.state_mut(key);
        (hold.tokens, hold.cost) = admit(state, limits, ask, now.into())?;
        Ok(hold)
    }

    /// Why `ask` would be refused for `key` at `now` under `limits`, or
    /// `None` when it fits. Nothing changes: the fleet asks this of its
    /// mirror of Redis's counts for the `Retry-After` of a refusal.
    pub fn check(
        &self,
        key: &str,
        limits: &KeyLimits,
        ask: Amount,
        now: impl Into<Now>,
    ) -> Option<Refusal> {
        let mut state = self.keys.get(key).copied().unwrap_or_default();
        admit(&mut state, limits, ask, now.into()).err()
    }

    /// Adopts the fleet's counts for `key` (what Redis's reserve script read
    /// and wrote): the headers of this node then report the fleet's state.
    pub fn adopt(&mut self, key: &str, shared: Shared) {
        let state = self.state_mut(key);
        state.tokens = TokenWindow {
            start_ms: shared.window_start,
            prev: shared.prev_tokens,
            curr: shared.curr_tokens,
        };
        if let Some((period_start, nanos)) = shared.spend {
            state.spend = Spend {
                period_start,
                nanos,
            };
        }
    }

    /// Settles `hold` to what the request really `used`.
    pub fn settle(&mut self, hold: Hold, used: Amount, now: impl Into<Now>) {
        let Some(state) = self.keys.get_mut(&hold.key) else {
            return;
        };
        if let Some((window, reserved)) = hold.tokens {
            let mono = now.into().mono_ms;
            state.tokens.settle(window, reserved, used.tokens, mono);
        }
        if let Some((period, reserved)) = hold.cost {
            // A settlement after the period renewed must not charge the new one.
            if period == state.spend.period_start {
                state.spend.nanos = state
                    .spend
                    .nanos
                    .saturating_sub(reserved)
                    .saturating_add(used.cost_nanos);
            }
        }
    }

    /// Gives back everything `hold` reserved (the request consumed nothing).
    pub fn release(&mut self, hold: Hold, now: impl Into<Now>) {
        self.settle(hold, Amount::default(), now);
    }

    /// Records what `key` used before this ledger existed (see [`Seed`]):
    /// its token window at once, its spend when a reservation first names the
    /// key's budget period. Call before any reservation of the key.
    pub fn seed(&mut self, key: &str, seed: Seed) {
        let state = self.state_mut(key);
        state.tokens = TokenWindow {
            start_ms: seed.window_start,
            prev: seed.prev_tokens,
            curr: seed.curr_tokens,
        };
        state.seed = Some(seed);
    }

    /// The token headers' values for `key` under `tpm` at `now`.
    pub fn tokens(&self, key: &str, tpm: u64, now: impl Into<Now>) -> TokenState {
        let mono = now.into().mono_ms;
        let mut w = self.keys.get(key).map(|s| s.tokens).unwrap_or_default();
        w.roll(mono);
        w.state(tpm, mono)
    }

    /// Nano-dollars `key` may still spend in the current period of `budget`.
    pub fn budget_remaining(&self, key: &str, budget: Budget, now: impl Into<Now>) -> u64 {
        let state = self.keys.get(key).copied().unwrap_or_default();
        let mut spend = state.spend;
        spend.roll(budget.per, now.into().unix_ms, state.seed.as_ref());
        budget.nanos.saturating_sub(spend.nanos)
    }
}

#[cfg(test)]
#[path = "ledger_tests.rs"]
mod tests;
