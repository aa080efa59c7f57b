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
mod tests;
