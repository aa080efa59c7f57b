//! The outage rules against a model of Redis and of nodes' clocks.

use super::*;
use crate::fleet::Grant;

const W: u64 = WINDOW_MS;

#[test]
fn estimates_either_side_of_a_multiple_keep_the_windows_numbered() {
    // Redis's boundaries at multiples of the window on the caller's clock
    // (a fleet sidecar's clock is the wall clock, as Redis's is): the
    // estimates land a ms either side, and a slack may carry one across.
    let t = 100 * W + 30_000;
    let mut r = Reach::default();
    r.align(t, t + 2, W - 30_000 - 1); // boundary 1 ms before 101·W
    let clock = r.window_clock(t);
    assert!(r.went_local(t));
    assert!(r.shares_from_the_start(t + 5_000).is_err(), "rule 1");
    for (sent, recv) in [(t + 5_000, t + 5_000), (t + 6_000, t + 6_004)] {
        // Boundary at 101·W exactly; then 1 ms late with 4 ms of slack.
        r.align(sent, recv, 101 * W - sent);
        assert!(
            r.shares_from_the_start(recv + 1).is_err(),
            "still the window Redis went away in"
        );
        assert!(r.shares(recv + 1).is_err());
        assert!(
            r.window_clock(t).abs_diff(clock) <= 1,
            "the clock does not jump a window"
        );
    }
    // The next window is a later one: the node's share, from its start.
    let next = r.shares_from_the_start(101 * W + 10).expect("rule 2");
    assert_eq!(next.next_ms, 102 * W + 4);
    // And the other way round, from just after a multiple to just before.
    let mut r = Reach::default();
    r.align(t, t, W - 30_000 + 1);
    assert!(r.went_local(t));
    r.align(t + 5_000, t + 5_000, W - 35_000 - 1);
    assert!(r.shares_from_the_start(t + 6_000).is_err());
    assert!(r.shares_from_the_start(101 * W + 10).is_ok());
}

#[test]
fn a_phase_kept_by_an_earlier_module_numbers_windows_as_it_did() {
    // Before phases were unwrapped: phase modulo the window, and
    // `index = (now + W − (phase + slack) % W) / W + 1`.
    let old = Reach {
        phase_ms: 20_000,
        slack_ms: 3,
        aligned: 2,
        lost_window: 7,
        ..Reach::default()
    };
    for now in [5 * W, 5 * W + 20_002, 5 * W + 20_003, 9 * W + 59_999] {
        assert_eq!(old.index(now), (now + W - 20_003) / W + 1, "{now}");
        assert_eq!(old.window_clock(now), now + W - 20_000, "{now}");
    }
    let late = Reach {
        phase_ms: 59_999,
        slack_ms: 3,
        ..old
    };
    let now = 5 * W + 10;
    assert_eq!(
        late.index(now),
        (now + W - 2) / W + 1,
        "phase + slack past a window"
    );
    let mut moved = old;
    moved.align(5 * W, 5 * W + 3, 20_001);
    assert_eq!(
        moved.index(6 * W),
        old.index(6 * W),
        "a ms later: same numbering"
    );
}

#[test]
fn one_line_per_node_and_outage_however_many_workers() {
    let mut r = Reach::default();
    assert!(!r.lost());
    // Four workers turn local one after the other: the first logs.
    assert!(r.went_local(10_000));
    assert!(!r.went_local(10_050));
    assert!(!r.went_local(10_100));
    r.still_local(11_000);
    assert!(!r.went_local(12_500));
    assert!(r.lost());
    // A worker that stayed global and hears Redis is no news.
    assert!(!r.answered(false, 12_600));
    // The first local worker back logs; the others do not.
    assert!(r.answered(true, 13_000));
    assert!(!r.lost());
    assert!(!r.answered(true, 13_100));
    // A worker still local after that does not mark the node again.
    r.still_local(13_200);
    assert!(!r.lost());
    assert!(!r.answered(true, 13_300));
    // A new outage is a new line.
    assert!(r.went_local(20_000));
}

#[test]
fn a_loss_no_local_worker_stands_by_is_ended_by_a_global_answer() {
    // The local workers were replaced (a reload) by ones that never lost Redis.
    let mut r = Reach::default();
    assert!(r.went_local(10_000));
    r.still_local(11_000);
    assert!(!r.answered(false, 11_000 + REACH_STALE_MS - 1));
    assert!(r.answered(false, 11_000 + REACH_STALE_MS));
    assert!(!r.lost());
    // Likewise a worker turning local after a loss nobody stood by logs anew.
    assert!(r.went_local(30_000));
    assert!(r.went_local(30_000 + REACH_STALE_MS));
}

/// What `n` requests from `from` (one per ms) get: L leased, S share, D denied.
fn run(l: &mut Lease, w: &mut RateWindow, r: &Reach, limit: u32, from: u64, n: u64) -> String {
    (from..from + n)
        .map(|t| match l.take_local(w, r, limit, 2, t) {
            (v, None) if v.admitted => 'L',
            (_, Some(_)) => 'S',
            _ => 'D',
        })
        .collect()
}

#[test]
fn the_window_redis_went_away_in_admits_only_what_redis_counted() {
    // Limit 40 over 2 nodes; Redis's windows start at 7 s past each
    // minute of this clock, known to 3 ms. The last grant: 3 tokens with
    // 10 left fleet-wide, 20 s before that window ends.
    let mut r = Reach::default();
    r.align(W + 47_000, W + 47_003, 20_000);
    let (mut l, mut w) = (Lease::default(), RateWindow::default());
    l.apply(&Grant::from_counts(40, 3, 0, 30, 40_000), W + 47_000);
    assert!(r.went_local(W + 48_000));
    // Its 3 tokens, then nothing: not the 10 ÷ 2 the stale figure allows.
    assert_eq!(run(&mut l, &mut w, &r, 40, W + 48_001, 6), "LLLDDD");
    let (v, owed) = l.take_local(&mut w, &r, 40, 2, W + 50_000);
    // Told to come back when the next window's safe part starts.
    assert_eq!((v.admitted, owed, v.reset_after_ms), (false, None, 17_003));
    // That window: 20 shares counted from zero, then none until the next.
    assert_eq!(
        run(&mut l, &mut w, &r, 40, 2 * W + 7_003, 22),
        "SSSSSSSSSSSSSSSSSSSSDD"
    );
    let (v, _) = l.take_local(&mut w, &r, 40, 2, 2 * W + 30_000);
    assert_eq!((v.remaining, v.reset_after_ms), (0, 37_003));
    // The last 3 ms before the boundary admit nothing; then 20 more.
    let (mut l, mut w) = (Lease::default(), RateWindow::default());
    assert_eq!(run(&mut l, &mut w, &r, 40, 3 * W + 7_000, 3), "DDD");
    assert_eq!(
        run(&mut l, &mut w, &r, 40, 3 * W + 7_003, 21),
        "SSSSSSSSSSSSSSSSSSSSD"
    );
}

#[test]
fn a_share_says_what_is_left_of_it_and_until_when_it_is_owed() {
    let mut r = Reach::default();
    assert!(r.went_local(1_000));
    let (mut l, mut w) = (Lease::default(), RateWindow::default());
    let (v, owed) = l.take_local(&mut w, &r, 30, 2, W + 10);
    assert_eq!(
        (v.admitted, v.remaining, v.reset_after_ms),
        (true, 14, W - 10)
    );
    assert_eq!(owed, Some(2 * W));
}

#[test]
fn redis_back_after_a_boundary_holds_the_windows_until_the_others_are_back() {
    let mut r = Reach::default();
    r.align(0, 4, W);
    assert!(r.went_local(1_000));
    // Back in the window it went away in, far from its end: nothing held.
    assert_eq!(r.hold_request(20_000), None);
    // Near its end: the next window, from Redis's boundary.
    assert_eq!(r.hold_request(W - 1_000), Some((1_000, W + 1_000)));
    // Two windows on: that one, and the next when it is near.
    assert_eq!(r.hold_request(3 * W + 10_000), Some((0, 50_000)));
    assert_eq!(r.hold_request(4 * W - 500), Some((0, W + 500)));
    // A node that has Redis asks nothing.
    assert!(r.answered(true, 3 * W + 10_000));
    assert_eq!(r.hold_request(3 * W + 10_000), None);
    // Redis says this window is held: no grant until it ends, shares in it.
    let (mut l, mut w) = (Lease::default(), RateWindow::default());
    r.held(3 * W + 10_000, 50_000);
    assert!(r.keeps_local(3 * W + 59_999));
    assert_eq!(run(&mut l, &mut w, &r, 4, 3 * W + 10_001, 3), "SSD");
    assert!(!r.keeps_local(4 * W));
    assert_eq!(r.shares(4 * W + 10), Err(RETRY_SOON_MS));
    // Held in the window the node itself lost Redis in: shares too (no
    // grant in a held window, so nothing another node got adds to them).
    let mut r = Reach::default();
    assert!(r.went_local(1_000));
    r.held(2_000, 58_000);
    assert!(r.shares(2_000).is_ok());
    assert!(r.answered(true, 3_000));
    assert!(r.shares(3_000).is_ok());
}

#[test]
fn a_loss_found_near_a_boundary_counts_for_the_next_window_too() {
    let mut r = Reach::default();
    r.align(0, 5, W);
    assert!(r.went_local(W - LOSS_SPREAD_MS + 10));
    assert_eq!(r.shares(W + 10), Err(W - 5));
    assert!(r.shares(2 * W + 5).is_ok());
    let mut r = Reach::default();
    assert!(r.went_local(W - LOSS_SPREAD_MS - 10));
    assert!(r.shares(W + 10).is_ok());
}

#[test]
fn counters_lost_leave_each_node_what_is_left_of_its_share_until_their_window_ends() {
    let mut r = Reach::default();
    let (mut l, mut w) = (Lease::default(), RateWindow::default());
    l.apply(&Grant::from_counts(40, 2, 0, 30, 10_000), 0);
    // 17 admitted here in this window before the loss (counted on Redis's windows).
    for t in 0..17 {
        w.hit(u32::MAX, r.window_clock(1_000 + t));
    }
    r.recount(50_000);
    assert!(r.keeps_local(20_000));
    // The lease's 2 tokens, then 20 − 19 = 1 of the share, then none.
    assert_eq!(run(&mut l, &mut w, &r, 40, 20_000, 5), "LLSDD");
    assert_eq!(
        l.take_local(&mut w, &r, 40, 2, 30_000).0.reset_after_ms,
        30_000
    );
    assert!(!r.keeps_local(50_000));
}

#[test]
fn a_caller_that_cannot_count_its_grants_takes_shares_only_in_whole_windows_away() {
    let mut r = Reach::default();
    assert!(r.went_local(1_000));
    assert_eq!(r.shares_from_the_start(2_000), Err(W - 2_000));
    assert!(r.shares_from_the_start(W + 10).is_ok());
    // Held, or counting anew: no share for it, whatever `shares` allows.
    assert!(r.answered(true, W + 20_000));
    r.held(W + 20_000, 40_000);
    assert!(r.shares(W + 20_000).is_ok());
    assert_eq!(r.shares_from_the_start(W + 20_000), Err(40_000));
    let mut r = Reach::default();
    r.recount(30_000);
    assert!(r.shares(10_000).is_ok());
    assert_eq!(r.shares_from_the_start(10_000), Err(20_000));
}

#[test]
fn boundaries_follow_redis_then_the_wall_clock_before_it_answered() {
    let mut r = Reach::default();
    // The wall clock reads 12:00:40.000 when the caller's reads 100 000.
    r.align_to_wall(100_000, 1_700_000_040_000 - 1_700_000_040_000 % W + 40_000);
    assert!(r.went_local(100_000));
    // Next wall minute at 120 000, safe from 120 250.
    assert_eq!(r.shares(110_000), Err(10_250));
    assert!(r.shares(120_250).is_ok());
    // Redis's answers replace it; the wall clock no longer does.
    r.align(130_000, 130_002, 30_000);
    r.align_to_wall(0, 0);
    assert_eq!(r.window(170_000).next_ms, 220_002);
    // A slow answer leaves the estimate as it was.
    r.align(130_000, 132_000, 10_000);
    assert_eq!(r.window(170_000).next_ms, 220_002);
}

/// A model of one Redis (down during `outages`, restarted empty after
/// some) and nodes each sending a request every `gap` ms (so each finds
/// a loss, and Redis back, within that), for ten minutes.
struct Model {
    limit: u32,
    nodes: u32,
    counts: std::collections::HashMap<u64, u32>,
    held: std::collections::HashSet<u64>,
    epoch: u32,
    /// (down, up, restarted empty)
    outages: Vec<(u64, u64, bool)>,
}

struct Node {
    lease: Lease,
    window: RateWindow,
    reach: Reach,
    local: bool,
    epoch: u32,
    /// Admissions on shares Redis has not counted, and until when they are owed.
    debt: (u32, u64),
    rtt: u64,
}

/// What the lease script answered.
struct Answer {
    grant: Grant,
    epoch: u32,
    held: bool,
}

impl Model {
    fn up(&self, t: u64) -> bool {
        !self.outages.iter().any(|&(a, b, _)| a <= t && t < b)
    }

    /// The lease script at `t`: counts `debt`, marks what `hold` asks,
    /// grants up to `want` unless the window is held.
    fn script(&mut self, t: u64, want: u32, debt: u32, hold: Option<(u64, u64)>) -> Answer {
        for o in &mut self.outages {
            if o.2 && o.1 <= t {
                o.2 = false;
                self.counts.clear();
                self.held.clear();
                self.epoch += 1;
            }
        }
        let w = t / W;
        if let Some((after, upto)) = hold {
            self.held
                .extend(held_windows(t, after, upto).iter().map(|s| s / W));
        }
        let held = self.held.contains(&w);
        let prev = self.counts.get(&(w.wrapping_sub(1))).copied().unwrap_or(0);
        let curr = self.counts.entry(w).or_default();
        *curr += debt;
        let room = crate::ratelimit::room(self.limit.into(), prev.into(), (*curr).into(), t % W);
        let g = if held {
            0
        } else {
            want.min(room.clamp(0, i128::from(u32::MAX)) as u32)
        };
        *curr += g;
        Answer {
            grant: Grant::from_counts(self.limit, g, prev, *curr, t % W),
            epoch: self.epoch,
            held,
        }
    }

    /// Reads an answer at `t` as the module does: false when its grant
    /// may not be used (counters lost in this window, or held).
    fn read(&self, node: &mut Node, t: u64, a: &Answer) -> bool {
        if a.epoch != node.epoch {
            node.epoch = a.epoch;
            node.debt = (0, 0);
            if self.outages.iter().any(|o| o.1 <= t && t / W == o.1 / W) {
                node.reach.recount(t - t % W + W);
            }
        }
        node.reach.align(t, t + node.rtt, a.grant.window_left_ms);
        if a.held {
            node.reach.held(t, a.grant.window_left_ms);
        }
        !node.reach.keeps_local(t)
    }

    /// One request at `t` on `node`: whether it was admitted.
    fn request(&mut self, node: &mut Node, t: u64) -> bool {
        let up = self.up(t);
        if node.local && up {
            // The probe: Redis answers.
            let a = self.script(t, 0, 0, node.reach.hold_request(t));
            self.read(node, t, &a);
            node.local = false;
            node.reach.answered(true, t);
        }
        if !up && !node.local {
            node.local = true;
            node.reach.went_local(t);
        }
        if !node.local && node.debt.0 > 0 {
            if t < node.debt.1 {
                let a = self.script(t, 0, node.debt.0, None);
                self.read(node, t, &a);
            }
            node.debt = (0, 0);
        }
        let local = |node: &mut Node, limit, nodes| {
            let (v, owed) = node
                .lease
                .take_local(&mut node.window, &node.reach, limit, nodes, t);
            if let Some(until) = owed {
                node.debt = (node.debt.0 + 1, until);
            }
            v.admitted
        };
        if node.local || node.reach.keeps_local(t) {
            return local(node, self.limit, self.nodes);
        }
        let clock = node.reach.window_clock(t);
        match node.lease.take(self.limit, t) {
            Take::Admit(_) => {
                node.window.hit(u32::MAX, clock);
                return true;
            }
            Take::Deny(_) => return false,
            Take::Empty => {}
        }
        let want = node.lease.want(self.limit, self.nodes, t);
        let a = self.script(t, want, 0, None);
        if !self.read(node, t, &a) {
            // Not the Redis it counted in, or a held window: the grant
            // is given back (the module does not apply it either).
            *self.counts.entry(t / W).or_default() -= a.grant.granted;
            return local(node, self.limit, self.nodes);
        }
        node.lease.apply(&a.grant, t);
        let admitted = matches!(node.lease.take(self.limit, t), Take::Admit(_));
        if admitted {
            node.window.hit(u32::MAX, clock);
        }
        admitted
    }
}

/// Admissions per Redis window of nodes sending requests at the times of
/// their schedule (round trip `rtt`), through `outages` (down at, for,
/// restarted empty).
fn simulate(
    limit: u32,
    schedules: &[(Vec<u64>, u64)],
    outages: &[(u64, u64, bool)],
) -> Vec<(u64, u32, u32)> {
    let mut m = Model {
        limit,
        nodes: schedules.len() as u32,
        counts: Default::default(),
        held: Default::default(),
        epoch: 1,
        outages: outages
            .iter()
            .map(|&(a, len, empty)| (a, a + len, empty))
            .collect(),
    };
    let mut nodes: Vec<Node> = schedules
        .iter()
        .map(|(_, rtt)| Node {
            lease: Lease::default(),
            window: RateWindow::default(),
            reach: Reach::default(),
            local: false,
            epoch: 1,
            debt: (0, 0),
            rtt: *rtt,
        })
        .collect();
    let mut events: Vec<(u64, usize)> = vec![];
    for (n, (times, _)) in schedules.iter().enumerate() {
        events.extend(times.iter().map(|&t| (t, n)));
    }
    events.sort_unstable();
    let mut admitted = std::collections::BTreeMap::<u64, u32>::new();
    // Per window with a restart in it, each node's admissions before it.
    let restarts: Vec<u64> = outages.iter().filter(|o| o.2).map(|o| o.0 + o.1).collect();
    let mut before = std::collections::BTreeMap::<(u64, usize), u32>::new();
    for (t, n) in events {
        if m.request(&mut nodes[n], t) {
            *admitted.entry(t / W).or_default() += 1;
            if restarts.iter().any(|&r| r / W == t / W && t < r) {
                *before.entry((t / W, n)).or_default() += 1;
            }
        }
    }
    // Rule 4's bound where Redis lost its counters: each node's grants
    // before the loss or its share, whichever is larger.
    let share = crate::fleet::local_share(limit, schedules.len() as u32);
    admitted
        .into_iter()
        .map(|(w, a)| {
            let bound = if restarts.iter().any(|&r| r / W == w) {
                (0..schedules.len())
                    .map(|n| before.get(&(w, n)).copied().unwrap_or(0).max(share))
                    .sum::<u32>()
                    .max(limit)
            } else {
                limit
            };
            (w, a, bound)
        })
        .collect()
}

#[test]
fn a_node_that_found_the_loss_before_a_boundary_takes_no_share_after_it() {
    // B finds Redis gone 150 ms before a boundary, A (idle since) 189 ms
    // after it; Redis is back 30 s into that window, where A, back first
    // with a burst (its loss found in that window), takes grants while B
    // still spends its share: without the spread, 28 of 20.
    let a = [59_790, 60_189].into_iter().chain(90_114..90_290).collect();
    let b = (0..1_000).map(|k| 59_150 + k * 350).collect();
    let per = simulate(20, &[(a, 0), (b, 0)], &[(59_800, 30_200, false)]);
    assert!(per.iter().all(|&(_, n, _)| n <= 20), "{per:?}");
}

proptest::proptest! {
    #[test]
    fn every_window_holds_its_limit_through_outages_and_restarts(
        limit in 2u32..80,
        gaps in proptest::collection::vec((1u64..400, 0u64..400, 0u64..4), 1..4),
        outages in proptest::collection::vec((0u64..550_000, 100u64..150_000, proptest::bool::ANY), 0..4),
    ) {
        // A limit below the node count still gives each node one request
        // (`local_share`): a lockout would be worse than that overshoot.
        let limit = limit.max(gaps.len() as u32);
        let schedules: Vec<(Vec<u64>, u64)> = gaps
            .iter()
            .map(|&(gap, offset, rtt)| ((0..).map(|k| offset + k * gap).take_while(|&t| t < 600_000).collect(), rtt))
            .collect();
        let admitted = simulate(limit, &schedules, &outages);
        for (w, a, bound) in &admitted {
            proptest::prop_assert!(a <= bound, "window {w}: {a} admitted, bound {bound} (limit {limit}); {admitted:?}");
        }
    }
}
