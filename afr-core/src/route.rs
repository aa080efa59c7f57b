//! The route plan of one request (design §4): walk a model's ordered routes,
//! skip providers whose breaker rejects, stop at the first success or at a
//! non-retryable answer, and say at the end whether everything failed (500),
//! every route that answered was rate limited (429 with the shortest
//! `Retry-After` the providers gave) or everything was open (503 with
//! `Retry-After`).
//!
//! Admission is asked lazily, one route at a time, so a half-open provider's
//! single probe is only taken when that route is really about to be tried.

use crate::breaker::{Admission, MIN_PROVIDER_RETRY_AFTER};
use crate::retry_after::ceil_secs;
use std::time::Duration;

/// How the plan ended when no route answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exhausted {
    /// No route was admitted: every breaker was open.
    AllOpen {
        /// Seconds until the first breaker half-opens (at least 1), for `Retry-After`.
        retry_after_secs: u64,
    },
    /// No route can serve this request at all (e.g. `n > 1` with only
    /// Anthropic routes): the client's request is at fault, no provider was called.
    Unservable,
    /// At least one route was tried and all tried routes failed.
    AllFailed {
        /// Indexes of the routes tried, in order.
        tried: Vec<usize>,
    },
    /// Every route tried answered that it is overloaded (Anthropic's 529):
    /// the client sees the provider's own answer on Anthropic's API.
    AllOverloaded {
        /// Indexes of the routes tried, in order.
        tried: Vec<usize>,
    },
    /// Every route tried answered 429 (the others were open): the client may
    /// retry, like after a provider's own 429.
    AllRateLimited {
        /// Indexes of the routes tried, in order.
        tried: Vec<usize>,
        /// The shortest `Retry-After` the providers gave; `None` if none gave one.
        retry_after: Option<Duration>,
    },
}

/// How a tried route failed, as far as the plan's verdict goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteFailure {
    /// The provider answered 429, with its `Retry-After` if it gave one.
    RateLimited {
        /// The wait the provider asked for.
        retry_after: Option<Duration>,
    },
    /// The provider answered that it is overloaded (Anthropic's 529).
    Overloaded,
    /// Anything else that moves on to the next route.
    Other,
}

/// The state of one request's walk over its routes.
#[derive(Debug, Clone)]
pub struct RoutePlan {
    routes: usize,
    next: usize,
    tried: Vec<usize>,
    min_retry: Option<Duration>,
    rate_limited: usize,
    min_rate_retry: Option<Duration>,
    overloaded: usize,
}

impl RoutePlan {
    /// A plan over `routes` ordered routes.
    pub fn new(routes: usize) -> Self {
        RoutePlan {
            routes,
            next: 0,
            tried: Vec::new(),
            min_retry: None,
            rate_limited: 0,
            min_rate_retry: None,
            overloaded: 0,
        }
    }

    /// The next route to try, asking `admit(index)` for each candidate in
    /// order and skipping rejected ones. `admit` answers `None` for a route
    /// that cannot serve the request (no breaker is asked; it is no outcome).
    /// `None` when the routes are used up.
    pub fn next_route<A: Into<Option<Admission>>>(
        &mut self,
        mut admit: impl FnMut(usize) -> A,
    ) -> Option<(usize, Admission)> {
        while self.next < self.routes {
            let index = self.next;
            self.next += 1;
            let Some(admission) = admit(index).into() else {
                continue;
            };
            match admission {
                Admission::Rejected { retry_after } => {
                    self.min_retry =
                        Some(self.min_retry.map_or(retry_after, |m| m.min(retry_after)));
                }
                admitted => {
                    self.tried.push(index);
                    return Some((index, admitted));
                }
            }
        }
        None
    }

    /// Records how the route last returned by `next_route` failed.
    pub fn failed(&mut self, failure: RouteFailure) {
        if failure == RouteFailure::Overloaded {
            self.overloaded += 1;
        }
        if let RouteFailure::RateLimited { retry_after } = failure {
            self.rate_limited += 1;
            if let Some(wait) = retry_after {
                // A client told `Retry-After: 0` retries at once into the same 429s.
                let wait = wait.max(MIN_PROVIDER_RETRY_AFTER);
                self.min_rate_retry = Some(self.min_rate_retry.map_or(wait, |m| m.min(wait)));
            }
        }
    }

    /// Routes tried so far, in order.
    pub fn tried(&self) -> &[usize] {
        &self.tried
    }

    /// Whether a failover happened (more than one route tried).
    pub fn failed_over(&self) -> bool {
        self.tried.len() > 1
    }

    /// The verdict once `next_route` returned `None`.
    pub fn exhausted(&self) -> Exhausted {
        if self.tried.is_empty() {
            let Some(wait) = self.min_retry else {
                return Exhausted::Unservable;
            };
            // Round up so a client that waits Retry-After finds the breaker half-open.
            Exhausted::AllOpen {
                retry_after_secs: ceil_secs(wait).max(1),
            }
        } else if self.rate_limited == self.tried.len() {
            Exhausted::AllRateLimited {
                tried: self.tried.clone(),
                retry_after: self.min_rate_retry,
            }
        } else if self.overloaded == self.tried.len() {
            Exhausted::AllOverloaded {
                tried: self.tried.clone(),
            }
        } else {
            Exhausted::AllFailed {
                tried: self.tried.clone(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_overloaded_is_the_providers_own_answer_and_one_other_failure_is_not() {
        let mut plan = RoutePlan::new(2);
        while plan.next_route(|_| Admission::Allowed).is_some() {
            plan.failed(RouteFailure::Overloaded);
        }
        assert_eq!(
            plan.exhausted(),
            Exhausted::AllOverloaded { tried: vec![0, 1] }
        );
        let mut plan = RoutePlan::new(2);
        plan.next_route(|_| Admission::Allowed);
        plan.failed(RouteFailure::Overloaded);
        plan.next_route(|_| Admission::Allowed);
        plan.failed(RouteFailure::Other);
        assert_eq!(plan.exhausted(), Exhausted::AllFailed { tried: vec![0, 1] });
    }

    fn rejected(ms: u64) -> Admission {
        Admission::Rejected {
            retry_after: Duration::from_millis(ms),
        }
    }

    #[test]
    fn tries_routes_in_order() {
        let mut plan = RoutePlan::new(3);
        assert_eq!(
            plan.next_route(|_| Admission::Allowed),
            Some((0, Admission::Allowed))
        );
        assert_eq!(
            plan.next_route(|_| Admission::Allowed),
            Some((1, Admission::Allowed))
        );
        assert!(plan.failed_over());
        assert_eq!(
            plan.next_route(|_| Admission::Probe),
            Some((2, Admission::Probe))
        );
        assert_eq!(plan.next_route(|_| Admission::Allowed), None);
        assert_eq!(
            plan.exhausted(),
            Exhausted::AllFailed {
                tried: vec![0, 1, 2]
            }
        );
    }

    #[test]
    fn skips_open_breakers() {
        let mut plan = RoutePlan::new(3);
        let admit = |i: usize| {
            if i == 1 {
                Admission::Allowed
            } else {
                rejected(500)
            }
        };
        assert_eq!(plan.next_route(admit), Some((1, Admission::Allowed)));
        assert_eq!(plan.next_route(admit), None);
        assert_eq!(plan.exhausted(), Exhausted::AllFailed { tried: vec![1] });
    }

    #[test]
    fn all_open_reports_the_earliest_half_open_rounded_up() {
        let mut plan = RoutePlan::new(2);
        let admit = |i: usize| {
            if i == 0 {
                rejected(29_100)
            } else {
                rejected(12_001)
            }
        };
        assert_eq!(plan.next_route(admit), None);
        assert_eq!(
            plan.exhausted(),
            Exhausted::AllOpen {
                retry_after_secs: 13
            }
        );
    }

    #[test]
    fn all_open_is_at_least_one_second() {
        let mut plan = RoutePlan::new(1);
        assert_eq!(plan.next_route(|_| rejected(0)), None);
        assert_eq!(
            plan.exhausted(),
            Exhausted::AllOpen {
                retry_after_secs: 1
            }
        );
    }

    fn rate_limited(secs: Option<u64>) -> RouteFailure {
        RouteFailure::RateLimited {
            retry_after: secs.map(Duration::from_secs),
        }
    }

    #[test]
    fn every_route_rate_limited_gives_the_shortest_retry_after() {
        let mut plan = RoutePlan::new(4);
        let admit = |i: usize| {
            if i == 2 {
                rejected(1_000) // open: skipped, no answer of its own
            } else {
                Admission::Allowed
            }
        };
        for wait in [Some(20), None, Some(7)] {
            assert!(plan.next_route(admit).is_some());
            plan.failed(rate_limited(wait));
        }
        assert_eq!(plan.next_route(admit), None);
        assert_eq!(
            plan.exhausted(),
            Exhausted::AllRateLimited {
                tried: vec![0, 1, 3],
                retry_after: Some(Duration::from_secs(7)),
            }
        );
    }

    #[test]
    fn a_zero_retry_after_is_never_passed_on_as_retry_now() {
        let mut plan = RoutePlan::new(1);
        assert!(plan.next_route(|_| Admission::Allowed).is_some());
        plan.failed(rate_limited(Some(0)));
        assert_eq!(plan.next_route(|_| Admission::Allowed), None);
        assert_eq!(
            plan.exhausted(),
            Exhausted::AllRateLimited {
                tried: vec![0],
                retry_after: Some(Duration::from_secs(1)),
            }
        );
    }

    #[test]
    fn rate_limited_without_retry_after_has_none() {
        let mut plan = RoutePlan::new(1);
        plan.next_route(|_| Admission::Allowed);
        plan.failed(rate_limited(None));
        assert_eq!(
            plan.exhausted(),
            Exhausted::AllRateLimited {
                tried: vec![0],
                retry_after: None,
            }
        );
    }

    #[test]
    fn one_other_failure_among_429s_is_a_plain_failure() {
        let mut plan = RoutePlan::new(2);
        plan.next_route(|_| Admission::Allowed);
        plan.failed(rate_limited(Some(3)));
        plan.next_route(|_| Admission::Allowed);
        plan.failed(RouteFailure::Other);
        assert_eq!(plan.exhausted(), Exhausted::AllFailed { tried: vec![0, 1] });
    }

    #[test]
    fn routes_that_cannot_serve_are_skipped_without_a_verdict_of_their_own() {
        let mut plan = RoutePlan::new(3);
        let admit = |i: usize| (i == 2).then_some(Admission::Allowed);
        assert_eq!(plan.next_route(admit), Some((2, Admission::Allowed)));
        assert_eq!(plan.next_route(admit), None);
        assert_eq!(plan.exhausted(), Exhausted::AllFailed { tried: vec![2] });

        let mut plan = RoutePlan::new(2);
        assert_eq!(plan.next_route(|_| None), None);
        assert_eq!(plan.exhausted(), Exhausted::Unservable);

        // One route cannot serve, the other is open: retrying later helps.
        let mut plan = RoutePlan::new(2);
        assert_eq!(plan.next_route(|i| (i == 1).then(|| rejected(2_000))), None);
        assert_eq!(
            plan.exhausted(),
            Exhausted::AllOpen {
                retry_after_secs: 2
            }
        );
    }

    #[test]
    fn admission_is_asked_lazily() {
        let mut plan = RoutePlan::new(3);
        let mut asked = Vec::new();
        plan.next_route(|i| {
            asked.push(i);
            Admission::Allowed
        });
        assert_eq!(asked, vec![0]);
    }
}
