//! The sidecar's clocks (design §3): the wall clock, for the budget period a
//! request is charged to and for what is wall-clock by nature (usage rows'
//! times, reset headers), and a monotonic clock for token windows, so that
//! a wall-clock step (an NTP step, a VM resume) neither renews a key's `tpm`
//! window nor stalls it — the module's `rpm` windows run on nginx's
//! monotonic `ngx_current_msec` for the same reason.
//!
//! The monotonic clock reads the Unix time at start plus the time elapsed
//! since (`Instant`), so at start it agrees with the wall clock and the
//! token windows seeded from usage rows line up with it; later it keeps
//! running evenly whatever the wall clock does.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use afr_core::ledger::Now;

/// The two clocks, read together.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    origin: Instant,
    origin_unix_ms: u64,
}

impl Clock {
    /// Clocks that agree now.
    pub fn start() -> Clock {
        Clock {
            origin: Instant::now(),
            origin_unix_ms: unix_ms(),
        }
    }

    /// The monotonic clock, in ms.
    pub fn mono_ms(&self) -> u64 {
        self.origin_unix_ms + self.origin.elapsed().as_millis() as u64
    }

    /// Now, for a request that started at `started_unix_ms` (its usage row's time).
    pub fn now_for(&self, started_unix_ms: u64) -> Now {
        Now {
            mono_ms: self.mono_ms(),
            unix_ms: started_unix_ms,
        }
    }
}

/// The wall clock, Unix ms.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
