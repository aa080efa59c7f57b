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
use afr_core::ledger::{Amount, Hold, Ledger, Now, Refusal, Shared};
use afr_core::limits::KeyLimits;
use afr_core::ratelimit::WINDOW_MS;
use anyhow::Context;
use redis::aio::MultiplexedConnection;

use crate::usage::{UsageQuery, UsageReader};

/// Reserve. KEYS: the key's token-window prefix, its budget counter.
/// ARGV: now (ms), window (ms), tpm (-1: none), tokens asked, budget in
/// nano-dollars (-1: none), cost asked, budget counter TTL (ms), budget seed
/// (-1: none known; a missing counter is then answered 3 without counting).
/// Returns {verdict (0 counted, 1 tokens refused, 2 budget refused, 3 seed
/// wanted), window start, previous window's tokens, current window's, spent}.
/// The rule is `afr_core::ledger`'s `admit` on the fleet's counts; Lua's
/// numbers are doubles, exact below 2^53 (tokens × 60 000 and nano-dollars).
const RESERVE: &str = r"
local now = tonumber(ARGV[1])
local w = tonumber(ARGV[2])
local tpm = tonumber(ARGV[3])
local budget = tonumber(ARGV[5])
local start = now - now % w
local curk = KEYS[1] .. ':' .. string.format('%d', start)
local prev, curr, spent = 0, 0, 0
if tpm >= 0 then
  prev = tonumber(redis.call('GET', KEYS[1] .. ':' .. string.format('%d', start - w)) or 0)
  curr = tonumber(redis.call('GET', curk) or 0)
end
if budget >= 0 then
  local s = redis.call('GET', KEYS[2])
  if not s then
    if tonumber(ARGV[8]) < 0 then return {3, start, prev, curr, 0} end
    redis.call('SET', KEYS[2], ARGV[8], 'PX', ARGV[7], 'NX')
    s = redis.call('GET', KEYS[2])
  end
  spent = tonumber(s)
end
if tpm >= 0 and prev * (w - (now - start)) + (curr + tonumber(ARGV[4])) * w > tpm * w then
  return {1, start, prev, curr, spent}
end
if budget >= 0 then
  if spent >= budget or spent + tonumber(ARGV[6]) > budget then
    return {2, start, prev, curr, spent}
  end
  spent = redis.call('INCRBY', KEYS[2], ARGV[6])
  redis.call('PEXPIRE', KEYS[2], ARGV[7])
end
if tpm >= 0 then
  curr = redis.call('INCRBY', curk, ARGV[4])
  redis.call('PEXPIRE', curk, 2 * w + 1000)
end
return {0, start, prev, curr, spent}
";

/// Settle. KEYS: the token window counter, the budget counter. ARGV: the
/// change of each (used − reserved). A counter that expired is left alone
/// (its window or period no longer decides anything); none goes below zero.
const SETTLE: &str = r"
for i = 1, 2 do
  if ARGV[i] ~= '0' and redis.call('EXISTS', KEYS[i]) == 1 then
    if redis.call('INCRBY', KEYS[i], ARGV[i]) < 0 then
      redis.call('SET', KEYS[i], 0, 'KEEPTTL')
    end
  end
end
return 0
";

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
    reserve: redis::Script,
    settle: redis::Script,
}

/// A reservation, and where it was made.
pub enum Held {
    /// In this node's ledger (no `[fleet]`, or Redis unreachable).
    Local(Hold),
    /// In the fleet's Redis.
    Fleet(FleetHold),
}

impl Held {
    /// Start (Unix ms) of the budget period the reservation is charged to,
    /// when the key has a budget.
    pub fn period_start(&self) -> Option<u64> {
        match self {
            Held::Local(hold) => hold.period_start(),
            Held::Fleet(hold) => hold.period_start,
        }
    }
}

/// What a reservation counted in Redis, to settle it there.
pub struct FleetHold {
    fleet: Arc<Fleet>,
    window_key: String,
    tokens: u64,
    budget_key: String,
    cost_nanos: u64,
    period_start: Option<u64>,
}

/// One reserve script's answer.
struct Answer {
    verdict: i64,
    shared: Shared,
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
        let client = redis::Client::open(url.as_str())
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
            reserve: redis::Script::new(RESERVE),
            settle: redis::Script::new(SETTLE),
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

    /// Reserves `ask` for `key` under `limits` fleet-wide, or on this node's
    /// share in `ledger` when Redis cannot answer within the timeout. `store`
    /// sets a budget counter Redis does not hold.
    pub async fn reserve(
        self: &Arc<Self>,
        ledger: &Mutex<Ledger>,
        store: Option<&UsageReader>,
        key: &str,
        limits: &KeyLimits,
        ask: Amount,
        now: Now,
    ) -> Result<Held, Refusal> {
        if self.health().should_try(Instant::now()) {
            match tokio::time::timeout(
                self.timeout,
                self.reserve_in_redis(store, key, limits, ask, now),
            )
            .await
            {
                Ok(Ok((answer, hold))) => {
                    self.answered();
                    let mut ledger = lock(ledger);
                    ledger.adopt(key, answer.shared);
                    if answer.verdict == 0 {
                        return Ok(Held::Fleet(hold));
                    }
                    // The mirror now holds what Redis decided on: it says which
                    // limit, and when retrying can succeed.
                    // (Another node's settlement may have freed room since:
                    // then Redis's verdict stands, with a retry in a second.)
                    let refusal = ledger.check(key, limits, ask, now);
                    return Err(refusal.unwrap_or_else(|| match limits.budget {
                        Some(budget) if answer.verdict == 2 => Refusal::Budget {
                            budget,
                            retry_after_ms: 1_000,
                        },
                        _ => Refusal::Tokens {
                            limit: limits.tpm.unwrap_or(0),
                            requested: ask.tokens,
                            retry_after_ms: 1_000,
                        },
                    }));
                }
                Ok(Err(e)) => self.failed(&e.to_string()),
                Err(_) => self.failed(&format!("no answer within {:?}", self.timeout)),
            }
        }
        self.local.fetch_add(1, Ordering::Relaxed);
        lock(ledger)
            .reserve(key, &limits.share(self.nodes), ask, now)
            .map(Held::Local)
    }

    async fn reserve_in_redis(
        self: &Arc<Self>,
        store: Option<&UsageReader>,
        key: &str,
        limits: &KeyLimits,
        ask: Amount,
        now: Now,
    ) -> anyhow::Result<(Answer, FleetHold)> {
        // Windows on the fleet's clock; the budget period the request started in.
        let now_ms = now.mono_ms;
        let period = limits.budget.map(|b| (b, b.per.bounds(now.unix_ms)));
        let names = RedisKeys::new(
            key,
            limits.budget.map(|b| b.per),
            period.map_or(0, |(_, (s, _))| s),
        );
        let mut seed: i64 = -1;
        loop {
            let mut call = self.reserve.key(&names.tokens);
            call.key(&names.budget)
                .arg(now_ms)
                .arg(WINDOW_MS)
                .arg(limits.tpm.map_or(-1, |t| t as i64))
                .arg(ask.tokens)
                .arg(limits.budget.map_or(-1, |b| b.nanos as i64))
                .arg(ask.cost_nanos)
                .arg(period.map_or(0, |(_, (_, end))| {
                    end.saturating_sub(now_ms) + BUDGET_GRACE_MS
                }))
                .arg(seed);
            let mut conn = self.connection().await?;
            let out: Vec<i64> = call.invoke_async(&mut conn).await.inspect_err(|_| {
                // A broken connection is replaced on the next call.
                if let Ok(mut slot) = self.conn.try_lock() {
                    *slot = None;
                }
            })?;
            let [verdict, start, prev, curr, spent] = <[i64; 5]>::try_from(out)
                .map_err(|v| anyhow::anyhow!("the reserve script answered {v:?}"))?;
            if verdict == 3 {
                anyhow::ensure!(seed < 0, "the reserve script asked twice for a seed");
                seed = spent_in_store(store, key, period.map_or(0, |(_, (s, _))| s)).await? as i64;
                continue;
            }
            let nonneg = |n: i64| n.max(0) as u64;
            let answer = Answer {
                verdict,
                shared: Shared {
                    window_start: nonneg(start),
                    prev_tokens: nonneg(prev),
                    curr_tokens: nonneg(curr),
                    spend: period.map(|(_, (s, _))| (s, nonneg(spent))),
                },
            };
            let hold = FleetHold {
                fleet: Arc::clone(self),
                window_key: names.window(nonneg(start)),
                tokens: if limits.tpm.is_some() { ask.tokens } else { 0 },
                budget_key: names.budget,
                cost_nanos: if limits.budget.is_some() {
                    ask.cost_nanos
                } else {
                    0
                },
                period_start: period.map(|(_, (s, _))| s),
            };
            return Ok((answer, hold));
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

    fn answered(&self) {
        if self.health().answered() == Some(Change::Back) {
            tracing::info!(redis = %self.target, "fleet: Redis is reachable again; tpm and budgets are fleet-wide again");
        }
    }

    fn failed(&self, why: &str) {
        if let Ok(mut slot) = self.conn.try_lock() {
            *slot = None;
        }
        if self.health().failed(Instant::now()) == Some(Change::Lost) {
            tracing::error!(redis = %self.target, error = %why, nodes = self.nodes, "fleet: Redis unreachable; each key's tpm and budget are held to their local share (limit ÷ nodes) until it is back");
        }
    }
}

impl FleetHold {
    /// Settles this hold to what the request `used`, in the background: the
    /// response does not wait for Redis. Lost when Redis is unreachable
    /// (the reservation then stays counted until its window or period ends:
    /// the fleet under-admits, never over-admits).
    pub fn settle(self, used: Amount) {
        let hold = self;
        let tokens = used.tokens as i64 - hold.tokens as i64;
        let cost = if hold.cost_nanos == 0 && used.cost_nanos > 0 {
            // No budget on this key: its cost is not counted in Redis.
            0
        } else {
            used.cost_nanos as i64 - hold.cost_nanos as i64
        };
        if tokens == 0 && cost == 0 {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let fleet = Arc::clone(&hold.fleet);
        rt.spawn(async move {
            let call = async {
                let mut conn = fleet.connection().await?;
                fleet
                    .settle
                    .key(&hold.window_key)
                    .key(&hold.budget_key)
                    .arg(tokens)
                    .arg(cost)
                    .invoke_async::<i64>(&mut conn)
                    .await?;
                anyhow::Ok(())
            };
            match tokio::time::timeout(fleet.timeout, call).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "fleet: a settlement did not reach Redis; its reservation stays counted until its window ends"),
                Err(_) => tracing::warn!("fleet: a settlement timed out; its reservation stays counted until its window ends"),
            }
        });
    }
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
