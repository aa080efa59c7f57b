//! What runs on a pool thread: one Redis call ([`Call`]), made by
//! [`run_call`] on the thread's own connection with the lease script, bounded
//! by the Redis timeout. The result is read back on the event loop
//! (`call_done` in `mod.rs`).

use std::cell::RefCell;
use std::ffi::c_void;
use std::sync::Arc;
use std::time::Duration;

use afr_core::ratelimit::WINDOW_MS;
use ngx::ffi::ngx_log_t;

use super::directive::FleetConf;
use crate::zone::{KeyDigest, ZoneCtx};

/// The lease script: tokens for one key, capped by the sliding-window rule of
/// `afr_core::ratelimit` on Redis's own clock (one clock for every node).
/// KEYS[1] is the key's prefix `afr:{<hashed id>}`; the window counters are
/// `<prefix>:<window start ms>`, each expiring after two windows.
/// ARGV: limit, tokens wanted, window length (ms), debt (admissions the
/// node made on its local share that Redis has not counted: counted first,
/// in the current window, unconditionally — they were already admitted).
/// `afr:{epoch}` is the time (Redis's ms) its data began, set when missing:
/// it lives as long as Redis's data (renewed for a day by every call), so a
/// node that sees another value than before knows Redis lost its counters
/// (a restart without persistence, a failover, or a fleet idle for a day)
/// and when: the window they were lost in.
/// ARGV 5 and 6: what a node back from a loss asks to hold
/// (`afr_core::outage`, rule 3: `afr_held`'s `after` and `upto`; 0 0:
/// nothing); in a held window nothing is granted (the debt still counts).
/// Returns {granted, previous window's count, current window's count, ms
/// into it, epoch, ms left of the window the epoch began in (≤ 0: over),
/// held (1: the current window is held)}.
const LEASE_SCRIPT: &str = concat!(
    afr_core::sliding_window_lua!(),
    afr_core::hold_lua!(),
    r"
local t = redis.call('TIME')
local ep = redis.call('GET', 'afr:{epoch}')
if not ep then
  redis.call('SET', 'afr:{epoch}', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), 'NX')
  ep = redis.call('GET', 'afr:{epoch}')
end
redis.call('PEXPIRE', 'afr:{epoch}', 86400000)
local w = tonumber(ARGV[3])
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local start = now - now % w
local curk = KEYS[1] .. ':' .. string.format('%d', start)
local prev = tonumber(redis.call('GET', KEYS[1] .. ':' .. string.format('%d', start - w)) or 0)
local curr = tonumber(redis.call('GET', curk) or 0)
local debt = tonumber(ARGV[4])
if debt > 0 then
  curr = redis.call('INCRBY', curk, debt)
  redis.call('PEXPIRE', curk, 2 * w + 1000)
end
local e = now - start
local limit = tonumber(ARGV[1])
local held = afr_held('afr:{held}:rpm', now, w, tonumber(ARGV[5]), tonumber(ARGV[6]))
local grant = 0
if held == 0 then
  grant = math.max(0, math.min(tonumber(ARGV[2]), afr_room(limit, w, prev, curr, e)))
end
if grant > 0 then
  curr = redis.call('INCRBY', curk, grant)
  redis.call('PEXPIRE', curk, 2 * w + 1000)
end
local epl = tonumber(ep) - tonumber(ep) % w + w - now
return {grant, prev, curr, e, tonumber(ep), epl, held}
"
);

/// One Redis call, run on a pool thread; the result is read back on the event loop.
pub(super) struct Call {
    pub(super) info: Arc<redis::ConnectionInfo>,
    /// `ca_file=`'s PEM, for a TLS connection.
    pub(super) ca: Option<Arc<Vec<u8>>>,
    pub(super) url: String,
    pub(super) timeout: Duration,
    /// `afr:{<hex of the hashed key id>}`; empty for a PING probe.
    pub(super) prefix: String,
    pub(super) digest: KeyDigest,
    pub(super) limit: u32,
    pub(super) want: u32,
    /// Local admissions of the key this call adds to Redis's count, and
    /// until when they are owed (`afr_core::outage`: their window's end).
    pub(super) debt: u32,
    pub(super) debt_until_ms: u64,
    /// What to hold should Redis answer (a probe of a node that lost it).
    pub(super) hold: Option<(u64, u64)>,
    pub(super) sent_ms: u64,
    pub(super) zone: *const ZoneCtx,
    pub(super) fleet: *const FleetConf,
    pub(super) result: Option<Result<[i64; 7], String>>,
}

thread_local! {
    /// A pool thread's Redis connection, reused across calls, with the
    /// configuration it was made for (a reload may point elsewhere).
    static CONN: RefCell<Option<(Arc<redis::ConnectionInfo>, redis::Connection)>> =
        const { RefCell::new(None) };
}

/// Runs on a pool thread: the blocking Redis call, bounded by the timeout.
pub(super) unsafe extern "C" fn run_call(data: *mut c_void, _log: *mut ngx_log_t) {
    // SAFETY: `data` is the `Call` in a TaskBox posted by `task::post`; only this
    // thread touches it until nginx posts the completion event.
    let call = unsafe { &mut *data.cast::<Call>() };
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        CONN.with_borrow_mut(|slot| exec(call, slot))
    }));
    call.result = Some(r.unwrap_or_else(|_| Err("panic in Redis call".to_owned())));
}

fn exec(
    call: &Call,
    slot: &mut Option<(Arc<redis::ConnectionInfo>, redis::Connection)>,
) -> Result<[i64; 7], String> {
    if slot
        .as_ref()
        .is_some_and(|(i, _)| !Arc::ptr_eq(i, &call.info))
    {
        *slot = None;
    }
    let reused = slot.is_some();
    // A call that ran in Redis but whose answer was lost (a timeout, a reset
    // after the script ran) is counted there and owed again here, and the
    // retry below may run a script that already ran: both count high, which
    // only under-admits (never over).
    match attempt(call, slot) {
        // A pooled connection Redis (or a firewall) closed meanwhile is no
        // outage: reconnect and try once more. A timeout is not retried: it
        // already took the whole bound.
        Err(e) if reused && (e.is_connection_dropped() || e.is_io_error()) && !e.is_timeout() => {
            attempt(call, slot).map_err(|e| named(&e))
        }
        r => r.map_err(|e| named(&e)),
    }
}

/// One call on the thread's connection (made if there is none). A failed
/// connection is dropped so the next call reconnects.
fn attempt(
    call: &Call,
    slot: &mut Option<(Arc<redis::ConnectionInfo>, redis::Connection)>,
) -> redis::RedisResult<[i64; 7]> {
    if slot.is_none() {
        let client = match &call.ca {
            Some(pem) => redis::Client::build_with_tls(
                (*call.info).clone(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.to_vec()),
                },
            )?,
            None => redis::Client::open((*call.info).clone())?,
        };
        let conn = client.get_connection_with_timeout(call.timeout)?;
        conn.set_read_timeout(Some(call.timeout))?;
        conn.set_write_timeout(Some(call.timeout))?;
        *slot = Some((call.info.clone(), conn));
    }
    let Some((_, conn)) = slot.as_mut() else {
        return Err(redis::RedisError::from((
            redis::ErrorKind::Io,
            "no connection",
        )));
    };
    // A probe runs the lease script itself, on a key of its own, asking for
    // one token: a Redis that answers PING but cannot run the script (out of
    // memory, a read-only replica, scripts disabled) is not back.
    let (prefix, limit, want) = if call.prefix.is_empty() {
        (PROBE_KEY, u32::MAX, 1)
    } else {
        (call.prefix.as_str(), call.limit, call.want)
    };
    let out = redis::Script::new(LEASE_SCRIPT)
        .key(prefix)
        .arg(limit)
        .arg(want)
        .arg(WINDOW_MS)
        .arg(call.debt)
        .arg(call.hold.map_or(0, |h| h.0))
        .arg(call.hold.map_or(0, |h| h.1))
        .invoke::<Vec<i64>>(conn)
        .and_then(|v| {
            <[i64; 7]>::try_from(v).map_err(|_| {
                redis::RedisError::from((
                    redis::ErrorKind::UnexpectedReturnType,
                    "lease script answered an unexpected shape",
                ))
            })
        });
    if out.is_err() {
        *slot = None;
    }
    out
}

/// The key the probe's lease script counts on (expires like any window).
const PROBE_KEY: &str = "afr:{probe}";

/// What a failed call says, named for an operator when Redis refused it
/// for a reason of its own.
fn named(e: &redis::RedisError) -> String {
    let text = e.to_string();
    let code = e.code().unwrap_or_default().to_ascii_uppercase();
    let why = match (e.kind(), code.as_str()) {
        (redis::ErrorKind::AuthenticationFailed, _) | (_, "NOAUTH" | "WRONGPASS") => {
            "authentication failed: check password_file="
        }
        (_, "READONLY") => "Redis is a read-only replica: point afr_fleet at the primary",
        (_, "OOM") => "Redis is out of memory (maxmemory): it refuses writes",
        (_, "NOSCRIPT") => "Redis does not run scripts",
        _ => return text,
    };
    format!("{why} ({text})")
}
