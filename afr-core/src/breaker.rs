//! The circuit breaker per provider (design §4) as a pure state machine.
//!
//! The breaker is asked for admission and then fed each admitted request's
//! [`Outcome`] together with the [`Admission`] it got, with the current time
//! as a parameter, so tests drive it with a synthetic clock and never sleep.
//! Closed counts consecutive failures; at `failures` it opens for `cooldown`;
//! after that the first admission becomes the single half-open probe, and only
//! the probe's outcome closes or reopens it. Requests admitted while closed
//! that end after it opened (long streams) change nothing. A failure whose
//! answer said when to come back (`Retry-After`) keeps the breaker it opens
//! open for that long instead of the cooldown.

use std::time::{Duration, Instant};

/// When a breaker opens and how long it stays open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerPolicy {
    /// Consecutive failures that open the breaker (at least 1).
    pub failures: u32,
    /// How long an open breaker rejects requests before a probe is allowed.
    pub cooldown: Duration,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        BreakerPolicy {
            failures: 5,
            cooldown: Duration::from_secs(30),
        }
    }
}

/// The observable state, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Requests flow; failures are counted.
    Closed,
    /// Requests are rejected until the cooldown ends.
    Open,
    /// One probe request decides whether to close or reopen.
    HalfOpen,
}

impl BreakerState {
    /// Gauge value: 0 closed, 1 half-open, 2 open.
    pub fn as_gauge(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
        }
    }
}

/// The answer to "may I send a request to this provider now?".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Closed breaker: go ahead.
    Allowed,
    /// Half-open: this request is the single probe; report its outcome.
    Probe,
    /// Open (or a probe is in flight): skip this provider.
    Rejected {
        /// Time until a probe may be admitted.
        retry_after: Duration,
    },
}

impl Admission {
    /// Whether the request may be sent.
    pub fn is_admitted(self) -> bool {
        !matches!(self, Admission::Rejected { .. })
    }
}

/// How an admitted request ended, as far as the provider's health goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The provider answered (2xx, or a 4xx that is the client's fault).
    Success,
    /// Connect error, timeout, 429, 5xx, or a stream that broke.
    Failure,
    /// A failure whose answer said when to come back (`Retry-After` on a 429
    /// or 503): counted like [`Outcome::Failure`], and if it opens the breaker,
    /// the breaker stays open for `retry_after` (shorter or longer than the
    /// cooldown, at most [`MAX_PROVIDER_RETRY_AFTER`]).
    Throttled {
        /// The wait the provider asked for.
        retry_after: Duration,
    },
    /// No verdict on the provider's health: the client went away first, or
    /// the provider answered but its first content outlasted `first_content`
    /// (a reasoning model thinking is not a provider failure).
    Neutral,
}

/// The longest a provider's `Retry-After` keeps its breaker open: a wrong or
/// far-off value (a daily quota) is re-probed at this pace, one request each.
pub const MAX_PROVIDER_RETRY_AFTER: Duration = Duration::from_secs(600);

/// The shortest: `Retry-After: 0` (or a date in the past) would open the
/// breaker until now, so every 429 probe reopened it for nothing and the
/// breaker never rejected a request.
pub const MIN_PROVIDER_RETRY_AFTER: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inner {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

/// A circuit breaker for one provider.
#[derive(Debug, Clone)]
pub struct Breaker {
    policy: BreakerPolicy,
    inner: Inner,
}

/// Retry-After reported while a probe is in flight: the probe's outcome is
/// unknown, so a short wait is the honest answer.
const PROBE_IN_FLIGHT_RETRY: Duration = Duration::from_secs(1);

impl Breaker {
    /// A closed breaker with the given policy.
    pub fn new(policy: BreakerPolicy) -> Self {
        Breaker {
            policy: BreakerPolicy {
                failures: policy.failures.max(1),
                cooldown: policy.cooldown,
            },
            inner: Inner::Closed { failures: 0 },
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> BreakerPolicy {
        self.policy
    }

    /// Replaces the policy (config reload) without forgetting the state.
    pub fn set_policy(&mut self, policy: BreakerPolicy) {
        self.policy = BreakerPolicy {
            failures: policy.failures.max(1),
            cooldown: policy.cooldown,
        };
    }

    /// The state as seen at `now` (an open breaker past its cooldown reads as half-open).
    pub fn state(&self, now: Instant) -> BreakerState {
        match self.inner {
            Inner::Closed { .. } => BreakerState::Closed,
            Inner::Open { until } if now >= until => BreakerState::HalfOpen,
            Inner::Open { .. } => BreakerState::Open,
            Inner::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Asks to send one request at `now`. An admitted request must later be
    /// [settled](Breaker::settle) with this answer.
    pub fn admit(&mut self, now: Instant) -> Admission {
        match self.inner {
            Inner::Closed { .. } => Admission::Allowed,
            Inner::Open { until } if now >= until => {
                self.inner = Inner::HalfOpen { probing: true };
                Admission::Probe
            }
            Inner::Open { until } => Admission::Rejected {
                retry_after: until - now,
            },
            Inner::HalfOpen { probing: false } => {
                self.inner = Inner::HalfOpen { probing: true };
                Admission::Probe
            }
            Inner::HalfOpen { probing: true } => Admission::Rejected {
                retry_after: PROBE_IN_FLIGHT_RETRY,
            },
        }
    }

    /// Settles one admitted request: `admission` is what [`Breaker::admit`]
    /// answered for it, `outcome` how it ended.
    pub fn settle(&mut self, admission: Admission, outcome: Outcome, now: Instant) {
        let open = |cooldown: Duration| Inner::Open {
            until: now + cooldown,
        };
        let open_for = match outcome {
            Outcome::Throttled { retry_after } => {
                retry_after.clamp(MIN_PROVIDER_RETRY_AFTER, MAX_PROVIDER_RETRY_AFTER)
            }
            _ => self.policy.cooldown,
        };
        let failed = matches!(outcome, Outcome::Failure | Outcome::Throttled { .. });
        self.inner = match (admission, self.inner, outcome) {
            // Only the probe decides a half-open breaker.
            (Admission::Probe, Inner::HalfOpen { probing: true }, Outcome::Success) => {
                Inner::Closed { failures: 0 }
            }
            (Admission::Probe, Inner::HalfOpen { probing: true }, _) if failed => open(open_for),
            // No verdict mid-probe: let the next request probe.
            (Admission::Probe, Inner::HalfOpen { probing: true }, Outcome::Neutral) => {
                Inner::HalfOpen { probing: false }
            }
            (Admission::Allowed, Inner::Closed { .. }, Outcome::Success) => {
                Inner::Closed { failures: 0 }
            }
            (Admission::Allowed, Inner::Closed { failures }, _) if failed => {
                if failures + 1 < self.policy.failures {
                    Inner::Closed {
                        failures: failures + 1,
                    }
                } else {
                    open(open_for)
                }
            }
            // A straggler admitted before the breaker opened must neither close
            // it, extend its cooldown, nor release someone else's probe.
            (_, inner, _) => inner,
        };
    }

    /// Time until a request could be admitted; zero when one could be now.
    pub fn retry_after(&self, now: Instant) -> Duration {
        match self.inner {
            Inner::Open { until } if now < until => until - now,
            Inner::HalfOpen { probing: true } => PROBE_IN_FLIGHT_RETRY,
            _ => Duration::ZERO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fail(b: &mut Breaker, now: Instant) {
        let a = b.admit(now);
        b.settle(a, Outcome::Failure, now);
    }

    fn policy() -> BreakerPolicy {
        BreakerPolicy {
            failures: 3,
            cooldown: Duration::from_secs(30),
        }
    }

    #[test]
    fn opens_after_n_consecutive_failures() {
        let t0 = Instant::now();
        let mut b = Breaker::new(policy());
        for _ in 0..2 {
            assert_eq!(b.admit(t0), Admission::Allowed);
            b.settle(Admission::Allowed, Outcome::Failure, t0);
        }
        assert_eq!(b.state(t0), BreakerState::Closed);
        fail(&mut b, t0);
        assert_eq!(b.state(t0), BreakerState::Open);
        assert_eq!(
            b.admit(t0 + Duration::from_secs(10)),
            Admission::Rejected {
                retry_after: Duration::from_secs(20)
            }
        );
    }

    #[test]
    fn success_resets_the_count() {
        let t0 = Instant::now();
        let mut b = Breaker::new(policy());
        fail(&mut b, t0);
        fail(&mut b, t0);
        b.settle(Admission::Allowed, Outcome::Success, t0);
        fail(&mut b, t0);
        fail(&mut b, t0);
        assert_eq!(b.state(t0), BreakerState::Closed);
    }

    #[test]
    fn half_open_admits_a_single_probe_then_closes_on_success() {
        let t0 = Instant::now();
        let mut b = Breaker::new(policy());
        (0..3).for_each(|_| fail(&mut b, t0));
        let t1 = t0 + Duration::from_secs(30);
        assert_eq!(b.state(t1), BreakerState::HalfOpen);
        assert_eq!(b.admit(t1), Admission::Probe);
        assert!(!b.admit(t1).is_admitted());
        b.settle(Admission::Probe, Outcome::Success, t1);
        assert_eq!(b.admit(t1), Admission::Allowed);
        assert_eq!(b.state(t1), BreakerState::Closed);
    }

    #[test]
    fn failed_probe_reopens_for_a_full_cooldown() {
        let t0 = Instant::now();
        let mut b = Breaker::new(policy());
        (0..3).for_each(|_| fail(&mut b, t0));
        let t1 = t0 + Duration::from_secs(31);
        assert_eq!(b.admit(t1), Admission::Probe);
        b.settle(Admission::Probe, Outcome::Failure, t1);
        assert_eq!(b.state(t1), BreakerState::Open);
        assert_eq!(b.retry_after(t1), Duration::from_secs(30));
    }

    #[test]
    fn neutral_probe_lets_the_next_request_probe() {
        let t0 = Instant::now();
        let mut b = Breaker::new(policy());
        (0..3).for_each(|_| fail(&mut b, t0));
        let t1 = t0 + Duration::from_secs(30);
        assert_eq!(b.admit(t1), Admission::Probe);
        b.settle(Admission::Probe, Outcome::Neutral, t1);
        assert_eq!(b.admit(t1), Admission::Probe);
    }

    #[test]
    fn neutral_outcomes_neither_count_nor_reset_failures() {
        let t0 = Instant::now();
        let mut b = Breaker::new(policy());
        fail(&mut b, t0);
        fail(&mut b, t0);
        // A thinking model's first_content expiry between two failures.
        b.settle(Admission::Allowed, Outcome::Neutral, t0);
        assert_eq!(b.state(t0), BreakerState::Closed);
        fail(&mut b, t0);
        assert_eq!(b.state(t0), BreakerState::Open);
    }

    fn throttled(secs: u64) -> Outcome {
        Outcome::Throttled {
            retry_after: Duration::from_secs(secs),
        }
    }

    #[test]
    fn retry_after_sets_how_long_the_breaker_stays_open() {
        for (asked, open_for) in [(0, 1), (5, 5), (90, 90), (86_400, 600)] {
            let t0 = Instant::now();
            let mut b = Breaker::new(policy());
            fail(&mut b, t0);
            fail(&mut b, t0);
            let a = b.admit(t0);
            b.settle(a, throttled(asked), t0);
            let until = t0 + Duration::from_secs(open_for);
            assert_eq!(b.retry_after(t0), Duration::from_secs(open_for), "{asked}");
            assert_eq!(
                b.state(until - Duration::from_millis(1)),
                BreakerState::Open
            );
            assert_eq!(b.admit(until), Admission::Probe, "{asked}");
        }
    }

    #[test]
    fn throttled_counts_as_a_failure_and_a_throttled_probe_reopens_for_its_retry_after() {
        let t0 = Instant::now();
        let mut b = Breaker::new(policy());
        for _ in 0..2 {
            let a = b.admit(t0);
            b.settle(a, throttled(1), t0);
        }
        assert_eq!(b.state(t0), BreakerState::Closed);
        fail(&mut b, t0); // a plain failure opens for the cooldown
        assert_eq!(b.retry_after(t0), Duration::from_secs(30));
        let t1 = t0 + Duration::from_secs(30);
        assert_eq!(b.admit(t1), Admission::Probe);
        b.settle(Admission::Probe, throttled(4), t1);
        assert_eq!(b.retry_after(t1), Duration::from_secs(4));
    }

    #[test]
    fn a_late_retry_after_does_not_move_an_open_breaker() {
        let t0 = Instant::now();
        let mut b = Breaker::new(policy());
        (0..3).for_each(|_| fail(&mut b, t0));
        b.settle(Admission::Allowed, throttled(300), t0);
        assert_eq!(b.retry_after(t0), Duration::from_secs(30));
    }

    #[test]
    fn stragglers_admitted_while_closed_do_not_touch_a_half_open_breaker() {
        let t0 = Instant::now();
        let mut b = Breaker::new(policy());
        let straggler = b.admit(t0); // a long stream admitted while closed
        (0..3).for_each(|_| fail(&mut b, t0));
        let t1 = t0 + Duration::from_secs(30);
        assert_eq!(b.admit(t1), Admission::Probe);
        // The straggler's client leaves: the probe stays the only one in flight.
        b.settle(straggler, Outcome::Neutral, t1);
        assert!(!b.admit(t1).is_admitted());
        // Its late success must not close the breaker while the probe decides.
        b.settle(straggler, Outcome::Success, t1);
        assert_eq!(b.state(t1), BreakerState::HalfOpen);
        b.settle(Admission::Probe, Outcome::Failure, t1);
        assert_eq!(b.state(t1), BreakerState::Open);
    }

    #[test]
    fn late_failures_do_not_extend_an_open_cooldown() {
        let t0 = Instant::now();
        let mut b = Breaker::new(policy());
        (0..3).for_each(|_| fail(&mut b, t0));
        b.settle(
            Admission::Allowed,
            Outcome::Failure,
            t0 + Duration::from_secs(20),
        );
        assert_eq!(
            b.retry_after(t0 + Duration::from_secs(20)),
            Duration::from_secs(10)
        );
    }

    #[test]
    fn policy_of_zero_failures_behaves_as_one() {
        let t0 = Instant::now();
        let mut b = Breaker::new(BreakerPolicy {
            failures: 0,
            cooldown: Duration::from_secs(1),
        });
        fail(&mut b, t0);
        assert_eq!(b.state(t0), BreakerState::Open);
    }
}
