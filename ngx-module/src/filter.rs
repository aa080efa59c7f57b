//! Per-request state and the header filter that puts `X-RateLimit-*` on every
//! response of an authenticated request: 429s, proxied successes and errors,
//! SSE streams and `error_page` responses alike.
//!
//! The state lives in a request-pool cleanup entry as well as in the module
//! context: an internal redirect (`error_page`, `try_files`) clears module
//! contexts, and the access phase then runs again — finding the state in the
//! pool tells it the request was already admitted and counted (the same trick
//! as nginx's realip module).

use std::ffi::c_void;
use std::mem::size_of;
use std::ptr::{self, addr_of_mut};

use afr_core::error::ErrorShape;
use afr_core::fleet::Path;
use afr_core::ratelimit::Verdict;
use ngx::core::Status;
use ngx::ffi::{
    ngx_http_output_header_filter_pt, ngx_http_request_t, ngx_http_top_header_filter, ngx_int_t,
    ngx_list_push, ngx_list_t, ngx_pnalloc, ngx_pool_cleanup_add, ngx_pool_t, ngx_str_t,
    ngx_table_elt_t,
};

use crate::variables::AfrStatus;
use crate::AfrModule;
use ngx::http::{HttpModule, HttpModuleMainConf};

/// What the access phase decided for a request.
#[derive(Clone, Copy)]
pub struct RequestState {
    /// The request passed the access phase.
    pub admitted: bool,
    /// Values of the `X-RateLimit-*` headers (when `status` was counted).
    pub rate: Verdict,
    /// `$afr_status`.
    pub status: AfrStatus,
    /// `$afr_key_id` (empty when no key was recognised), in the request pool.
    pub key_id: ngx_str_t,
    /// `$afr_key_name`, in the request pool.
    pub key_name: ngx_str_t,
    /// Wall clock (Unix ms) of the decision, which `X-RateLimit-Reset` counts from.
    pub unix_ms: u64,
    /// `$afr_fleet`: how the fleet decided the request (none without `afr_fleet`).
    pub fleet: Option<Path>,
}

static mut NEXT_HEADER_FILTER: ngx_http_output_header_filter_pt = None;

/// Inserts the header filter at the top of the chain (called per configuration load).
pub fn register() -> Result<(), ()> {
    // SAFETY: filter chain globals are only touched while loading configuration,
    // on the master's single thread.
    unsafe {
        NEXT_HEADER_FILTER = ngx_http_top_header_filter;
        ngx_http_top_header_filter = Some(header_filter);
    }
    Ok(())
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
pub unsafe fn set_state(r: *mut ngx_http_request_t, state: RequestState) -> Result<(), ()> {
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
pub unsafe fn get_state(r: *mut ngx_http_request_t) -> Option<RequestState> {
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

unsafe extern "C" fn header_filter(r: *mut ngx_http_request_t) -> ngx_int_t {
    // SAFETY: nginx calls header filters with a valid request.
    unsafe {
        // Only main requests answer the client, and only configurations that
        // use `afr` anywhere can have state to look for.
        let used = AfrModule::main_conf(&*r).is_some_and(|m| m.used);
        if used && r == (*r).main {
            if let Some(state) = get_state(r).filter(|s| s.status.counted()) {
                // The request line's URI: an `error_page` redirect changes `uri`.
                let shape = ErrorShape::for_path((*r).unparsed_uri.as_bytes());
                let anthropic = shape == ErrorShape::Anthropic;
                if add_rate_headers(r, &state.rate, state.unix_ms, anthropic).is_err() {
                    return Status::NGX_ERROR.into();
                }
            }
        }
        match NEXT_HEADER_FILTER {
            Some(next) => next(r),
            None => Status::NGX_OK.into(),
        }
    }
}

/// Sets `X-RateLimit-Limit/Remaining/Reset`, replacing any an upstream sent;
/// Reset counts from the decision's wall clock `unix_ms`. With `anthropic`
/// (a `/v1/messages…` request) also Anthropic's
/// `anthropic-ratelimit-requests-{limit,remaining,reset}`, the reset as an
/// RFC 3339 time (tests/fixtures/README.md records the format).
///
/// # Safety
/// `r` must be a valid request whose headers were not sent yet.
pub unsafe fn add_rate_headers(
    r: *mut ngx_http_request_t,
    v: &Verdict,
    unix_ms: u64,
    anthropic: bool,
) -> Result<(), ()> {
    // SAFETY: `r` is valid; the out-headers list belongs to it.
    unsafe {
        let headers = addr_of_mut!((*r).headers_out.headers);
        for h in list_iter(headers) {
            let key = (*h).key.as_bytes();
            // The token headers are the sidecar's own (it alone knows the
            // key's tokens); every other x-ratelimit-* is ours to set.
            let tokens = key.len() > 7 && key[key.len() - 7..].eq_ignore_ascii_case(b"-tokens");
            let ours = (key.len() > 12 && key[..12].eq_ignore_ascii_case(b"x-ratelimit-"))
                || (anthropic
                    && key.len() > 29
                    && key[..29].eq_ignore_ascii_case(b"anthropic-ratelimit-requests-"));
            if ours && !tokens {
                (*h).hash = 0; // hidden from the header writer
            }
        }
        let pool = (*r).pool;
        push_header(
            pool,
            headers,
            "X-RateLimit-Limit",
            v.limit.to_string().as_bytes(),
        )?;
        push_header(
            pool,
            headers,
            "X-RateLimit-Remaining",
            v.remaining.to_string().as_bytes(),
        )?;
        push_header(
            pool,
            headers,
            "X-RateLimit-Reset",
            v.reset_unix(unix_ms).to_string().as_bytes(),
        )?;
        // OpenAI's names for the same window, which SDKs and tools read.
        push_header(
            pool,
            headers,
            "x-ratelimit-limit-requests",
            v.limit.to_string().as_bytes(),
        )?;
        push_header(
            pool,
            headers,
            "x-ratelimit-remaining-requests",
            v.remaining.to_string().as_bytes(),
        )?;
        push_header(
            pool,
            headers,
            "x-ratelimit-reset-requests",
            afr_core::limits::openai_duration(v.reset_after_ms).as_bytes(),
        )?;
        if anthropic {
            let names = [
                "anthropic-ratelimit-requests-limit",
                "anthropic-ratelimit-requests-remaining",
                "anthropic-ratelimit-requests-reset",
            ];
            let reset = afr_core::limits::rfc3339_seconds(v.reset_unix(unix_ms));
            let values = [v.limit.to_string(), v.remaining.to_string(), reset];
            for (name, value) in names.into_iter().zip(values) {
                push_header(pool, headers, name, value.as_bytes())?;
            }
        }
    }
    Ok(())
}

/// Appends `name: value` to a header list, copying both into `pool`.
///
/// # Safety
/// `pool` and `list` must be valid and belong to the same request.
pub unsafe fn push_header(
    pool: *mut ngx_pool_t,
    list: *mut ngx_list_t,
    name: &str,
    value: &[u8],
) -> Result<(), ()> {
    // SAFETY: the list holds ngx_table_elt_t; zeroing covers every nginx
    // version's layout (1.23+ adds `next`, which must be null).
    unsafe {
        let h = ngx_list_push(list).cast::<ngx_table_elt_t>();
        if h.is_null() {
            return Err(());
        }
        ptr::write_bytes(h, 0, 1);
        let key = copy_str(pool, name.as_bytes())?;
        let low = copy_str(pool, name.to_ascii_lowercase().as_bytes())?;
        (*h).key = key;
        (*h).lowcase_key = low.data;
        (*h).value = copy_str(pool, value)?;
        (*h).hash = header_hash(name.as_bytes());
    }
    Ok(())
}

/// nginx's header-name hash (`ngx_hash(key, c)` over the lowercased name).
pub fn header_hash(name: &[u8]) -> ngx::ffi::ngx_uint_t {
    name.iter().fold(0 as ngx::ffi::ngx_uint_t, |h, &c| {
        h.wrapping_mul(31).wrapping_add(c.to_ascii_lowercase() as _)
    })
}

/// Copies bytes into `pool` as an `ngx_str_t`.
///
/// # Safety
/// `pool` must be valid.
pub unsafe fn copy_str(pool: *mut ngx_pool_t, bytes: &[u8]) -> Result<ngx_str_t, ()> {
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

/// Iterates the elements of an `ngx_list_t` of `ngx_table_elt_t`.
///
/// # Safety
/// `list` must be a valid header list that is not modified while iterating.
pub unsafe fn list_iter(list: *mut ngx_list_t) -> impl Iterator<Item = *mut ngx_table_elt_t> {
    // SAFETY: walking parts and their `nelts` elements, as ngx_list.h documents.
    let mut part = unsafe { addr_of_mut!((*list).part) };
    let mut i = 0usize;
    // SAFETY: as above; the caller keeps the list alive and unchanged.
    std::iter::from_fn(move || unsafe {
        loop {
            if part.is_null() {
                return None;
            }
            if i < (*part).nelts {
                let elt = (*part).elts.cast::<ngx_table_elt_t>().add(i);
                i += 1;
                return Some(elt);
            }
            part = (*part).next;
            i = 0;
        }
    })
}
