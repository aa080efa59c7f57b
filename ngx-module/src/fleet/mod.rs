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
//! (`suspend`: blocked as nginx's own thread-pool reads are, with a deadline
//! of `timeout` from its first suspension) and resumed when its key's refill
//! lands, when the worker turns local, or at its deadline on the local share.
//! A worker has at most [`MAX_CALLS_IN_FLIGHT`] calls in flight: past that, a
//! key without a token is decided on its local share at once, so a slow Redis
//! never piles calls up in the pool's queue.
//!
//! Fail-static: a refill that fails marks Redis down for this worker (the
//! node's first worker to turn local logs one error-log line for the node,
//! naming Redis's refusal if it refused: `afr_core::outage::Reach` in the
//! zone header); the worker then decides every fleet key on the local path
//! by `afr_core::outage`'s rules — the lease's tokens in the window Redis
//! went away in, the node's share (limit ÷ `nodes`) of each later window —
//! never waits on Redis, and probes it (the lease script on a key of its
//! own) at most once per [`PROBE_INTERVAL_MS`], from a request or its own
//! timer; the node's first worker back logs that global limits are back.
//! What a worker admits on a share is a debt, added to Redis's count with
//! the key's next call or by that timer once Redis answers; a probe that
//! Redis answers after a window boundary has the next windows held (no
//! grant to anyone, shares for every node), so a node back early is never
//! granted what another spent on its share and has not paid yet. A Redis
//! that lost its counters grants nothing until that window ends.
//! `$afr_fleet` says how each request was decided (`global`: from a lease;
//! `local`: on the local share).
//!
//! The files, each importing only the ones after it:
//!
//! - this one: the worker's state and decisions — the mode (global or local),
//!   refills, probes, debts, the tick, and the completion handler
//!   (`call_done`) that applies a call's result;
//! - [`task`]: the thread-task plumbing (posting a call to the pool, taking it
//!   back on completion);
//! - [`redis_io`]: what runs on a pool thread — the lease script, the
//!   thread's connection, one call;
//! - [`directive`]: the `afr_fleet` directive, parsed into a [`FleetConf`]
//!   (stored by `conf.rs`'s handler).

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};

use afr_core::fleet::{Grant, Path, Take};
use afr_core::ratelimit::{Verdict, WINDOW_MS};
use ngx::ffi::{
    ngx_add_timer, ngx_event_t, ngx_http_request_t, ngx_log_t, NGX_LOG_ERR, NGX_LOG_NOTICE,
};
use ngx::ngx_log_error;

use crate::clock;
use crate::suspend::{self, Found, Resumed};
use crate::zone::{key_digest, FleetTake, KeyDigest, ZoneCtx, ZoneFull};

mod directive;
mod redis_io;
mod task;

pub(crate) use directive::{parse, FleetConf};
use redis_io::Call;

/// While Redis is down, a worker tries it again at most this often.
const PROBE_INTERVAL_MS: u64 = 1_000;

/// Redis calls one worker may have posted to its thread pool and not yet
/// seen completed: key refills, debt payments and the probe together. A key
/// without a token past this is decided on its local share (a debt), as when
/// the pool refuses a task, instead of queueing one more call.
///
/// Twice nginx's default pool of 32 threads: 32 calls run while 32 wait at
/// most one call each for a thread, so a call posted ends within about two
/// call times — a few milliseconds on a healthy Redis, where a burst of new
/// keys rarely reaches the bound, and about two `timeout`s on one that is
/// slow but still answers, where without it every distinct key added a call
/// to the pool's queue (up to its `max_queue`, 65 536 by default), each
/// answered only after all those before it.
const MAX_CALLS_IN_FLIGHT: usize = 64;

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
    /// The worker's timer while it is local or owes Redis (see [`Tick`]).
    tick: Option<Box<Tick>>,
}

impl Worker {
    /// Whether one more call may be posted: fewer than
    /// [`MAX_CALLS_IN_FLIGHT`] are (one per key in `in_flight`, and the probe).
    fn has_room(&self) -> bool {
        self.in_flight.len() + usize::from(self.probing) < MAX_CALLS_IN_FLIGHT
    }
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

/// One key's uncounted local admissions, all of one Redis window.
#[derive(Clone, Copy)]
struct Debt {
    count: u32,
    /// The key's limit (Redis's answer is read against it).
    limit: u32,
    /// When their window ends (mono ms): past it they weigh on no decision
    /// in Redis's current window, and are dropped.
    until_ms: u64,
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
pub(crate) enum Decision {
    /// Decided now (admitted or not), from a lease or on the local share.
    Now(Verdict, Path),
    /// Suspended until the key's refill lands; the access handler is run again then.
    Suspended,
}

/// Decides one request of key `id` (limit `rpm`) on a fleet node; `found`
/// is what `suspend::take` said of it (a request resumed from a wait is
/// decided as the wait ended).
pub(crate) fn decide(
    fleet: &FleetConf,
    zone: &ZoneCtx,
    r: *mut ngx_http_request_t,
    (id, rpm): (&str, u32),
    found: Found,
    now_ms: u64,
) -> Result<Decision, ZoneFull> {
    let digest = key_digest(id.as_bytes());
    let decided_locally = |(v, owed): (Verdict, Option<u64>)| {
        if let Some(until_ms) = owed {
            owe_n(&digest, rpm, 1, until_ms);
            arm_tick(fleet, zone);
        }
        Decision::Now(v, Path::Local)
    };
    let local = || {
        let decided = zone.fleet_local(id.as_bytes(), rpm, fleet.nodes, now_ms)?;
        Ok(decided_locally(decided))
    };
    let since_ms = match found {
        Found::Waiting => return Ok(Decision::Suspended),
        Found::Resumed(Resumed::Local) => return local(),
        Found::Resumed(Resumed::Refilled { since_ms }) => since_ms,
        Found::Fresh => now_ms,
    };
    let mode = WORKER.with_borrow(|w| w.mode);
    if let Mode::Local { .. } = mode {
        probe(fleet, zone, now_ms);
        return local();
    }
    if WORKER.with_borrow(|w| !w.debts.is_empty()) {
        pay_debts(fleet, zone, now_ms);
    }
    let (take, refill_want) =
        match zone.fleet_take(id.as_bytes(), rpm, fleet.nodes, now_ms, fleet.refill_ms)? {
            FleetTake::Lease { take, refill } => (take, refill),
            FleetTake::Local(v, owed) => return Ok(decided_locally((v, owed))),
        };
    let posted = match refill_want {
        Some(want) => refill(fleet, zone, &digest, rpm, want, now_ms),
        None => true,
    };
    match take {
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
            if unsafe { suspend::park(r, digest, since_ms, deadline_ms - waited) } {
                Ok(Decision::Suspended)
            } else {
                local()
            }
        }
        // No room for one more call, or the pool refused the task: decide
        // like Redis is down.
        Take::Empty => local(),
    }
}

/// Posts a refill for `digest` unless one is in flight in this worker;
/// false when this worker has [`MAX_CALLS_IN_FLIGHT`] calls in flight or the
/// pool refused it.
fn refill(
    fleet: &FleetConf,
    zone: &ZoneCtx,
    digest: &KeyDigest,
    limit: u32,
    want: u32,
    now_ms: u64,
) -> bool {
    match WORKER.with_borrow(|w| (w.in_flight.contains(digest), w.has_room())) {
        (true, _) => return true,
        (false, false) => return false,
        (false, true) => {}
    }
    let debt = take_debt(digest, now_ms);
    let ok = task::post(
        key_call(fleet, zone, digest, limit, want, debt, now_ms),
        fleet.pool,
        call_done,
    );
    if ok {
        WORKER.with_borrow_mut(|w| w.in_flight.insert(*digest));
    } else if let Some(d) = debt {
        owe_n(digest, limit, d.count, d.until_ms);
        arm_tick(fleet, zone);
    }
    ok
}

/// The lease script's call for key `digest`, paying `debt`.
fn key_call(
    fleet: &FleetConf,
    zone: &ZoneCtx,
    digest: &KeyDigest,
    limit: u32,
    want: u32,
    debt: Option<Debt>,
    now_ms: u64,
) -> Call {
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    Call {
        info: fleet.info.clone(),
        ca: fleet.ca.clone(),
        url: fleet.url.clone(),
        timeout: fleet.timeout,
        prefix: format!("afr:{{{hex}}}"),
        digest: *digest,
        limit,
        want,
        debt: debt.map_or(0, |d| d.count),
        debt_until_ms: debt.map_or(0, |d| d.until_ms),
        hold: None,
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
    let now_ms = clock::mono_ms();
    let (local, owes) = WORKER.with_borrow(|w| (w.mode != Mode::Global, !w.debts.is_empty()));
    if local {
        // The node's loss of Redis stands while a worker is local.
        zone.fleet_reach(|r| r.still_local(now_ms));
        probe(fleet, zone, now_ms);
    } else if owes {
        pay_debts(fleet, zone, now_ms);
    }
    if local || owes {
        arm_tick(fleet, zone);
    }
}

/// Counts `n` admissions of key `digest` (limit `limit`) made on its
/// local share in the window that ends at `until_ms`, for Redis to count
/// when it answers. A debt of an earlier window is dropped: it weighs on
/// nothing Redis decides now.
fn owe_n(digest: &KeyDigest, limit: u32, n: u32, until_ms: u64) {
    WORKER.with_borrow_mut(|w| {
        let d = w.debts.entry(*digest).or_insert(Debt {
            count: 0,
            limit,
            until_ms,
        });
        if until_ms > d.until_ms {
            (d.count, d.until_ms) = (0, until_ms);
        }
        if until_ms == d.until_ms {
            d.count = d.count.saturating_add(n);
        }
        d.limit = limit;
    });
}

/// Takes key `digest`'s debt to send it, unless its window is over.
fn take_debt(digest: &KeyDigest, now_ms: u64) -> Option<Debt> {
    WORKER
        .with_borrow_mut(|w| w.debts.remove(digest))
        .filter(|d| now_ms < d.until_ms)
}

/// Redis answers again: sends every debt of this worker (one call per key,
/// asking no tokens), so what was admitted locally is counted before
/// anything more is granted — as many as [`MAX_CALLS_IN_FLIGHT`] leaves room
/// for; the tick sends the rest.
fn pay_debts(fleet: &FleetConf, zone: &ZoneCtx, now_ms: u64) {
    let digests: Vec<KeyDigest> = WORKER.with_borrow(|w| {
        if !w.has_room() {
            return Vec::new();
        }
        w.debts
            .keys()
            .filter(|d| !w.in_flight.contains(*d))
            .copied()
            .collect()
    });
    for digest in digests {
        if !WORKER.with_borrow(Worker::has_room) {
            arm_tick(fleet, zone);
            return;
        }
        let Some(debt) = take_debt(&digest, now_ms) else {
            continue;
        };
        let call = key_call(fleet, zone, &digest, debt.limit, 0, Some(debt), now_ms);
        if task::post(call, fleet.pool, call_done) {
            WORKER.with_borrow_mut(|w| w.in_flight.insert(digest));
        } else {
            owe_n(&digest, debt.limit, debt.count, debt.until_ms);
            arm_tick(fleet, zone);
            return;
        }
    }
}

/// Probes Redis, at most once per [`PROBE_INTERVAL_MS`] (the interval
/// counted from the last probe, or from when a lost Redis's window ends),
/// and not while the worker has [`MAX_CALLS_IN_FLIGHT`] calls in flight (the
/// next interval tries again; any of those calls that succeeds is an answer).
fn probe(fleet: &FleetConf, zone: &ZoneCtx, now_ms: u64) {
    let busy = WORKER.with_borrow_mut(|w| {
        if let Mode::Local { probed_ms } = &mut w.mode {
            if now_ms < probed_ms.saturating_add(PROBE_INTERVAL_MS) {
                return true;
            }
            *probed_ms = now_ms;
        }
        if w.probing || !w.has_room() {
            return true;
        }
        w.probing = true;
        false
    });
    if busy {
        return;
    }
    let ok = task::post(
        Call {
            info: fleet.info.clone(),
            ca: fleet.ca.clone(),
            url: fleet.url.clone(),
            timeout: fleet.timeout,
            prefix: String::new(),
            digest: [0; 16],
            limit: 0,
            want: 0,
            debt: 0,
            debt_until_ms: 0,
            hold: zone.fleet_reach(|r| r.hold_request(now_ms)).flatten(),
            sent_ms: now_ms,
            zone,
            fleet,
            result: None,
        },
        fleet.pool,
        call_done,
    );
    if !ok {
        WORKER.with_borrow_mut(|w| w.probing = false);
    }
}

/// Completion, on the worker's event loop: apply the grant, switch modes, resume waiters.
unsafe extern "C" fn call_done(ev: *mut ngx_event_t) {
    // SAFETY: nginx runs this handler once, for the completion event of a
    // task that `task::post` made with it.
    let call = unsafe { task::finish(ev) };
    let now_ms = clock::mono_ms();
    // SAFETY: the zone context lives in the configuration pool of this
    // worker's cycle, which outlives every task the worker posted.
    let zone = unsafe { &*call.zone };
    let log = ngx::log::ngx_cycle_log().as_ptr();
    let ok = match &call.result {
        Some(Ok(c)) => {
            read_answer(zone, &call, c, now_ms, log);
            true
        }
        Some(Err(e)) => {
            go_local(zone, now_ms, log, &call.url, Some(e));
            false
        }
        None => {
            go_local(zone, now_ms, log, &call.url, Some("the call did not run"));
            false
        }
    };
    // SAFETY: as the zone: the configuration outlives the worker's tasks.
    let fleet = unsafe { &*call.fleet };
    if call.prefix.is_empty() {
        WORKER.with_borrow_mut(|w| w.probing = false);
    } else {
        WORKER.with_borrow_mut(|w| w.in_flight.remove(&call.digest));
        if !ok && call.debt > 0 {
            // Not counted: owed again, sent when Redis answers.
            owe_n(&call.digest, call.limit, call.debt, call.debt_until_ms);
        }
    }
    if ok {
        answered(zone, now_ms, log, &call.url);
        if WORKER.with_borrow(|w| !w.debts.is_empty()) {
            pay_debts(fleet, zone, now_ms);
        }
    } else {
        // Local now: the tick probes Redis and pays what is owed once it
        // answers, whether or not a request comes to this worker again.
        arm_tick(fleet, zone);
    }
    if call.prefix.is_empty() {
        return;
    }
    if ok {
        suspend::refilled(&call.digest, true);
    } else {
        // This worker is local now: no waiter of any key is left waiting
        // for a refill that would fail the same way.
        suspend::all_local();
    }
}

/// Reads what the lease script answered (`c`, see `redis_io`): Redis's
/// window boundaries, whether it lost the counters this node counted in
/// (`afr_core::outage`, rule 4: no grant until that window ends; the
/// node's first worker to see it says so, once per epoch) or holds this
/// window (rule 3), and otherwise the key's grant.
fn read_answer(zone: &ZoneCtx, call: &Call, c: &[i64; 7], now_ms: u64, log: *mut ngx_log_t) {
    let left = WINDOW_MS - (c[3].max(0) as u64).min(WINDOW_MS - 1);
    let lost = zone.fleet_lost_counters(c[4], c[5]);
    let held = c[6] == 1;
    zone.fleet_reach(|r| {
        r.align(call.sent_ms, now_ms, left);
        if lost.is_some() {
            r.recount(now_ms + (c[5].max(0) as u64).min(WINDOW_MS));
        }
        if held {
            r.held(now_ms, left);
        }
    });
    if lost.is_some() {
        // What this worker owed was owed to the Redis that is gone.
        WORKER.with_borrow_mut(|w| w.debts.clear());
    }
    if lost == Some(true) {
        ngx_log_error!(
            NGX_LOG_ERR,
            log,
            "afr_fleet: Redis {} lost its counters (restarted without persistence or failed \
             over); until the window they were lost in ends, each key spends only what was \
             counted before",
            call.url
        );
    }
    if lost.is_none() && !held && !call.prefix.is_empty() {
        let n = |x: i64| u32::try_from(x.max(0)).unwrap_or(u32::MAX);
        let g = Grant::from_counts(call.limit, n(c[0]), n(c[1]), n(c[2]), c[3].max(0) as u64);
        zone.fleet_apply(&call.digest, &g, call.sent_ms, now_ms);
    }
}

/// This worker turns local, unless it is. The node's first worker to turn
/// local logs that Redis is unreachable (`why`; `None`: the caller logs its
/// own line); the others do so silently.
fn go_local(zone: &ZoneCtx, now_ms: u64, log: *mut ngx_log_t, url: &str, why: Option<&str>) {
    let changed = WORKER.with_borrow_mut(|w| {
        let was_global = w.mode == Mode::Global;
        if was_global {
            w.mode = Mode::Local { probed_ms: now_ms };
        }
        was_global
    });
    if !changed {
        return;
    }
    let wall = clock::now();
    let first = zone
        .fleet_reach(|r| {
            r.align_to_wall(wall.mono_ms, wall.unix_ms);
            r.went_local(now_ms)
        })
        .unwrap_or(true);
    if let (true, Some(why)) = (first, why) {
        log_unreachable(log, url, why);
    }
}

/// Redis answered this worker: it is global (again). The node's first
/// worker back logs that global limits are back (see
/// `afr_core::outage::Reach::answered`).
fn answered(zone: &ZoneCtx, now_ms: u64, log: *mut ngx_log_t, url: &str) {
    let was_local =
        WORKER.with_borrow_mut(|w| std::mem::replace(&mut w.mode, Mode::Global) != Mode::Global);
    if zone
        .fleet_reach(|r| r.answered(was_local, now_ms))
        .unwrap_or(was_local)
    {
        ngx_log_error!(
            NGX_LOG_NOTICE,
            log,
            "afr_fleet: Redis {url} is reachable again, global limits are back"
        );
    }
}

fn log_unreachable(log: *mut ngx_log_t, url: &str, why: &str) {
    ngx_log_error!(
        NGX_LOG_ERR,
        log,
        "afr_fleet: Redis {url} unreachable ({why}); each key is limited to its local share \
         (limit / nodes) until it is back"
    );
}
