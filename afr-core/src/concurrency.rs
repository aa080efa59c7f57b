//! Requests in flight per key (`max_concurrent`), decided like nginx's
//! `limit_conn`: a counter per key taken when a request is admitted and given
//! back when the request ends, however it ends.
//!
//! The counter lives in the module's shared-memory slot of the key (so it is
//! `repr(C)` and `Copy`), next to its [`crate::ratelimit::RateWindow`]; the
//! module takes the zone's mutex around every call, which makes one host's
//! workers one decision point. The release is a request-pool cleanup, so it
//! runs on every ending nginx knows of (normal finalisation, client abort,
//! upstream error, a stream torn down) — but not when a worker is killed
//! (`SIGKILL`, a crash): like `limit_conn`, that worker's slots stay taken
//! until the counter is reset (see README, "Concurrency").

/// In-flight counter of one key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InFlight {
    /// Requests of the key admitted and not yet ended.
    pub count: u32,
}

impl InFlight {
    /// Takes one place under `limit` requests in flight; `false` (and nothing
    /// taken) when all `limit` are in use. A limit lowered by a keys reload
    /// below the current count refuses until enough requests have ended.
    pub fn try_acquire(&mut self, limit: u32) -> bool {
        if self.count >= limit {
            return false;
        }
        self.count += 1;
        true
    }

    /// Gives one place back. Saturating: a slot that was evicted and reused
    /// for the same key while a request ran must not wrap around.
    pub fn release(&mut self) {
        self.count = self.count.saturating_sub(1);
    }

    /// True when no request of the key is in flight, so its slot may be reused.
    pub fn is_idle(&self) -> bool {
        self.count == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn admits_up_to_the_limit_and_frees_on_release() {
        let mut f = InFlight::default();
        assert!(f.try_acquire(2));
        assert!(f.try_acquire(2));
        assert!(!f.try_acquire(2));
        assert_eq!(f.count, 2);
        f.release();
        assert!(f.try_acquire(2));
        assert!(!f.is_idle());
    }

    #[test]
    fn a_lowered_limit_waits_for_enough_releases() {
        let mut f = InFlight { count: 5 };
        assert!(!f.try_acquire(3));
        f.release();
        f.release();
        assert!(!f.try_acquire(3));
        f.release();
        assert!(f.try_acquire(3));
    }

    #[test]
    fn release_never_wraps() {
        let mut f = InFlight::default();
        f.release();
        assert_eq!(f.count, 0);
        assert!(f.is_idle());
    }

    proptest! {
        /// Any interleaving of acquires and releases (each release giving
        /// back one place that was taken) never holds more than the limit.
        #[test]
        fn never_more_than_the_limit(limit in 1u32..8, ops in proptest::collection::vec(any::<bool>(), 0..200)) {
            let mut f = InFlight::default();
            let mut held = 0u32;
            for acquire in ops {
                if acquire {
                    if f.try_acquire(limit) {
                        held += 1;
                    }
                } else if held > 0 {
                    f.release();
                    held -= 1;
                }
                prop_assert!(f.count <= limit);
                prop_assert_eq!(f.count, held);
            }
        }
    }
}
