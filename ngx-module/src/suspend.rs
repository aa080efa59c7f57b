//! Requests suspended in the access phase while their key's fleet lease is
//! refilled (`fleet`), and how each is resumed exactly once (issue 22).
//!
//! nginx's own waits are the model — `limit_req`'s delay and the thread-pool
//! reads (`ngx_http_writer`, `r->blocked`):
//!
//! - the request is `blocked` (nginx will not free it) and its handlers are
//!   replaced for the wait: `ngx_http_test_reading` reads, so a client that
//!   leaves is seen at once (the request is finalized as 499 when it is
//!   resumed, never forwarded); [`on_write`] writes, so a write event the
//!   connection sees meanwhile (armed by a previous proxied request on a
//!   keep-alive connection, fired by body bytes) never re-runs the access
//!   phase;
//! - every suspension has a deadline, a timer on the connection's write event
//!   as `limit_req` sets one (`delayed`), so no request waits longer than the
//!   fleet's `timeout` however many refills are queued; at the deadline it is
//!   decided on the key's local share. The timer also keeps a worker that is
//!   told to quit (a reload) alive until its suspended requests are answered;
//! - a request is resumed once — by its key's refill landing, by the worker
//!   turning local, or by its deadline, whichever comes first — and the
//!   access phase then finds what to do in [`take`].
//!
//! State is per worker (one event-loop thread): a thread-local map from the
//! request to its wait, which only holds requests that are blocked, so an
//! address cannot be reused while it is in the map.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;

use ngx::ffi::{
    ngx_add_timer, ngx_del_timer, ngx_handle_write_event, ngx_http_block_reading,
    ngx_http_cleanup_add, ngx_http_cleanup_t, ngx_http_core_run_phases, ngx_http_finalize_request,
    ngx_http_request_t, ngx_http_run_posted_requests, ngx_http_test_reading,
    NGX_HTTP_CLIENT_CLOSED_REQUEST, NGX_HTTP_INTERNAL_SERVER_ERROR, NGX_OK,
};

use crate::zone::KeyDigest;

/// How a suspended request is decided once resumed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resumed {
    /// Its key's refill landed: decide again from the lease, and suspend
    /// again, if need be, only until the deadline set at the first suspension.
    Refilled {
        /// When it was first suspended (mono ms).
        since_ms: u64,
    },
    /// Its deadline passed, or the worker turned local: the key's local share.
    Local,
}

/// A request's state, as the access phase finds it.
pub enum Found {
    /// Not suspended: decide normally.
    Fresh,
    /// Still waiting (the phase was re-run by something else): keep waiting.
    Waiting,
    /// Resumed: decide as it says.
    Resumed(Resumed),
}

#[derive(Clone, Copy)]
enum Wait {
    Waiting {
        digest: KeyDigest,
        since_ms: u64,
        /// The request cleanup that ends the wait if nginx finishes the
        /// request first (client gone, stream reset): disarmed on resume.
        cleanup: *mut ngx_http_cleanup_t,
    },
    Resumed(Resumed),
}

#[derive(Default)]
struct Waits {
    /// Every suspended (or resumed and not yet decided) request.
    by_request: HashMap<usize, Wait>,
    /// The requests waiting for each key's refill.
    by_key: HashMap<KeyDigest, Vec<*mut ngx_http_request_t>>,
}

thread_local! {
    static WAITS: RefCell<Waits> = RefCell::new(Waits::default());
}

/// What the access phase should do with `r` (a resumed request's entry is
/// taken: it is decided now).
pub fn take(r: *mut ngx_http_request_t) -> Found {
    WAITS.with_borrow_mut(|w| match w.by_request.get(&(r as usize)) {
        None => Found::Fresh,
        Some(Wait::Waiting { .. }) => Found::Waiting,
        Some(&Wait::Resumed(how)) => {
            w.by_request.remove(&(r as usize));
            Found::Resumed(how)
        }
    })
}

/// Suspends `r` until its key's (`digest`) refill lands or `wait_ms` passes;
/// false (nothing changed) when nginx cannot register the request cleanup
/// the wait needs, and the caller decides the request now.
///
/// # Safety
/// `r` must be a valid main request in the access phase, not suspended.
pub unsafe fn park(
    r: *mut ngx_http_request_t,
    digest: KeyDigest,
    since_ms: u64,
    wait_ms: u64,
) -> bool {
    // SAFETY: `r` is valid; nginx runs request cleanups when it terminates
    // or frees the request — before it looks at `blocked` — so a request
    // finished while it waits leaves the wait here, never in our maps.
    let cleanup = unsafe { ngx_http_cleanup_add(r, 0) };
    if cleanup.is_null() {
        return false;
    }
    // SAFETY: `cleanup` is the fresh entry nginx just returned.
    unsafe {
        (*cleanup).handler = Some(on_cleanup);
        (*cleanup).data = r.cast();
    }
    WAITS.with_borrow_mut(|w| {
        w.by_request.insert(
            r as usize,
            Wait::Waiting {
                digest,
                since_ms,
                cleanup,
            },
        );
        w.by_key.entry(digest).or_default().push(r);
    });
    // SAFETY: `r` is a valid main request; blocked keeps nginx from freeing
    // it until `resume` (nginx's thread-pool reads do the same), and the
    // handlers and the timer are what `limit_req`'s delay sets.
    unsafe {
        let main = (*r).main;
        (*main).set_blocked((*main).blocked() + 1);
        (*r).set_aio(1);
        (*r).read_event_handler = Some(ngx_http_test_reading);
        (*r).write_event_handler = Some(on_write);
        let wev = (*(*r).connection).write;
        (*wev).set_delayed(1);
        ngx_add_timer(wev, wait_ms.max(1) as _);
    }
    true
}

/// Takes `r` out of the waits; what it was.
fn forget(r: *mut ngx_http_request_t) -> Option<Wait> {
    WAITS.with_borrow_mut(|w| {
        let wait = w.by_request.remove(&(r as usize))?;
        if let Wait::Waiting { digest, .. } = wait {
            if let Some(list) = w.by_key.get_mut(&digest) {
                list.retain(|&x| x != r);
            }
        }
        Some(wait)
    })
}

/// Undoes what `park` did to the request: its timer, `blocked`, `aio`, and
/// the cleanup (disarmed).
///
/// # Safety
/// `r` must be a request parked by `park` and not yet unblocked.
unsafe fn unblock(r: *mut ngx_http_request_t, cleanup: *mut ngx_http_cleanup_t) {
    // SAFETY: per the contract `r`, its connection and the cleanup entry
    // (in the request's pool) are alive.
    unsafe {
        (*cleanup).handler = None;
        let wev = (*(*r).connection).write;
        if (*wev).timer_set() != 0 {
            ngx_del_timer(wev);
        }
        (*wev).set_delayed(0);
        let main = (*r).main;
        debug_assert!((*main).blocked() > 0);
        (*main).set_blocked((*main).blocked().saturating_sub(1));
        (*r).set_aio(0);
    }
}

/// The request cleanup of a waiting request: nginx is finishing it (the
/// client left, an HTTP/2 stream was reset, the worker is shutting down),
/// so the wait ends here and nginx may free it.
unsafe extern "C" fn on_cleanup(data: *mut c_void) {
    let r = data.cast::<ngx_http_request_t>();
    if let Some(Wait::Waiting { cleanup, .. }) = forget(r) {
        // SAFETY: nginx runs the cleanup while the request is still alive,
        // and only once; it was parked and not resumed (its entry said so).
        unsafe { unblock(r, cleanup) };
    }
}

/// Resumes the requests waiting for `digest`'s refill, which landed (`ok`)
/// or failed.
pub fn refilled(digest: &KeyDigest, ok: bool) {
    let waiters = WAITS.with_borrow_mut(|w| w.by_key.remove(digest).unwrap_or_default());
    for r in waiters {
        resume_with(r, |since_ms| {
            if ok {
                Resumed::Refilled { since_ms }
            } else {
                Resumed::Local
            }
        });
    }
}

/// Resumes every suspended request of this worker on the local share (the
/// worker turned local: no refill is worth waiting for).
pub fn all_local() {
    let waiters: Vec<_> =
        WAITS.with_borrow_mut(|w| w.by_key.drain().flat_map(|(_, v)| v).collect());
    for r in waiters {
        resume_with(r, |_| Resumed::Local);
    }
}

/// The write handler while suspended: a write event before the deadline is
/// not the request's to act on; the deadline resumes it on the local share.
unsafe extern "C" fn on_write(r: *mut ngx_http_request_t) {
    // SAFETY: nginx calls the write handler with a valid request, whose
    // connection's write event carries our timer.
    unsafe {
        let wev = (*(*r).connection).write;
        if (*wev).delayed() != 0 {
            // Not the timer (ngx_http_request_handler clears `delayed` when
            // it fires): keep waiting, with the event re-armed if need be.
            if ngx_handle_write_event(wev, 0) != NGX_OK as isize {
                // Out of the wait before nginx finishes (and may free) it.
                if let Some(Wait::Waiting { cleanup, .. }) = forget(r) {
                    unblock(r, cleanup);
                }
                ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR as isize);
            }
            return;
        }
    }
    WAITS.with_borrow_mut(|w| {
        if let Some(Wait::Waiting { digest, .. }) = w.by_request.get(&(r as usize)) {
            let digest = *digest;
            if let Some(list) = w.by_key.get_mut(&digest) {
                list.retain(|&x| x != r);
            }
        }
    });
    resume_with(r, |_| Resumed::Local);
}

/// Records how `r` is to be decided and runs its phases again (or, if its
/// client left meanwhile, lets nginx finish it).
fn resume_with(r: *mut ngx_http_request_t, how: impl FnOnce(u64) -> Resumed) {
    let waiting = WAITS.with_borrow_mut(|w| match w.by_request.get(&(r as usize)) {
        Some(&Wait::Waiting {
            since_ms, cleanup, ..
        }) => Some((since_ms, cleanup)),
        _ => None,
    });
    let Some((since_ms, cleanup)) = waiting else {
        return; // already resumed, or finished by nginx
    };
    // SAFETY: `r` was blocked by `park` and is still waiting, so nginx kept
    // it alive; unblocking it and running its phases is what nginx's
    // thread-pool completions do.
    unsafe {
        let c = (*r).connection;
        unblock(r, cleanup);
        if (*c).error() == 0 {
            WAITS.with_borrow_mut(|w| {
                w.by_request
                    .insert(r as usize, Wait::Resumed(how(since_ms)))
            });
            (*r).read_event_handler = Some(ngx_http_block_reading);
            (*r).write_event_handler = Some(ngx_http_core_run_phases);
            ngx_http_core_run_phases(r);
        } else {
            // The client left (ngx_http_test_reading, or an HTTP/2 stream
            // reset, terminated the request while it was blocked): it is
            // finished now, as 499, and nothing is decided or forwarded.
            WAITS.with_borrow_mut(|w| w.by_request.remove(&(r as usize)));
            ngx_http_finalize_request(r, NGX_HTTP_CLIENT_CLOSED_REQUEST as isize);
        }
        ngx_http_run_posted_requests(c);
    }
}
