//! The header filter that puts `X-RateLimit-*` on every response of an
//! authenticated request: 429s, proxied successes and errors, SSE streams and
//! `error_page` responses alike, from the state the access phase recorded
//! ([`crate::state`]); and the header-list helpers the access phase uses too.

use std::ptr::{self, addr_of_mut};

use afr_core::error::ErrorShape;
use afr_core::ratelimit::Verdict;
use ngx::core::Status;
use ngx::ffi::{
    ngx_http_output_header_filter_pt, ngx_http_request_t, ngx_http_top_header_filter, ngx_int_t,
    ngx_list_push, ngx_list_t, ngx_pool_t, ngx_table_elt_t,
};
use ngx::http::HttpModuleMainConf;

use crate::state::{copy_str, get_state};
use crate::AfrModule;

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
