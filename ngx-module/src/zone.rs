//! The `afr_zone` shared memory: one [`RateWindow`] per key, shared by all
//! workers, so N workers enforce one limit.
//!
//! Modelled on nginx's `limit_req` (a hash lookup, an LRU queue, stale
//! counters dropped from the tail, reuse on reload), with one difference that
//! matters when the zone is full: every counter is a fixed-size [`Slot`] that
//! holds a digest of the key id, never the id itself. limit_req allocates a
//! node per key from the slab, sized by the key; with ids of different lengths
//! the LRU evictions free scattered chunks of one slab class while the new key
//! needs another, and the allocation still fails. Here the zone's memory is
//! one slab allocation made at start-up, cut into slots: evicting the least
//! recently used slot always frees room for any key, so a full zone keeps
//! limiting the keys in use and never answers 500.
//!
//! Capacity is fixed by the zone size: `(size − one page) / (size_of::<Slot>() + 4)`
//! slots (see README, "Zone size"). On `nginx -s reload` a zone of the same name
//! and size is handed back to [`init_zone`] and reused: counters survive. A
//! zone whose size changed starts afresh; `conf.rs` says so at NOTICE.
//!
//! To add per-key state, add a field to [`Slot`]: slots are zeroed when a key
//! is (re)assigned one, and capacity follows.
//!
//! A slot also counts the key's requests in flight (`max_concurrent`, like
//! `limit_conn`): [`ZoneCtx::admit`] takes a place under the same mutex as the
//! rate decision and hands back a [`Lease`], which the access handler gives
//! back from a request-pool cleanup. A slot with requests in flight is never
//! dropped as stale, and eviction from a full zone passes over it when it can
//! (see [`EVICT_SCAN`]), so a count is not lost while its requests run.

use std::ffi::c_void;
use std::mem::{align_of, size_of};
use std::ptr::{self, addr_of_mut};

use afr_core::concurrency::InFlight;
use afr_core::fleet::{Grant, Lease as FleetLease, Take};
use afr_core::outage::Reach as FleetReach;
use afr_core::ratelimit::{RateWindow, Verdict};
use ngx::core::Status;
use ngx::ffi::{
    ngx_int_t, ngx_pagesize, ngx_shm_zone_t, ngx_shmtx_lock, ngx_shmtx_unlock, ngx_slab_alloc,
    ngx_slab_pool_t, NGX_LOG_EMERG, NGX_LOG_NOTICE, NGX_LOG_WARN,
};
use ngx::ngx_log_error;
use sha2::{Digest, Sha256};

/// Ends a bucket chain, the free list and the LRU queue.
const NIL: u32 = u32::MAX;

/// How many slots from the LRU tail a full zone looks at for one without
/// requests in flight before it evicts the tail anyway (a zone of long-running
/// streams only): bounded, so a decision stays O(1).
const EVICT_SCAN: usize = 8;

/// At most one "zone is full" line per worker per this many milliseconds.
const FULL_LOG_INTERVAL_MS: u64 = 60_000;

/// The first 16 bytes of SHA-256(key id): what a slot stores instead of the id,
/// so every slot has the same size. 128 bits make a collision between two of a
/// zone's keys practically impossible (and the keys file is the operator's own).
pub type KeyDigest = [u8; 16];

/// The digest of a key id.
pub fn key_digest(id: &[u8]) -> KeyDigest {
    let full = Sha256::digest(id);
    let mut d = [0u8; 16];
    d.copy_from_slice(&full[..16]);
    d
}

/// Per-cycle handle on the zone (lives in the configuration pool).
pub struct ZoneCtx {
    name: String,
    sh: *mut Shared,
    pool: *mut ngx_slab_pool_t,
}

impl ZoneCtx {
    /// A handle for the zone `name`, bound to memory by [`init_zone`].
    pub fn new(name: String) -> Self {
        ZoneCtx {
            name,
            sh: ptr::null_mut(),
            pool: ptr::null_mut(),
        }
    }

    /// How many keys the zone holds at once (0 before [`init_zone`]).
    pub fn capacity(&self) -> u32 {
        // SAFETY: `sh` is null or the zone's header, whose `capacity` never changes.
        unsafe { self.sh.as_ref() }.map_or(0, |sh| sh.capacity)
    }
}

/// The zone's header, at the start of its one allocation; the bucket heads
/// (`capacity` × u32) and then the slots follow it.
#[repr(C)]
struct Shared {
    capacity: u32,
    /// Slots in use.
    len: u32,
    /// Head of the free slots (never-used ones are `len..capacity`, so this
    /// only holds slots freed as stale).
    free: u32,
    /// Most recently used slot.
    lru_head: u32,
    /// Least recently used slot: the one evicted next.
    lru_tail: u32,
    slots_offset: u32,
    /// When a "zone is full" line was last logged (any worker), and the
    /// evictions since: one line a minute for the whole zone.
    full_logged_ms: u64,
    evicted_unlogged: u64,
    /// Redis's epoch as this node last saw it (0: never), kept here rather
    /// than per worker so that a worker's first call after a Redis restart
    /// is compared with what the node counted in.
    fleet_epoch: i64,
    /// An epoch that was seen replacing another one: Redis lost its counters
    /// when it began, so every worker treats it as lost while its first
    /// window lasts.
    fleet_lost_epoch: i64,
    /// Whether the node has Redis, as its workers found: one log line per
    /// node when it loses Redis and one when it has it back.
    fleet_reach: FleetReach,
}

/// One key's counter. Fixed size: see the module docs.
#[repr(C)]
#[derive(Clone, Copy)]
struct Slot {
    digest: KeyDigest,
    window: RateWindow,
    /// The node's fleet lease on this key (`afr_fleet`; unused without it).
    lease: FleetLease,
    /// Next slot in the same bucket, or in the free list.
    next: u32,
    lru_prev: u32,
    lru_next: u32,
    /// Requests of the key in flight (counted only for keys with
    /// `max_concurrent`). Last: with the three `u32` above it fills what
    /// would otherwise be padding, so the slot stays 96 bytes.
    in_flight: InFlight,
}

/// Size of the zone's one allocation for `capacity` slots.
fn layout(capacity: u32) -> (usize, usize) {
    let buckets_end = size_of::<Shared>() + capacity as usize * size_of::<u32>();
    let slots_offset = buckets_end.next_multiple_of(align_of::<Slot>());
    (
        slots_offset,
        slots_offset + capacity as usize * size_of::<Slot>(),
    )
}

/// Zone initialisation, called by nginx in the master for each cycle.
pub extern "C" fn init_zone(zone: *mut ngx_shm_zone_t, old_data: *mut c_void) -> ngx_int_t {
    // SAFETY: nginx passes this cycle's zone, whose `data` is our ZoneCtx.
    let zone = unsafe { &mut *zone };
    // SAFETY: set by `afr_zone` to a ZoneCtx in the configuration pool.
    let ctx = unsafe { &mut *zone.data.cast::<ZoneCtx>() };
    if !old_data.is_null() {
        // SAFETY: `old_data` is the previous cycle's ZoneCtx, still alive during init.
        let old = unsafe { &*old_data.cast::<ZoneCtx>() };
        ctx.sh = old.sh;
        ctx.pool = old.pool;
        return Status::NGX_OK.into();
    }
    let pool = zone.shm.addr.cast::<ngx_slab_pool_t>();
    ctx.pool = pool;
    // SAFETY: the shared memory starts with the slab pool nginx initialised.
    let pool_ref = unsafe { &mut *pool };
    if zone.shm.exists != 0 {
        ctx.sh = pool_ref.data.cast();
        return Status::NGX_OK.into();
    }
    // The pages left in the pool, less one for nginx's own small allocations
    // (the zone's log context): the slots take the rest in one allocation.
    // SAFETY: ngx_pagesize is set once at start-up, before any configuration.
    let page = unsafe { ngx_pagesize };
    let pages = (pool_ref.end as usize).saturating_sub(pool_ref.start as usize) / page;
    let bytes = pages.saturating_sub(1) * page;
    let per_key = size_of::<Slot>() + size_of::<u32>();
    let mut capacity = (bytes.saturating_sub(size_of::<Shared>() + align_of::<Slot>()) / per_key)
        .min(NIL as usize - 1) as u32;
    let mut sh: *mut Shared = ptr::null_mut();
    // The page estimate can be off by the slab's own rounding: shrink until it fits.
    while capacity > 0 {
        // SAFETY: the pool is valid; ngx_slab_alloc takes the mutex itself.
        sh = unsafe { ngx_slab_alloc(pool, layout(capacity).1) }.cast();
        if !sh.is_null() {
            break;
        }
        capacity -= capacity / 64 + 1;
    }
    if sh.is_null() {
        ngx_log_error!(
            NGX_LOG_EMERG,
            zone.shm.log,
            "\"afr_zone\" zone \"{}\" is too small",
            ctx.name
        );
        return Status::NGX_ERROR.into();
    }
    let (slots_offset, _) = layout(capacity);
    // SAFETY: `sh` is a fresh allocation of `layout(capacity)` bytes.
    unsafe {
        sh.write(Shared {
            capacity,
            len: 0,
            free: NIL,
            lru_head: NIL,
            lru_tail: NIL,
            slots_offset: slots_offset as u32,
            full_logged_ms: 0,
            fleet_epoch: 0,
            fleet_lost_epoch: 0,
            fleet_reach: FleetReach::default(),
            evicted_unlogged: 0,
        });
        let buckets = sh.add(1).cast::<u32>();
        for i in 0..capacity as usize {
            buckets.add(i).write(NIL);
        }
        // Zeroed slots are valid `Slot`s, so `Table` may see them as a slice.
        ptr::write_bytes(
            sh.cast::<u8>().add(slots_offset),
            0,
            capacity as usize * size_of::<Slot>(),
        );
    }
    ctx.sh = sh;
    pool_ref.data = sh.cast();
    // The new cycle's log: its files are open by now, unlike `ngx_cycle`'s.
    ngx_log_error!(
        NGX_LOG_NOTICE,
        zone.shm.log,
        "afr_zone \"{}\" holds {} keys",
        ctx.name,
        capacity
    );
    Status::NGX_OK.into()
}

/// Holds the slab mutex; unlocks on drop.
struct Locked(*mut ngx_slab_pool_t);

impl Locked {
    fn new(pool: *mut ngx_slab_pool_t) -> Self {
        // SAFETY: `pool` is the zone's slab pool, whose mutex nginx created.
        unsafe { ngx_shmtx_lock(addr_of_mut!((*pool).mutex)) };
        Locked(pool)
    }
}

impl Drop for Locked {
    fn drop(&mut self) {
        // SAFETY: we hold the mutex taken in `new`.
        unsafe { ngx_shmtx_unlock(addr_of_mut!((*self.0).mutex)) };
    }
}

/// Why a request could not be counted: the zone was never initialised.
#[derive(Debug)]
pub struct ZoneFull;

/// What [`ZoneCtx::admit`] decided for one request.
#[derive(Clone, Copy, Debug)]
pub enum Decision {
    /// Counted against the key's rate window: admitted or not as the verdict
    /// says. An admitted request of a key with `max_concurrent` holds `lease`.
    Counted {
        /// The rate window's verdict.
        verdict: Verdict,
        /// The place in flight taken for it, to give back when it ends.
        lease: Option<Lease>,
    },
    /// All `limit` places in flight are taken; the request was not counted
    /// against its rate window (`verdict` says where that window stands).
    Busy {
        /// The rate window, peeked.
        verdict: Verdict,
        /// The key's `max_concurrent`.
        limit: u32,
    },
}

/// A place in flight held by one admitted request: [`Lease::release`] gives it
/// back. It names the key by digest, not by slot, so a slot reused meanwhile
/// for another key is never decremented.
#[derive(Clone, Copy, Debug)]
pub struct Lease {
    sh: *mut Shared,
    pool: *mut ngx_slab_pool_t,
    digest: KeyDigest,
}

impl Lease {
    /// Gives the place back (once: the caller's cleanup runs once).
    pub fn release(self) {
        let _guard = Locked::new(self.pool);
        // SAFETY: `sh` and `pool` are the zone this lease was taken from;
        // shared memory stays mapped in this worker for its whole life (a
        // reload reuses it, or the old mapping lives on in an old worker),
        // and we hold its mutex.
        let table = unsafe { Table::new(self.sh) };
        if let Some(i) = table.find(&self.digest) {
            table.slots[i as usize].in_flight.release();
        }
    }
}

impl ZoneCtx {
    /// Decides one request of key `id` at `now_ms`: first its places in
    /// flight (when it has `max_concurrent`), then its `limit` per minute —
    /// one step under the zone's mutex, so every worker sees the same counts.
    pub fn admit(
        &self,
        id: &[u8],
        limit: u32,
        max_concurrent: Option<u32>,
        now_ms: u64,
    ) -> Result<Decision, ZoneFull> {
        if self.sh.is_null() || self.pool.is_null() || self.capacity() == 0 {
            return Err(ZoneFull);
        }
        let digest = key_digest(id);
        let (decision, report) = {
            let _guard = Locked::new(self.pool);
            // SAFETY: under the mutex we have exclusive access to the zone.
            let mut table = unsafe { Table::new(self.sh) };
            let (i, evicted) = table.slot_for(&digest, now_ms);
            let slot = &mut table.slots[i as usize];
            let decision = match max_concurrent {
                Some(n) if !slot.in_flight.try_acquire(n) => Decision::Busy {
                    verdict: slot.window.peek(limit, now_ms),
                    limit: n,
                },
                held => {
                    let verdict = slot.window.hit(limit, now_ms);
                    let lease = match held {
                        Some(_) if !verdict.admitted => {
                            slot.in_flight.release();
                            None
                        }
                        Some(_) => Some(Lease {
                            sh: self.sh,
                            pool: self.pool,
                            digest,
                        }),
                        None => None,
                    };
                    Decision::Counted { verdict, lease }
                }
            };
            (
                decision,
                evicted.then(|| table.full_report(now_ms)).flatten(),
            )
        };
        if let Some(evicted) = report {
            ngx_log_error!(
                NGX_LOG_WARN,
                ngx::log::ngx_cycle_log().as_ptr(),
                "afr_zone \"{}\" is full ({} keys): evicted {} least recently used counter(s) \
                 since the last report; consider a larger zone",
                self.name,
                self.capacity(),
                evicted
            );
        }
        Ok(decision)
    }
}

/// The zone's memory seen as its header, buckets and slots; made only under
/// the slab mutex, so plain safe code from here on.
struct Table<'a> {
    sh: &'a mut Shared,
    buckets: &'a mut [u32],
    slots: &'a mut [Slot],
}

/// What the zone said about one request of a fleet-limited key.
pub enum FleetTake {
    /// The lease's answer, and the tokens to ask Redis for now (refill
    /// ahead of need, or the lease is empty), if any.
    Lease { take: Take, refill: Option<u32> },
    /// Decided on the local path though the worker has Redis: the window is
    /// held or Redis counts anew (`afr_core::outage`, rules 3 and 4). As
    /// [`ZoneCtx::fleet_local`]'s answer.
    Local(Verdict, Option<u64>),
}

impl Slot {
    /// `afr_core::outage`'s local decision on this slot's lease and window
    /// (which counts the key's admissions on Redis's windows, and keeps the
    /// slot from being evicted as stale while a share counts).
    fn take_local(
        &mut self,
        reach: &FleetReach,
        limit: u32,
        nodes: u32,
        now_ms: u64,
    ) -> (Verdict, Option<u64>) {
        self.lease
            .take_local(&mut self.window, reach, limit, nodes, now_ms)
    }
}

impl ZoneCtx {
    /// Decides one request of key `id` from this node's lease (see
    /// `afr_core::fleet`), or on the local path while the node keeps to it.
    /// An admission is also counted in the key's local window, which keeps
    /// the slot from being evicted as stale.
    pub fn fleet_take(
        &self,
        id: &[u8],
        limit: u32,
        nodes: u32,
        now_ms: u64,
        refill_ms: u64,
    ) -> Result<FleetTake, ZoneFull> {
        self.with_fleet_slot(&key_digest(id), now_ms, |reach, slot| {
            if reach.keeps_local(now_ms) {
                let (v, owed) = slot.take_local(reach, limit, nodes, now_ms);
                return FleetTake::Local(v, owed);
            }
            let take = slot.lease.take(limit, now_ms);
            let refill = match take {
                Take::Admit(_) => {
                    slot.window.hit(u32::MAX, reach.window_clock(now_ms));
                    let ahead = slot.lease.wants_refill(now_ms);
                    // One refill ahead per node: the others see it in flight.
                    if ahead {
                        slot.lease.refill_sent(now_ms + refill_ms);
                    }
                    ahead.then(|| slot.lease.want(limit, nodes, now_ms))
                }
                Take::Deny(_) => None,
                Take::Empty => Some(slot.lease.want(limit, nodes, now_ms)),
            };
            FleetTake::Lease { take, refill }
        })
    }

    /// Decides one request of key `id` on the local path
    /// (`afr_core::outage`: the lease's tokens, then this node's share of
    /// the window when the rules allow one). The second value says until
    /// when Redis is owed the admission (a share), if it is.
    pub fn fleet_local(
        &self,
        id: &[u8],
        limit: u32,
        nodes: u32,
        now_ms: u64,
    ) -> Result<(Verdict, Option<u64>), ZoneFull> {
        self.with_fleet_slot(&key_digest(id), now_ms, |reach, slot| {
            slot.take_local(reach, limit, nodes, now_ms)
        })
    }

    /// Takes one of key `id`'s `limit` places in flight for a request the
    /// fleet lease already admitted (`verdict`): `Busy` when all are taken.
    pub fn hold(
        &self,
        id: &[u8],
        limit: u32,
        verdict: Verdict,
        now_ms: u64,
    ) -> Result<Decision, ZoneFull> {
        let digest = key_digest(id);
        if !self.with_slot(&digest, now_ms, |slot| slot.in_flight.try_acquire(limit))? {
            return Ok(Decision::Busy { verdict, limit });
        }
        Ok(Decision::Counted {
            verdict,
            lease: Some(Lease {
                sh: self.sh,
                pool: self.pool,
                digest,
            }),
        })
    }

    /// Adds a grant from Redis, asked for at `sent_ms`, to key `digest`'s
    /// lease (the caller has placed Redis's boundaries from the same answer).
    pub fn fleet_apply(&self, digest: &KeyDigest, grant: &Grant, sent_ms: u64, now_ms: u64) {
        // An uninitialised zone has no lease to add to: nothing to do.
        let _ = self.with_slot(digest, now_ms, |slot| slot.lease.apply(grant, sent_ms));
    }

    /// Whether Redis's `epoch` says it lost the counters this node counted
    /// in — it replaced the epoch the node last saw, or some worker already
    /// saw it do so — and remembers it. `window_left_ms` is what is left of
    /// the window the epoch began in (≤ 0: over, and so is the loss).
    /// `Some(first)` when lost; `first`: this call is the node's first to
    /// see that epoch replace the other (once per epoch and node).
    pub fn fleet_lost_counters(&self, epoch: i64, window_left_ms: i64) -> Option<bool> {
        if self.sh.is_null() || self.pool.is_null() {
            return None;
        }
        let _guard = Locked::new(self.pool);
        // SAFETY: under the mutex we have exclusive access to the zone header.
        let sh = unsafe { &mut *self.sh };
        let first = sh.fleet_epoch != 0 && sh.fleet_epoch != epoch;
        if first {
            sh.fleet_lost_epoch = epoch;
        }
        sh.fleet_epoch = epoch;
        (sh.fleet_lost_epoch == epoch && window_left_ms > 0).then_some(first)
    }

    /// Runs `f` on the node's view of Redis (`afr_core::outage::Reach`)
    /// under the zone's mutex; `None` before [`init_zone`].
    pub fn fleet_reach<R>(&self, f: impl FnOnce(&mut FleetReach) -> R) -> Option<R> {
        if self.sh.is_null() || self.pool.is_null() {
            return None;
        }
        let _guard = Locked::new(self.pool);
        // SAFETY: under the mutex we have exclusive access to the zone header.
        let sh = unsafe { &mut *self.sh };
        Some(f(&mut sh.fleet_reach))
    }

    /// Runs `f` on key `digest`'s slot (made most recently used; a new key
    /// gets a zeroed one) under the zone's mutex: the one lock-and-find step
    /// of the fleet lease and the places in flight.
    fn with_slot<R>(
        &self,
        digest: &KeyDigest,
        now_ms: u64,
        f: impl FnOnce(&mut Slot) -> R,
    ) -> Result<R, ZoneFull> {
        self.with_fleet_slot(digest, now_ms, |_, slot| f(slot))
    }

    /// As [`Self::with_slot`], with the node's view of Redis beside the slot.
    fn with_fleet_slot<R>(
        &self,
        digest: &KeyDigest,
        now_ms: u64,
        f: impl FnOnce(&mut FleetReach, &mut Slot) -> R,
    ) -> Result<R, ZoneFull> {
        if self.sh.is_null() || self.pool.is_null() || self.capacity() == 0 {
            return Err(ZoneFull);
        }
        let _guard = Locked::new(self.pool);
        // SAFETY: under the mutex we have exclusive access to the zone.
        let mut table = unsafe { Table::new(self.sh) };
        let (i, _) = table.slot_for(digest, now_ms);
        Ok(f(&mut table.sh.fleet_reach, &mut table.slots[i as usize]))
    }
}

impl Table<'_> {
    /// # Safety
    /// `sh` is a zone header written by [`init_zone`] and the caller holds the
    /// slab mutex for as long as the `Table` lives.
    unsafe fn new<'a>(sh: *mut Shared) -> Table<'a> {
        // SAFETY: per the contract: `init_zone` laid out `capacity` bucket heads
        // after the header and `capacity` zeroed slots at `slots_offset`, all
        // initialised, and the mutex makes our access exclusive.
        unsafe {
            let n = (*sh).capacity as usize;
            let buckets = std::slice::from_raw_parts_mut(sh.add(1).cast::<u32>(), n);
            let slots = std::slice::from_raw_parts_mut(
                sh.cast::<u8>()
                    .add((*sh).slots_offset as usize)
                    .cast::<Slot>(),
                n,
            );
            Table {
                sh: &mut *sh,
                buckets,
                slots,
            }
        }
    }

    /// Counts an eviction; returns the evictions to report when a "zone is
    /// full" line is due (at most one per [`FULL_LOG_INTERVAL_MS`] per zone:
    /// a full zone under load would otherwise log on every new key).
    fn full_report(&mut self, now_ms: u64) -> Option<u64> {
        self.sh.evicted_unlogged += 1;
        let last = self.sh.full_logged_ms;
        if last != 0 && now_ms.abs_diff(last) < FULL_LOG_INTERVAL_MS {
            return None;
        }
        self.sh.full_logged_ms = now_ms.max(1);
        Some(std::mem::take(&mut self.sh.evicted_unlogged))
    }

    fn bucket(&self, d: &KeyDigest) -> usize {
        let h = u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]);
        (h % self.buckets.len() as u64) as usize
    }

    /// The slot of digest `d`, if the key has one.
    fn find(&self, d: &KeyDigest) -> Option<u32> {
        let mut i = self.buckets[self.bucket(d)];
        while i != NIL {
            if self.slots[i as usize].digest == *d {
                return Some(i);
            }
            i = self.slots[i as usize].next;
        }
        None
    }

    /// The slot of digest `d`, made most recently used; a key without one is
    /// given a fresh slot. The flag says whether a counter was evicted for it.
    fn slot_for(&mut self, d: &KeyDigest, now_ms: u64) -> (u32, bool) {
        if let Some(i) = self.find(d) {
            self.lru_unlink(i);
            self.lru_push_head(i);
            return (i, false);
        }
        // A miss: drop up to two stale counters from the tail, as limit_req
        // does (limit_conn's rule too: never one with requests in flight).
        for _ in 0..2 {
            let t = self.sh.lru_tail;
            if t == NIL {
                break;
            }
            let tail = &self.slots[t as usize];
            if !tail.window.is_stale(now_ms) || !tail.in_flight.is_idle() {
                break;
            }
            self.remove(t);
            self.slots[t as usize].next = self.sh.free;
            self.sh.free = t;
        }
        let (i, evicted) = if self.sh.free != NIL {
            let i = self.sh.free;
            self.sh.free = self.slots[i as usize].next;
            (i, false)
        } else if self.sh.len < self.sh.capacity {
            self.sh.len += 1;
            (self.sh.len - 1, false)
        } else {
            // Full: the least recently used slot without requests in flight
            // is taken over (the tail itself when the scan finds none).
            let victim = self.idle_near_tail().unwrap_or(self.sh.lru_tail);
            self.remove(victim);
            (victim, true)
        };
        let b = self.bucket(d);
        let s = &mut self.slots[i as usize];
        s.digest = *d;
        s.window = RateWindow::default();
        s.in_flight = InFlight::default();
        s.lease = FleetLease::default();
        s.next = self.buckets[b];
        self.buckets[b] = i;
        self.lru_push_head(i);
        (i, evicted)
    }

    /// The first of the [`EVICT_SCAN`] least recently used slots with no
    /// request in flight.
    fn idle_near_tail(&self) -> Option<u32> {
        let mut i = self.sh.lru_tail;
        for _ in 0..EVICT_SCAN {
            if i == NIL {
                return None;
            }
            if self.slots[i as usize].in_flight.is_idle() {
                return Some(i);
            }
            i = self.slots[i as usize].lru_prev;
        }
        None
    }

    /// Unlinks slot `i` from its bucket chain and the LRU queue.
    fn remove(&mut self, i: u32) {
        let b = self.bucket(&self.slots[i as usize].digest);
        let after = self.slots[i as usize].next;
        if self.buckets[b] == i {
            self.buckets[b] = after;
        } else {
            let mut j = self.buckets[b];
            while j != NIL {
                let n = self.slots[j as usize].next;
                if n == i {
                    self.slots[j as usize].next = after;
                    break;
                }
                j = n;
            }
        }
        self.lru_unlink(i);
    }

    fn lru_unlink(&mut self, i: u32) {
        let Slot {
            lru_prev: p,
            lru_next: n,
            ..
        } = self.slots[i as usize];
        if p == NIL {
            self.sh.lru_head = n;
        } else {
            self.slots[p as usize].lru_next = n;
        }
        if n == NIL {
            self.sh.lru_tail = p;
        } else {
            self.slots[n as usize].lru_prev = p;
        }
    }

    fn lru_push_head(&mut self, i: u32) {
        let h = self.sh.lru_head;
        self.slots[i as usize].lru_prev = NIL;
        self.slots[i as usize].lru_next = h;
        if h == NIL {
            self.sh.lru_tail = i;
        } else {
            self.slots[h as usize].lru_prev = i;
        }
        self.sh.lru_head = i;
    }
}
