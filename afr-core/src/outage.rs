//! A fleet node on its own while Redis is away (design §9): when it may
//! admit what Redis has not counted, and how much. The same rules hold the
//! module's `rpm` (per nginx node, in its shared zone) and the sidecar's
//! `tpm` (per sidecar):
//!
//! 1. **The window Redis went away in**: only what Redis counted already — an
//!    `rpm` lease's tokens; nothing for `tpm`, whose reservations are
//!    counted one by one. What the other nodes spent since this node's last
//!    sync is unknown, so a share of what was left then could add up to more
//!    than the limit (it did: 31 of 30 in a chaos run). A loss found in the
//!    last [`LOSS_SPREAD_MS`] of a window counts for the next one too: the
//!    other nodes may find the same loss only after the boundary.
//! 2. **Every later window**: the node's share `limit ÷ nodes`, counted from
//!    zero at each of Redis's window boundaries — fixed windows on the node's
//!    estimate of Redis's clock ([`Reach::align`]). The estimate is uncertain
//!    by a round trip (`slack`); nothing is admitted in the last `slack` ms
//!    before a boundary, so no admission counted in one window falls in the
//!    next by Redis's clock.
//! 3. **Redis back after a boundary**: the windows from there until
//!    [`RETURN_SPREAD_MS`] later are *held*: the node's first call back asks
//!    Redis to mark them ([`Reach::hold_request`]), and in a held window
//!    Redis grants nothing to anyone — every node decides on its share
//!    ([`Reach::held`]) and pays what it owes. Otherwise a node back early
//!    would be granted what another node, not back yet, spent on its share
//!    and has not paid. The spread covers the others' return (they probe
//!    once a second).
//! 4. **Redis lost its counters** (restarted empty, failed over): until the
//!    window they were lost in ends, no grant; each node decides on what is
//!    left of its share after everything it admitted in that window
//!    ([`Reach::recount`]); the new Redis counts from the next window. Exact
//!    unless a node had been granted more than its share in that window
//!    before the loss: then the window may hold up to the sum over nodes of
//!    the larger of the two (the old Redis's counts are gone; refusing the
//!    rest of the window to every key would turn each restart into a
//!    minute of 429s).
//!
//! With every node away together — Redis down, frozen, restarted empty,
//! read-only, its connections cut — each window's admissions stay within the
//! limit (rule 4's bound aside). Not covered, because no node can know of it: a partition (a node
//! cut off from Redis for longer than the spread after the others are back)
//! — its shares add to what Redis grants the others.
//!
//! Times are on the caller's monotonic clock (ms), as in [`crate::fleet`].

use crate::fleet::{local_share, Lease, Take};
use crate::ratelimit::{RateWindow, Verdict, WINDOW_MS};

/// How long a node's loss of Redis stands without a local worker standing
/// by it (each does once a second, from its timer): past it, the workers
/// that were local are gone (a reload, a crash), and the next worker that
/// hears Redis answer says it is back.
pub const REACH_STALE_MS: u64 = 3_000;

/// A round trip longer than this does not move the estimate of Redis's
/// window boundaries: the strip it would close before each boundary costs
/// more admissions than a slightly older estimate risks.
pub const MAX_SLACK_MS: u64 = 1_000;

/// The uncertainty of boundaries estimated from the node's wall clock, until
/// Redis has answered once: NTP keeps a fleet's clocks closer than this.
pub const WALL_SLACK_MS: u64 = 250;

/// A loss found this close to a window's end is taken as found in the next
/// window too (rule 1): other nodes find it up to a probe interval and a
/// timeout later.
pub const LOSS_SPREAD_MS: u64 = 2_000;

/// A node back from a loss has the windows until this much later held
/// (rule 3): the other nodes find Redis back within a probe interval and a
/// timeout.
pub const RETURN_SPREAD_MS: u64 = 2_000;

/// Phases are kept unwrapped ([`Reach::align`]) and biased by this many
/// windows' worth, so that they never go below zero: an estimate that moves
/// across a multiple of the window moves the boundaries by those few ms, not
/// the windows' numbering by one. (Wrapped modulo the window, a boundary
/// estimated 1 ms before a multiple and then 1 ms after it renumbered every
/// window: the window Redis went away in became "a later one", and a node
/// took a share in it — 2 184 of 1 500 tokens in a chaos run.)
const PHASE_BIAS_MS: u64 = 1_000 * WINDOW_MS;

/// How long a refusal says to wait when Redis is reachable but was too
/// slow for this request (no loss, so no share): a second.
pub const RETRY_SOON_MS: u64 = 1_000;

/// The Lua side of rule 3, a literal for `concat!` in front of a Redis
/// script: defines `afr_held(name, now, w, after, upto)`, which marks as
/// held `name .. ':' .. start` for every window whose start, read to the
/// nearest boundary, lies `after` ms from `now` or later (`after` 0: the
/// current window too) and before `upto` ms from `now` (nothing when
/// `upto` is 0) — what [`Reach::hold_request`] asks — and says whether the
/// current window is held (1) or not (0). A mark lives three windows.
#[macro_export]
macro_rules! hold_lua {
    () => {
        r"
local function afr_held(name, now, w, after, upto)
  local start = now - now % w
  if upto > 0 then
    for i = 0, 3 do
      local s = start + i * w
      if (after == 0 or s + w / 2 >= now + after) and s + w / 2 < now + upto then
        redis.call('SET', name .. ':' .. string.format('%d', s), 1, 'PX', 3 * w)
      end
    end
  end
  return redis.call('EXISTS', name .. ':' .. string.format('%d', start))
end
"
    };
}

/// The starts (Redis's clock) of the windows [`hold_lua!`]'s `afr_held`
/// marks when asked at `now_ms` to hold from `after_ms` to `upto_ms` (see
/// [`Reach::hold_request`]): the rule in Rust, for the Lua twin's tests and
/// the model of Redis in this file's.
pub fn held_windows(now_ms: u64, after_ms: u64, upto_ms: u64) -> Vec<u64> {
    let w = WINDOW_MS;
    let start = now_ms - now_ms % w;
    if upto_ms == 0 {
        return Vec::new();
    }
    (0..4)
        .map(|i| start + i * w)
        .filter(|s| {
            (after_ms == 0 || s + w / 2 >= now_ms + after_ms) && s + w / 2 < now_ms + upto_ms
        })
        .collect()
}

/// One node's view of Redis, shared by its workers (kept in the module's
/// shared zone, so `repr(C)`; zeroed means "Redis reachable, boundaries at
/// multiples of the window on the caller's clock"). It logs one line when
/// the node loses Redis and one when it has it back, not one per worker,
/// and holds the rules above. Each nginx worker still decides its own mode
/// from its own calls.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reach {
    /// When a local worker of the node last stood by the loss; 0 while the
    /// node has Redis.
    local_ms: u64,
    /// Redis's window boundaries on the caller's clock: each lies within
    /// `[phase_ms + k·W, phase_ms + slack_ms + k·W]`. Unwrapped, biased by
    /// [`PHASE_BIAS_MS`] (when `aligned` is not 0).
    phase_ms: u64,
    slack_ms: u64,
    /// 0: not estimated; 1: from the wall clock; 2: from Redis's answers.
    aligned: u64,
    /// Index ([`Reach::index`]) of the last window the node lost Redis in
    /// (rule 1).
    lost_window: u64,
    /// Index of the last window Redis said was held (rule 3).
    held_window: u64,
    /// Until then the node takes no grant: the window is held (rule 3) or
    /// Redis counts anew (rule 4).
    no_grants_until_ms: u64,
    /// Until then Redis counts anew (rule 4).
    recount_until_ms: u64,
}

/// One of Redis's windows as the node may use it for shares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShareWindow {
    /// Its index, to count shares in.
    pub index: u64,
    /// When its safe part ends: the strip of `slack` before the boundary.
    pub end_ms: u64,
    /// When the next window's safe part starts (shares count from zero).
    pub next_ms: u64,
}

impl Reach {
    /// Sets the boundaries from a call sent at `sent_ms` whose answer came
    /// back at `recv_ms` saying `window_left_ms` were left of Redis's window:
    /// that window ended between `sent_ms + left` and `recv_ms + left`.
    pub fn align(&mut self, sent_ms: u64, recv_ms: u64, window_left_ms: u64) {
        let slack = recv_ms.saturating_sub(sent_ms);
        if slack > MAX_SLACK_MS {
            return;
        }
        self.set_phase((sent_ms + window_left_ms) % WINDOW_MS);
        self.slack_ms = slack;
        self.aligned = 2;
    }

    /// Moves the boundaries to `phase` (modulo the window) by the shorter
    /// way from where they were: the estimate's noise never renumbers the
    /// windows (see [`PHASE_BIAS_MS`]).
    fn set_phase(&mut self, phase: u64) {
        let cur = self.phase();
        let d = (phase + WINDOW_MS - cur % WINDOW_MS) % WINDOW_MS;
        let moved = if d <= WINDOW_MS / 2 {
            cur + d
        } else {
            cur.saturating_sub(WINDOW_MS - d)
        };
        // Only clocks drifting apart by hundreds of windows in one direction
        // reach either end: start over there (one renumbering).
        self.phase_ms = if (WINDOW_MS..2 * PHASE_BIAS_MS).contains(&moved) {
            moved
        } else {
            PHASE_BIAS_MS + phase
        };
    }

    /// The unwrapped phase: multiples of the window until one is estimated.
    /// A phase under one window was written by a module before phases were
    /// unwrapped (a shared zone outlives a reload): read with the bias, it
    /// numbers the windows as that module did.
    fn phase(&self) -> u64 {
        match self.aligned {
            0 => PHASE_BIAS_MS,
            _ if self.phase_ms < WINDOW_MS => PHASE_BIAS_MS + self.phase_ms,
            _ => self.phase_ms,
        }
    }

    /// Until Redis has answered: boundaries where the wall clock (Redis's
    /// `TIME` is one) reads a multiple of the window, `unix_ms` being the
    /// wall clock when the caller's clock reads `mono_ms`.
    pub fn align_to_wall(&mut self, mono_ms: u64, unix_ms: u64) {
        if self.aligned != 0 {
            return;
        }
        self.set_phase((mono_ms + WINDOW_MS - unix_ms % WINDOW_MS) % WINDOW_MS);
        self.slack_ms = WALL_SLACK_MS;
        self.aligned = 1;
    }

    /// Where safe parts start: the unwrapped phase plus the slack (not
    /// reduced modulo the window either: a slack carrying the phase past a
    /// multiple would renumber the windows as a wrapped phase did).
    fn offset(&self) -> u64 {
        if self.aligned != 0 && self.phase_ms < WINDOW_MS {
            // An earlier module's phase (see `phase`): its offset was
            // reduced modulo the window, so its windows were numbered so.
            return PHASE_BIAS_MS + (self.phase_ms + self.slack_ms) % WINDOW_MS;
        }
        self.phase() + self.slack_ms
    }

    /// The index of the window whose safe part starts last at or before
    /// `now_ms` (≥ 1): windows are `[start, start + W)`, their safe part
    /// `[start, start + W − slack)`.
    fn index(&self, now_ms: u64) -> u64 {
        let t =
            i128::from(now_ms) + i128::from(WINDOW_MS + PHASE_BIAS_MS) - i128::from(self.offset());
        (t.max(0) / i128::from(WINDOW_MS)) as u64 + 1
    }

    /// `now_ms` moved so that Redis's windows begin at multiples of the
    /// window, by the earliest their boundaries can be: the clock a fleet
    /// key's [`RateWindow`] counts its admissions on. An admission in the
    /// `slack` after a boundary may be Redis's previous window: it counts in
    /// the next one (where a share counted from the safe start then sees
    /// it), never in neither.
    pub fn window_clock(&self, now_ms: u64) -> u64 {
        (now_ms + WINDOW_MS + PHASE_BIAS_MS).saturating_sub(self.phase())
    }

    /// When window `index` starts (caller's clock; it may precede 0).
    fn start(&self, index: u64) -> i128 {
        i128::from(index * WINDOW_MS + self.offset()) - i128::from(2 * WINDOW_MS + PHASE_BIAS_MS)
    }

    fn window(&self, now_ms: u64) -> ShareWindow {
        let index = self.index(now_ms);
        let start = self.start(index);
        let clamp = |t: i128| t.clamp(0, i128::from(u64::MAX)) as u64;
        ShareWindow {
            index,
            end_ms: clamp(start + i128::from(WINDOW_MS - self.slack_ms.min(WINDOW_MS))),
            next_ms: clamp(start + i128::from(WINDOW_MS)),
        }
    }

    /// A worker turned local at `now_ms`. True when the node had Redis until
    /// then: this worker is the first, and logs that Redis is unreachable.
    /// The node admits no share in the window this happened in (rule 1),
    /// nor in the next one when that starts within [`LOSS_SPREAD_MS`].
    pub fn went_local(&mut self, now_ms: u64) -> bool {
        let first = self.local_ms == 0 || self.stale(now_ms);
        if first {
            self.lost_window = self.index(now_ms + LOSS_SPREAD_MS);
        }
        self.local_ms = now_ms.max(1);
        first
    }

    /// A worker is still local at `now_ms` (its timer): the loss stands,
    /// unless another worker already said Redis is back.
    pub fn still_local(&mut self, now_ms: u64) {
        if self.local_ms != 0 {
            self.local_ms = self.local_ms.max(now_ms);
        }
    }

    /// A worker heard Redis answer at `now_ms`; `was_local`: it was local
    /// until then. True when this ends the node's loss — the first local
    /// worker back, or any worker once no local one has stood by the loss
    /// for [`REACH_STALE_MS`] — and this worker logs that Redis is back.
    pub fn answered(&mut self, was_local: bool, now_ms: u64) -> bool {
        if self.local_ms == 0 || !(was_local || self.stale(now_ms)) {
            return false;
        }
        self.local_ms = 0;
        true
    }

    /// What a call of a node that lost Redis asks Redis to hold, should it
    /// answer (rule 3): every window that starts `after_ms` from now or
    /// later (0: the current one too) and before `until_ms` from now, each
    /// start read to the nearest boundary. `None` when Redis back now would
    /// end the loss within the window it began in.
    pub fn hold_request(&self, now_ms: u64) -> Option<(u64, u64)> {
        let last = self.index(now_ms + RETURN_SPREAD_MS);
        if !self.lost() || last <= self.lost_window {
            return None;
        }
        let clamp = |t: i128| (t - i128::from(now_ms)).clamp(0, i128::from(u64::MAX)) as u64;
        // Safe starts are `slack` past Redis's boundaries: asked from the
        // boundary before the first window after the loss to the one after
        // the last.
        let boundary = |i: u64| self.start(i) - i128::from(self.slack_ms);
        Some((
            clamp(boundary(self.lost_window + 1)),
            clamp(boundary(last + 1)),
        ))
    }

    /// Redis said at `now_ms` that its window, `window_left_ms` from its
    /// end, is held (rule 3): no grant until it ends, shares in it.
    pub fn held(&mut self, now_ms: u64, window_left_ms: u64) {
        self.held_window = self.held_window.max(self.index(now_ms));
        self.no_grants_until_ms = self.no_grants_until_ms.max(now_ms + window_left_ms);
    }

    /// Redis answered without the counters it held (rule 4): until
    /// `until_ms`, when the window they were lost in ends, the node takes no
    /// grant and decides on what is left of its share.
    pub fn recount(&mut self, until_ms: u64) {
        self.recount_until_ms = self.recount_until_ms.max(until_ms);
        self.no_grants_until_ms = self.no_grants_until_ms.max(until_ms);
    }

    /// Whether the node counts as having lost Redis.
    pub fn lost(&self) -> bool {
        self.local_ms != 0
    }

    fn stale(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.local_ms) >= REACH_STALE_MS
    }

    /// The window a share may be decided in at `now_ms`, or how long until
    /// one may be: shares are for a window after the node's loss while it is
    /// away (rule 2), or for a held window (rule 3: Redis grants nothing in
    /// it, so every node's shares are all it admits), and never in the strip
    /// before a boundary.
    pub fn shares(&self, now_ms: u64) -> Result<ShareWindow, u64> {
        let w = self.window(now_ms);
        if now_ms >= w.end_ms {
            return Err(w.next_ms - now_ms);
        }
        // A held window is all shares for every node, whenever each lost
        // Redis: nobody is granted anything in it.
        let recounting = now_ms < self.recount_until_ms;
        if (w.index > self.lost_window && self.lost()) || w.index == self.held_window || recounting
        {
            return Ok(w);
        }
        Err(if self.lost() {
            w.next_ms - now_ms
        } else if now_ms < self.no_grants_until_ms {
            self.no_grants_until_ms - now_ms
        } else {
            RETRY_SOON_MS
        })
    }

    /// [`Reach::shares`] for a caller that cannot count what it admitted in
    /// a window before it took shares there (the sidecar's `tpm`: its
    /// reservations are Redis's alone): only windows the node lost Redis
    /// before (rule 2), whole; none while Redis is held or counts anew, which
    /// may begin mid-window.
    pub fn shares_from_the_start(&self, now_ms: u64) -> Result<ShareWindow, u64> {
        let w = self.window(now_ms);
        if now_ms < w.end_ms && self.lost() && w.index > self.lost_window {
            return Ok(w);
        }
        match self.shares(now_ms) {
            Err(wait) => Err(wait),
            Ok(_) => Err(self.no_grants_until_ms.saturating_sub(now_ms).max(1)),
        }
    }

    /// Whether at `now_ms` a node that has Redis still decides on the local
    /// path: the window is held (rule 3), or Redis counts anew (rule 4).
    pub fn keeps_local(&self, now_ms: u64) -> bool {
        now_ms < self.no_grants_until_ms
    }
}

impl Lease {
    /// Decides one request of a key with `limit` on this node's share while
    /// Redis is away (or while the node keeps to the local path): the lease's
    /// tokens first (Redis counted them), then the node's share of the
    /// window when [`Reach::shares`] allows one. `window` is the key's count
    /// on this node on [`Reach::window_clock`], of every admission (leased
    /// or not): a share is what is left of `limit ÷ nodes` after all of them.
    /// Returns the verdict and, for a share, until when (caller's clock)
    /// Redis is owed the admission: past its window it weighs on nothing and
    /// is dropped.
    pub fn take_local(
        &mut self,
        window: &mut RateWindow,
        reach: &Reach,
        limit: u32,
        nodes: u32,
        now_ms: u64,
    ) -> (Verdict, Option<u64>) {
        let t = reach.window_clock(now_ms);
        if let Take::Admit(v) = self.take(limit, now_ms) {
            window.hit(u32::MAX, t);
            return (v, None);
        }
        let refused = |wait_ms: u64| Verdict {
            admitted: false,
            limit,
            remaining: 0,
            reset_after_ms: wait_ms,
        };
        let w = match reach.shares(now_ms) {
            Ok(w) => w,
            Err(wait_ms) => return (refused(wait_ms), None),
        };
        window.roll(t);
        let share = local_share(limit, nodes);
        if window.curr >= share {
            return (refused(w.next_ms - now_ms), None);
        }
        window.hit(u32::MAX, t);
        let v = Verdict {
            admitted: true,
            limit,
            remaining: share - window.curr,
            reset_after_ms: w.next_ms - now_ms,
        };
        (v, Some(w.next_ms))
    }
}

#[cfg(test)]
mod tests {
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
            let room =
                crate::ratelimit::room(self.limit.into(), prev.into(), (*curr).into(), t % W);
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
                let (v, owed) =
                    node.lease
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
}
