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
    ngx_list_push, ngx_list_t, ngx_pool_t, ngx_str_t, ngx_table_elt_t,
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
/// RFC 3339 time (tests/fixtures/README.md records the format). Each value is
/// formatted and copied into the pool once, and shared by the headers that
/// carry it; the names are static ([`HeaderName`]).
///
/// # Safety
/// `r` must be a valid request whose headers were not sent yet.
pub unsafe fn add_rate_headers(
    r: *mut ngx_http_request_t,
    v: &Verdict,
    unix_ms: u64,
    anthropic: bool,
) -> Result<(), ()> {
    const LIMIT: HeaderName = HeaderName::new("X-RateLimit-Limit", "x-ratelimit-limit");
    const REMAINING: HeaderName = HeaderName::new("X-RateLimit-Remaining", "x-ratelimit-remaining");
    const RESET: HeaderName = HeaderName::new("X-RateLimit-Reset", "x-ratelimit-reset");
    // OpenAI's names for the same window, which SDKs and tools read.
    const OPENAI_LIMIT: HeaderName =
        HeaderName::new("x-ratelimit-limit-requests", "x-ratelimit-limit-requests");
    const OPENAI_REMAINING: HeaderName = HeaderName::new(
        "x-ratelimit-remaining-requests",
        "x-ratelimit-remaining-requests",
    );
    const OPENAI_RESET: HeaderName =
        HeaderName::new("x-ratelimit-reset-requests", "x-ratelimit-reset-requests");
    const ANTHROPIC: [HeaderName; 3] = [
        HeaderName::new(
            "anthropic-ratelimit-requests-limit",
            "anthropic-ratelimit-requests-limit",
        ),
        HeaderName::new(
            "anthropic-ratelimit-requests-remaining",
            "anthropic-ratelimit-requests-remaining",
        ),
        HeaderName::new(
            "anthropic-ratelimit-requests-reset",
            "anthropic-ratelimit-requests-reset",
        ),
    ];
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
        let mut digits = itoa::Buffer::new();
        let limit = copy_str(pool, digits.format(v.limit).as_bytes())?;
        let remaining = copy_str(pool, digits.format(v.remaining).as_bytes())?;
        let reset = copy_str(pool, digits.format(v.reset_unix(unix_ms)).as_bytes())?;
        push_value(headers, &LIMIT, limit)?;
        push_value(headers, &REMAINING, remaining)?;
        push_value(headers, &RESET, reset)?;
        push_value(headers, &OPENAI_LIMIT, limit)?;
        push_value(headers, &OPENAI_REMAINING, remaining)?;
        let after = afr_core::limits::DurationText::new(v.reset_after_ms);
        push_value(
            headers,
            &OPENAI_RESET,
            copy_str(pool, after.as_str().as_bytes())?,
        )?;
        if anthropic {
            let at = afr_core::limits::rfc3339_seconds(v.reset_unix(unix_ms));
            let values = [limit, remaining, copy_str(pool, at.as_bytes())?];
            for (name, value) in ANTHROPIC.iter().zip(values) {
                push_value(headers, name, value)?;
            }
        }
    }
    Ok(())
}

/// A header name as nginx keeps it in a header list (`ngx_table_elt_t`): as
/// sent, lowercased, and hashed, all made at compile time. Before, every
/// header a request got (five to the sidecar, six or nine on the response)
/// lowercased its name into a new String and copied both forms and hashed
/// them, per request.
pub struct HeaderName {
    key: &'static str,
    low: &'static str,
    hash: ngx::ffi::ngx_uint_t,
}

impl HeaderName {
    /// `low` must be `key` lowercased (checked when the constant is made).
    pub const fn new(key: &'static str, low: &'static str) -> Self {
        let (k, l) = (key.as_bytes(), low.as_bytes());
        assert!(
            k.len() == l.len(),
            "a header name's lowercase form differs in length"
        );
        let mut hash: ngx::ffi::ngx_uint_t = 0;
        let mut i = 0;
        while i < k.len() {
            assert!(
                k[i].to_ascii_lowercase() == l[i],
                "not the header name lowercased"
            );
            hash = hash
                .wrapping_mul(31)
                .wrapping_add(l[i] as ngx::ffi::ngx_uint_t);
            i += 1;
        }
        HeaderName { key, low, hash }
    }
}

/// Appends `name: value` to a header list, copying `value` into `pool`.
///
/// # Safety
/// `pool` and `list` must be valid and belong to the same request.
pub unsafe fn push_header(
    pool: *mut ngx_pool_t,
    list: *mut ngx_list_t,
    name: &HeaderName,
    value: &[u8],
) -> Result<(), ()> {
    // SAFETY: as the caller promises; the copy lives as long as the request.
    unsafe { push_value(list, name, copy_str(pool, value)?) }
}

/// Appends `name: value` to a header list, `value` being in the request's pool.
///
/// # Safety
/// `list` must be valid, and `value` live as long as the request.
unsafe fn push_value(list: *mut ngx_list_t, name: &HeaderName, value: ngx_str_t) -> Result<(), ()> {
    // SAFETY: the list holds ngx_table_elt_t; zeroing covers every nginx
    // version's layout (1.23+ adds `next`, which must be null). The name's
    // bytes are static and nginx only reads a header's key and lowcase_key
    // (its own filters set `key` to string literals the same way), so the
    // `*mut` they are stored as is never written through.
    unsafe {
        let h = ngx_list_push(list).cast::<ngx_table_elt_t>();
        if h.is_null() {
            return Err(());
        }
        ptr::write_bytes(h, 0, 1);
        (*h).key = ngx_str_t {
            len: name.key.len(),
            data: name.key.as_ptr().cast_mut(),
        };
        (*h).lowcase_key = name.low.as_ptr().cast_mut();
        (*h).value = value;
        (*h).hash = name.hash;
    }
    Ok(())
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
