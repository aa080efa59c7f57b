//! The sidecar's shared state: the config snapshot in force (swapped whole on
//! reload), the providers built from it, the breakers (which outlive reloads),
//! metrics and the usage store handles.

use crate::providers::{self, Provider};
use crate::serve::clock::{self, Clock};
use crate::serve::fleet::Fleet;
use crate::serve::metrics::Metrics;
use crate::serve::usage_sink::UsageSink;
use crate::usage::UsageReader;
use afr_core::breaker::{Admission, Breaker, BreakerPolicy, BreakerState, Outcome};
use afr_core::config::{ConfigError, SidecarConfig};
use afr_core::ledger::{Ledger, Now};
use afr_core::pins::Pins;
use arc_swap::ArcSwap;
use rustc_hash::FxHashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// One loaded configuration with everything built from it.
pub struct Runtime {
    /// The parsed, validated config.
    pub config: SidecarConfig,
    /// The shared secret nginx must send.
    pub secret: Vec<u8>,
    /// Enabled providers by name (those whose API key variable is set, or that need none).
    pub providers: FxHashMap<String, Arc<dyn Provider>>,
}

/// Why a config could not be loaded; every line names the file or a config path.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.join("\n"))]
pub struct LoadError(pub Vec<String>);

impl Runtime {
    /// Reads, parses and validates the config at `path`, resolving secrets from the environment.
    pub fn load(path: &Path) -> Result<Runtime, LoadError> {
        let origin = path.display().to_string();
        let text =
            std::fs::read_to_string(path).map_err(|e| LoadError(vec![format!("{origin}: {e}")]))?;
        let config = SidecarConfig::parse(&text, &origin).map_err(|errs| {
            LoadError(
                errs.iter()
                    .map(|e: &ConfigError| format!("{origin}: {e}"))
                    .collect(),
            )
        })?;
        for w in config.warnings() {
            tracing::warn!("{origin}: {w}");
        }
        let secret = match (&config.server.secret, &config.server.secret_env) {
            (Some(s), _) => s.clone(),
            (None, Some(var)) => match std::env::var(var) {
                Ok(s) if s.len() >= 16 => s,
                Ok(_) => {
                    return Err(LoadError(vec![format!(
                        "{origin}: server.secret_env: ${var} must hold at least 16 characters"
                    )]))
                }
                Err(_) => {
                    return Err(LoadError(vec![format!(
                        "{origin}: server.secret_env: environment variable {var} is not set"
                    )]))
                }
            },
            (None, None) => {
                return Err(LoadError(vec![format!(
                    "{origin}: server: a shared secret is required"
                )]))
            }
        };
        let mut built = FxHashMap::default();
        let mut errors = Vec::new();
        for (name, p) in &config.providers {
            let api_key = match &p.api_key_env {
                Some(var) => match std::env::var(var) {
                    Ok(key) if !key.is_empty() => Some(key),
                    _ => {
                        tracing::warn!(provider = %name, variable = %var, "provider disabled: its API key variable is not set");
                        continue;
                    }
                },
                None => None,
            };
            match providers::build(name, p, api_key) {
                Ok(provider) => {
                    built.insert(name.clone(), provider);
                }
                Err(e) => errors.push(format!("{origin}: providers.{name}: {e}")),
            }
        }
        if !errors.is_empty() {
            return Err(LoadError(errors));
        }
        Ok(Runtime {
            config,
            secret: secret.into_bytes(),
            providers: built,
        })
    }

    /// The breaker policy this config asks for.
    pub fn breaker_policy(&self) -> BreakerPolicy {
        BreakerPolicy {
            failures: self.config.breaker.failures,
            cooldown: self.config.breaker.cooldown,
        }
    }
}

/// Responses whose provider the gateway remembers, at most: about 200 bytes
/// each, so 20 MB at worst; the oldest are forgotten first.
pub const RESPONSE_PINS: usize = 100_000;
/// How long the gateway remembers which provider created a response. OpenAI
/// keeps stored responses 30 days; agents continue a conversation within
/// minutes to hours, and a restart forgets every pin anyway.
pub const RESPONSE_PIN_TTL: Duration = Duration::from_secs(24 * 3600);

/// Everything a request handler needs.
pub struct Gateway {
    /// The config in force.
    pub runtime: ArcSwap<Runtime>,
    /// Where the config was read from.
    pub config_path: PathBuf,
    /// FxHash: SipHash of the provider's name twice a request was ~1 000
    /// instructions (callgrind); names come from the config, not clients.
    breakers: Mutex<FxHashMap<String, Breaker>>,
    /// Metrics.
    pub metrics: Metrics,
    /// Usage writer.
    pub recorder: Option<UsageSink>,
    /// Usage reader for `GET /v1/usage`.
    pub reader: Option<UsageReader>,
    /// Token and money reservations of every key on this host: the sidecar
    /// is one process per host, so this is the host's one decision point.
    pub ledger: Mutex<Ledger>,
    /// The ledger's clocks: token windows on a monotonic one.
    pub clock: Clock,
    /// With `[fleet]`: reservations are made in the fleet's Redis, and the
    /// ledger above mirrors its counts (and decides while Redis is down).
    pub fleet: Option<Arc<Fleet>>,
    /// OpenTelemetry spans and GenAI metrics, when an OTLP endpoint is set.
    pub telemetry: Option<Arc<crate::serve::telemetry::Telemetry>>,
    /// Which provider created each Responses API response relayed here, so
    /// `previous_response_id` follow-ups go back to it.
    pins: Mutex<Pins>,
    /// Whether budgets can be held (a [`Budgets`] as its `u8`).
    budgets: AtomicU8,
}

/// Whether the ledger knows what each key spent this period, so a budget
/// can be held: budgets fail closed (design §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Budgets {
    /// Seeded from the usage store: budgets are held.
    Ready = 0,
    /// The usage store could not be read yet; the seed is being retried and
    /// budgeted keys are refused meanwhile (503, `Retry-After`).
    Seeding = 1,
    /// No usage store (`[usage] record = false`): what a key spent cannot
    /// survive a restart, so budgeted keys are refused.
    NoStore = 2,
}

impl Gateway {
    /// A gateway serving `runtime`.
    pub fn new(
        runtime: Runtime,
        config_path: PathBuf,
        recorder: Option<UsageSink>,
        reader: Option<UsageReader>,
    ) -> Self {
        let gateway = Gateway {
            runtime: ArcSwap::from_pointee(runtime),
            config_path,
            breakers: Mutex::new(FxHashMap::default()),
            metrics: Metrics::new(),
            recorder,
            reader,
            ledger: Mutex::new(Ledger::new()),
            clock: Clock::start(),
            fleet: None,
            telemetry: None,
            pins: Mutex::new(Pins::new(RESPONSE_PINS, RESPONSE_PIN_TTL)),
            budgets: AtomicU8::new(Budgets::Seeding as u8),
        };
        gateway.sync_breakers();
        gateway
    }

    /// Installs a newly loaded config; breaker states carry over by provider name.
    pub fn install(&self, runtime: Runtime) {
        self.runtime.store(Arc::new(runtime));
        self.sync_breakers();
    }

    /// The ledger's clocks for a request that started at `started_unix_ms`.
    /// A fleet's token windows are the fleet's (Redis's counters, aligned to
    /// the nodes' shared wall clock), so there the window clock is the wall
    /// clock too; a lone sidecar's windows run on its monotonic clock.
    pub fn ledger_now(&self, started_unix_ms: u64) -> Now {
        if self.fleet.is_some() {
            Now {
                mono_ms: clock::unix_ms(),
                unix_ms: started_unix_ms,
            }
        } else {
            self.clock.now_for(started_unix_ms)
        }
    }

    /// Whether budgets can be held now.
    pub fn budgets(&self) -> Budgets {
        match self.budgets.load(Ordering::Acquire) {
            0 => Budgets::Ready,
            2 => Budgets::NoStore,
            _ => Budgets::Seeding,
        }
    }

    /// Records whether budgets can be held.
    pub fn set_budgets(&self, budgets: Budgets) {
        self.budgets.store(budgets as u8, Ordering::Release);
    }

    /// The response pins, even if a thread panicked holding them (each
    /// statement leaves them valid).
    pub fn pins(&self) -> MutexGuard<'_, Pins> {
        self.pins.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The ledger, even if a thread panicked holding it (its state is a few
    /// integers per key, valid after every statement).
    pub fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sync_breakers(&self) {
        let runtime = self.runtime.load();
        let policy = runtime.breaker_policy();
        let now = Instant::now();
        let mut breakers = self.lock();
        breakers.retain(|name, _| runtime.config.providers.contains_key(name));
        for name in runtime.config.providers.keys() {
            let breaker = breakers
                .entry(name.clone())
                .or_insert_with(|| Breaker::new(policy));
            breaker.set_policy(policy);
            self.metrics.breaker_state(name, breaker.state(now));
        }
    }

    fn lock(&self) -> MutexGuard<'_, FxHashMap<String, Breaker>> {
        // A panic while holding this lock cannot leave a breaker half-updated
        // (every update is a single assignment), so a poisoned map is still sound.
        self.breakers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every provider's breaker state at `now`, by name: what the admin
    /// listener's dashboard samples into its history.
    pub fn breaker_states(&self, now: Instant) -> Vec<(String, BreakerState)> {
        let mut states: Vec<(String, BreakerState)> = self
            .lock()
            .iter()
            .map(|(name, breaker)| (name.clone(), breaker.state(now)))
            .collect();
        states.sort_by(|a, b| a.0.cmp(&b.0));
        states
    }

    /// Asks `provider`'s breaker for admission at `now`.
    pub fn admit(&self, provider: &str, now: Instant) -> Admission {
        let policy = self.runtime.load().breaker_policy();
        let mut breakers = self.lock();
        // Found by the borrowed name: `entry` would own (allocate) it on
        // every request for the one time it is missing.
        if !breakers.contains_key(provider) {
            breakers.insert(provider.to_owned(), Breaker::new(policy));
        }
        let Some(breaker) = breakers.get_mut(provider) else {
            unreachable!("inserted above");
        };
        let admission = breaker.admit(now);
        self.metrics.breaker_state(provider, breaker.state(now));
        admission
    }

    /// Settles one admitted request to `provider` (see [`Breaker::settle`]).
    pub fn settle(&self, provider: &str, admission: Admission, outcome: Outcome) {
        let now = Instant::now();
        let mut breakers = self.lock();
        if let Some(breaker) = breakers.get_mut(provider) {
            breaker.settle(admission, outcome, now);
            self.metrics.breaker_state(provider, breaker.state(now));
        }
    }
}

/// A breaker admission that must be settled; dropping it unsettled (the
/// client went away mid-attempt) settles it neutral, which releases a
/// half-open probe and changes nothing else.
pub struct BreakerTicket {
    gateway: Arc<Gateway>,
    provider: String,
    admission: Admission,
    settled: bool,
}

impl BreakerTicket {
    /// A ticket for an attempt on `provider` that `admission` let through.
    pub fn new(gateway: Arc<Gateway>, provider: &str, admission: Admission) -> Self {
        BreakerTicket {
            gateway,
            provider: provider.to_owned(),
            admission,
            settled: false,
        }
    }

    /// The provider answered well.
    pub fn success(self) {
        self.settle(Outcome::Success);
    }

    /// The provider failed.
    pub fn failure(self) {
        self.settle(Outcome::Failure);
    }

    /// Settles the attempt with `outcome`.
    pub fn settle(mut self, outcome: Outcome) {
        self.settled = true;
        self.gateway.settle(&self.provider, self.admission, outcome);
    }
}

impl Drop for BreakerTicket {
    fn drop(&mut self) {
        if !self.settled {
            self.gateway
                .settle(&self.provider, self.admission, Outcome::Neutral);
        }
    }
}
