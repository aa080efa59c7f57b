//! The clock of one upstream attempt (design §4): by when the provider must
//! answer, when a stream commits to it, and how long a committed stream may
//! stay silent — upstream (then it fails) and toward the client (then the
//! client gets a keep-alive comment).
//!
//! An attempt has two phases that mean different things. Until the provider
//! has answered (status and headers) it may be dead: `first_byte` bounds the
//! wait and an expiry is a provider failure that fails over. Once it has
//! answered, a slow first content is a reasoning model thinking: only
//! `first_content` bounds it, and an expiry is neither failed over nor held
//! against the provider's breaker. The client is not left in silence
//! meanwhile: a stream commits after `stream_hold` even without content, and
//! from then on any silence longer than `stream_keepalive` gets an SSE
//! comment, so load balancers with an idle timeout (AWS ALB: 60 s) keep the
//! connection. Every function takes the times it needs, so tests never sleep.

use crate::config::Timeouts;
use std::time::{Duration, Instant};

/// Which timeout expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// No answer (status and headers) in time.
    FirstByte,
    /// Answered, but no content in time.
    FirstContent,
    /// Too long a silence between two events after the content started.
    Idle,
    /// The whole exchange took too long.
    Total,
}

impl Limit {
    /// The config name of the timeout, for logs and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::FirstByte => "first_byte",
            Limit::FirstContent => "first_content",
            Limit::Idle => "idle",
            Limit::Total => "total",
        }
    }
}

/// A timeout that expired, and whether that says the provider is unhealthy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expiry {
    /// Which timeout.
    pub limit: Limit,
    /// Its configured value, for the message.
    pub timeout: Duration,
    /// `true`: a provider failure (fail over if nothing was sent yet, count
    /// against the breaker). `false`: the provider answered and is slow to
    /// start its content; the client gets an error, the breaker no verdict.
    pub provider_fault: bool,
}

/// What happens at the deadline of an answered stream that waits for its
/// first content before committing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holding {
    /// Commit now: send the headers and what is held.
    Commit,
    /// Give up on the provider.
    Expire(Expiry),
}

/// What happens at the deadline of a committed stream waiting for its next event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Send the client a keep-alive comment and keep waiting.
    KeepAlive,
    /// Give up on the provider.
    Expire(Expiry),
}

/// The timeouts of one attempt, fixed when its request is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    timeouts: Timeouts,
    first_byte: Instant,
    first_content: Instant,
    total: Instant,
    idle: Duration,
    hold: Duration,
    keepalive: Duration,
}

impl Attempt {
    /// An attempt sent at `sent` under the provider's `timeouts`, holding a
    /// healthy stream back for `hold` and keeping the client's connection
    /// alive every `keepalive`.
    pub fn new(timeouts: &Timeouts, hold: Duration, keepalive: Duration, sent: Instant) -> Self {
        let total = sent + timeouts.total;
        Attempt {
            timeouts: *timeouts,
            first_byte: (sent + timeouts.first_byte).min(total),
            first_content: (sent + timeouts.first_content).min(total),
            total,
            idle: timeouts.idle,
            hold,
            keepalive,
        }
    }

    /// The end of the whole exchange.
    pub fn total(&self) -> Instant {
        self.total
    }

    /// By when the provider must answer, and what an expiry means (always a
    /// provider failure). A stream's headers come at once, so `first_byte`
    /// bounds them. A non-streaming answer only arrives once the completion
    /// is generated, so `total` bounds it — except for a half-open probe:
    /// while it is out every other request to the provider is refused, so it
    /// gets `first_byte` like a stream.
    pub fn answer_by(&self, stream: bool, probe: bool) -> (Instant, Expiry) {
        let (at, limit) = if stream || probe {
            (
                self.first_byte,
                self.limit_at(self.first_byte, Limit::FirstByte),
            )
        } else {
            (self.total, Limit::Total)
        };
        (at, self.expiry(limit, true))
    }

    /// A stream the provider answered at `answered`, not committed yet: when
    /// to stop waiting for its first content, and what then.
    pub fn holding(&self, answered: Instant) -> (Instant, Holding) {
        let commit = answered + self.hold;
        if commit < self.first_content {
            (commit, Holding::Commit)
        } else {
            (self.first_content, Holding::Expire(self.slow_content()))
        }
    }

    /// A committed stream waiting for its next upstream event: the upstream
    /// deadline is `first_content` until content was seen, then `idle` after
    /// the `last_event`; a keep-alive is due `keepalive` after the client was
    /// `last_sent` anything.
    pub fn committed(
        &self,
        content_seen: bool,
        last_event: Instant,
        last_sent: Instant,
    ) -> (Instant, Wake) {
        let (deadline, expiry) = if content_seen {
            let idle_end = last_event + self.idle;
            if idle_end < self.total {
                (idle_end, self.expiry(Limit::Idle, true))
            } else {
                (self.total, self.expiry(Limit::Total, true))
            }
        } else {
            (self.first_content, self.slow_content())
        };
        let keepalive = last_sent + self.keepalive;
        if keepalive < deadline {
            (keepalive, Wake::KeepAlive)
        } else {
            (deadline, Wake::Expire(expiry))
        }
    }

    /// An answered stream without content at `first_content`.
    fn slow_content(&self) -> Expiry {
        self.expiry(
            self.limit_at(self.first_content, Limit::FirstContent),
            false,
        )
    }

    fn expiry(&self, limit: Limit, provider_fault: bool) -> Expiry {
        let t = &self.timeouts;
        let timeout = match limit {
            Limit::FirstByte => t.first_byte,
            Limit::FirstContent => t.first_content,
            Limit::Idle => t.idle,
            Limit::Total => t.total,
        };
        Expiry {
            limit,
            timeout,
            provider_fault,
        }
    }

    /// `limit`, or `Total` when `total` cut it short.
    fn limit_at(&self, at: Instant, limit: Limit) -> Limit {
        if at >= self.total {
            Limit::Total
        } else {
            limit
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn timeouts() -> Timeouts {
        Timeouts {
            connect: secs(5),
            first_byte: secs(60),
            first_content: secs(600),
            idle: secs(60),
            total: secs(900),
        }
    }

    fn attempt(t0: Instant) -> Attempt {
        Attempt::new(&timeouts(), secs(3), secs(15), t0)
    }

    fn expiry(limit: Limit, timeout: u64, provider_fault: bool) -> Expiry {
        Expiry {
            limit,
            timeout: secs(timeout),
            provider_fault,
        }
    }

    fn fault(limit: Limit, timeout: u64) -> Wake {
        Wake::Expire(expiry(limit, timeout, true))
    }

    fn slow(limit: Limit, timeout: u64) -> Wake {
        Wake::Expire(expiry(limit, timeout, false))
    }

    #[test]
    fn streams_and_probes_must_answer_within_first_byte_other_answers_within_total() {
        let t0 = Instant::now();
        let a = attempt(t0);
        let first_byte = expiry(Limit::FirstByte, 60, true);
        assert_eq!(a.answer_by(true, false), (t0 + secs(60), first_byte));
        assert_eq!(a.answer_by(true, true), (t0 + secs(60), first_byte));
        // The probe: a provider that accepts TCP and never answers must not
        // hold the breaker half-open (every request refused) for `total`.
        assert_eq!(a.answer_by(false, true), (t0 + secs(60), first_byte));
        assert_eq!(
            a.answer_by(false, false),
            (t0 + secs(900), expiry(Limit::Total, 900, true))
        );
    }

    #[test]
    fn an_answered_stream_commits_after_the_hold() {
        let t0 = Instant::now();
        let a = attempt(t0);
        assert_eq!(a.holding(t0 + secs(1)), (t0 + secs(4), Holding::Commit));
    }

    #[test]
    fn a_hold_longer_than_first_content_expires_without_blaming_the_provider() {
        let t0 = Instant::now();
        let t = Timeouts {
            first_content: secs(2),
            ..timeouts()
        };
        let a = Attempt::new(&t, secs(3), secs(15), t0);
        assert_eq!(
            a.holding(t0 + secs(1)),
            (
                t0 + secs(2),
                Holding::Expire(expiry(Limit::FirstContent, 2, false))
            )
        );
    }

    #[test]
    fn committed_without_content_keeps_the_client_alive_until_first_content() {
        let t0 = Instant::now();
        let a = attempt(t0);
        // Committed at 3 s after the role chunk at 0 s.
        assert_eq!(
            a.committed(false, t0, t0 + secs(3)),
            (t0 + secs(18), Wake::KeepAlive)
        );
        // A thinking model is not held to `idle` (60 s) but to `first_content`.
        assert_eq!(
            a.committed(false, t0, t0 + secs(588)),
            (t0 + secs(600), slow(Limit::FirstContent, 600))
        );
    }

    #[test]
    fn after_content_silence_is_bounded_by_idle_then_total() {
        let t0 = Instant::now();
        let a = attempt(t0);
        assert_eq!(
            a.committed(true, t0 + secs(10), t0 + secs(10)),
            (t0 + secs(25), Wake::KeepAlive)
        );
        assert_eq!(
            a.committed(true, t0 + secs(10), t0 + secs(65)),
            (t0 + secs(70), fault(Limit::Idle, 60))
        );
        assert_eq!(
            a.committed(true, t0 + secs(880), t0 + secs(890)),
            (t0 + secs(900), fault(Limit::Total, 900))
        );
    }

    #[test]
    fn total_caps_every_other_timeout_and_says_so() {
        let t0 = Instant::now();
        let t = Timeouts {
            total: secs(30),
            ..timeouts()
        };
        let a = Attempt::new(&t, secs(3), secs(15), t0);
        assert_eq!(a.total(), t0 + secs(30));
        assert_eq!(a.answer_by(true, false).1.limit, Limit::Total);
        // A slow first content cut by `total` is still no provider failure.
        assert_eq!(
            a.committed(false, t0, t0 + secs(20)),
            (t0 + secs(30), slow(Limit::Total, 30))
        );
    }

    #[test]
    fn a_zero_hold_commits_as_soon_as_the_provider_answered() {
        let t0 = Instant::now();
        let a = Attempt::new(&timeouts(), Duration::ZERO, secs(15), t0);
        assert_eq!(a.holding(t0 + secs(2)), (t0 + secs(2), Holding::Commit));
    }
}
