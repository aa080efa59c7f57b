//! The access-phase handler: `Authorization: Bearer afr_…` (or Anthropic's
//! `x-api-key: afr_…`) → key → limit.
//!
//! A refused request gets its OpenAI error body right here (401/403/429, JSON;
//! Anthropic's shape on `/v1/messages…`, see `ErrorShape::for_path`)
//! and never reaches the upstream. An admitted one has its identity headers
//! rewritten: the client's `Authorization` and any `X-Afr-*` it sent are
//! dropped, and `X-Afr-Key-Id`, `X-Afr-Models`, `X-Afr-Secret` are set, so a
//! plain `proxy_pass` forwards exactly what the sidecar trusts.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ptr::{self, addr_of_mut};
use std::rc::Rc;
use std::sync::OnceLock;

use afr_core::error::{ErrorBody, ErrorShape};
use afr_core::keys::{
    bearer_token, concurrency_limited_body, is_well_formed, rate_limited_body, Denial,
};
use afr_core::ratelimit::Verdict;
use ngx::core::{Buffer, Pool, Status};
use ngx::ffi::{
    ngx_array_push, ngx_chain_t, ngx_conf_t, ngx_http_discard_request_body,
    ngx_http_finalize_request, ngx_http_handler_pt, ngx_http_output_filter,
    ngx_http_phases_NGX_HTTP_ACCESS_PHASE, ngx_http_request_t, ngx_http_send_header, ngx_int_t,
    ngx_list_part_t, ngx_palloc, ngx_pool_cleanup_add, ngx_table_elt_t, NGX_LOG_ERR,
};
use ngx::http::{HttpModuleLocationConf, HttpModuleMainConf, NgxHttpCoreModule};
use ngx::ngx_log_error;

use crate::clock::{self, Now};
use crate::filter::{list_iter, push_header, HeaderName};
use crate::fleet::{self, FleetConf};
use crate::state::{self, copy_str, AfrStatus};
use crate::variables;
use crate::zone::{Decision, Lease, ZoneCtx};
use crate::{reload, AfrModule};
use afr_core::fleet::Path;

/// Adds the handler to the access phase.
pub fn register(cf: &mut ngx_conf_t) -> Result<(), ()> {
    let cmcf = NgxHttpCoreModule::main_conf_mut(cf).ok_or(())?;
    // SAFETY: the phase array holds `ngx_http_handler_pt`s; push returns a
    // slot for one or null.
    unsafe {
        let h = ngx_array_push(
            &mut cmcf.phases[ngx_http_phases_NGX_HTTP_ACCESS_PHASE as usize].handlers,
        )
        .cast::<ngx_http_handler_pt>();
        if h.is_null() {
            return Err(());
        }
        *h = Some(access_handler);
    }
    Ok(())
}

/// `Retry-After` of a request refused for concurrency: when one of the key's
/// requests ends cannot be known, so the client is asked to try again soon
/// (nginx's `limit_conn` sends none; a client needs one to back off).
const BUSY_RETRY_AFTER_SECS: u64 = 1;

// The headers the access phase adds: to the request the sidecar gets, and to a refusal.
const KEY_ID: HeaderName = HeaderName::new("X-Afr-Key-Id", "x-afr-key-id");
const MODELS: HeaderName = HeaderName::new("X-Afr-Models", "x-afr-models");
const LIMITS: HeaderName = HeaderName::new("X-Afr-Limits", "x-afr-limits");
const FLEET: HeaderName = HeaderName::new("X-Afr-Fleet", "x-afr-fleet");
const SECRET: HeaderName = HeaderName::new("X-Afr-Secret", "x-afr-secret");
const RETRY_AFTER: HeaderName = HeaderName::new("Retry-After", "retry-after");
const WWW_AUTHENTICATE: HeaderName = HeaderName::new("WWW-Authenticate", "www-authenticate");

/// A recognised key's labels, for `$afr_key_id` / `$afr_key_name`.
struct Who {
    id: String,
    name: String,
}

enum Outcome {
    Refuse(Denial, Option<Who>),
    Limited(Verdict, Who),
    /// `max_concurrent` requests of the key are in flight (the limit).
    Busy(Verdict, u32, Who),
    Admit {
        verdict: Verdict,
        who: Who,
        models: Option<String>,
        limits: Option<String>,
        lease: Option<Lease>,
    },
    Internal(&'static str),
    /// Waiting for the key's fleet lease to be refilled; the phase runs again then.
    Suspended,
}

unsafe extern "C" fn access_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    // SAFETY: nginx calls phase handlers with a valid request.
    let req = unsafe { &mut *r };
    let Some(lcf) = AfrModule::location_conf(req) else {
        return Status::NGX_DECLINED.into();
    };
    if lcf.enable != Some(true) || r != req.main {
        return Status::NGX_DECLINED.into();
    }
    // SAFETY: `r` is a valid main request.
    if let Some(state) = unsafe { state::get_state(r) } {
        // Internal redirect of a request we already admitted and counted.
        if state.admitted {
            return Status::NGX_DECLINED.into();
        }
    }
    let Some(mcf) = AfrModule::main_conf(req) else {
        return Status::NGX_DECLINED.into();
    };
    // SAFETY: `afr_zone` stored a ZoneCtx pointer in the zone's data.
    let Some(zone) =
        (unsafe { mcf.zone.as_ref() }).and_then(|z| unsafe { z.data.cast::<ZoneCtx>().as_ref() })
    else {
        return send_error(
            r,
            500,
            &internal_body("rate-limit zone missing").to_json(),
            None,
        );
    };

    let now = clock::now();
    let mut path = None;
    let outcome = decide(r, zone, mcf.fleet.as_ref(), now, &mut path);
    let shape = ErrorShape::for_path(req.uri.as_bytes());
    match outcome {
        Outcome::Suspended => Status::NGX_AGAIN.into(),
        Outcome::Refuse(d, who) => {
            let key = who.as_ref().map(|w| (w.id.as_str(), w.name.as_str()));
            // SAFETY: `r` is a valid main request.
            if unsafe {
                variables::record(r, AfrStatus::of_denial(d), None, now.unix_ms, key, path)
            }
            .is_err()
            {
                return Status::NGX_ERROR.into();
            }
            send_error(r, d.status(), denial_json(d, shape), None)
        }
        Outcome::Internal(why) => send_error(r, 500, &shape.render(500, &internal_body(why)), None),
        Outcome::Limited(v, who) => {
            let key = Some((who.id.as_str(), who.name.as_str()));
            // SAFETY: `r` is a valid main request.
            if unsafe { variables::record(r, AfrStatus::Limited, Some(v), now.unix_ms, key, path) }
                .is_err()
            {
                return Status::NGX_ERROR.into();
            }
            let json = limited_json(Limit::Rate, v.limit, shape);
            send_error(r, 429, &json, Some(v.retry_after_secs(now.unix_ms)))
        }
        Outcome::Busy(v, limit, who) => {
            let key = Some((who.id.as_str(), who.name.as_str()));
            // SAFETY: `r` is a valid main request.
            if unsafe { variables::record(r, AfrStatus::Busy, Some(v), now.unix_ms, key, path) }
                .is_err()
            {
                return Status::NGX_ERROR.into();
            }
            let json = limited_json(Limit::Concurrency, limit, shape);
            send_error(r, 429, &json, Some(BUSY_RETRY_AFTER_SECS))
        }
        Outcome::Admit {
            verdict,
            who,
            models,
            limits,
            lease,
        } => {
            // First, so that the place is given back whatever happens next.
            // SAFETY: `r` is a valid main request.
            if let Some(lease) = lease {
                if unsafe { hold_until_request_ends(r, lease) }.is_err() {
                    return Status::NGX_ERROR.into();
                }
            }
            let key = Some((who.id.as_str(), who.name.as_str()));
            // SAFETY: `r` is a valid main request in the access phase.
            let ok = unsafe {
                variables::record(
                    r,
                    AfrStatus::Admitted,
                    Some(verdict),
                    now.unix_ms,
                    key,
                    path,
                )
                .is_ok()
                    && rewrite_identity(
                        r,
                        &who.id,
                        models.as_deref(),
                        limits.as_deref(),
                        path.map(Path::as_str),
                        lcf.secret.as_deref(),
                    )
                    .is_ok()
            };
            if ok {
                Status::NGX_DECLINED.into()
            } else {
                Status::NGX_ERROR.into()
            }
        }
    }
}

/// Gives `lease` back when the request's pool is destroyed: the one place
/// every ending of a request passes through (finalisation with any status, a
/// client gone, an upstream error, an HTTP/2 stream reset, a lingering
/// close), which is how `limit_conn` releases too. When the cleanup cannot be
/// registered the place is given back at once and the request fails.
///
/// # Safety
/// `r` must be a valid main request.
unsafe fn hold_until_request_ends(r: *mut ngx_http_request_t, lease: Lease) -> Result<(), ()> {
    // SAFETY: `r` is valid; the cleanup's data block is sized for a Lease.
    unsafe {
        let cln = ngx_pool_cleanup_add((*r).pool, std::mem::size_of::<Lease>());
        if cln.is_null() {
            lease.release();
            return Err(());
        }
        (*cln).data.cast::<Lease>().write(lease);
        (*cln).handler = Some(release_lease);
    }
    Ok(())
}

/// The request pool's cleanup: gives the place in flight back.
unsafe extern "C" fn release_lease(data: *mut std::ffi::c_void) {
    // SAFETY: `data` is the Lease written by `hold_until_request_ends`; a
    // pool runs each cleanup once.
    let lease = unsafe { data.cast::<Lease>().read() };
    lease.release();
}

fn internal_body(why: &str) -> ErrorBody {
    ErrorBody::new(
        "server_error",
        Some("internal_error"),
        format!("Gateway error: {why}."),
    )
}

/// The client's key: `Authorization: Bearer afr_…` (OpenAI SDKs) or
/// `x-api-key: afr_…` (Anthropic SDKs, Claude Code). Either header twice, or
/// both with different keys, is malformed: the request must name one key.
fn client_token<'r>(r: *mut ngx_http_request_t) -> Result<&'r [u8], Denial> {
    let (mut auth, mut api_key): (Option<&[u8]>, Option<&[u8]>) = (None, None);
    // SAFETY: the request's header list is valid and not modified here.
    for h in unsafe { list_iter(addr_of_mut!((*r).headers_in.headers)) } {
        // SAFETY: list elements are initialised table entries.
        let (key, value) = unsafe { ((*h).key.as_bytes(), (*h).value.as_bytes()) };
        let slot = if key.eq_ignore_ascii_case(b"authorization") {
            &mut auth
        } else if key.eq_ignore_ascii_case(b"x-api-key") {
            &mut api_key
        } else {
            continue;
        };
        if slot.replace(value).is_some() {
            return Err(Denial::Malformed);
        }
    }
    let api_key = api_key
        .map(|k| {
            if is_well_formed(k.trim_ascii()) {
                Ok(k.trim_ascii())
            } else {
                Err(Denial::Malformed)
            }
        })
        .transpose()?;
    match (auth.map(bearer_token).transpose()?, api_key) {
        (Some(a), Some(k)) if a != k => Err(Denial::Malformed),
        (Some(t), _) | (None, Some(t)) => Ok(t),
        (None, None) => Err(Denial::Missing),
    }
}

fn decide(
    r: *mut ngx_http_request_t,
    zone: &ZoneCtx,
    fleet: Option<&FleetConf>,
    now: Now,
    path: &mut Option<Path>,
) -> Outcome {
    // A request resumed from a fleet wait is decided as the wait ended (and
    // one still waiting is left waiting), whatever happens below.
    let waited = fleet.map(|_| crate::suspend::take(r));
    if matches!(waited, Some(crate::suspend::Found::Waiting)) {
        return Outcome::Suspended;
    }
    let token = match client_token(r) {
        Err(d) => return Outcome::Refuse(d, None),
        Ok(t) => t,
    };
    let found = reload::resolve(token, |entry| {
        let entry = entry.ok_or((Denial::Unknown, None))?;
        let who = Who {
            id: entry.id.clone(),
            name: entry.name.clone(),
        };
        match entry.check((now.unix_ms / 1000) as i64) {
            Ok(()) => Ok((
                who,
                entry.rpm,
                entry.limits.max_concurrent,
                entry.models_header(),
                entry.limits.header_value(),
            )),
            Err(d) => Err((d, Some(who))),
        }
    });
    let (who, rpm, max_concurrent, models, limits) = match found {
        None => return Outcome::Internal("no key table loaded"),
        Some(Err((d, who))) => return Outcome::Refuse(d, who),
        Some(Ok(k)) => k,
    };
    let id = &who.id;
    // Without `afr_fleet` the zone decides both limits in one step. With it,
    // `rpm` is the fleet lease's; places in flight stay this host's and are
    // taken after the lease admitted the request (so, unlike without a fleet,
    // a request refused for concurrency has used one of the key's requests).
    let decided = match fleet {
        None => zone.admit(id.as_bytes(), rpm, max_concurrent, now.mono_ms),
        Some(f) => match fleet::decide(
            f,
            zone,
            r,
            (id, rpm),
            waited.unwrap_or(crate::suspend::Found::Fresh),
            now.mono_ms,
        ) {
            Ok(fleet::Decision::Suspended) => return Outcome::Suspended,
            Ok(fleet::Decision::Now(verdict, how)) => {
                *path = Some(how);
                match max_concurrent {
                    Some(n) if verdict.admitted => {
                        zone.hold(id.as_bytes(), n, verdict, now.mono_ms)
                    }
                    _ => Ok(Decision::Counted {
                        verdict,
                        lease: None,
                    }),
                }
            }
            Err(e) => Err(e),
        },
    };
    match decided {
        Err(_) => {
            // SAFETY: the request's log is valid.
            let log = unsafe { (*(*r).connection).log };
            ngx_log_error!(
                NGX_LOG_ERR,
                log,
                "afr_zone is not initialised, key \"{id}\" not counted"
            );
            Outcome::Internal("rate-limit zone unavailable")
        }
        Ok(Decision::Busy { verdict, limit }) => Outcome::Busy(verdict, limit, who),
        Ok(Decision::Counted { verdict, .. }) if !verdict.admitted => {
            Outcome::Limited(verdict, who)
        }
        Ok(Decision::Counted { verdict, lease }) => Outcome::Admit {
            verdict,
            who,
            models,
            limits,
            lease,
        },
    }
}

/// Replaces the request's header list with one that has no `Authorization`
/// and no client `X-Afr-*`, plus our identity headers (and, with `afr_fleet`,
/// how the fleet decided this request).
///
/// # Safety
/// `r` must be a valid request in the access phase.
unsafe fn rewrite_identity(
    r: *mut ngx_http_request_t,
    id: &str,
    models: Option<&str>,
    limits: Option<&str>,
    fleet: Option<&str>,
    secret: Option<&str>,
) -> Result<(), ()> {
    // SAFETY: per the contract; the old elements stay allocated in the request
    // pool, so pointers nginx kept into them (host, user_agent…) stay valid.
    unsafe {
        let list = addr_of_mut!((*r).headers_in.headers);
        let kept: Vec<ngx_table_elt_t> = list_iter(list)
            .filter(|&h| {
                let k = (*h).key.as_bytes();
                !(k.eq_ignore_ascii_case(b"authorization")
                    || k.eq_ignore_ascii_case(b"x-api-key")
                    || (k.len() >= 6 && k[..6].eq_ignore_ascii_case(b"x-afr-")))
            })
            .map(|h| *h)
            .collect();
        let pool = (*r).pool;
        let n = kept.len() + 5;
        let elts = ngx_palloc(pool, n * std::mem::size_of::<ngx_table_elt_t>());
        if elts.is_null() {
            return Err(());
        }
        // ngx_list_init, which is a static inline function in C.
        (*list).part = ngx_list_part_t {
            elts,
            nelts: 0,
            next: ptr::null_mut(),
        };
        (*list).last = addr_of_mut!((*list).part);
        (*list).size = std::mem::size_of::<ngx_table_elt_t>();
        (*list).nalloc = n;
        (*list).pool = pool;
        for h in kept {
            let slot = ngx::ffi::ngx_list_push(list).cast::<ngx_table_elt_t>();
            if slot.is_null() {
                return Err(());
            }
            slot.write(h);
        }
        (*r).headers_in.authorization = ptr::null_mut();
        push_header(pool, list, &KEY_ID, id.as_bytes())?;
        if let Some(m) = models {
            push_header(pool, list, &MODELS, m.as_bytes())?;
        }
        if let Some(l) = limits {
            push_header(pool, list, &LIMITS, l.as_bytes())?;
        }
        if let Some(f) = fleet {
            // Where this request's rpm was decided, for the sidecar's
            // `afr_fleet_requests{limits=…}` (global, or local while Redis is down).
            push_header(pool, list, &FLEET, f.as_bytes())?;
        }
        if let Some(s) = secret {
            push_header(pool, list, &SECRET, s.as_bytes())?;
        }
    }
    Ok(())
}

/// The JSON body of a refusal, serialized once per process: an invalid-key
/// flood should cost what nginx's own `return 401` costs.
fn denial_json(d: Denial, shape: ErrorShape) -> &'static str {
    static BODIES: OnceLock<[[String; 5]; 2]> = OnceLock::new();
    let all = BODIES.get_or_init(|| {
        [ErrorShape::OpenAi, ErrorShape::Anthropic].map(|shape| {
            [
                Denial::Missing,
                Denial::Malformed,
                Denial::Unknown,
                Denial::Disabled,
                Denial::Expired,
            ]
            .map(|d| shape.render(d.status(), &d.body()))
        })
    });
    let all = &all[usize::from(shape == ErrorShape::Anthropic)];
    let i = match d {
        Denial::Missing => 0,
        Denial::Malformed => 1,
        Denial::Unknown => 2,
        Denial::Disabled => 3,
        Denial::Expired => 4,
    };
    &all[i]
}

/// Which limit a 429 names.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Limit {
    Rate,
    Concurrency,
}

/// Distinct 429 bodies a worker keeps: one per limit value the keys use and
/// shape, so a handful; past this many, a body is rendered and not kept.
const LIMITED_BODIES: usize = 256;

/// The JSON body of a 429, rendered once per (limit, value, shape) in this
/// worker rather than per refusal: formatting the message and serializing it
/// was per request what a flood of 429s spent beyond nginx's own work
/// (issue 24). A worker is one thread, so the cache is thread-local; a key's
/// limit changing by reload only adds an entry.
fn limited_json(limit: Limit, value: u32, shape: ErrorShape) -> Rc<str> {
    thread_local! {
        static BODIES: RefCell<HashMap<(Limit, u32, ErrorShape), Rc<str>>> =
            RefCell::new(HashMap::new());
    }
    let render = || -> Rc<str> {
        let body = match limit {
            Limit::Rate => rate_limited_body(value),
            Limit::Concurrency => concurrency_limited_body(value),
        };
        shape.render(429, &body).into()
    };
    BODIES.with(|bodies| {
        let mut bodies = bodies.borrow_mut();
        if let Some(json) = bodies.get(&(limit, value, shape)) {
            return json.clone();
        }
        let json = render();
        if bodies.len() < LIMITED_BODIES {
            bodies.insert((limit, value, shape), json.clone());
        }
        json
    })
}

/// Sends an OpenAI error response and finalizes the request.
fn send_error(
    r: *mut ngx_http_request_t,
    status: u16,
    json: &str,
    retry_after: Option<u64>,
) -> ngx_int_t {
    // SAFETY: `r` is a valid main request whose header was not sent; every
    // buffer comes from its pool and lives as long as the request.
    unsafe {
        let (ok, error): (ngx_int_t, ngx_int_t) = (Status::NGX_OK.into(), Status::NGX_ERROR.into());
        // As nginx's own error path does (ngx_http_special_response_handler,
        // the client_max_body_size check): mark `Expect: 100-continue` as
        // answered, so discarding the body sends no `100 Continue` and the
        // client is never invited to upload a body we refuse.
        (*r).set_expect_tested(1);
        let rc = ngx_http_discard_request_body(r);
        if rc != ok {
            return rc;
        }
        let req = &mut *r;
        let pool = req.pool;
        req.headers_out.status = status as _;
        let Ok(ct) = copy_str(pool, b"application/json") else {
            return Status::NGX_ERROR.into();
        };
        req.headers_out.content_type = ct;
        req.headers_out.content_type_len = ct.len;
        req.headers_out.content_type_lowcase = ptr::null_mut();
        req.headers_out.content_length_n = json.len() as _;
        let headers = addr_of_mut!(req.headers_out.headers);
        if let Some(secs) = retry_after {
            let mut digits = itoa::Buffer::new();
            let secs = digits.format(secs).as_bytes();
            if push_header(pool, headers, &RETRY_AFTER, secs).is_err() {
                return Status::NGX_ERROR.into();
            }
        }
        if status == 401 && push_header(pool, headers, &WWW_AUTHENTICATE, b"Bearer").is_err() {
            return Status::NGX_ERROR.into();
        }
        let rc = ngx_http_send_header(r);
        if rc == error || rc > ok || req.header_only() != 0 {
            ngx_http_finalize_request(r, rc);
            return Status::NGX_DONE.into();
        }
        let Some(mut buf) = Pool::from_ngx_pool(pool).create_buffer_from_str(json) else {
            return Status::NGX_ERROR.into();
        };
        buf.set_last_buf(true);
        buf.set_last_in_chain(true);
        let mut chain = ngx_chain_t {
            buf: buf.as_ngx_buf_mut(),
            next: ptr::null_mut(),
        };
        let rc = ngx_http_output_filter(r, &mut chain);
        ngx_http_finalize_request(r, rc);
        Status::NGX_DONE.into()
    }
}
