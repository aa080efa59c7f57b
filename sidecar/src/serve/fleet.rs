//! A key's `tpm` and budget held across a fleet's nodes through one Redis
//! (`[fleet]`, design §9; nginx's `afr_fleet` does the same for `rpm`).
//!
//! Every reservation of a key with such limits is one Redis script: it reads
//! the key's fleet-wide token window and period spend, applies the ledger's
//! rule (`afr_core::ledger`, same order: tokens, then budget, nothing counted
//! unless both fit) and counts the reservation — atomically, so concurrent
//! requests on any number of nodes can never together overshoot. The node
//! adopts the counts the script read into its own ledger, which then answers
//! the `x-ratelimit-*-tokens` headers and, for a refusal, the `Retry-After`.
//! Settlement is a second script, sent after the response without anyone
//! waiting for it.
//!
//! Why a round trip per reservation rather than the module's leases: token
//! reservations are a request's worst case (often thousands of tokens), so a
//! lease would have to hold a large slice of the window idle; and the sidecar
//! is async, so waiting ~0.1 ms for Redis costs a task, not a thread. Keys
//! without `tpm` or a budget never touch Redis.
//!
//! Redis down is not an outage: the call is bounded by `[fleet] timeout`,
//! the node logs once and decides on its share of each limit (limit ÷ nodes)
//! in its own ledger, tries Redis again once a second, and logs when it is
//! back. A budget counter Redis does not hold (a new period, or a Redis that
//! restarted without persistence) is first set from the usage store — the
//! fleet's one PostgreSQL — so a Redis restart does not renew budgets.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use afr_core::config::FleetConfig;
use afr_core::fleet_ledger::{Change, Health, RedisKeys};
use afr_core::ledger::{Amount, Hold, Ledger, Now, Refusal, Reserve, Shared};
use afr_core::limits::KeyLimits;
use afr_core::outage::Reach;
use afr_core::ratelimit::WINDOW_MS;
use anyhow::Context;
use redis::aio::MultiplexedConnection;

use crate::serve::clock;
use crate::usage::{UsageQuery, UsageReader};

/// Reserve. KEYS: the key's token-window prefix, its budget counter, the
/// reservation's hold. ARGV: (unused), window (ms), tpm (-1: none), tokens
/// asked, budget in nano-dollars (-1: none), cost asked, budget counter TTL
/// (ms), budget seed (-1: none known; a missing counter is then answered 3
/// without counting), hold TTL (ms), and what a node back from a loss asks
/// to hold (`afr_core::outage`, rule 3: `afr_held`'s `after` and `upto`;
/// 0 0: nothing). `afr:{epoch}` (shared with nginx's `afr_fleet`) is when
/// Redis's data began: another value than the last one seen means Redis
/// lost its counters, in the window the epoch began in.
/// Returns {verdict (0 counted, 1 tokens refused, 2 budget refused, 3 seed
/// wanted, 4 the reservation was already released: its node gave up on this
/// call, 5 the window is held and the key has a `tpm`: nothing counted,
/// decide on the node's share), window start, previous window's tokens,
/// current window's, spent, epoch, ms left of the window the epoch began in
/// (≤ 0: over), held (1: the current window is), ms left of the window}.
/// The rule is `afr_core::ledger`'s `admit` on the fleet's counts (the window's
/// arithmetic is `afr_core::ratelimit::room`'s Lua twin), windows on
/// Redis's own clock (one clock for every node); Lua's numbers are doubles,
/// exact below 2^53 (tokens × 60 000 and nano-dollars). What was counted is
/// written in the hold (tokens:cost:window start:flags, 1 tokens, 2 cost)
/// for the settlement to correct exactly once.
const RESERVE: &str = concat!(
    afr_core::sliding_window_lua!(),
    afr_core::hold_lua!(),
    r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local w = tonumber(ARGV[2])
local ep = redis.call('GET', 'afr:{epoch}')
if not ep then
  redis.call('SET', 'afr:{epoch}', now, 'NX')
  ep = redis.call('GET', 'afr:{epoch}')
end
redis.call('PEXPIRE', 'afr:{epoch}', 86400000)
ep = tonumber(ep)
local epl = ep - ep % w + w - now
local start = now - now % w
local held = afr_held('afr:{held}:tpm', now, w, tonumber(ARGV[10]), tonumber(ARGV[11]))
if redis.call('EXISTS', KEYS[3]) == 1 then return {4, 0, 0, 0, 0, ep, epl, held, w - (now - start)} end
local tpm = tonumber(ARGV[3])
local budget = tonumber(ARGV[5])
if held == 1 and tpm >= 0 then return {5, start, 0, 0, 0, ep, epl, held, w - (now - start)} end
local curk = KEYS[1] .. ':' .. string.format('%d', start)
local prev, curr, spent = 0, 0, 0
if tpm >= 0 then
  prev = tonumber(redis.call('GET', KEYS[1] .. ':' .. string.format('%d', start - w)) or 0)
  curr = tonumber(redis.call('GET', curk) or 0)
end
if budget >= 0 then
  local s = redis.call('GET', KEYS[2])
  if not s then
    if tonumber(ARGV[8]) < 0 then return {3, start, prev, curr, 0, ep, epl, held, w - (now - start)} end
    redis.call('SET', KEYS[2], ARGV[8], 'PX', ARGV[7], 'NX')
    s = redis.call('GET', KEYS[2])
  end
  spent = tonumber(s)
end
if tpm >= 0 and afr_room(tpm, w, prev, curr, now - start) < tonumber(ARGV[4]) then
  return {1, start, prev, curr, spent, ep, epl, held, w - (now - start)}
end
local flags, tok, cost = 0, 0, 0
if budget >= 0 then
  if spent >= budget or spent + tonumber(ARGV[6]) > budget then
    return {2, start, prev, curr, spent, ep, epl, held, w - (now - start)}
  end
  spent = redis.call('INCRBY', KEYS[2], ARGV[6])
  redis.call('PEXPIRE', KEYS[2], ARGV[7])
  flags, cost = flags + 2, ARGV[6]
end
if tpm >= 0 then
  curr = redis.call('INCRBY', curk, ARGV[4])
  redis.call('PEXPIRE', curk, 2 * w + 1000)
  flags, tok = flags + 1, ARGV[4]
end
redis.call('SET', KEYS[3], tok .. ':' .. cost .. ':' .. string.format('%d', start) .. ':' .. flags, 'PX', ARGV[9])
return {0, start, prev, curr, spent, ep, epl, held, w - (now - start)}
"
);

/// Settle (or release: used 0). KEYS: the token-window prefix, the budget
/// counter, the hold. ARGV: tokens used, nano-dollars used, tombstone TTL
/// (ms). Corrects what the hold says was counted by what was used, once: the
/// hold is replaced by a tombstone, so a repeated settlement does nothing and
/// a reserve that reaches Redis after its release counts nothing. A counter
/// that expired is left alone (its window or period no longer decides
/// anything); none goes below zero. Returns 1 when it corrected a hold.
const SETTLE: &str = r"
local h = redis.call('GET', KEYS[3])
redis.call('SET', KEYS[3], 'done', 'PX', ARGV[3])
if not h then return 0 end
local tok, cost, start, flags = string.match(h, '^(%d+):(%d+):(%d+):(%d+)$')
if not tok then return 0 end
flags = tonumber(flags)
local function adjust(k, d)
  if d ~= 0 and redis.call('EXISTS', k) == 1 then
    if redis.call('INCRBY', k, d) < 0 then
      redis.call('SET', k, 0, 'KEEPTTL')
    end
  end
end
if flags % 2 == 1 then
  adjust(KEYS[1] .. ':' .. start, tonumber(ARGV[1]) - tonumber(tok))
end
if flags >= 2 then
  adjust(KEYS[2], tonumber(ARGV[2]) - tonumber(cost))
end
return 1
";

/// Pay. KEYS: the key's token-window prefix, its budget counter. ARGV:
/// tokens, nano-dollars used on the node's local share while Redis was
/// away, window (ms). Tokens are added to the current window by Redis's
/// clock; the spend to the budget counter only if Redis still holds it (one
/// it lost is set again from the usage store, which has that spend).
const PAY: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local w = tonumber(ARGV[3])
local start = now - now % w
if tonumber(ARGV[1]) > 0 then
  local curk = KEYS[1] .. ':' .. string.format('%d', start)
  redis.call('INCRBY', curk, ARGV[1])
  redis.call('PEXPIRE', curk, 2 * w + 1000)
end
if tonumber(ARGV[2]) > 0 and redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('INCRBY', KEYS[2], ARGV[2])
end
return 0
";

/// How long an unsettled hold is kept in Redis: longer than any request
/// may take. A settlement is retried (it is idempotent) until then.
const HOLD_TTL: Duration = Duration::from_secs(2 * 3600);

/// How long a settled hold's tombstone is kept: long enough that a retried
/// settlement, or a reserve delayed in a dead connection, finds it.
const TOMBSTONE_TTL: Duration = Duration::from_secs(600);

/// How long the usage store may take to say what a key spent this period,
/// for a budget counter Redis does not hold (not the Redis timeout: a slow
/// database is not a Redis outage).
const SEED_TIMEOUT: Duration = Duration::from_secs(5);

/// A budget counter outlives its period by this much (late settlements).
const BUDGET_GRACE_MS: u64 = 3_600_000;

/// The fleet's Redis, shared by every request of this sidecar.
pub struct Fleet {
    client: redis::Client,
    /// Where Redis is, for log lines: host and port only (no password).
    target: String,
    conn: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    nodes: u32,
    timeout: Duration,
    health: Mutex<Health>,
    /// Reservations decided on the local share since start.
    local: AtomicU64,
    /// What this node decides alone while Redis is away: each key on its
    /// share of what was left fleet-wide at the last sync, counted from zero.
    outage: Mutex<Outage>,
    /// Redis's epoch as last seen (see `RESERVE`).
    epoch: Mutex<Option<i64>>,
    /// When this node may admit `tpm` Redis has not counted
    /// (`afr_core::outage`: the same rules as nginx's `afr_fleet`).
    reach: Mutex<Reach>,
    reserve: redis::Script,
    settle: redis::Script,
    pay: redis::Script,
    /// Settlements and debt payments still trying to reach Redis, for a
    /// shutdown to wait for ([`Fleet::drain`]).
    writes: tokio_util::task::TaskTracker,
    /// Set by a shutdown: retries stop backing off.
    draining: std::sync::atomic::AtomicBool,
}

/// The node's own decisions while Redis is away, and what Redis has not
/// been told of them yet.
#[derive(Default)]
struct Outage {
    /// Reservations made on local shares, token windows on
    /// [`Reach::window_clock`] (Redis's windows).
    ledger: Ledger,
    /// The outage is over and paid for: the next answer Redis gives outside
    /// a held window starts the next outage's ledger from nothing.
    over: bool,
    /// What each key used on them (settled), to add to the fleet's counts
    /// when Redis answers again.
    debts: std::collections::HashMap<String, Debt>,
}

/// One key's usage decided locally that Redis has not counted.
#[derive(Clone)]
struct Debt {
    key: String,
    names: RedisKeys,
    used: Amount,
}

/// A reservation, and where it was made.
pub enum Held {
    /// In this node's ledger (no `[fleet]`).
    Local(Hold),
    /// On this node's share while Redis is away: settled there, and owed
    /// to Redis.
    Outage(Arc<Fleet>, Hold, RedisKeys),
    /// In the fleet's Redis.
    Fleet(FleetHold),
}

impl Held {
    /// Start (Unix ms) of the budget period the reservation is charged to,
    /// when the key has a budget.
    pub fn period_start(&self) -> Option<u64> {
        match self {
            Held::Local(hold) | Held::Outage(_, hold, _) => hold.period_start(),
            Held::Fleet(hold) => hold.period_start,
        }
    }
}

/// A reservation counted in Redis, to settle it there.
pub struct FleetHold {
    fleet: Arc<Fleet>,
    names: RedisKeys,
    /// The hold's Redis key: what the reserve counted, until it is settled.
    hold: String,
    period_start: Option<u64>,
}

/// One reserve script's answer: {verdict, window start, previous window's
/// tokens, current window's, spent}.
struct Answer {
    counts: [i64; 5],
    /// Redis's `afr:{epoch}`.
    epoch: i64,
    /// Milliseconds left of the window that epoch began in.
    epoch_left: i64,
    /// Whether Redis holds the current window (`afr_core::outage`, rule 3).
    held: bool,
}

impl Answer {
    fn verdict(&self) -> i64 {
        self.counts[0]
    }
}

impl Fleet {
    /// The fleet of `[fleet]`, reading the Redis URL from its variable. Does
    /// not connect: Redis may come up after the sidecar.
    pub fn from_config(config: &FleetConfig) -> anyhow::Result<Fleet> {
        let url = std::env::var(&config.redis_url_env).with_context(|| {
            format!(
                "fleet.redis_url_env: the variable {} is not set (redis://[:password@]host:port[/db])",
                config.redis_url_env
            )
        })?;
        let tls = url.starts_with("rediss://");
        let client = match &config.ca_file {
            Some(path) if tls => {
                let pem = std::fs::read(path)
                    .with_context(|| format!("fleet.ca_file: cannot read {}", path.display()))?;
                let certs = redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                };
                redis::Client::build_with_tls(url.as_str(), certs)
            }
            Some(_) => anyhow::bail!(
                "fleet.ca_file is set but the URL in {} is not rediss:// (Redis over TLS)",
                config.redis_url_env
            ),
            None => redis::Client::open(url.as_str()),
        }
        .map_err(|e| anyhow::anyhow!("fleet.redis_url_env: {}: {e}", config.redis_url_env))?;
        let info = client.get_connection_info();
        let target = format!("{}", info.addr());
        Ok(Fleet {
            client,
            target,
            conn: tokio::sync::Mutex::new(None),
            nodes: config.nodes,
            timeout: config.timeout,
            health: Mutex::new(Health::default()),
            local: AtomicU64::new(0),
            outage: Mutex::new(Outage::default()),
            epoch: Mutex::new(None),
            reach: Mutex::new(Reach::default()),
            writes: tokio_util::task::TaskTracker::new(),
            draining: std::sync::atomic::AtomicBool::new(false),
            reserve: redis::Script::new(RESERVE),
            settle: redis::Script::new(SETTLE),
            pay: redis::Script::new(PAY),
        })
    }

    /// Whether Redis is in use (for `afr_fleet_redis_up`).
    pub fn is_up(&self) -> bool {
        self.health().is_up()
    }

    /// Reservations decided on the local share since start.
    pub fn local_reservations(&self) -> u64 {
        self.local.load(Ordering::Relaxed)
    }

    /// Reserves `ask` for `key` under `limits` fleet-wide as hold `id` (the
    /// request's id), or on this node's share in `ledger` when Redis cannot
    /// answer within the timeout. `store` sets a budget counter Redis does
    /// not hold; when it cannot be read the budget cannot be held (budgets
    /// fail closed) — a slow or absent database is not a Redis outage.
    #[allow(clippy::too_many_arguments)]
    pub async fn reserve(
        self: &Arc<Self>,
        ledger: &Mutex<Ledger>,
        store: Option<&UsageReader>,
        id: &str,
        key: &str,
        limits: &KeyLimits,
        ask: Amount,
        now: Now,
    ) -> Result<Held, Reserve> {
        let period = limits.budget.map(|b| b.per.bounds(now.unix_ms));
        let names = RedisKeys::new(
            key,
            limits.budget.map(|b| b.per),
            period.map_or(0, |(s, _)| s),
        );
        // Redis holds this window, or counts anew: a `tpm` is decided on the
        // node's share without asking (`afr_core::outage`, rules 3 and 4).
        let keeps_local = limits.tpm.is_some() && self.reach().keeps_local(now.mono_ms);
        if !keeps_local && self.health().should_try(Instant::now()) {
            let hold = names.hold(id);
            let mut seed: i64 = -1;
            let answer = loop {
                // A connection Redis closed (a restart, a firewall) is no
                // outage: reconnect and try once more within the same bound.
                let call = async {
                    match self
                        .run_reserve(&names, &hold, limits, ask, now, period, seed)
                        .await
                    {
                        Err(e) if connection_lost(&e) => {
                            self.run_reserve(&names, &hold, limits, ask, now, period, seed)
                                .await
                        }
                        r => r,
                    }
                };
                match tokio::time::timeout(self.timeout, call).await {
                    Ok(Ok(a)) if a.verdict() == 3 && seed < 0 => {
                        let spent = tokio::time::timeout(
                            SEED_TIMEOUT,
                            spent_in_store(store, key, period.map_or(0, |(s, _)| s)),
                        )
                        .await;
                        match spent {
                            Ok(Ok(n)) => seed = n as i64,
                            Ok(Err(e)) => {
                                tracing::warn!(key_id = %key, error = %e, "fleet: the usage store cannot say what this key spent this period; its budget cannot be held now");
                                return Err(Reserve::Unavailable);
                            }
                            Err(_) => {
                                tracing::warn!(key_id = %key, "fleet: the usage store did not say within {SEED_TIMEOUT:?} what this key spent this period; its budget cannot be held now");
                                return Err(Reserve::Unavailable);
                            }
                        }
                    }
                    Ok(Ok(a)) if self.lost_counters(a.epoch) && a.epoch_left > 0 => {
                        // Redis answered without the counts it held: what
                        // this reservation counted there is released, and
                        // the node decides alone until that window ends,
                        // taking no share in it (rule 4).
                        if a.verdict() == 0 {
                            self.apply_later(names.clone(), hold.clone(), Amount::default());
                        }
                        let left = (a.epoch_left as u64).min(WINDOW_MS);
                        self.reach().recount(now.mono_ms + left);
                        let until = Instant::now() + Duration::from_millis(left);
                        self.health().lost_counters(until);
                        // Once per loss (a new epoch), whether or not the
                        // node had Redis until now: after an outage, Redis
                        // back empty is the usual way it is lost.
                        tracing::error!(redis = %self.target, "fleet: Redis lost its counters (restarted without persistence or failed over); tpm and budgets are held to this node's share until the window ends");
                        break None;
                    }
                    Ok(Ok(a)) if a.verdict() == 5 => {
                        // A held window: nothing was counted; the key's tpm
                        // is decided on this node's share (rule 3).
                        self.answered(now.mono_ms);
                        break None;
                    }
                    Ok(Ok(a)) => break Some(a),
                    Ok(Err(e)) => {
                        self.failed(&e.to_string(), now.mono_ms);
                        break None;
                    }
                    Err(_) => {
                        // The script may have run and counted the reservation:
                        // release it (and refuse it, should it still arrive).
                        self.apply_later(names.clone(), hold.clone(), Amount::default());
                        self.failed(&format!("no answer within {:?}", self.timeout), now.mono_ms);
                        break None;
                    }
                }
            };
            if let Some(answer) = answer {
                return self.adopt(ledger, key, limits, ask, now, period, answer, names, hold);
            }
        }
        self.local.fetch_add(1, Ordering::Relaxed);
        // The key's share, this node's use during the outage counted apart.
        let share = self.outage_share(&lock(ledger), key, limits, ask, now)?;
        let at = self.outage_now(now);
        let mut outage = self.outage();
        outage
            .ledger
            .reserve(key, &share, ask, at)
            .map(|hold| Held::Outage(Arc::clone(self), hold, names))
            .map_err(Reserve::Refused)
    }

    /// `now` for the outage ledger: its token windows are Redis's.
    fn outage_now(&self, now: Now) -> Now {
        Now {
            mono_ms: self.reach().window_clock(now.mono_ms),
            unix_ms: now.unix_ms,
        }
    }

    /// `limits` for `key` while Redis is away (`afr_core::outage`): its
    /// `tpm` ÷ nodes in a window the rules give shares in, none in the one
    /// Redis went away in (refused until one may be); its budget, what was
    /// left at the last sync ÷ nodes.
    fn outage_share(
        &self,
        mirror: &Ledger,
        key: &str,
        limits: &KeyLimits,
        ask: Amount,
        now: Now,
    ) -> Result<KeyLimits, Reserve> {
        let n = u64::from(self.nodes.max(1));
        let mut share = limits.share(self.nodes);
        if let Some(tpm) = limits.tpm {
            let mut reach = self.reach();
            reach.align_to_wall(now.mono_ms, clock::unix_ms());
            // This node does not count what it reserved in Redis, so a share
            // is only for a window it was away from the start of.
            if let Err(wait) = reach.shares_from_the_start(now.mono_ms) {
                return Err(Reserve::Refused(Refusal::Tokens {
                    limit: tpm,
                    requested: ask.tokens,
                    retry_after_ms: wait,
                }));
            }
        }
        if let Some(budget) = limits.budget {
            let left = mirror.budget_remaining(key, budget, now);
            share.budget = Some(afr_core::limits::Budget {
                nanos: left / n,
                per: budget.per,
            });
        }
        Ok(share)
    }

    /// Settles a reservation made while Redis was away, and owes Redis what
    /// it used.
    pub fn settle_outage(&self, hold: Hold, names: RedisKeys, used: Amount, now: Now) {
        let key = hold.key().to_owned();
        let at = self.outage_now(now);
        let mut outage = self.outage();
        outage.ledger.settle(hold, used, at);
        if used == Amount::default() {
            return;
        }
        let debt = outage.debts.entry(key.clone()).or_insert(Debt {
            key,
            names,
            used: Amount::default(),
        });
        debt.used.tokens += used.tokens;
        debt.used.cost_nanos += used.cost_nanos;
    }

    /// Whether Redis's `epoch` says it lost its counters since this node
    /// last saw it (and remembers it).
    fn lost_counters(&self, epoch: i64) -> bool {
        let mut seen = self.epoch.lock().unwrap_or_else(|e| e.into_inner());
        seen.replace(epoch).is_some_and(|e| e != epoch)
    }

    fn outage(&self) -> MutexGuard<'_, Outage> {
        self.outage.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn reach(&self) -> MutexGuard<'_, Reach> {
        self.reach.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Redis answers again: adds what keys used on local shares to the
    /// fleet's counts (tokens to the current window; spend to the period's
    /// counter when Redis still holds it — one it lost is set again from the
    /// usage store, whose rows have that spend), and starts the next outage
    /// from nothing. Not idempotent: a retry after a lost answer counts
    /// twice, which only under-admits.
    fn pay_debts(self: &Arc<Self>) {
        let debts: Vec<Debt> = {
            let mut outage = self.outage();
            // Not reset here: in a held window the node still decides on
            // what is left of its shares.
            outage.over = true;
            outage.debts.drain().map(|(_, d)| d).collect()
        };
        if debts.is_empty() {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let fleet = Arc::clone(self);
        self.writes.spawn_on(
            async move {
                for (i, debt) in debts.iter().enumerate() {
                    let call = async {
                        let mut conn = fleet.connection().await?;
                        fleet
                            .pay
                            .key(&debt.names.tokens)
                            .key(&debt.names.budget)
                            .arg(debt.used.tokens)
                            .arg(debt.used.cost_nanos)
                            .arg(WINDOW_MS)
                            .invoke_async::<i64>(&mut conn)
                            .await?;
                        anyhow::Ok(())
                    };
                    if !matches!(tokio::time::timeout(fleet.timeout, call).await, Ok(Ok(()))) {
                        // Owed again, paid when Redis next answers.
                        fleet.drop_connection();
                        let mut outage = fleet.outage();
                        for d in &debts[i..] {
                            outage.debts.insert(d.key.clone(), d.clone());
                        }
                        return;
                    }
                }
                tracing::info!(
                    keys = debts.len(),
                    "fleet: what was used on local shares during the outage is counted in Redis"
                );
            },
            &rt,
        );
    }

    /// For a shutdown: gives the settlements and debt payments still trying
    /// to reach Redis until `within` to land (retrying every 100 ms from now
    /// on), and says how many did not — those reservations stay counted at
    /// their worst case until their window or period ends, and those local
    /// admissions are never counted fleet-wide. Without it a sidecar stopped
    /// during a Redis blip dropped them all.
    pub async fn drain(self: &Arc<Self>, within: Duration) -> (usize, usize) {
        self.draining.store(true, Ordering::Relaxed);
        if !self.outage().debts.is_empty() {
            self.pay_debts();
        }
        self.writes.close();
        let _ = tokio::time::timeout(within, self.writes.wait()).await;
        (self.writes.len(), self.outage().debts.len())
    }

    /// What a reserve script's `answer` means for the request.
    #[allow(clippy::too_many_arguments)]
    fn adopt(
        self: &Arc<Self>,
        ledger: &Mutex<Ledger>,
        key: &str,
        limits: &KeyLimits,
        ask: Amount,
        now: Now,
        period: Option<(u64, u64)>,
        answer: Answer,
        names: RedisKeys,
        hold: String,
    ) -> Result<Held, Reserve> {
        self.answered(now.mono_ms);
        if !answer.held {
            let mut outage = self.outage();
            if std::mem::take(&mut outage.over) {
                outage.ledger = Ledger::new();
            }
        }
        let nonneg = |n: i64| n.max(0) as u64;
        let [verdict, start, prev, curr, spent] = answer.counts;
        if verdict == 4 {
            // Released before it arrived (this node gave up on an earlier
            // call with this id): nothing was counted.
            return Err(Reserve::Unavailable);
        }
        let shared = Shared {
            window_start: nonneg(start),
            prev_tokens: nonneg(prev),
            curr_tokens: nonneg(curr),
            spend: period.map(|(s, _)| (s, nonneg(spent))),
        };
        let mut ledger = lock(ledger);
        ledger.adopt(key, shared);
        if verdict == 0 {
            return Ok(Held::Fleet(FleetHold {
                fleet: Arc::clone(self),
                names,
                hold,
                period_start: period.map(|(s, _)| s),
            }));
        }
        // The mirror now holds what Redis decided on: it says which limit,
        // and when retrying can succeed. (Another node's settlement may have
        // freed room since: then Redis's verdict stands, with a retry in a
        // second.) The mirror's windows are Redis's; its clock here is the
        // node's, which is close enough for a Retry-After.
        let refusal = ledger.check(key, limits, ask, now);
        Err(Reserve::Refused(refusal.unwrap_or_else(
            || match limits.budget {
                Some(budget) if verdict == 2 => Refusal::Budget {
                    budget,
                    retry_after_ms: 1_000,
                },
                _ => Refusal::Tokens {
                    limit: limits.tpm.unwrap_or(0),
                    requested: ask.tokens,
                    retry_after_ms: 1_000,
                },
            },
        )))
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_reserve(
        &self,
        names: &RedisKeys,
        hold: &str,
        limits: &KeyLimits,
        ask: Amount,
        now: Now,
        period: Option<(u64, u64)>,
        seed: i64,
    ) -> anyhow::Result<Answer> {
        let mut call = self.reserve.key(&names.tokens);
        call.key(&names.budget)
            .key(hold)
            .arg(0)
            .arg(WINDOW_MS)
            .arg(limits.tpm.map_or(-1, |t| t as i64))
            .arg(ask.tokens)
            .arg(limits.budget.map_or(-1, |b| b.nanos as i64))
            .arg(ask.cost_nanos)
            .arg(period.map_or(0, |(_, end)| {
                end.saturating_sub(now.unix_ms) + BUDGET_GRACE_MS
            }))
            .arg(seed)
            .arg(HOLD_TTL.as_millis() as u64);
        // The call's own send time on the fleet's window clock (the wall
        // clock, `GatewayState::ledger_now`), not the request's: a call
        // after a seed query goes out later than `now`, and the boundary
        // estimated from it (and the windows it asks held, counted from
        // now) would be early by the query's time.
        let sent_ms = clock::unix_ms().max(now.mono_ms);
        let hold_request = self.reach().hold_request(sent_ms);
        call.arg(hold_request.map_or(0, |h| h.0))
            .arg(hold_request.map_or(0, |h| h.1));
        let sent = Instant::now();
        let mut conn = self.connection().await?;
        let out: Vec<i64> = call.invoke_async(&mut conn).await.inspect_err(|_| {
            // A broken connection is replaced on the next call.
            if let Ok(mut slot) = self.conn.try_lock() {
                *slot = None;
            }
        })?;
        let all = <[i64; 9]>::try_from(out)
            .map_err(|v| anyhow::anyhow!("the reserve script answered {v:?}"))?;
        let [verdict, start, prev, curr, spent, epoch, epoch_left, held, left] = all;
        let left = left.clamp(1, WINDOW_MS as i64) as u64;
        let recv_ms = sent_ms + sent.elapsed().as_millis() as u64;
        {
            let mut reach = self.reach();
            reach.align(sent_ms, recv_ms, left);
            if held == 1 {
                reach.held(recv_ms, left);
            }
        }
        Ok(Answer {
            counts: [verdict, start, prev, curr, spent],
            epoch,
            epoch_left,
            held: held == 1,
        })
    }

    /// Corrects hold `hold` in Redis to `used` (a settlement; a release when
    /// nothing was used) in the background, retried until it lands or the
    /// hold expires: the script is idempotent, so a retry after a lost answer
    /// cannot count twice.
    fn apply_later(self: &Arc<Self>, names: RedisKeys, hold: String, used: Amount) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let fleet = Arc::clone(self);
        self.writes.spawn_on(async move {
            let deadline = Instant::now() + HOLD_TTL;
            let mut wait = Duration::from_millis(100);
            let mut warned = false;
            loop {
                let call = async {
                    let mut conn = fleet.connection().await?;
                    fleet
                        .settle
                        .key(&names.tokens)
                        .key(&names.budget)
                        .key(&hold)
                        .arg(used.tokens)
                        .arg(used.cost_nanos)
                        .arg(TOMBSTONE_TTL.as_millis() as u64)
                        .invoke_async::<i64>(&mut conn)
                        .await?;
                    anyhow::Ok(())
                };
                match tokio::time::timeout(fleet.timeout, call).await {
                    Ok(Ok(())) => return,
                    Ok(Err(e)) => {
                        fleet.drop_connection();
                        if !std::mem::replace(&mut warned, true) {
                            tracing::warn!(error = %e, "fleet: a settlement did not reach Redis; retrying until it does");
                        }
                    }
                    Err(_) => {
                        fleet.drop_connection();
                        if !std::mem::replace(&mut warned, true) {
                            tracing::warn!("fleet: a settlement timed out; retrying until it lands");
                        }
                    }
                }
                if Instant::now() + wait > deadline {
                    tracing::error!("fleet: a settlement could not reach Redis before its hold expired; its reservation stays counted until its window or period ends");
                    return;
                }
                if fleet.draining.load(Ordering::Relaxed) {
                    wait = Duration::from_millis(100);
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }, &rt);
    }

    fn drop_connection(&self) {
        if let Ok(mut slot) = self.conn.try_lock() {
            *slot = None;
        }
    }

    async fn connection(&self) -> anyhow::Result<MultiplexedConnection> {
        let mut slot = self.conn.lock().await;
        if let Some(conn) = slot.as_ref() {
            return Ok(conn.clone());
        }
        let conn = self.client.get_multiplexed_async_connection().await?;
        *slot = Some(conn.clone());
        Ok(conn)
    }

    fn health(&self) -> MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn answered(self: &Arc<Self>, now_ms: u64) {
        if self.health().answered() == Some(Change::Back) {
            self.reach().answered(true, now_ms);
            tracing::info!(redis = %self.target, "fleet: Redis is reachable again; tpm and budgets are fleet-wide again");
        }
        if !self.outage().debts.is_empty() {
            self.pay_debts();
        }
    }

    fn failed(&self, why: &str, now_ms: u64) {
        if let Ok(mut slot) = self.conn.try_lock() {
            *slot = None;
        }
        if self.health().failed(Instant::now()) == Some(Change::Lost) {
            let mut reach = self.reach();
            reach.align_to_wall(now_ms, clock::unix_ms());
            reach.went_local(now_ms);
            drop(reach);
            tracing::error!(redis = %self.target, error = %why, nodes = self.nodes, "fleet: Redis unreachable; each key's tpm and budget are held to their local share (limit ÷ nodes) until it is back");
        }
    }
}

impl FleetHold {
    /// Settles this hold to what the request `used`, in the background (the
    /// response does not wait for Redis), retried until it lands.
    pub fn settle(self, used: Amount) {
        let FleetHold {
            fleet, names, hold, ..
        } = self;
        fleet.apply_later(names, hold, used);
    }
}

/// Whether `e` is a connection that broke (not a timeout, not a refusal).
fn connection_lost(e: &anyhow::Error) -> bool {
    e.downcast_ref::<redis::RedisError>()
        .is_some_and(|e| (e.is_connection_dropped() || e.is_io_error()) && !e.is_timeout())
}

fn lock(ledger: &Mutex<Ledger>) -> MutexGuard<'_, Ledger> {
    ledger.lock().unwrap_or_else(|e| e.into_inner())
}

/// What `key` spent since `period_start` by the usage store (the fleet's
/// one database), for a budget counter Redis does not hold.
async fn spent_in_store(
    store: Option<&UsageReader>,
    key: &str,
    period_start: u64,
) -> anyhow::Result<u64> {
    let Some(reader) = store.cloned() else {
        return Ok(0); // usage recording off: nothing to read
    };
    let q = UsageQuery {
        key_id: Some(key.to_owned()),
        since_ms: Some(period_start as i64),
        ..UsageQuery::default()
    };
    let rows = tokio::task::spawn_blocking(move || reader.query(&q))
        .await
        .context("reading the usage store")??;
    Ok(rows.iter().map(|r| r.cost_nanos).sum())
}
