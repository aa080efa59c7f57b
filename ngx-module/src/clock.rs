//! nginx's cached clocks, as the worker's event loop sees them: the time of
//! an access decision ([`now`]) and the monotonic clock of fleet refills
//! ([`mono_ms`]).

use std::ptr::{self, addr_of};

use ngx::ffi::{ngx_cached_time, ngx_current_msec};

/// The time of a decision, from nginx's cached clocks.
#[derive(Clone, Copy)]
pub(crate) struct Now {
    /// `ngx_current_msec`: monotonic, shared by every process of one boot
    /// (CLOCK_MONOTONIC), so windows never start in the future after a wall
    /// clock step — the clock `limit_req` uses.
    pub(crate) mono_ms: u64,
    /// Wall clock, Unix ms: for `X-RateLimit-Reset` and key expiry only.
    pub(crate) unix_ms: u64,
}

/// `ngx_current_msec`, for code outside a request's decision (fleet refills).
pub(crate) fn mono_ms() -> u64 {
    now().mono_ms
}

pub(crate) fn now() -> Now {
    // SAFETY: ngx_cached_time always points at a valid slot and
    // ngx_current_msec is a plain integer; both are updated by the worker's
    // own thread between events.
    unsafe {
        let t = ptr::read_volatile(ngx_cached_time);
        Now {
            mono_ms: ptr::read_volatile(addr_of!(ngx_current_msec)) as u64,
            unix_ms: t.sec as u64 * 1000 + t.msec as u64,
        }
    }
}
