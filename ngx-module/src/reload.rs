//! The worker's key table and its hot reload.
//!
//! Each worker holds the current [`KeyTable`] and a bounded moka cache of
//! resolved tokens (hits and misses), so a flood of random keys costs one hash
//! and one probe each and cannot grow memory. A task on nginx's own event loop
//! stats the keys file every `afr_reload_interval`; when it changed, a plain OS
//! thread parses it (a 100 000-key file takes longer than a request may wait)
//! and the task swaps the result in on the event loop: the swap is a pointer
//! store plus a fresh cache. A broken file is logged with file, line and field
//! and the previous table stays. Old tables are dropped off the event loop too.
//!
//! A new table is accepted only from a stable read
//! ([`afr_core::keyfile::load_stable`]): the file's stamp is the same before
//! and after it was read, so a read racing a writer is retried on the next
//! tick. A read that failed (a file only root may read, then
//! `chmod`ed: chmod changes no part of the stamp) is retried on every tick
//! rather than remembered. An empty table replacing one with keys — what an
//! editor's truncate-then-write shows for a moment — must in addition stay
//! unchanged for [`EMPTY_SETTLE`]. A worker checks the file when it starts,
//! so a worker respawned after a crash never serves the table of the last
//! `nginx -s reload`.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use afr_core::keyfile::FileStamp;
use afr_core::keyfile::{load_stable, LoadError};
use afr_core::keys::{KeyEntry, KeyFileError, KeyTable};
use ngx::ffi::{NGX_LOG_ERR, NGX_LOG_NOTICE};
use ngx::ngx_log_error;

/// Resolved tokens kept per worker (hits and misses alike).
const CACHE_CAPACITY: u64 = 16_384;
/// Niceness of the parser thread.
const PARSE_NICE: libc::c_int = 10;
/// How long a parser thread waits to take the replaced table off the event loop.
const DROP_WAIT: Duration = Duration::from_secs(30);
/// How often a running parse is polled for its result.
const PARSE_POLL: Duration = Duration::from_millis(5);
/// How long an empty keys file must stay unchanged before it replaces a table
/// with keys: longer than an editor takes between truncating and writing, and
/// short enough that emptying the file on purpose still takes effect within
/// 2 s at the default 1 s interval.
pub const EMPTY_SETTLE: Duration = Duration::from_secs(1);

/// Loads the keys file at worker start when it changed since the
/// configuration was read (a worker respawned after a crash starts from the
/// table of the last `nginx -s reload`). Parsing here, before the worker
/// accepts a connection, keeps a revoked key from working for even one
/// request. Returns the table to start from and the stamp it reflects; a
/// file that cannot be taken now (unreadable, mid-write, broken, or empty
/// where the old one had keys) is left to the watcher, which logs it.
pub fn start_table(
    path: &Path,
    table: Arc<KeyTable>,
    stamp: Option<FileStamp>,
) -> (Arc<KeyTable>, Option<FileStamp>) {
    let Some(now) = FileStamp::of(path) else {
        return (table, stamp);
    };
    if Some(now) == stamp {
        return (table, stamp);
    }
    match load_stable(path, now) {
        Ok(t) if !t.is_empty() || table.is_empty() => {
            log(
                NGX_LOG_NOTICE,
                &format!(
                    "afr: keys file {} changed since the configuration was read: loaded {} keys at worker start",
                    path.display(),
                    t.len()
                ),
            );
            (Arc::new(t), Some(now))
        }
        _ => (table, stamp),
    }
}

struct WorkerKeys {
    table: Arc<KeyTable>,
    /// Keyed by [`TokenDigest`], never the token itself.
    cache: moka::sync::Cache<u128, Option<u32>>,
}

/// What the cache remembers of a token: 128 bits of two SipHashes under this
/// worker's random keys. A plaintext token kept in a long-lived cache would be
/// readable in a core dump; SHA-256 would cost what the cache saves. Random
/// keys make a collision unguessable, and 2^-128 makes an accidental one moot.
struct TokenDigest([std::collections::hash_map::RandomState; 2]);

impl TokenDigest {
    fn of(&self, token: &[u8]) -> u128 {
        use std::hash::BuildHasher;
        let [a, b] = &self.0;
        (u128::from(a.hash_one(token)) << 64) | u128::from(b.hash_one(token))
    }
}

impl WorkerKeys {
    fn new(table: Arc<KeyTable>) -> Self {
        WorkerKeys {
            table,
            cache: moka::sync::Cache::new(CACHE_CAPACITY),
        }
    }
}

thread_local! {
    // nginx runs requests and our task on one thread per worker.
    static KEYS: RefCell<Option<WorkerKeys>> = const { RefCell::new(None) };
    static DIGEST: TokenDigest = TokenDigest(Default::default());
}

/// Makes `table` this worker's key table, with an empty cache (start-up).
pub fn install(table: Arc<KeyTable>) {
    fix_allocator_thresholds();
    KEYS.with(|k| *k.borrow_mut() = Some(WorkerKeys::new(table)));
}

/// Looks `token` up (cache first, then one SHA-256 and one probe) and hands
/// the key, if any, to `f`. `None` when no table is installed.
pub fn resolve<R>(token: &[u8], f: impl FnOnce(Option<&KeyEntry>) -> R) -> Option<R> {
    KEYS.with(|k| {
        let keys = k.borrow();
        let keys = keys.as_ref()?;
        let digest = DIGEST.with(|d| d.of(token));
        let index = match keys.cache.get(&digest) {
            Some(hit) => hit,
            None => {
                let found = keys.table.find(token);
                keys.cache.insert(digest, found);
                found
            }
        };
        Some(f(index.and_then(|i| keys.table.get(i))))
    })
}

/// Spawns a thread with every signal blocked, so nginx's signal handlers keep
/// running on the worker's main thread only. The thread lowers its own
/// priority: on a busy machine a parse must not take CPU time from the event
/// loops serving requests.
fn spawn_quiet(f: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
    let body = move || {
        // SAFETY: setpriority on the calling thread's own id (Linux applies
        // PRIO_PROCESS with a thread id to that thread only); failure is harmless.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, PARSE_NICE) };
        f()
    };
    // SAFETY: sigset_t is plain data; sigfillset/pthread_sigmask only write to
    // the sets we pass. The mask is restored right after the spawn, and the new
    // thread inherits the blocked mask.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
        let r = std::thread::Builder::new()
            .name("afr-keys".into())
            .spawn(body);
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        r.map(|_| ())
    }
}

/// Hands the memory freed by a reload back to the OS. The parse's scratch
/// (the file's text, the document) and the replaced table are freed into
/// malloc arenas, which keep them resident: measured with 30 000 keys (a
/// table ~12 MB), a worker grew from 18 MB to 45–74 MB over ten hot reloads
/// without this. Runs on the parser thread, off the event loop.
fn release_freed_memory() {
    // SAFETY: malloc_trim only returns free pages to the OS; no allocation
    // is moved or invalidated.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Fixes glibc's trim and mmap thresholds at their defaults (128 KiB) in a
/// worker. Left dynamic, glibc raises both after the first large free (up to
/// 32/64 MiB), and `malloc_trim` never trims the top of a non-main arena —
/// the parser thread's. A replaced table freed into that top then stayed
/// resident: measured with 30 000 keys (a table ~12 MB), in 2 of 3 series of
/// ten hot reloads a worker stayed 1.3 tables over its base. Fixed, a block
/// of 128 KiB or more is mapped and unmapped on its own and a top past
/// 128 KiB is trimmed when freed. nginx's pools (a few KiB) never reach it;
/// a buffer configured at 128 KiB or more (`client_body_buffer_size`) costs
/// an mmap and a munmap per request, as it does until glibc first raises
/// the threshold.
fn fix_allocator_thresholds() {
    // SAFETY: mallopt only sets allocator parameters, under glibc's own
    // locks, so threads already running (a `thread_pool`) are unaffected.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// Starts this worker's watcher of the keys file.
pub fn watch(path: PathBuf, stamp: Option<FileStamp>, interval: Duration) {
    ngx::async_::spawn(watch_loop(path, stamp, interval)).detach();
}

async fn watch_loop(path: PathBuf, mut seen: Option<FileStamp>, interval: Duration) {
    // Consecutive ticks the file could not be stat'ed, to tell an editor's
    // rename (gone for one tick) from a real problem worth one log line.
    let mut unreadable_ticks = 0u32;
    // The version whose read last failed, so a lasting failure is logged once.
    let mut failed: Option<FileStamp> = None;
    // An empty version waiting to replace a table with keys, and since when.
    let mut settling: Option<(FileStamp, Instant)> = None;
    loop {
        ngx::async_::sleep(interval).await;
        let now = match FileStamp::stat(&path) {
            Ok(stamp) => {
                unreadable_ticks = 0;
                stamp
            }
            Err(e) => {
                unreadable_ticks += 1;
                if unreadable_ticks == 2 {
                    // A worker runs as nginx's `user`: a file or directory only
                    // root can read is the usual cause.
                    log(
                        NGX_LOG_ERR,
                        &format!(
                            "afr: cannot stat keys file {}: {e}; keeping the previous keys",
                            path.display()
                        ),
                    );
                }
                continue;
            }
        };
        if Some(now) == seen {
            continue;
        }
        let (tx, rx) = mpsc::channel();
        let p = path.clone();
        // The parser builds the whole new state (table and empty cache), so
        // the event loop only swaps a pointer; it then takes the replaced state
        // back and frees it (100 000 entries take milliseconds to free).
        let started = spawn_quiet(move || {
            let t0 = Instant::now();
            let result = load_stable(&p, now).map(|t| WorkerKeys::new(Arc::new(t)));
            let (old_tx, old_rx) = mpsc::channel::<WorkerKeys>();
            if tx.send((result, t0.elapsed(), old_tx)).is_ok() {
                drop(old_rx.recv_timeout(DROP_WAIT));
            }
            release_freed_memory();
        });
        if let Err(e) = started {
            log(
                NGX_LOG_ERR,
                &format!("afr: cannot start keys parser thread: {e}"),
            );
            continue;
        }
        let parsed = loop {
            ngx::async_::sleep(PARSE_POLL).await;
            match rx.try_recv() {
                Ok(done) => break Some(done),
                Err(TryRecvError::Empty) => continue,
                Err(TryRecvError::Disconnected) => break None,
            }
        };
        let current = KEYS.with(|k| k.borrow().as_ref().map_or(0, |w| w.table.len()));
        match parsed {
            Some((Ok(keys), took, old_tx)) => {
                let n = keys.table.len();
                if n == 0 && current > 0 {
                    // Possibly a truncate-then-write caught in between: take
                    // it only once it has stayed this way for EMPTY_SETTLE.
                    match settling {
                        Some((stamp, since)) if stamp == now && since.elapsed() >= EMPTY_SETTLE => {
                        }
                        Some((stamp, _)) if stamp == now => continue,
                        _ => {
                            settling = Some((now, Instant::now()));
                            continue;
                        }
                    }
                }
                seen = Some(now);
                failed = None;
                settling = None;
                let t0 = Instant::now();
                let old = KEYS.with(|k| k.borrow_mut().replace(keys));
                let swapped = t0.elapsed();
                if let Some(old) = old {
                    // If the parser is gone the value comes back and drops here.
                    drop(old_tx.send(old));
                }
                log(
                    NGX_LOG_NOTICE,
                    &format!(
                        "afr: loaded {n} keys from {} (parsed in {} ms, swapped in {} us)",
                        path.display(),
                        took.as_millis(),
                        swapped.as_micros()
                    ),
                );
            }
            // Mid-write: the next tick reads it again, quietly.
            Some((Err(LoadError::Unstable(_)), _, _)) => {}
            // Not remembered as seen: a chmod changes no part of the stamp,
            // so only retrying notices the file became readable.
            Some((Err(e @ LoadError::Io { .. }), _, _)) => {
                if failed != Some(now) {
                    failed = Some(now);
                    log(
                        NGX_LOG_ERR,
                        &format!("afr: {e}; keeping the previous keys ({current} keys)"),
                    );
                }
            }
            Some((Err(LoadError::Invalid(e)), _, _)) => {
                seen = Some(now);
                log(
                    NGX_LOG_ERR,
                    &format!(
                        "{}; keeping the previous keys ({current} keys)",
                        keys_file_message(&e)
                    ),
                );
            }
            None => {
                log(
                    NGX_LOG_ERR,
                    "afr: keys parser thread died; keeping the previous keys",
                );
            }
        }
    }
}

/// A keys-file problem worded like nginx's own file errors:
/// `keys file "/etc/afr/keys.toml" line 12: key[3].rpm: must be …`.
pub fn keys_file_message(e: &KeyFileError) -> String {
    match e.line {
        Some(line) => format!(
            "keys file \"{}\" line {line}: {}: {}",
            e.file, e.field, e.message
        ),
        None => format!("keys file \"{}\": {}: {}", e.file, e.field, e.message),
    }
}

fn log(level: u32, msg: &str) {
    ngx_log_error!(level, ngx::log::ngx_cycle_log().as_ptr(), "{msg}");
}
