//! The module's nginx variables, for `log_format`, `map`, `if` and
//! `proxy_set_header`:
//!
//! | variable | value |
//! |---|---|
//! | `$afr_key_id` | the key's `id` (never its secret) |
//! | `$afr_key_name` | the key's `name` |
//! | `$afr_rate_limit` | `X-RateLimit-Limit` of the request |
//! | `$afr_rate_remaining` | `X-RateLimit-Remaining` of the request |
//! | `$afr_status` | `admitted`, `unknown`, `disabled`, `expired`, `limited` or `concurrency` |
//! | `$afr_trace_id` | the request's W3C trace id: its `traceparent`'s, else a fresh one |
//!
//! A variable is "not found" (empty; `-` in an access log) where it has no
//! value: every one on a location with `afr off`, the key's fields when no key
//! was recognised. Values come from the state the access phase recorded
//! ([`crate::state::RequestState`]), so they survive internal redirects.

use afr_core::fleet::Path;
use afr_core::ratelimit::Verdict;
use afr_core::tracecontext::{hex128, trace_id};
use ngx::core::Status;
use ngx::ffi::{
    ngx_conf_t, ngx_http_add_variable, ngx_http_request_t, ngx_int_t, ngx_str_t, ngx_uint_t,
    ngx_variable_value_t, NGX_HTTP_VAR_NOCACHEABLE,
};
use ngx::ngx_string;
use std::ptr::addr_of_mut;

use crate::filter::list_iter;
use crate::state::{self, AfrStatus, RequestState};

/// Which variable a get handler call is for (its `data`).
#[derive(Clone, Copy)]
enum Var {
    KeyId = 0,
    KeyName,
    RateLimit,
    RateRemaining,
    Status,
    Fleet,
}

const VARS: [(ngx_str_t, Var); 6] = [
    (ngx_string!("afr_key_id"), Var::KeyId),
    (ngx_string!("afr_key_name"), Var::KeyName),
    (ngx_string!("afr_rate_limit"), Var::RateLimit),
    (ngx_string!("afr_rate_remaining"), Var::RateRemaining),
    (ngx_string!("afr_status"), Var::Status),
    (ngx_string!("afr_fleet"), Var::Fleet),
];

/// Declares the variables (preconfiguration, so the configuration can use them).
pub fn add(cf: *mut ngx_conf_t) -> Result<(), ()> {
    let mut name = ngx_string!("afr_trace_id");
    // Cacheable (flags 0): one value per request, the same in the header to
    // the sidecar and in the access log.
    // SAFETY: `cf` is the configuration being parsed; nginx copies the name.
    let v = unsafe { ngx_http_add_variable(cf, &mut name, 0) };
    // SAFETY: a non-null return is the variable's entry in this configuration.
    let Some(v) = (unsafe { v.as_mut() }) else {
        return Err(());
    };
    v.get_handler = Some(get_trace_id);
    for (name, var) in VARS {
        let mut name = name;
        // SAFETY: `cf` is the configuration being parsed; nginx copies the name.
        let v =
            unsafe { ngx_http_add_variable(cf, &mut name, NGX_HTTP_VAR_NOCACHEABLE as ngx_uint_t) };
        // SAFETY: a non-null return is the variable's entry in this configuration.
        let Some(v) = (unsafe { v.as_mut() }) else {
            return Err(());
        };
        v.get_handler = Some(get_variable);
        v.data = var as usize;
    }
    Ok(())
}

unsafe extern "C" fn get_variable(
    r: *mut ngx_http_request_t,
    v: *mut ngx_variable_value_t,
    data: usize,
) -> ngx_int_t {
    // SAFETY: nginx calls get handlers with a valid request and value slot.
    let v = unsafe { &mut *v };
    // SAFETY: `r` is a valid request.
    let Some(state) = (unsafe { state::get_state(r) }) else {
        v.set_not_found(1);
        return Status::NGX_OK.into();
    };
    let number = |n: u32| -> Option<ngx_str_t> {
        if !state.status.counted() {
            return None;
        }
        let text = n.to_string();
        // SAFETY: the request pool outlives the variable's use in this request.
        unsafe { state::copy_str((*r).pool, text.as_bytes()) }.ok()
    };
    let value = match data {
        d if d == Var::KeyId as usize => Some(state.key_id).filter(|s| s.len > 0),
        d if d == Var::KeyName as usize => Some(state.key_name).filter(|s| s.len > 0),
        d if d == Var::RateLimit as usize => number(state.rate.limit),
        d if d == Var::RateRemaining as usize => number(state.rate.remaining),
        // How the fleet decided this request, not the worker's mode now.
        d if d == Var::Fleet as usize => state.fleet.map(|p| ngx_str_t {
            len: p.as_str().len(),
            data: p.as_str().as_ptr().cast_mut(),
        }),
        _ => Some(ngx_str_t {
            len: state.status.as_str().len(),
            data: state.status.as_str().as_ptr().cast_mut(),
        }),
    };
    match value {
        Some(s) => set_value(v, s),
        None => v.set_not_found(1),
    }
    Status::NGX_OK.into()
}

/// Gives the variable the value `s` (bytes that live as long as the request).
fn set_value(v: &mut ngx_variable_value_t, s: ngx_str_t) {
    v.set_len(s.len as u32);
    v.set_valid(1);
    v.set_no_cacheable(0);
    v.set_not_found(0);
    v.data = s.data;
}

/// `$afr_trace_id`: the trace id of the client's `traceparent` when it sent
/// one valid header, else a fresh random one, as 32 lowercase hex digits.
/// The sidecar makes it the trace id of the request's span when there is no
/// `traceparent` (`X-Afr-Trace-Id`), so an access-log line finds its trace.
///
/// A fresh id comes from a per-thread non-cryptographic generator
/// (`fastrand`): a trace id must be unique, not secret. nginx's
/// `$request_id` draws 16 bytes from OpenSSL's generator, ~6 000
/// instructions a request (callgrind), what the whole key check costs.
unsafe extern "C" fn get_trace_id(
    r: *mut ngx_http_request_t,
    v: *mut ngx_variable_value_t,
    _data: usize,
) -> ngx_int_t {
    // SAFETY: nginx calls get handlers with a valid request and value slot.
    let (r, v) = unsafe { (r, &mut *v) };
    let mut found: Option<&[u8]> = None;
    let mut count = 0;
    // SAFETY: the request's header list is valid and not modified here.
    for h in unsafe { list_iter(addr_of_mut!((*r).headers_in.headers)) } {
        // SAFETY: list elements are initialised table entries.
        let (key, value) = unsafe { ((*h).key.as_bytes(), (*h).value.as_bytes()) };
        if key.eq_ignore_ascii_case(b"traceparent") {
            count += 1;
            found = trace_id(value);
        }
    }
    let fresh;
    let id = match found.filter(|_| count == 1) {
        Some(id) => id,
        None => {
            fresh = hex128(fastrand::u128(1..));
            &fresh[..]
        }
    };
    // SAFETY: the request pool outlives the variable's use in this request.
    match unsafe { state::copy_str((*r).pool, id) } {
        Ok(s) => {
            set_value(v, s);
            Status::NGX_OK.into()
        }
        Err(()) => Status::NGX_ERROR.into(),
    }
}

/// Records the access phase's decision for the header filter and the
/// variables; `unix_ms` is the wall clock of the decision (what
/// `X-RateLimit-Reset` counts from); `key` is `(id, name)` when a key was recognised.
///
/// # Safety
/// `r` must be a valid main request.
pub unsafe fn record(
    r: *mut ngx_http_request_t,
    status: AfrStatus,
    rate: Option<Verdict>,
    unix_ms: u64,
    key: Option<(&str, &str)>,
    fleet: Option<Path>,
) -> Result<(), ()> {
    // Never read: the header filter and the variables look at `status` first.
    let rate = rate.unwrap_or(Verdict {
        admitted: false,
        limit: 0,
        remaining: 0,
        reset_after_ms: 0,
    });
    let empty = ngx_str_t {
        len: 0,
        data: std::ptr::null_mut(),
    };
    // SAFETY: `r` is valid; the copies live in its pool as long as the request.
    unsafe {
        let (key_id, key_name) = match key {
            Some((id, name)) => (
                state::copy_str((*r).pool, id.as_bytes())?,
                state::copy_str((*r).pool, name.as_bytes())?,
            ),
            None => (empty, empty),
        };
        state::set_state(
            r,
            RequestState {
                admitted: status == AfrStatus::Admitted,
                rate,
                unix_ms,
                status,
                key_id,
                key_name,
                fleet,
            },
        )
    }
}
