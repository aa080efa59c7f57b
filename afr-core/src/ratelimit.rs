//! Per-key rate limiting: a sliding-window counter in integer arithmetic.
//!
//! Windows are 60 s long and aligned to multiples of [`WINDOW_MS`] on the
//! caller's clock — nginx's monotonic `ngx_current_msec`, as `limit_req` uses,
//! so an NTP step or a VM resume moving the wall clock cannot strand a key in
//! a window that starts in the future. A request is admitted while
//! `prev · (W − elapsed)/W + curr + 1 ≤ limit`: the previous window still
//! weighs on the current one in proportion to how much of it a trailing 60 s
//! span would still cover. A burst at the end of one window therefore blocks a
//! burst at the start of the next (no boundary doubling), in O(1) state per key
//! (the [`RateWindow`] lives in nginx shared memory, so it is `repr(C)` and `Copy`).
//!
//! A [`Verdict`] says when things change as a delay from the decision, so the
//! caller turns it into the Unix timestamp of `X-RateLimit-Reset` with its own
//! wall clock ([`Verdict::reset_unix`]) and `Retry-After` is exactly
//! `Reset − now`, rounded up.
//!
//! All arithmetic is scaled by the window length in milliseconds and done in
//! `u64`, so there is no floating point and no rounding drift between workers.

/// Length of a rate-limit window in milliseconds.
pub const WINDOW_MS: u64 = 60_000;

/// How far behind a window's start a clock may read and still be taken as
/// that start: workers' cached clocks lag each other by a few milliseconds.
/// A larger step back re-anchors the window at the clock's current window,
/// keeping its counts, so no step can make a key wait longer than two windows.
pub const STEP_BACK_TOLERANCE_MS: u64 = 1_000;

/// The sliding-window rule, the one place it is written in Rust: how many
/// more units (requests, tokens) fit under `limit` per window when `prev`
/// were counted in the previous window and `curr` in the current one,
/// `elapsed_ms` into it (clamped to the window). That is
/// `⌊(limit·W − prev·(W − elapsed) − curr·W) / W⌋`: the previous window
/// weighs in proportion to how much of it a trailing window still covers.
/// Negative when more was counted than the limit (admissions made on a local
/// share and counted later): then not even zero units fit.
///
/// Its Lua twin, [`sliding_window_lua!`](crate::sliding_window_lua), is what
/// the fleet's Redis scripts use; both are run against one table of vectors
/// (`afr-core/vectors/sliding-window.json`).
pub fn room(limit: u64, prev: u64, curr: u64, elapsed_ms: u64) -> i128 {
    let e = elapsed_ms.min(WINDOW_MS - 1);
    // Every request of nginx's access phase comes here: in 64 bits when the
    // terms fit (any limit below ~10^14), 128 only for absurd token limits.
    let terms = (
        limit.checked_mul(WINDOW_MS),
        prev.checked_mul(WINDOW_MS - e),
        curr.checked_mul(WINDOW_MS),
    );
    if let (Some(cap), Some(p), Some(c)) = terms {
        if let (Ok(cap), Ok(used)) = (i64::try_from(cap), i64::try_from(p.saturating_add(c))) {
            return i128::from((cap - used).div_euclid(WINDOW_MS as i64));
        }
    }
    let w = i128::from(WINDOW_MS);
    let x = i128::from(limit) * w - i128::from(prev) * (w - i128::from(e)) - i128::from(curr) * w;
    x.div_euclid(w)
}

/// The Lua text of [`room`], a literal for `concat!` in front of a Redis
/// script: defines `afr_room(limit, w, prev, curr, e)`. Lua's numbers are
/// doubles, exact below 2^53 (a limit of 10^9 tokens × 60 000 ms is 6·10^13).
#[macro_export]
macro_rules! sliding_window_lua {
    () => {
        r"
local function afr_room(limit, w, prev, curr, e)
  if e > w - 1 then e = w - 1 end
  return math.floor((limit * w - prev * (w - e) - curr * w) / w)
end
"
    };
}

/// Counter state of one key: the start of the current window and the number of
/// requests admitted in it and in the window before.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateWindow {
    /// Start of the current window on the caller's clock (ms), a multiple of [`WINDOW_MS`].
    pub start_ms: u64,
    /// Requests admitted in the previous window.
    pub prev: u32,
    /// Requests admitted in the current window.
    pub curr: u32,
}

/// The outcome of one request against a key's window, with everything the
/// `X-RateLimit-*` and `Retry-After` headers need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Whether the request may pass.
    pub admitted: bool,
    /// The key's limit per window (`X-RateLimit-Limit`).
    pub limit: u32,
    /// Requests that would still be admitted right now (`X-RateLimit-Remaining`).
    pub remaining: u32,
    /// Milliseconds from the decision to `X-RateLimit-Reset`: for a denial,
    /// until one more request is admitted; for an admission, until the full
    /// limit is available again (if no other request arrives meanwhile).
    pub reset_after_ms: u64,
}

impl Verdict {
    /// `X-RateLimit-Reset`: Unix seconds, rounded up, when
    /// [`reset_after_ms`](Self::reset_after_ms) will have passed, for a
    /// decision taken at `now_unix_ms` on the wall clock.
    pub fn reset_unix(&self, now_unix_ms: u64) -> u64 {
        (now_unix_ms + self.reset_after_ms).div_ceil(1000)
    }

    /// `Retry-After` in whole seconds: `Reset − now` rounded up, so a client
    /// that waits exactly that long, or comes back at `Reset`, is admitted.
    /// 0 for an admission.
    pub fn retry_after_secs(&self, now_unix_ms: u64) -> u64 {
        if self.admitted {
            0
        } else {
            (self.reset_unix(now_unix_ms) * 1000 - now_unix_ms).div_ceil(1000)
        }
    }
}

impl RateWindow {
    /// Moves the window forward to the one containing `now_ms`.
    ///
    /// A clock slightly behind the window start (another worker's cached time
    /// lags by a few milliseconds) leaves the window alone; one further behind
    /// than [`STEP_BACK_TOLERANCE_MS`] re-anchors it at `now_ms`'s window.
    pub fn roll(&mut self, now_ms: u64) {
        let current = now_ms - now_ms % WINDOW_MS;
        if now_ms < self.start_ms {
            if self.start_ms - now_ms > STEP_BACK_TOLERANCE_MS {
                self.start_ms = current;
            }
            return;
        }
        if current == self.start_ms {
            return;
        }
        if current == self.start_ms + WINDOW_MS {
            self.prev = self.curr;
        } else {
            self.prev = 0;
        }
        self.curr = 0;
        self.start_ms = current;
    }

    /// True when nothing counted here can influence a decision at `now_ms`:
    /// both windows are over, so the entry may be dropped.
    pub fn is_stale(&self, now_ms: u64) -> bool {
        now_ms >= self.start_ms + 2 * WINDOW_MS
    }

    fn elapsed(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.start_ms).min(WINDOW_MS - 1)
    }

    /// Requests that still fit at `now_ms` ([`room`], never below 0).
    fn room(&self, limit: u32, now_ms: u64) -> u32 {
        let r = room(
            limit.into(),
            self.prev.into(),
            self.curr.into(),
            self.elapsed(now_ms),
        );
        r.clamp(0, i128::from(limit)) as u32
    }

    /// Counts one request at `now_ms` against `limit` requests per window and
    /// says whether it is admitted. A denied request is not counted.
    pub fn hit(&mut self, limit: u32, now_ms: u64) -> Verdict {
        self.roll(now_ms);
        // Within the tolerance a lagging clock is taken as the window start;
        // the lag is added back to every delay, so they stay exact.
        let t = now_ms.max(self.start_ms);
        let lag = t - now_ms;
        let admitted = self.room(limit, t) >= 1;
        if admitted {
            self.curr = self.curr.saturating_add(1);
        }
        Verdict {
            admitted,
            limit,
            remaining: self.room(limit, t),
            reset_after_ms: lag
                + if admitted {
                    self.full_ms(t)
                } else {
                    self.wait_ms(limit, t)
                },
        }
    }

    /// What the window says at `now_ms` without counting a request: for the
    /// `X-RateLimit-*` headers of a request refused by another limit
    /// (`max_concurrent`), which must not use up the key's requests. The
    /// verdict is not `admitted`; `reset_after_ms` is when the full limit is back.
    pub fn peek(&self, limit: u32, now_ms: u64) -> Verdict {
        let mut w = *self;
        w.roll(now_ms);
        let t = now_ms.max(w.start_ms);
        Verdict {
            admitted: false,
            limit,
            remaining: w.room(limit, t),
            reset_after_ms: (t - now_ms) + w.full_ms(t),
        }
    }

    /// Milliseconds from `t` (not before the window start) until nothing
    /// counted weighs any more, i.e. the full limit is available again.
    fn full_ms(&self, t: u64) -> u64 {
        let end = self.start_ms + WINDOW_MS;
        if self.curr > 0 {
            end + WINDOW_MS - t
        } else if self.prev > 0 {
            end - t
        } else {
            0
        }
    }

    /// Milliseconds from `now` (not before the window start) until one more
    /// request fits, if no other request arrives meanwhile.
    fn wait_ms(&self, limit: u32, now: u64) -> u64 {
        let w = WINDOW_MS;
        let limit = u64::from(limit);
        if limit == 0 {
            return w;
        }
        let e = self.elapsed(now);
        let (prev, curr) = (u64::from(self.prev), u64::from(self.curr));
        // Later in this window: prev·(w − e − dt) + (curr + 1)·w ≤ limit·w.
        if curr < limit && prev > 0 {
            let room = (limit - curr - 1) * w; // what the decaying prev must fall to
            let need = (prev * (w - e)).saturating_sub(room); // load to shed, in prev·ms
            let dt = need.div_ceil(prev);
            if e + dt < w {
                return dt;
            }
        }
        // In the next window, x ms in: curr·(w − x) + w ≤ limit·w.
        let to_next = self.start_ms + w - now;
        let x = if curr == 0 {
            0
        } else {
            (curr * w).saturating_sub((limit - 1) * w).div_ceil(curr)
        };
        to_next + x
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T0: u64 = 1_800_000_000_000; // a window boundary (multiple of 60 000)

    /// Terms too large for 64 bits take the 128-bit path and agree with it.
    #[test]
    fn room_is_exact_past_64_bits() {
        let huge = 1u64 << 60;
        assert_eq!(room(huge, 0, 0, 0), i128::from(huge));
        assert_eq!(room(huge, huge, 1, 30_000), i128::from(huge) / 2 - 1);
        assert_eq!(room(30, 1, 30, 30_000), -1);
    }

    #[test]
    fn admits_limit_then_denies_with_headers() {
        let mut w = RateWindow::default();
        for i in 0..5 {
            let v = w.hit(5, T0 + 1000);
            assert!(v.admitted);
            assert_eq!(v.remaining, 4 - i);
            // The full limit is back once this window's requests stop weighing:
            // at the end of the next window.
            assert_eq!(v.reset_after_ms, 2 * WINDOW_MS - 1000);
        }
        let v = w.hit(5, T0 + 1000);
        assert!(!v.admitted);
        assert_eq!(v.remaining, 0);
        assert_eq!(v.reset_after_ms, WINDOW_MS - 1000 + WINDOW_MS / 5);
        // Unix clock at .300 s: Reset rounds up, Retry-After is Reset − now rounded up.
        let unix = 1_700_000_000_300;
        assert_eq!(v.reset_unix(unix), 1_700_000_072);
        assert_eq!(v.retry_after_secs(unix), 72);
    }

    #[test]
    fn burst_at_boundary_is_not_doubled() {
        let mut w = RateWindow::default();
        let admitted_before = (0..100).filter(|_| w.hit(50, T0 - 10).admitted).count();
        let admitted_after = (0..100).filter(|_| w.hit(50, T0 + 10).admitted).count();
        assert_eq!(admitted_before, 50);
        assert_eq!(admitted_after, 0);
    }

    #[test]
    fn clock_lagging_a_little_is_clamped_and_delays_stay_exact() {
        let mut w = RateWindow::default();
        assert!(w.hit(1, T0 + 5000).admitted);
        let mut w2 = RateWindow::default();
        assert!(w2.hit(1, T0 + 100).admitted);
        let v = w2.hit(1, T0 - 500);
        assert!(!v.admitted);
        assert_eq!(w2.start_ms, T0);
        assert!(w2.hit(1, T0 - 500 + v.reset_after_ms).admitted);
    }

    /// The measured failure: a one-hour step back left a key at its limit
    /// refused for an hour while Retry-After said a minute.
    #[test]
    fn an_hour_step_back_waits_at_most_two_windows() {
        let mut w = RateWindow::default();
        assert!(w.hit(1, T0 + 5000).admitted);
        let back = T0 + 5000 - 3_600_000;
        let v = w.hit(1, back);
        assert!(!v.admitted);
        assert!(v.reset_after_ms <= 2 * WINDOW_MS, "{v:?}");
        assert!(w.hit(1, back + v.reset_after_ms).admitted);
    }

    #[test]
    fn peek_counts_nothing() {
        let mut w = RateWindow::default();
        w.hit(5, T0 + 1000);
        w.hit(5, T0 + 1000);
        let before = w;
        let v = w.peek(5, T0 + 2000);
        assert_eq!(w, before);
        assert_eq!((v.admitted, v.limit, v.remaining), (false, 5, 3));
        assert_eq!(v.reset_after_ms, 2 * WINDOW_MS - 2000);
        assert_eq!(RateWindow::default().peek(5, T0).remaining, 5);
    }

    #[test]
    fn stale_after_two_windows() {
        let mut w = RateWindow::default();
        w.hit(1, T0);
        assert!(!w.is_stale(T0 + 2 * WINDOW_MS - 1));
        assert!(w.is_stale(T0 + 2 * WINDOW_MS));
    }

    /// Request times: sorted offsets from T0 over ~3 windows.
    fn times() -> impl Strategy<Value = Vec<u64>> {
        prop::collection::vec(0u64..3 * WINDOW_MS, 0..400).prop_map(|mut v| {
            v.sort_unstable();
            v.into_iter().map(|t| T0 + t).collect()
        })
    }

    fn run(limit: u32, times: &[u64]) -> Vec<u64> {
        let mut w = RateWindow::default();
        times
            .iter()
            .copied()
            .filter(|&t| w.hit(limit, t).admitted)
            .collect()
    }

    proptest! {
        #[test]
        fn never_more_than_limit_in_a_fixed_window(limit in 1u32..80, ts in times()) {
            let admitted = run(limit, &ts);
            for k in 0..4 {
                let start = T0 + k * WINDOW_MS;
                let n = admitted.iter().filter(|&&t| t >= start && t < start + WINDOW_MS).count();
                prop_assert!(n <= limit as usize);
            }
        }

        /// Any 60 s span reaching `b` ms into a window admits at most
        /// `limit · (1 + b/W)`: a burst just before and just after a boundary
        /// gets about one limit, never two.
        #[test]
        fn no_boundary_doubling(limit in 1u32..80, ts in times(), b in 0u64..WINDOW_MS) {
            let admitted = run(limit, &ts);
            for k in 1..3 {
                let boundary = T0 + k * WINDOW_MS;
                let (from, to) = (boundary + b - WINDOW_MS, boundary + b);
                let n = admitted.iter().filter(|&&t| t >= from && t < to).count() as u64;
                let bound = u64::from(limit) + u64::from(limit) * b / WINDOW_MS;
                prop_assert!(n <= bound, "{} admitted in [{}, {}), bound {}", n, from, to, bound);
            }
        }

        #[test]
        fn remaining_is_exactly_what_still_fits(limit in 1u32..80, ts in times()) {
            let mut w = RateWindow::default();
            for t in ts {
                let v = w.hit(limit, t);
                let mut probe = w;
                let fits = (0..=limit).take_while(|_| probe.hit(limit, t).admitted).count();
                prop_assert_eq!(v.remaining as usize, fits);
            }
        }

        /// On a 2xx, Reset is when the full limit is available again: at
        /// `reset_after_ms` a whole limit fits, a millisecond earlier it does not.
        #[test]
        fn admitted_reset_is_when_the_full_limit_is_back(limit in 1u32..80, ts in times()) {
            let mut w = RateWindow::default();
            for t in ts {
                let v = w.hit(limit, t);
                if !v.admitted {
                    continue;
                }
                let fits = |at: u64| {
                    let mut probe = w;
                    (0..limit).take_while(|_| probe.hit(limit, at).admitted).count()
                };
                prop_assert_eq!(fits(t + v.reset_after_ms), limit as usize);
                prop_assert!(fits(t + v.reset_after_ms - 1) < limit as usize);
                prop_assert!(v.reset_after_ms <= 2 * WINDOW_MS);
            }
        }

        #[test]
        fn retry_after_is_tight(limit in 1u32..80, ts in times(), extra in 0u32..200) {
            let mut w = RateWindow::default();
            for t in &ts {
                w.hit(limit, *t);
            }
            let t = ts.last().copied().unwrap_or(T0);
            let mut v = w.hit(limit, t);
            for _ in 0..extra {
                if !v.admitted { break; }
                v = w.hit(limit, t);
            }
            if !v.admitted {
                let mut later = w;
                prop_assert!(later.hit(limit, t + v.reset_after_ms).admitted);
                let mut sooner = w;
                prop_assert!(!sooner.hit(limit, t + v.reset_after_ms - 1).admitted);
            }
        }

        /// Through the headers, with any offset between the monotonic clock
        /// and the Unix clock: `Retry-After` is `Reset − now` rounded up, and a
        /// request sent at `Reset` (or `Retry-After` seconds later) is admitted.
        #[test]
        fn a_request_at_reset_is_admitted(
            limit in 1u32..20,
            ts in times(),
            unix_offset in 0u64..1_000_000_000,
        ) {
            let mut w = RateWindow::default();
            for t in ts {
                let v = w.hit(limit, t);
                if v.admitted {
                    continue;
                }
                let unix_now = t + unix_offset;
                let reset = v.reset_unix(unix_now);
                let retry = v.retry_after_secs(unix_now);
                prop_assert_eq!(retry, (reset * 1000 - unix_now).div_ceil(1000));
                prop_assert!(retry >= 1);
                let mut at_reset = w;
                prop_assert!(at_reset.hit(limit, t + (reset * 1000 - unix_now)).admitted);
                let mut after_retry = w;
                prop_assert!(after_retry.hit(limit, t + retry * 1000).admitted);
            }
        }

        /// Clock jumps (an NTP step, a VM resume): whatever the jumps, a
        /// refused request is told a delay of at most two windows, and a
        /// request sent after that delay on the same clock is admitted.
        #[test]
        fn clock_jumps_never_strand_a_key(
            limit in 1u32..20,
            steps in prop::collection::vec((0u64..5_000, 0u64..4, 0u64..7_200_000), 1..300),
        ) {
            let mut w = RateWindow::default();
            let mut t = T0 + 3_600_000 * 10;
            for (dt, kind, jump) in steps {
                t += dt;
                match kind {
                    0 => t -= jump.min(t - T0),     // a step back
                    1 => t += jump,                  // a step forward
                    _ => {}
                }
                let v = w.hit(limit, t);
                prop_assert!(v.reset_after_ms <= 2 * WINDOW_MS + STEP_BACK_TOLERANCE_MS, "{:?}", v);
                if !v.admitted {
                    let mut later = w;
                    prop_assert!(later.hit(limit, t + v.reset_after_ms).admitted, "{:?} at {}", w, t);
                }
            }
        }
    }
}
