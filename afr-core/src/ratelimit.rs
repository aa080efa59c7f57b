//! Per-key rate limiting: a sliding-window counter in integer arithmetic.
//!
//! Windows are 60 s long and aligned to Unix time, so every key's
//! `X-RateLimit-Reset` is the end of the current minute. A request is admitted
//! while `prev · (W − elapsed)/W + curr + 1 ≤ limit`: the previous window still
//! weighs on the current one in proportion to how much of it a trailing 60 s
//! span would still cover. A burst at the end of one window therefore blocks a
//! burst at the start of the next (no boundary doubling), in O(1) state per key
//! (the [`RateWindow`] lives in nginx shared memory, so it is `repr(C)` and `Copy`).
//!
//! All arithmetic is scaled by the window length in milliseconds and done in
//! `u64`, so there is no floating point and no rounding drift between workers.

/// Length of a rate-limit window in milliseconds.
pub const WINDOW_MS: u64 = 60_000;

/// Counter state of one key: the start of the current window and the number of
/// requests admitted in it and in the window before.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateWindow {
    /// Start of the current window, Unix milliseconds, a multiple of [`WINDOW_MS`].
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
    /// Unix seconds at which the current window ends (`X-RateLimit-Reset`).
    pub reset_unix: u64,
    /// Milliseconds until a request would be admitted; 0 when admitted.
    pub retry_after_ms: u64,
}

impl Verdict {
    /// `Retry-After` in whole seconds (at least 1 for a denial, so clients back off).
    pub fn retry_after_secs(&self) -> u64 {
        if self.admitted {
            0
        } else {
            self.retry_after_ms.div_ceil(1000).max(1)
        }
    }
}

impl RateWindow {
    /// Moves the window forward to the one containing `now_ms`.
    ///
    /// A clock that went backwards (another worker's cached time can lag by a
    /// few milliseconds) is clamped to the window start rather than rewinding it.
    pub fn roll(&mut self, now_ms: u64) {
        if now_ms < self.start_ms {
            return;
        }
        let current = now_ms - now_ms % WINDOW_MS;
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

    /// Load of the sliding window at `now_ms`, in request·ms units
    /// (divide by [`WINDOW_MS`] for requests).
    fn load(&self, now_ms: u64) -> u64 {
        u64::from(self.prev) * (WINDOW_MS - self.elapsed(now_ms)) + u64::from(self.curr) * WINDOW_MS
    }

    /// Counts one request at `now_ms` against `limit` requests per window and
    /// says whether it is admitted. A denied request is not counted.
    pub fn hit(&mut self, limit: u32, now_ms: u64) -> Verdict {
        self.roll(now_ms);
        let cap = u64::from(limit) * WINDOW_MS;
        let admitted = self.load(now_ms) + WINDOW_MS <= cap;
        if admitted {
            self.curr = self.curr.saturating_add(1);
        }
        let remaining = (cap.saturating_sub(self.load(now_ms)) / WINDOW_MS) as u32;
        Verdict {
            admitted,
            limit,
            remaining: remaining.min(limit),
            reset_unix: (self.start_ms + WINDOW_MS) / 1000,
            retry_after_ms: if admitted {
                0
            } else {
                self.wait_ms(limit, now_ms)
            },
        }
    }

    /// Milliseconds from `now_ms` until one more request fits, if no other
    /// request arrives meanwhile.
    fn wait_ms(&self, limit: u32, now_ms: u64) -> u64 {
        let w = WINDOW_MS;
        let limit = u64::from(limit);
        if limit == 0 {
            return w;
        }
        let now = now_ms.max(self.start_ms);
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

    #[test]
    fn admits_limit_then_denies_with_headers() {
        let mut w = RateWindow::default();
        for i in 0..5 {
            let v = w.hit(5, T0 + 1000);
            assert!(v.admitted);
            assert_eq!(v.remaining, 4 - i);
            assert_eq!(v.reset_unix, (T0 + WINDOW_MS) / 1000);
        }
        let v = w.hit(5, T0 + 1000);
        assert!(!v.admitted);
        assert_eq!(v.remaining, 0);
        assert_eq!(v.retry_after_ms, WINDOW_MS - 1000 + WINDOW_MS / 5);
        assert_eq!(v.retry_after_secs(), 71);
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
    fn clock_going_backwards_is_clamped() {
        let mut w = RateWindow::default();
        assert!(w.hit(1, T0 + 5000).admitted);
        assert!(!w.hit(1, T0 - 5000).admitted);
        assert_eq!(w.start_ms, T0);
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
                prop_assert!(v.reset_unix * 1000 > t && v.reset_unix * 1000 <= t + WINDOW_MS);
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
                prop_assert!(later.hit(limit, t + v.retry_after_ms).admitted);
                let mut sooner = w;
                prop_assert!(!sooner.hit(limit, t + v.retry_after_ms - 1).admitted);
            }
        }
    }
}
