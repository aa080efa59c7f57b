//! The `afr_zone` shared memory: one [`RateWindow`] per key id, shared by all
//! workers, so N workers enforce one limit.
//!
//! Modelled on nginx's `limit_req`: nodes in an rbtree (keyed by a hash of the
//! key id, ties broken by the id bytes) and an LRU queue, allocated from the
//! zone's slab and touched only under the slab mutex. A miss first drops up to
//! two stale nodes from the LRU tail; when the slab is full the least recently
//! used counters are evicted (and logged) and the allocation retried, so a full
//! zone never silently stops limiting. On `nginx -s reload` a zone of the same
//! name and size is handed back to [`init_zone`] and reused: counters survive.

use std::ffi::c_void;
use std::mem::{offset_of, size_of};
use std::ptr::{self, addr_of_mut};

use afr_core::ratelimit::{RateWindow, Verdict};
use ngx::core::Status;
use ngx::ffi::{
    ngx_int_t, ngx_queue_t, ngx_rbt_red, ngx_rbtree_delete, ngx_rbtree_init, ngx_rbtree_insert,
    ngx_rbtree_key_t, ngx_rbtree_node_t, ngx_rbtree_t, ngx_shm_zone_t, ngx_shmtx_lock,
    ngx_shmtx_unlock, ngx_slab_alloc, ngx_slab_alloc_locked, ngx_slab_free_locked, ngx_slab_pool_t,
    NGX_LOG_WARN,
};
use ngx::ngx_log_error;

/// Most counters evicted to make room for one new key before giving up.
const MAX_EVICTIONS: usize = 64;

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
}

/// The zone's root, at the slab pool's `data`.
#[repr(C)]
struct Shared {
    rbtree: ngx_rbtree_t,
    sentinel: ngx_rbtree_node_t,
    lru: ngx_queue_t,
}

/// One key's counter; the id bytes follow the struct in the same allocation.
#[repr(C)]
struct Node {
    rb: ngx_rbtree_node_t,
    lru: ngx_queue_t,
    window: RateWindow,
    id_len: usize,
}

impl Node {
    /// # Safety
    /// `node` must point to a live node allocated by [`ZoneCtx::hit`].
    unsafe fn id<'a>(node: *const Node) -> &'a [u8] {
        // SAFETY: the id bytes were copied right after the struct at allocation.
        unsafe {
            std::slice::from_raw_parts(node.cast::<u8>().add(size_of::<Node>()), (*node).id_len)
        }
    }

    /// # Safety
    /// `q` must be the `lru` link of a live node.
    unsafe fn from_lru(q: *mut ngx_queue_t) -> *mut Node {
        // SAFETY: `lru` is embedded in `Node` at a fixed offset.
        unsafe { q.cast::<u8>().sub(offset_of!(Node, lru)).cast() }
    }
}

/// 64-bit FNV-1a: a stable hash of the key id (every worker must agree).
fn id_hash(id: &[u8]) -> ngx_rbtree_key_t {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in id {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h as ngx_rbtree_key_t
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
    // SAFETY: the pool is valid; ngx_slab_alloc takes the mutex itself.
    let sh = unsafe { ngx_slab_alloc(pool, size_of::<Shared>()) }.cast::<Shared>();
    if sh.is_null() {
        return Status::NGX_ERROR.into();
    }
    // SAFETY: `sh` is a fresh allocation large enough for `Shared`.
    unsafe {
        ngx_rbtree_init(
            addr_of_mut!((*sh).rbtree),
            addr_of_mut!((*sh).sentinel),
            Some(insert_node),
        );
        let lru = addr_of_mut!((*sh).lru);
        (*lru).prev = lru;
        (*lru).next = lru;
    }
    ctx.sh = sh;
    pool_ref.data = sh.cast();
    // Allocation failures are expected when full (we evict); don't log each one.
    pool_ref.set_log_nomem(0);
    Status::NGX_OK.into()
}

/// rbtree insertion: by hash, then by id bytes.
unsafe extern "C" fn insert_node(
    mut temp: *mut ngx_rbtree_node_t,
    node: *mut ngx_rbtree_node_t,
    sentinel: *mut ngx_rbtree_node_t,
) {
    // SAFETY: nginx calls this with valid tree nodes; every node in our tree is a `Node`.
    unsafe {
        loop {
            let go_left = if (*node).key != (*temp).key {
                (*node).key < (*temp).key
            } else {
                Node::id(node.cast()) < Node::id(temp.cast())
            };
            let next = if go_left {
                addr_of_mut!((*temp).left)
            } else {
                addr_of_mut!((*temp).right)
            };
            if *next == sentinel {
                *next = node;
                break;
            }
            temp = *next;
        }
        (*node).parent = temp;
        (*node).left = sentinel;
        (*node).right = sentinel;
        ngx_rbt_red(node);
    }
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

/// Why a request could not be counted.
#[derive(Debug)]
pub struct ZoneFull;

impl ZoneCtx {
    /// Counts one request of key `id` with `limit` per minute at `now_ms`.
    pub fn hit(&self, id: &[u8], limit: u32, now_ms: u64) -> Result<Verdict, ZoneFull> {
        if self.sh.is_null() || self.pool.is_null() {
            return Err(ZoneFull);
        }
        let hash = id_hash(id);
        let (verdict, evicted) = {
            let _guard = Locked::new(self.pool);
            // SAFETY: under the mutex we have exclusive access to the tree and queue.
            unsafe { self.hit_locked(hash, id, limit, now_ms) }
        };
        if evicted > 0 {
            ngx_log_error!(
                NGX_LOG_WARN,
                ngx::log::ngx_cycle_log().as_ptr(),
                "afr_zone \"{}\" is full: evicted {} least recently used key counter(s); consider a larger zone",
                self.name,
                evicted
            );
        }
        verdict.ok_or(ZoneFull)
    }

    /// # Safety
    /// The caller holds the slab mutex.
    unsafe fn hit_locked(
        &self,
        hash: ngx_rbtree_key_t,
        id: &[u8],
        limit: u32,
        now_ms: u64,
    ) -> (Option<Verdict>, usize) {
        // SAFETY: the caller holds the mutex; all pointers belong to this zone.
        unsafe {
            let sh = self.sh;
            let node = self.lookup(hash, id);
            if !node.is_null() {
                queue_remove(addr_of_mut!((*node).lru));
                queue_insert_head(addr_of_mut!((*sh).lru), addr_of_mut!((*node).lru));
                return (Some((*node).window.hit(limit, now_ms)), 0);
            }
            self.expire(now_ms, 2, false);
            let size = size_of::<Node>() + id.len();
            let mut evicted = 0;
            let mut mem = ngx_slab_alloc_locked(self.pool, size);
            while mem.is_null() && evicted < MAX_EVICTIONS {
                if self.expire(now_ms, 1, true) == 0 {
                    break;
                }
                evicted += 1;
                mem = ngx_slab_alloc_locked(self.pool, size);
            }
            if mem.is_null() {
                return (None, evicted);
            }
            let node = mem.cast::<Node>();
            ptr::write_bytes(node, 0, 1);
            (*node).rb.key = hash;
            (*node).id_len = id.len();
            ptr::copy_nonoverlapping(
                id.as_ptr(),
                mem.cast::<u8>().add(size_of::<Node>()),
                id.len(),
            );
            ngx_rbtree_insert(addr_of_mut!((*sh).rbtree), addr_of_mut!((*node).rb));
            queue_insert_head(addr_of_mut!((*sh).lru), addr_of_mut!((*node).lru));
            (Some((*node).window.hit(limit, now_ms)), evicted)
        }
    }

    /// # Safety
    /// The caller holds the slab mutex.
    unsafe fn lookup(&self, hash: ngx_rbtree_key_t, id: &[u8]) -> *mut Node {
        // SAFETY: the caller holds the mutex; the tree holds only `Node`s.
        unsafe {
            let sentinel = (*self.sh).rbtree.sentinel;
            let mut n = (*self.sh).rbtree.root;
            while n != sentinel {
                if hash != (*n).key {
                    n = if hash < (*n).key {
                        (*n).left
                    } else {
                        (*n).right
                    };
                    continue;
                }
                match id.cmp(Node::id(n.cast())) {
                    std::cmp::Ordering::Equal => return n.cast(),
                    std::cmp::Ordering::Less => n = (*n).left,
                    std::cmp::Ordering::Greater => n = (*n).right,
                }
            }
            ptr::null_mut()
        }
    }

    /// Frees up to `max` nodes from the LRU tail: only stale ones, or any when
    /// `force` (the zone is full). Returns how many were freed.
    ///
    /// # Safety
    /// The caller holds the slab mutex.
    unsafe fn expire(&self, now_ms: u64, max: usize, force: bool) -> usize {
        // SAFETY: the caller holds the mutex; queue links belong to live nodes.
        unsafe {
            let head = addr_of_mut!((*self.sh).lru);
            let mut freed = 0;
            while freed < max {
                let last = (*head).prev;
                if last == head {
                    break;
                }
                let node = Node::from_lru(last);
                if !force && !(*node).window.is_stale(now_ms) {
                    break;
                }
                queue_remove(last);
                ngx_rbtree_delete(addr_of_mut!((*self.sh).rbtree), addr_of_mut!((*node).rb));
                ngx_slab_free_locked(self.pool, node.cast());
                freed += 1;
            }
            freed
        }
    }
}

/// # Safety
/// `h` is a queue head and `x` an unlinked element.
unsafe fn queue_insert_head(h: *mut ngx_queue_t, x: *mut ngx_queue_t) {
    // SAFETY: per the contract above, all four links are valid.
    unsafe {
        (*x).next = (*h).next;
        (*(*x).next).prev = x;
        (*x).prev = h;
        (*h).next = x;
    }
}

/// # Safety
/// `x` is linked into a queue.
unsafe fn queue_remove(x: *mut ngx_queue_t) {
    // SAFETY: per the contract above, the neighbours are valid.
    unsafe {
        (*(*x).next).prev = (*x).prev;
        (*(*x).prev).next = (*x).next;
    }
}
