use super::*;
use proptest::prelude::*;

const T0: u64 = 1_800_000_000_000; // a window boundary

fn tpm(n: u64) -> KeyLimits {
    KeyLimits {
        tpm: Some(n),
        ..KeyLimits::default()
    }
}

fn tokens(n: u64) -> Amount {
    Amount {
        tokens: n,
        cost_nanos: 0,
    }
}

#[test]
fn ten_worst_cases_fit_and_settling_frees_the_rest() {
    let mut l = Ledger::new();
    let limits = tpm(10 * 100);
    let holds: Vec<_> = (0..50)
        .filter_map(|_| l.reserve("k", &limits, tokens(100), T0 + 5).ok())
        .collect();
    assert_eq!(holds.len(), 10);
    let refused = l.reserve("k", &limits, tokens(100), T0 + 5).unwrap_err();
    assert!(matches!(
        refused,
        Refusal::Tokens {
            limit: 1000,
            requested: 100,
            ..
        }
    ));
    // Each really used 30: 700 freed, room for 7 more worst cases.
    for h in holds {
        l.settle(h, tokens(30), T0 + 10);
    }
    assert_eq!(l.tokens("k", 1000, T0 + 10).remaining, 700);
    let more = (0..50)
        .filter(|_| l.reserve("k", &limits, tokens(100), T0 + 10).is_ok())
        .count();
    assert_eq!(more, 7);
}

#[test]
fn a_worst_case_above_the_whole_limit_never_fits() {
    assert_eq!(never_fits(&tpm(100), tokens(100)), None);
    assert_eq!(
        never_fits(&tpm(100), tokens(101)),
        Some(Never::Tokens {
            limit: 100,
            requested: 101
        })
    );
    let budget = Budget {
        nanos: 1_000,
        per: Period::Day,
    };
    let limits = KeyLimits {
        budget: Some(budget),
        ..KeyLimits::default()
    };
    let ask = |cost_nanos| Amount {
        tokens: 5,
        cost_nanos,
    };
    assert_eq!(never_fits(&limits, ask(1_000)), None);
    assert_eq!(
        never_fits(&limits, ask(1_001)),
        Some(Never::Budget {
            budget,
            requested_nanos: 1_001
        })
    );
    assert_eq!(never_fits(&KeyLimits::default(), ask(u64::MAX)), None);
}

#[test]
fn check_answers_what_reserve_would_and_changes_nothing() {
    let mut l = Ledger::new();
    let limits = tpm(1000);
    let shared = Shared {
        window_start: T0,
        prev_tokens: 0,
        curr_tokens: 950,
        spend: None,
    };
    l.adopt("k", shared);
    assert_eq!(l.tokens("k", 1000, T0 + 5).remaining, 50);
    let refused = l.check("k", &limits, tokens(100), T0 + 5).unwrap();
    assert!(l.check("k", &limits, tokens(50), T0 + 5).is_none());
    assert_eq!(
        l.tokens("k", 1000, T0 + 5).remaining,
        50,
        "check reserved nothing"
    );
    let mut same = Ledger::new();
    same.adopt("k", shared);
    assert_eq!(
        same.reserve("k", &limits, tokens(100), T0 + 5),
        Err(refused)
    );
    // The previous window's 950 must weigh at most 900: 3158 ms into the next.
    assert_eq!(refused.retry_after_ms(), WINDOW_MS + 3158 - 5);
}

#[test]
fn adopted_spend_decides_the_budget() {
    let mut l = Ledger::new();
    let budget = Budget {
        nanos: 1_000,
        per: Period::Day,
    };
    let limits = KeyLimits {
        budget: Some(budget),
        ..KeyLimits::default()
    };
    let (day, _) = Period::Day.bounds(T0);
    l.adopt(
        "k",
        Shared {
            spend: Some((day, 990)),
            ..Shared::default()
        },
    );
    assert_eq!(l.budget_remaining("k", budget, T0), 10);
    let ask = Amount {
        tokens: 0,
        cost_nanos: 20,
    };
    assert!(matches!(
        l.check("k", &limits, ask, T0),
        Some(Refusal::Budget { .. })
    ));
}

#[test]
fn release_gives_everything_back() {
    let mut l = Ledger::new();
    let h = l.reserve("k", &tpm(100), tokens(100), T0).unwrap();
    assert!(l.reserve("k", &tpm(100), tokens(1), T0).is_err());
    l.release(h, T0 + 1);
    assert_eq!(l.tokens("k", 100, T0 + 1).remaining, 100);
    assert_eq!(l.tokens("k", 100, T0 + 1).reset_ms, 0);
}

#[test]
fn too_large_for_the_limit_never_fits() {
    let mut l = Ledger::new();
    let r = l.reserve("k", &tpm(100), tokens(101), T0).unwrap_err();
    assert_eq!(r.retry_after_ms(), 2 * WINDOW_MS);
}

#[test]
fn retry_after_is_tight() {
    let mut l = Ledger::new();
    let _h = l.reserve("k", &tpm(100), tokens(100), T0 + 30_000).unwrap();
    let r = l
        .reserve("k", &tpm(100), tokens(50), T0 + 30_000)
        .unwrap_err();
    let wait = r.retry_after_ms();
    // The 100 move to the previous window at T0+60 s and decay; 50 fit
    // once half of it is gone, 30 s into the next window.
    assert_eq!(wait, 60_000);
    assert!(l
        .reserve("k", &tpm(100), tokens(50), T0 + 30_000 + wait - 1)
        .is_err());
    assert!(l
        .reserve("k", &tpm(100), tokens(50), T0 + 30_000 + wait)
        .is_ok());
}

#[test]
fn settling_after_the_window_rolled_corrects_the_previous_one() {
    let mut l = Ledger::new();
    let h = l
        .reserve("k", &tpm(1000), tokens(1000), T0 + 59_000)
        .unwrap();
    l.settle(h, tokens(200), T0 + 61_000);
    // 200 in the previous window, 59/60 of it still weighing.
    assert_eq!(l.tokens("k", 1000, T0 + 61_000).remaining, 1000 - 197);
}

#[test]
fn budget_refuses_then_renews_with_the_period() {
    let mut l = Ledger::new();
    let limits = KeyLimits {
        budget: Some(Budget {
            nanos: 1000,
            per: Period::Day,
        }),
        ..KeyLimits::default()
    };
    let ask = Amount {
        tokens: 10,
        cost_nanos: 600,
    };
    let h = l.reserve("k", &limits, ask, T0).unwrap();
    let r = l.reserve("k", &limits, ask, T0).unwrap_err();
    let (_, end) = Period::Day.bounds(T0);
    assert_eq!(r.retry_after_ms(), end - T0);
    assert!(matches!(r, Refusal::Budget { .. }));
    l.settle(
        h,
        Amount {
            tokens: 5,
            cost_nanos: 100,
        },
        T0 + 1,
    );
    assert_eq!(l.budget_remaining("k", limits.budget.unwrap(), T0 + 1), 900);
    let h2 = l.reserve("k", &limits, ask, T0 + 1).unwrap();
    // Settled after the day ended: the new day starts clean.
    l.settle(h2, ask, end + 1);
    assert_eq!(
        l.budget_remaining("k", limits.budget.unwrap(), end + 1),
        1000
    );
}

#[test]
fn token_windows_follow_the_monotonic_clock_not_a_wall_clock_step() {
    let mut l = Ledger::new();
    let at = |mono_ms, unix_ms| Now { mono_ms, unix_ms };
    l.reserve("k", &tpm(100), tokens(100), at(T0, T0)).unwrap();
    // The wall clock steps five minutes ahead (an NTP step, a VM resume)
    // one second later: the window has not ended.
    let stepped = at(T0 + 1_000, T0 + 301_000);
    assert!(l.reserve("k", &tpm(100), tokens(1), stepped).is_err());
    assert_eq!(l.tokens("k", 100, stepped).remaining, 0);
    // Nor does a step back stall it: two monotonic windows later it is empty.
    let back = at(T0 + 2 * WINDOW_MS, T0 - 3_600_000);
    assert_eq!(l.tokens("k", 100, back).remaining, 100);
    assert!(l.reserve("k", &tpm(100), tokens(100), back).is_ok());
}

#[test]
fn a_request_is_charged_to_the_period_it_started_in() {
    let limits = KeyLimits {
        budget: Some(Budget {
            nanos: 1000,
            per: Period::Day,
        }),
        ..KeyLimits::default()
    };
    let ask = Amount {
        tokens: 10,
        cost_nanos: 600,
    };
    let (day, end) = Period::Day.bounds(T0);
    // Started a millisecond before midnight, reserved after it: charged
    // to the day it started in, where its usage row is timed.
    let mut l = Ledger::new();
    let started = Now {
        mono_ms: end + 5,
        unix_ms: end - 1,
    };
    let h = l.reserve("k", &limits, ask, started).unwrap();
    assert_eq!(h.period_start(), Some(day));
    l.settle(h, ask, end + 10);
    let budget = limits.budget.unwrap();
    assert_eq!(l.budget_remaining("k", budget, end - 1), 400);
    assert_eq!(l.budget_remaining("k", budget, end + 10), 1000);
    // Once a later request has opened the next day, a late starter of
    // the old one is counted in the new day (its row is timed there).
    let mut l = Ledger::new();
    l.reserve("k", &limits, ask, end + 2).unwrap();
    let late = l.reserve("k", &limits, ask, started).unwrap_err();
    assert!(matches!(late, Refusal::Budget { .. }));
    assert_eq!(late.retry_after_ms(), Period::Day.bounds(end).1 - (end - 1));
    let small = Amount {
        tokens: 1,
        cost_nanos: 100,
    };
    let h = l.reserve("k", &limits, small, started).unwrap();
    assert_eq!(h.period_start(), Some(end));
}

#[test]
fn a_seed_carries_spend_and_tokens_over_a_restart() {
    let (day, _) = Period::Day.bounds(T0);
    let (month, _) = Period::Month.bounds(T0);
    let seed = Seed {
        day_start: day,
        day_nanos: 700,
        month_start: month,
        month_nanos: 5_000,
        window_start: T0,
        prev_tokens: 0,
        curr_tokens: 900,
    };
    let daily = KeyLimits {
        budget: Some(Budget {
            nanos: 1000,
            per: Period::Day,
        }),
        ..KeyLimits::default()
    };
    let monthly = KeyLimits {
        tpm: Some(990),
        budget: Some(Budget {
            nanos: 5_500,
            per: Period::Month,
        }),
        ..KeyLimits::default()
    };
    let ask = Amount {
        tokens: 50,
        cost_nanos: 400,
    };
    let mut l = Ledger::new();
    l.seed("d", seed);
    l.seed("m", seed);
    assert_eq!(l.budget_remaining("d", daily.budget.unwrap(), T0 + 5), 300);
    // 700 spent today before the restart: 400 more do not fit.
    assert!(matches!(
        l.reserve("d", &daily, ask, T0 + 5),
        Err(Refusal::Budget { .. })
    ));
    // The month's 5000 and the window's 900 tokens count too.
    assert_eq!(l.tokens("m", 1000, T0 + 5).remaining, 100);
    assert!(l.reserve("m", &monthly, ask, T0 + 5).is_ok());
    assert!(matches!(
        l.reserve("m", &monthly, ask, T0 + 5),
        Err(Refusal::Tokens { .. })
    ));
    // Tomorrow the day's seed no longer applies.
    let tomorrow = day + 86_400_000 + 5;
    assert_eq!(
        l.budget_remaining("d", daily.budget.unwrap(), tomorrow),
        1000
    );
}

#[test]
fn a_refused_budget_reserves_no_tokens() {
    let mut l = Ledger::new();
    let limits = KeyLimits {
        tpm: Some(100),
        budget: Some(Budget {
            nanos: 10,
            per: Period::Month,
        }),
        max_concurrent: None,
    };
    let ask = Amount {
        tokens: 50,
        cost_nanos: 11,
    };
    assert!(l.reserve("k", &limits, ask, T0).is_err());
    assert_eq!(l.tokens("k", 100, T0).remaining, 100);
}

#[test]
fn seeded_spend_counts() {
    let mut l = Ledger::new();
    let b = Budget {
        nanos: 1000,
        per: Period::Month,
    };
    l.seed(
        "k",
        Seed {
            month_start: Period::Month.bounds(T0).0,
            month_nanos: 1000,
            ..Seed::default()
        },
    );
    let limits = KeyLimits {
        budget: Some(b),
        ..KeyLimits::default()
    };
    assert!(l.reserve("k", &limits, Amount::default(), T0).is_err());
}

#[derive(Debug, Clone)]
enum Op {
    Reserve { tokens: u64, cost: u64 },
    Settle { which: usize, frac: u8 },
    Release { which: usize },
    Wait { ms: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1u64..400, 0u64..400).prop_map(|(tokens, cost)| Op::Reserve { tokens, cost }),
        2 => (any::<usize>(), 0u8..=100).prop_map(|(which, frac)| Op::Settle { which, frac }),
        1 => any::<usize>().prop_map(|which| Op::Release { which }),
        1 => (0u64..40_000).prop_map(|ms| Op::Wait { ms }),
    ]
}

proptest! {
    /// Under any interleaving of reservations, settlements at or below
    /// what was reserved, releases and the passing of time, the tokens
    /// counted in the sliding window never exceed `tpm` and the spend
    /// never exceeds the budget.
    #[test]
    fn never_overshoots(limit in 1u64..2000, budget in 1u64..3000, ops in prop::collection::vec(op(), 1..300)) {
        let limits = KeyLimits {
            tpm: Some(limit),
            budget: Some(Budget { nanos: budget, per: Period::Day }),
            max_concurrent: None,
        };
        let mut l = Ledger::new();
        let mut now = T0 + 12_345;
        let mut open: Vec<(Hold, Amount)> = Vec::new();
        for op in ops {
            match op {
                Op::Reserve { tokens, cost } => {
                    let ask = Amount { tokens, cost_nanos: cost };
                    let before = l.tokens("k", limit, now).remaining;
                    match l.reserve("k", &limits, ask, now) {
                        Ok(h) => {
                            prop_assert!(tokens <= before);
                            open.push((h, ask));
                        }
                        Err(Refusal::Tokens { .. }) => prop_assert!(tokens > before),
                        Err(Refusal::Budget { .. }) => {}
                    }
                }
                Op::Settle { which, frac } if !open.is_empty() => {
                    let (h, ask) = open.swap_remove(which % open.len());
                    let used = Amount {
                        tokens: ask.tokens * u64::from(frac) / 100,
                        cost_nanos: ask.cost_nanos * u64::from(frac) / 100,
                    };
                    l.settle(h, used, now);
                }
                Op::Release { which } if !open.is_empty() => {
                    let (h, _) = open.swap_remove(which % open.len());
                    l.release(h, now);
                }
                Op::Wait { ms } => now += ms,
                _ => {}
            }
            let state = l.keys.get("k").copied().unwrap_or_default();
            prop_assert!(state.tokens.load(now) <= u128::from(limit) * u128::from(WINDOW_MS));
            prop_assert!(state.spend.nanos <= budget);
        }
    }

    /// The documented bound for usage above the reservation (a provider
    /// reporting more than the worst case, a prompt the estimate
    /// under-counted): the window and the spend exceed their limits by
    /// at most the sum of those excesses, never by any reservation made
    /// after them.
    #[test]
    fn usage_above_the_reservation_overshoots_by_its_excess_only(
        limit in 1u64..2000, budget in 1u64..3000,
        ops in prop::collection::vec(op(), 1..300), extra in prop::collection::vec(100u64..300, 300),
    ) {
        let limits = KeyLimits {
            tpm: Some(limit),
            budget: Some(Budget { nanos: budget, per: Period::Day }),
            max_concurrent: None,
        };
        let mut l = Ledger::new();
        let now = T0 + 12_345;
        let mut open: Vec<(Hold, Amount)> = Vec::new();
        let (mut excess_tokens, mut excess_nanos) = (0u64, 0u64);
        for (i, op) in ops.into_iter().enumerate() {
            match op {
                Op::Reserve { tokens, cost } => {
                    let ask = Amount { tokens, cost_nanos: cost };
                    if let Ok(h) = l.reserve("k", &limits, ask, now) {
                        open.push((h, ask));
                    }
                }
                // Settled at up to 3x what was reserved.
                Op::Settle { which, frac } if !open.is_empty() => {
                    let (h, ask) = open.swap_remove(which % open.len());
                    let pct = u64::from(frac) * extra[i % extra.len()] / 100;
                    let used = Amount {
                        tokens: ask.tokens * pct / 100,
                        cost_nanos: ask.cost_nanos * pct / 100,
                    };
                    excess_tokens += used.tokens.saturating_sub(ask.tokens);
                    excess_nanos += used.cost_nanos.saturating_sub(ask.cost_nanos);
                    l.settle(h, used, now);
                }
                Op::Release { which } if !open.is_empty() => {
                    let (h, _) = open.swap_remove(which % open.len());
                    l.release(h, now);
                }
                _ => {}
            }
            let state = l.keys.get("k").copied().unwrap_or_default();
            prop_assert!(state.tokens.load(now) <= u128::from(limit + excess_tokens) * u128::from(WINDOW_MS));
            prop_assert!(state.spend.nanos <= budget + excess_nanos);
        }
    }

    /// Everything released brings the window back to where it was.
    #[test]
    fn releasing_all_restores_the_window(limit in 1u64..2000, asks in prop::collection::vec(1u64..300, 1..50)) {
        let mut l = Ledger::new();
        let holds: Vec<_> = asks.iter().filter_map(|&n| l.reserve("k", &tpm(limit), tokens(n), T0 + 7).ok()).collect();
        for h in holds {
            l.release(h, T0 + 9);
        }
        prop_assert_eq!(l.tokens("k", limit, T0 + 9).remaining, limit);
    }
}
