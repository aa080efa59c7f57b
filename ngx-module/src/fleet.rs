//! `afr_fleet`: one exact per-key limit across nginx nodes, shared through Redis.
//!
//! ```nginx
//! afr_fleet redis://10.0.0.5:6379/0 nodes=3 [timeout=200ms] [password_file=/etc/afr/redis.pass]
//!           [thread_pool=default];
//! ```
//!
//! The access phase never talks to Redis. Admissions are spent from a lease
//! held in the key's zone slot (`afr_core::fleet`); leases are refilled by a
//! task on an nginx thread pool (`ngx_thread_task_post`): the pool thread
//! runs the Redis script with connect, read and write timeouts, and nginx
//! calls the task's completion handler back on the worker's event loop, which
//! writes the grant into shared memory. A refill is asked for ahead of need
//! (half the last chunk spent); a request that finds no token is suspended
//! (`r->main->blocked`, as nginx's own thread-pool reads do) and resumed when
//! its key's refill lands, so it waits at most the Redis timeout.
//!
//! Fail-static: a refill that fails marks Redis down for this worker (one
//! error-log line); the worker then decides every fleet key from the local
//! window with the key's local share (limit ÷ `nodes`), never waits on Redis,
//! and probes it at most once per [`PROBE_INTERVAL_MS`] (one PING piggybacked
//! on a request); the first success logs that global limits are back.
//! `$afr_fleet` says how each request was decided (`global`: from a lease;
//! `local`: on the local share).

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::ffi::{c_char, c_void};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use afr_core::fleet::{local_share, Grant, Path, Take};
use afr_core::ratelimit::{Verdict, WINDOW_MS};
use ngx::core::{NGX_CONF_ERROR, NGX_CONF_OK};
use ngx::ffi::{
    ngx_add_timer, ngx_command_t, ngx_conf_full_name, ngx_conf_t, ngx_event_t, ngx_http_request_t,
    ngx_log_t, ngx_parse_time, ngx_str_t, ngx_thread_pool_add, ngx_thread_pool_t,
    ngx_thread_task_post, ngx_thread_task_t, NGX_LOG_EMERG, NGX_LOG_ERR, NGX_LOG_NOTICE, NGX_OK,
};
use ngx::{ngx_conf_log_error, ngx_log_error};

use crate::conf::MainConf;
use crate::suspend::{self, Found, Resumed};
use crate::zone::{key_digest, KeyDigest, ZoneCtx, ZoneFull};

/// While Redis is down, a worker tries it again at most this often.
pub const PROBE_INTERVAL_MS: u64 = 1_000;

/// The thread pool used without `thread_pool=`.
static DEFAULT_POOL: &str = "default";

/// Default Redis timeout (connect, and each read and write).
const DEFAULT_TIMEOUT_MS: u64 = 200;

/// The lease script: tokens for one key, capped by the sliding-window rule of
/// `afr_core::ratelimit` on Redis's own clock (one clock for every node).
/// KEYS[1] is the key's prefix `afr:{<hashed id>}`; the window counters are
/// `<prefix>:<window start ms>`, each expiring after two windows.
/// ARGV: limit, tokens wanted, window length (ms), debt (admissions the
/// node made on its local share that Redis has not counted: counted first,
/// in the current window, unconditionally — they were already admitted).
/// Returns {granted, previous window's count, current window's count, ms into it}.
const LEASE_SCRIPT: &str = r"
local t = redis.call('TIME')
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
local avail = math.floor((limit * w - prev * (w - e) - curr * w) / w)
local grant = math.max(0, math.min(tonumber(ARGV[2]), avail))
if grant > 0 then
  curr = redis.call('INCRBY', curk, grant)
  redis.call('PEXPIRE', curk, 2 * w + 1000)
end
return {grant, prev, curr, e}
";

/// The parsed `afr_fleet` directive.
pub struct FleetConf {
    /// Where Redis is, with the password from `password_file`.
    info: Arc<redis::ConnectionInfo>,
    /// The URL as written, for log lines (passwords never appear in it:
    /// `password_file` is the only way to give one).
    url: String,
    /// How long a refill may take (connect + call), for not sending another meanwhile.
    refill_ms: u64,
    /// Nodes in the fleet: the local share while Redis is down is limit ÷ nodes.
    pub nodes: u32,
    timeout: Duration,
    pool: *mut ngx_thread_pool_t,
}

/// The `afr_fleet` directive handler.
pub extern "C" fn set_fleet(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: `conf` is this module's main conf (NGX_HTTP_MAIN_CONF_OFFSET).
    let mcf = unsafe { &mut *conf.cast::<MainConf>() };
    if mcf.fleet.is_some() {
        return emerg(cf, "\"afr_fleet\" directive is duplicate");
    }
    match parse(cf) {
        Ok(f) => {
            mcf.fleet = Some(f);
            NGX_CONF_OK
        }
        Err(msg) => emerg(cf, &msg),
    }
}

fn emerg(cf: *mut ngx_conf_t, msg: &str) -> *mut c_char {
    ngx_conf_log_error!(NGX_LOG_EMERG, cf, "{msg}");
    NGX_CONF_ERROR
}

fn parse(cf: *mut ngx_conf_t) -> Result<FleetConf, String> {
    // SAFETY: nginx checked the argument count (1MORE) before calling the handler.
    let args = unsafe { (*(*cf).args).as_slice::<ngx_str_t>() };
    let text = |s: &ngx_str_t| -> Result<String, String> {
        std::str::from_utf8(s.as_bytes())
            .map(str::to_owned)
            .map_err(|_| "\"afr_fleet\" value is not valid UTF-8".to_owned())
    };
    let url = text(&args[1])?;
    if !url.starts_with("redis://") {
        return Err(format!(
            "invalid URL \"{url}\" in \"afr_fleet\" directive, expected redis://host:port[/db]"
        ));
    }
    let mut info: redis::ConnectionInfo =
        redis::IntoConnectionInfo::into_connection_info(url.as_str())
            .map_err(|e| format!("invalid URL \"{url}\" in \"afr_fleet\" directive: {e}"))?;
    if info.redis_settings().password().is_some() {
        return Err(format!(
            "\"afr_fleet\" URL \"{url}\" holds a password: use password_file= so it stays out of the configuration"
        ));
    }
    let (mut nodes, mut timeout, mut pool_name) = (None, DEFAULT_TIMEOUT_MS, None);
    for a in &args[2..] {
        let a_text = text(a)?;
        let (name, value) = a_text
            .split_once('=')
            .ok_or_else(|| format!("invalid parameter \"{a_text}\" in \"afr_fleet\" directive"))?;
        match name {
            "nodes" => {
                let n: u32 = value.parse().ok().filter(|&n| n >= 1).ok_or_else(|| {
                    format!("invalid \"nodes\" value \"{value}\" in \"afr_fleet\" directive, it must be a whole number of at least 1")
                })?;
                nodes = Some(n);
            }
            "timeout" => {
                let mut s = ngx_str_t {
                    len: value.len(),
                    data: value.as_ptr().cast_mut(),
                };
                // SAFETY: `s` points into `a_text`, alive for the call; nginx only reads it.
                let ms = unsafe { ngx_parse_time(&mut s, 0) };
                if ms <= 0 {
                    return Err(format!(
                        "invalid \"timeout\" value \"{value}\" in \"afr_fleet\" directive"
                    ));
                }
                timeout = ms as u64;
            }
            "password_file" => {
                let path = full_path(cf, value)?;
                let pass = std::fs::read_to_string(&path).map_err(|e| {
                    format!(
                        "\"afr_fleet\" password_file \"{}\" cannot be read: {e}",
                        path.display()
                    )
                })?;
                let pass = pass.trim_end_matches(['\r', '\n']);
                if pass.is_empty() {
                    return Err(format!(
                        "\"afr_fleet\" password_file \"{}\" is empty",
                        path.display()
                    ));
                }
                let settings = info.redis_settings().clone().set_password(pass);
                info = info.set_redis_settings(settings);
            }
            "thread_pool" if !value.is_empty() => {
                // SAFETY: the value is the tail of the argument `a`, in the cycle pool.
                pool_name = Some(ngx_str_t {
                    len: value.len(),
                    data: unsafe { a.data.add(a.len - value.len()) },
                });
            }
            _ => {
                return Err(format!(
                    "invalid parameter \"{a_text}\" in \"afr_fleet\" directive"
                ))
            }
        }
    }
    let nodes = nodes.ok_or_else(|| {
        "\"afr_fleet\" directive needs nodes=N (how many nodes share the limits; \
         each keeps limit/N while Redis is down)"
            .to_owned()
    })?;
    // `thread_pool=` names a `thread_pool` block; without it nginx's "default"
    // pool (32 threads) is made for us, as `aio threads` does. nginx keeps
    // the name's pointer: it points into the directive's argument, which
    // lives in the cycle pool, or at a static.
    let mut name = pool_name.unwrap_or(ngx_str_t {
        len: DEFAULT_POOL.len(),
        data: DEFAULT_POOL.as_ptr().cast_mut(),
    });
    // SAFETY: `cf` is the configuration being parsed; `name` outlives the cycle.
    let pool = unsafe { ngx_thread_pool_add(cf, &mut name) };
    if pool.is_null() {
        return Err(format!("\"afr_fleet\" cannot use thread pool \"{name}\""));
    }
    Ok(FleetConf {
        info: Arc::new(info),
        url,
        refill_ms: 3 * timeout,
        nodes,
        timeout: Duration::from_millis(timeout),
        pool,
    })
}

fn full_path(cf: *mut ngx_conf_t, value: &str) -> Result<PathBuf, String> {
    let mut s = ngx_str_t {
        len: value.len(),
        data: value.as_ptr().cast_mut(),
    };
    // SAFETY: `cf->cycle` is valid while parsing; nginx allocates the full
    // name in the cycle pool and leaves `value` untouched.
    if unsafe { ngx_conf_full_name((*cf).cycle, &mut s, 1) } != NGX_OK as isize {
        return Err(format!(
            "\"afr_fleet\" password_file \"{value}\" is not a valid path"
        ));
    }
    Ok(PathBuf::from(
        String::from_utf8_lossy(s.as_bytes()).into_owned(),
    ))
}

/// Which path decides this worker's fleet keys.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Global,
    /// Redis failed; the last probe was sent at this time (mono ms).
    Local {
        probed_ms: u64,
    },
}

/// This worker's view of the fleet: one event-loop thread, so a thread-local.
struct Worker {
    mode: Mode,
    /// Keys with a refill in flight (their waiters are `suspend`'s).
    in_flight: HashSet<KeyDigest>,
    /// Admissions this worker made on keys' local shares that Redis has not
    /// counted yet: sent with the key's next refill, or all at once when
    /// Redis answers again, so Redis back mid-window never grants again
    /// what was already spent.
    debts: HashMap<KeyDigest, Debt>,
    probing: bool,
    /// The worker's timer while it is local or owes Redis (see [`tick`]).
    tick: Option<Box<Tick>>,
}

/// A timer of one worker: while it is local it probes Redis once a
/// [`PROBE_INTERVAL_MS`] without waiting for a request, and once Redis
/// answers it pays the worker's debts — so what a worker admitted locally
/// reaches Redis even if no request of the key comes to that worker again.
struct Tick {
    ev: ngx_event_t,
    fleet: *const FleetConf,
    zone: *const ZoneCtx,
}

/// One key's uncounted local admissions.
#[derive(Clone, Copy)]
struct Debt {
    count: u32,
    /// The key's limit (Redis's answer is read against it).
    limit: u32,
    /// When the last of them was admitted (mono ms): a debt a whole window
    /// old weighs on no decision any more and is dropped.
    last_ms: u64,
}

thread_local! {
    static WORKER: RefCell<Worker> = RefCell::new(Worker {
        mode: Mode::Global,
        in_flight: HashSet::new(),
        debts: HashMap::new(),
        probing: false,
        tick: None,
    });
}

/// What the fleet path decided for one request.
pub enum Decision {
    /// Decided now (admitted or not), from a lease or on the local share.
    Now(Verdict, Path),
    /// Suspended until the key's refill lands; the access handler is run again then.
    Suspended,
}

/// Decides one request of key `id` (limit `rpm`) on a fleet node; `found`
/// is what `suspend::take` said of it (a request resumed from a wait is
/// decided as the wait ended).
pub fn decide(
    fleet: &FleetConf,
    zone: &ZoneCtx,
    r: *mut ngx_http_request_t,
    (id, rpm): (&str, u32),
    found: Found,
    now_ms: u64,
) -> Result<Decision, ZoneFull> {
    let digest = key_digest(id.as_bytes());
    let local = || {
        let v = zone.hit(id.as_bytes(), local_share(rpm, fleet.nodes), now_ms)?;
        if v.admitted {
            owe(&digest, rpm, now_ms);
            arm_tick(fleet, zone);
        }
        Ok(Decision::Now(v, Path::Local))
    };
    let since_ms = match found {
        Found::Waiting => return Ok(Decision::Suspended),
        Found::Resumed(Resumed::Local) => return local(),
        Found::Resumed(Resumed::Refilled { since_ms }) => since_ms,
        Found::Fresh => now_ms,
    };
    let mode = WORKER.with_borrow(|w| w.mode);
    if let Mode::Local { probed_ms } = mode {
        if now_ms.saturating_sub(probed_ms) >= PROBE_INTERVAL_MS {
            probe(fleet, zone, now_ms);
        }
        return local();
    }
    if WORKER.with_borrow(|w| !w.debts.is_empty()) {
        pay_debts(fleet, zone, now_ms);
    }
    let t = zone.fleet_take(id.as_bytes(), rpm, fleet.nodes, now_ms, fleet.refill_ms)?;
    let posted = match t.refill {
        Some(want) => refill(fleet, zone, &digest, rpm, want, now_ms),
        None => true,
    };
    match t.take {
        Take::Admit(v) | Take::Deny(v) => Ok(Decision::Now(v, Path::Global)),
        Take::Empty if posted => {
            // No request waits past the timeout from its first suspension.
            let waited = now_ms.saturating_sub(since_ms);
            let deadline_ms = fleet.timeout.as_millis() as u64;
            if waited >= deadline_ms {
                return local();
            }
            // SAFETY: `r` is a valid main request in the access phase, not
            // suspended (`found` was not `Waiting`).
            unsafe { suspend::park(r, digest, since_ms, deadline_ms - waited) };
            Ok(Decision::Suspended)
        }
        // The pool refused the task: decide like Redis is down.
        Take::Empty => local(),
    }
}

/// One Redis call, run on a pool thread; the result is read back on the event loop.
struct Call {
    info: Arc<redis::ConnectionInfo>,
    url: String,
    timeout: Duration,
    /// `afr:{<hex of the hashed key id>}`; empty for a PING probe.
    prefix: String,
    digest: KeyDigest,
    limit: u32,
    want: u32,
    /// Local admissions of the key this call adds to Redis's count.
    debt: u32,
    sent_ms: u64,
    zone: *const ZoneCtx,
    fleet: *const FleetConf,
    result: Option<Result<[i64; 4], String>>,
}

/// The task and its call in one allocation, freed by the completion handler.
#[repr(C)]
struct TaskBox {
    task: ngx_thread_task_t,
    call: Call,
}

/// Posts a refill for `digest` unless one is in flight in this worker;
/// false when the pool refused it.
fn refill(
    fleet: &FleetConf,
    zone: &ZoneCtx,
    digest: &KeyDigest,
    limit: u32,
    want: u32,
    now_ms: u64,
) -> bool {
    if WORKER.with_borrow(|w| w.in_flight.contains(digest)) {
        return true;
    }
    let debt = take_debt(digest, now_ms).map_or(0, |d| d.count);
    let ok = post(
        key_call(fleet, zone, digest, limit, want, debt, now_ms),
        fleet.pool,
    );
    if ok {
        WORKER.with_borrow_mut(|w| w.in_flight.insert(*digest));
    } else if debt > 0 {
        owe_n(digest, limit, debt, now_ms);
    }
    ok
}

/// The lease script's call for key `digest`.
fn key_call(
    fleet: &FleetConf,
    zone: &ZoneCtx,
    digest: &KeyDigest,
    limit: u32,
    want: u32,
    debt: u32,
    now_ms: u64,
) -> Call {
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    Call {
        info: fleet.info.clone(),
        url: fleet.url.clone(),
        timeout: fleet.timeout,
        prefix: format!("afr:{{{hex}}}"),
        digest: *digest,
        limit,
        want,
        debt,
        sent_ms: now_ms,
        zone,
        fleet,
        result: None,
    }
}

/// Starts this worker's [`Tick`] unless it runs.
fn arm_tick(fleet: &FleetConf, zone: &ZoneCtx) {
    WORKER.with_borrow_mut(|w| {
        let tick = w.tick.get_or_insert_with(|| {
            // SAFETY: an all-zero event is what nginx's own timers start from
            // (ngx_pcalloc); handler, data and log are set below.
            let ev: ngx_event_t = unsafe { std::mem::zeroed() };
            Box::new(Tick { ev, fleet, zone })
        });
        tick.fleet = fleet;
        tick.zone = zone;
        if tick.ev.timer_set() != 0 {
            return;
        }
        let data: *mut Tick = &mut **tick;
        tick.ev.handler = Some(on_tick);
        tick.ev.data = data.cast();
        tick.ev.log = ngx::log::ngx_cycle_log().as_ptr();
        // A worker told to quit does not wait for it.
        tick.ev.set_cancelable(1);
        // SAFETY: the event lives in a Box owned by this worker's state
        // until the process exits; only this thread touches it.
        unsafe { ngx_add_timer(&mut tick.ev, PROBE_INTERVAL_MS as _) };
    });
}

unsafe extern "C" fn on_tick(ev: *mut ngx_event_t) {
    // SAFETY: `data` is the Tick that owns `ev` (see `arm_tick`); the
    // configuration and zone it points to live as long as this worker's
    // cycle, and a reload starts new workers with new ticks.
    let (fleet, zone) = unsafe {
        let tick = &*(*ev).data.cast::<Tick>();
        (&*tick.fleet, &*tick.zone)
    };
    let now_ms = crate::access::mono_ms();
    let (local, owes) = WORKER.with_borrow(|w| (w.mode != Mode::Global, !w.debts.is_empty()));
    if local {
        probe(fleet, zone, now_ms);
    } else if owes {
        pay_debts(fleet, zone, now_ms);
    }
    if local || owes {
        arm_tick(fleet, zone);
    }
}

/// Counts one admission of key `digest` (limit `limit`) made on its local
/// share, for Redis to count when it answers again.
fn owe(digest: &KeyDigest, limit: u32, now_ms: u64) {
    owe_n(digest, limit, 1, now_ms);
}

fn owe_n(digest: &KeyDigest, limit: u32, n: u32, now_ms: u64) {
    WORKER.with_borrow_mut(|w| {
        let d = w.debts.entry(*digest).or_insert(Debt {
            count: 0,
            limit,
            last_ms: now_ms,
        });
        d.count = d.count.saturating_add(n);
        d.limit = limit;
        d.last_ms = d.last_ms.max(now_ms);
    });
}

/// Takes key `digest`'s debt to send it, unless it is a window old.
fn take_debt(digest: &KeyDigest, now_ms: u64) -> Option<Debt> {
    WORKER
        .with_borrow_mut(|w| w.debts.remove(digest))
        .filter(|d| now_ms.saturating_sub(d.last_ms) < WINDOW_MS)
}

/// Redis answers again: sends every debt of this worker (one call per key,
/// asking no tokens), so what was admitted locally is counted before
/// anything more is granted.
fn pay_debts(fleet: &FleetConf, zone: &ZoneCtx, now_ms: u64) {
    let digests: Vec<KeyDigest> = WORKER.with_borrow(|w| {
        w.debts
            .keys()
            .filter(|d| !w.in_flight.contains(*d))
            .copied()
            .collect()
    });
    for digest in digests {
        let Some(debt) = take_debt(&digest, now_ms) else {
            continue;
        };
        let call = key_call(fleet, zone, &digest, debt.limit, 0, debt.count, now_ms);
        if post(call, fleet.pool) {
            WORKER.with_borrow_mut(|w| w.in_flight.insert(digest));
        } else {
            owe_n(&digest, debt.limit, debt.count, now_ms);
            return;
        }
    }
}

fn probe(fleet: &FleetConf, zone: &ZoneCtx, now_ms: u64) {
    let busy = WORKER.with_borrow_mut(|w| {
        if let Mode::Local { probed_ms } = &mut w.mode {
            *probed_ms = now_ms;
        }
        std::mem::replace(&mut w.probing, true)
    });
    if busy {
        return;
    }
    let ok = post(
        Call {
            info: fleet.info.clone(),
            url: fleet.url.clone(),
            timeout: fleet.timeout,
            prefix: String::new(),
            digest: [0; 16],
            limit: 0,
            want: 0,
            debt: 0,
            sent_ms: now_ms,
            zone,
            fleet,
            result: None,
        },
        fleet.pool,
    );
    if !ok {
        WORKER.with_borrow_mut(|w| w.probing = false);
    }
}

fn post(call: Call, pool: *mut ngx_thread_pool_t) -> bool {
    // SAFETY: an all-zero ngx_thread_task_t is what ngx_thread_task_alloc
    // returns (it pcallocs); nginx fills `id` and the event's state on post.
    let mut task: ngx_thread_task_t = unsafe { std::mem::zeroed() };
    task.handler = Some(run_call);
    task.event.handler = Some(call_done);
    let b = Box::into_raw(Box::new(TaskBox { task, call }));
    // SAFETY: `b` is a fresh, uniquely owned allocation; it stays alive until
    // `call_done` (or the error branch below) frees it.
    unsafe {
        (*b).task.ctx = (&raw mut (*b).call).cast();
        (*b).task.event.data = b.cast();
        if ngx_thread_task_post(pool, &raw mut (*b).task) != NGX_OK as isize {
            drop(Box::from_raw(b));
            return false;
        }
    }
    true
}

thread_local! {
    /// A pool thread's Redis connection, reused across calls, with the
    /// configuration it was made for (a reload may point elsewhere).
    static CONN: RefCell<Option<(Arc<redis::ConnectionInfo>, redis::Connection)>> =
        const { RefCell::new(None) };
}

/// Runs on a pool thread: the blocking Redis call, bounded by the timeout.
unsafe extern "C" fn run_call(data: *mut c_void, _log: *mut ngx_log_t) {
    // SAFETY: `data` is the `Call` in a TaskBox posted by `post`; only this
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
) -> Result<[i64; 4], String> {
    if slot
        .as_ref()
        .is_some_and(|(i, _)| !Arc::ptr_eq(i, &call.info))
    {
        *slot = None;
    }
    let reused = slot.is_some();
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
) -> redis::RedisResult<[i64; 4]> {
    if slot.is_none() {
        let client = redis::Client::open((*call.info).clone())?;
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
        .invoke::<Vec<i64>>(conn)
        .and_then(|v| {
            <[i64; 4]>::try_from(v).map_err(|_| {
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

/// Completion, on the worker's event loop: apply the grant, switch modes, resume waiters.
unsafe extern "C" fn call_done(ev: *mut ngx_event_t) {
    // SAFETY: `data` is the TaskBox made by `post`; the pool is done with it.
    let b = unsafe { Box::from_raw((*ev).data.cast::<TaskBox>()) };
    let call = &b.call;
    let now_ms = crate::access::mono_ms();
    // SAFETY: the zone context lives in the configuration pool of this
    // worker's cycle, which outlives every task the worker posted.
    let zone = unsafe { &*call.zone };
    let log = ngx::log::ngx_cycle_log().as_ptr();
    let ok = match &call.result {
        Some(Ok(c)) => {
            if !call.prefix.is_empty() {
                let n = |x: i64| u32::try_from(x.max(0)).unwrap_or(u32::MAX);
                let g =
                    Grant::from_counts(call.limit, n(c[0]), n(c[1]), n(c[2]), c[3].max(0) as u64);
                zone.fleet_apply(&call.digest, &g, call.sent_ms, now_ms);
            }
            true
        }
        Some(Err(e)) => {
            set_mode(false, now_ms, log, &call.url, e);
            false
        }
        None => {
            set_mode(false, now_ms, log, &call.url, "the call did not run");
            false
        }
    };
    if ok {
        set_mode(true, now_ms, log, &call.url, "");
        if WORKER.with_borrow(|w| !w.debts.is_empty()) {
            // SAFETY: as the zone: the configuration outlives the worker's tasks.
            pay_debts(unsafe { &*call.fleet }, zone, now_ms);
        }
    }
    if call.prefix.is_empty() {
        WORKER.with_borrow_mut(|w| w.probing = false);
        return;
    }
    WORKER.with_borrow_mut(|w| w.in_flight.remove(&call.digest));
    if !ok && call.debt > 0 {
        // Not counted: owed again, sent when Redis answers.
        owe_n(&call.digest, call.limit, call.debt, call.sent_ms);
    }
    if ok {
        suspend::refilled(&call.digest, true);
    } else {
        // This worker is local now: no waiter of any key is left waiting
        // for a refill that would fail the same way.
        suspend::all_local();
    }
}

fn set_mode(up: bool, now_ms: u64, log: *mut ngx_log_t, url: &str, why: &str) {
    let changed = WORKER.with_borrow_mut(|w| {
        let was_up = w.mode == Mode::Global;
        w.mode = if up {
            Mode::Global
        } else {
            Mode::Local {
                probed_ms: match w.mode {
                    Mode::Local { probed_ms } => probed_ms,
                    Mode::Global => now_ms,
                },
            }
        };
        was_up != up
    });
    if !changed {
        return;
    }
    if up {
        ngx_log_error!(
            NGX_LOG_NOTICE,
            log,
            "afr_fleet: Redis {url} is reachable again, global limits are back"
        );
    } else {
        ngx_log_error!(
            NGX_LOG_ERR,
            log,
            "afr_fleet: Redis {url} unreachable ({why}); each key is limited to its local share \
             (limit / nodes) until it is back"
        );
    }
}
