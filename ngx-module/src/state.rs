//! Per-request state: what the access phase decided ([`RequestState`],
//! `$afr_status` as [`AfrStatus`]), read back by the header filter and the
//! variables.
//!
//! The state lives in a request-pool cleanup entry as well as in the module
//! context: an internal redirect (`error_page`, `try_files`) clears module
//! contexts, and the access phase then runs again — finding the state in the
//! pool tells it the request was already admitted and counted (the same trick
//! as nginx's realip module).

use std::ffi::c_void;
use std::mem::size_of;
use std::ptr;

use afr_core::fleet::Path;
use afr_core::keys::Denial;
use afr_core::ratelimit::Verdict;
use ngx::ffi::{ngx_http_request_t, ngx_pnalloc, ngx_pool_cleanup_add, ngx_pool_t, ngx_str_t};
use ngx::http::HttpModule;

use crate::AfrModule;

/// What the access phase decided, as `$afr_status` says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AfrStatus {
    /// Passed: a known, enabled, unexpired key under its limit.
    Admitted,
    /// No key, a malformed one, or one not in the keys file (401).
    Unknown,
    /// `enabled = false` (403).
    Disabled,
    /// Past its `expires` (403).
    Expired,
    /// Over its rate limit (429).
    Limited,
    /// `max_concurrent` requests already in flight (429).
    Busy,
}

impl AfrStatus {
    /// The status for a refused key.
    pub(crate) fn of_denial(d: Denial) -> Self {
        match d {
            Denial::Missing | Denial::Malformed | Denial::Unknown => AfrStatus::Unknown,
            Denial::Disabled => AfrStatus::Disabled,
            Denial::Expired => AfrStatus::Expired,
        }
    }

    /// Whether the request was counted, so it has `X-RateLimit-*` values.
    pub(crate) fn counted(self) -> bool {
        matches!(
            self,
            AfrStatus::Admitted | AfrStatus::Limited | AfrStatus::Busy
        )
    }

    /// The value of `$afr_status`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            AfrStatus::Admitted => "admitted",
            AfrStatus::Unknown => "unknown",
            AfrStatus::Disabled => "disabled",
            AfrStatus::Expired => "expired",
            AfrStatus::Limited => "limited",
            AfrStatus::Busy => "concurrency",
        }
    }
}

/// What the access phase decided for a request.
#[derive(Clone, Copy)]
pub(crate) struct RequestState {
    /// The request passed the access phase.
    pub(crate) admitted: bool,
    /// Values of the `X-RateLimit-*` headers (when `status` was counted).
    pub(crate) rate: Verdict,
    /// `$afr_status`.
    pub(crate) status: AfrStatus,
    /// `$afr_key_id` (empty when no key was recognised), in the request pool.
    pub(crate) key_id: ngx_str_t,
    /// `$afr_key_name`, in the request pool.
    pub(crate) key_name: ngx_str_t,
    /// Wall clock (Unix ms) of the decision, which `X-RateLimit-Reset` counts from.
    pub(crate) unix_ms: u64,
    /// `$afr_fleet`: how the fleet decided the request (none without `afr_fleet`).
    pub(crate) fleet: Option<Path>,
}

/// Marks our cleanup entry; nothing to free when the pool is destroyed. The
/// body is distinct so the linker cannot fold it with another no-op function.
#[inline(never)]
unsafe extern "C" fn state_marker(data: *mut c_void) {
    std::hint::black_box((data, 0x4146_525f_5354_4154_u64));
}

fn is_marker(handler: Option<unsafe extern "C" fn(*mut c_void)>) -> bool {
    let marker: unsafe extern "C" fn(*mut c_void) = state_marker;
    handler.is_some_and(|h| std::ptr::eq(h as *const (), marker as *const ()))
}

/// Records `state` for the request (and its internal redirects).
///
/// # Safety
/// `r` must be a valid main request.
pub(crate) unsafe fn set_state(r: *mut ngx_http_request_t, state: RequestState) -> Result<(), ()> {
    // SAFETY: `r` is valid; the cleanup's data block is sized for the state.
    unsafe {
        let cln = ngx_pool_cleanup_add((*r).pool, size_of::<RequestState>());
        if cln.is_null() {
            return Err(());
        }
        (*cln).handler = Some(state_marker);
        let data = (*cln).data.cast::<RequestState>();
        data.write(state);
        *(*r).ctx.add(AfrModule::module().ctx_index) = data.cast();
    }
    Ok(())
}

/// The state recorded for this request's main request, if any.
///
/// # Safety
/// `r` must be a valid request.
pub(crate) unsafe fn get_state(r: *mut ngx_http_request_t) -> Option<RequestState> {
    // SAFETY: `r`, its main request and their pools are valid; our cleanup
    // entries hold a `RequestState`.
    unsafe {
        let main = (*r).main;
        let ctx = *(*main).ctx.add(AfrModule::module().ctx_index);
        if !ctx.is_null() {
            return Some(*ctx.cast::<RequestState>());
        }
        let mut cln = (*(*main).pool).cleanup;
        while !cln.is_null() {
            if is_marker((*cln).handler) {
                return Some(*(*cln).data.cast::<RequestState>());
            }
            cln = (*cln).next;
        }
        None
    }
}

/// Copies bytes into `pool` as an `ngx_str_t`.
///
/// # Safety
/// `pool` must be valid.
pub(crate) unsafe fn copy_str(pool: *mut ngx_pool_t, bytes: &[u8]) -> Result<ngx_str_t, ()> {
    // SAFETY: ngx_pnalloc returns `len` writable bytes or null.
    unsafe {
        let data = ngx_pnalloc(pool, bytes.len().max(1)).cast::<u8>();
        if data.is_null() {
            return Err(());
        }
        ptr::copy_nonoverlapping(bytes.as_ptr(), data, bytes.len());
        Ok(ngx_str_t {
            len: bytes.len(),
            data,
        })
    }
}
