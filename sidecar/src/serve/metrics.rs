//! Prometheus metrics (served on the admin listener): requests by
//! model/provider/status, latency and time-to-first-token histograms, tokens,
//! breaker state and failovers, spend in US dollars by key and model, and the
//! usage store's queue, spill and drops, and a fleet's Redis state.
//! Labels carry names and key ids, never secrets.

use crate::serve::fleet::Fleet;
use crate::usage::Recorder;
use afr_core::sse::TokenUsage;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use rustc_hash::FxHashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    model: String,
    provider: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: String,
    provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    model: String,
    provider: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SpendLabels {
    key_id: String,
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderLabels {
    provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FleetLabels {
    limits: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OtelLabels {
    signal: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailoverLabels {
    model: String,
    from: String,
}

/// All sidecar metrics, cheap to update from any task.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<ModelLabels, Histogram>,
    ttft: Family<ModelLabels, Histogram>,
    tokens: Family<TokenLabels, Counter>,
    breaker: Family<ProviderLabels, Gauge>,
    failovers: Family<FailoverLabels, Counter>,
    spend: Family<SpendLabels, Counter<f64, AtomicU64>>,
    fleet_requests: Family<FleetLabels, Counter>,
    local_exhausted: Counter,
    otel_dropped: Family<OtelLabels, Counter>,
    /// Handles on the series a request updates, by model and provider.
    routes: Cache<RouteSeries>,
    /// Handles on the spend series, by key and model.
    spends: Cache<OnceLock<Counter<f64, AtomicU64>>>,
    /// Handles on the breaker gauges, by provider (and "").
    breakers: Cache<OnceLock<Gauge>>,
}

/// Handles on series, by two names (model and provider, key and model).
///
/// Each request updated five to seven series through `Family::get_or_create`,
/// which takes its labels owned (two or three `String`s built per series),
/// SipHashes them and takes the family's lock: ~5 000 instructions a request
/// (callgrind). A handle shares its series (a `Counter` or `Histogram` clone
/// is the same series), so each pair's handles are looked up once and then
/// found here by the borrowed names. Model and provider names come from the
/// config and keys from keys.toml (a client's unknown model is never a label),
/// so the map is as bounded as the families are.
struct Cache<T> {
    map: RwLock<FxHashMap<String, FxHashMap<String, Arc<T>>>>,
}

impl<T: Default> Cache<T> {
    fn new() -> Self {
        Cache {
            map: RwLock::new(FxHashMap::default()),
        }
    }

    fn get(&self, a: &str, b: &str) -> Arc<T> {
        if let Some(found) = self
            .map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(a)
            .and_then(|inner| inner.get(b))
        {
            return found.clone();
        }
        self.map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(a.to_owned())
            .or_default()
            .entry(b.to_owned())
            .or_default()
            .clone()
    }
}

/// The series of one (model, provider) pair, each made on first use (a series
/// appears in `/metrics` only once something was counted in it).
#[derive(Default)]
struct RouteSeries {
    /// `afr_requests_total` by status.
    requests: RwLock<Vec<(u16, Counter)>>,
    latency: OnceLock<Histogram>,
    ttft: OnceLock<Histogram>,
    /// `afr_tokens_total` by class, in [`TOKEN_CLASSES`] order.
    tokens: [OnceLock<Counter>; 6],
}

/// The token classes of `afr_tokens_total`; a class past the first two adds
/// no series until it is used.
const TOKEN_CLASSES: [&str; 6] = [
    "prompt",
    "completion",
    "cached_prompt",
    "cache_write_5m",
    "cache_write_1h",
    "reasoning",
];

fn latency_histogram() -> Histogram {
    // 0.5 ms … ~16 s: gateway overhead through long generations.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("afr");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests by model, provider and HTTP status",
            requests.clone(),
        );
        let latency = Family::<ModelLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "request_duration_seconds",
            "Time until the response was complete",
            latency.clone(),
        );
        let ttft = Family::<ModelLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "time_to_first_token_seconds",
            "Streams: time until the first content event was sent",
            ttft.clone(),
        );
        let tokens = Family::<TokenLabels, Counter>::default();
        registry.register(
            "tokens",
            "Tokens by model, provider and kind: prompt, completion, and the classes priced apart within them (cached_prompt, cache_write_5m, cache_write_1h: part of prompt; reasoning: part of completion)",
            tokens.clone(),
        );
        let breaker = Family::<ProviderLabels, Gauge>::default();
        registry.register(
            "breaker_state",
            "Circuit breaker per provider: 0 closed, 1 half-open, 2 open",
            breaker.clone(),
        );
        let failovers = Family::<FailoverLabels, Counter>::default();
        registry.register(
            "failovers",
            "Requests moved to the next route, by the provider that failed",
            failovers.clone(),
        );
        let spend = Family::<SpendLabels, Counter<f64, AtomicU64>>::default();
        registry.register(
            "spend_usd",
            "Cost of requests at their routes' prices, by key and model (routes without a price add nothing)",
            spend.clone(),
        );
        let fleet_requests = Family::<FleetLabels, Counter>::default();
        registry.register(
            "fleet_requests",
            "Requests nginx forwarded under afr_fleet, by where their rpm was decided: global (Redis) or local (the node's share while Redis is unreachable)",
            fleet_requests.clone(),
        );
        let local_exhausted = Counter::default();
        registry.register(
            "local_exhausted",
            "Requests answered 503 because the sidecar could not open a connection to a provider for want of its own descriptors or ports (not counted against the provider's breaker)",
            local_exhausted.clone(),
        );
        let otel_dropped = Family::<OtelLabels, Counter>::default();
        registry.register(
            "otel_dropped",
            "OpenTelemetry data not delivered to the collector, by signal (traces: spans; metrics: exports) and reason (queue_full: the export queue was full; export_failed: the collector did not take it)",
            otel_dropped.clone(),
        );
        Metrics {
            otel_dropped,
            routes: Cache::new(),
            spends: Cache::new(),
            breakers: Cache::new(),
            local_exhausted,
            fleet_requests,
            spend,
            registry,
            requests,
            latency,
            ttft,
            tokens,
            breaker,
            failovers,
        }
    }

    /// The counter of OpenTelemetry data of `signal` dropped for `reason`
    /// (see `telemetry`), shown from the start at 0.
    pub fn otel_dropped(&self, signal: &'static str, reason: &'static str) -> Counter {
        self.otel_dropped
            .get_or_create(&OtelLabels { signal, reason })
            .clone()
    }

    /// Adds a request's cost in nano-dollars to its key's and model's spend.
    pub fn spend(&self, key_id: &str, model: &str, nanos: u64) {
        if nanos > 0 {
            self.spends
                .get(key_id, model)
                .get_or_init(|| {
                    self.spend
                        .get_or_create(&SpendLabels {
                            key_id: key_id.to_owned(),
                            model: model.to_owned(),
                        })
                        .clone()
                })
                .inc_by(nanos as f64 / afr_core::limits::NANOS_PER_USD as f64);
        }
    }

    /// Counts one finished request and its latency.
    pub fn request(&self, model: &str, provider: &str, status: u16, latency: Duration) {
        let route = self.routes.get(model, provider);
        let counted = route
            .requests
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(s, _)| *s == status)
            .map(|(_, c)| c.clone());
        let counter = counted.unwrap_or_else(|| {
            let counter = self
                .requests
                .get_or_create(&RequestLabels {
                    model: model.to_owned(),
                    provider: provider.to_owned(),
                    status: status.to_string(),
                })
                .clone();
            let mut statuses = route.requests.write().unwrap_or_else(|e| e.into_inner());
            if !statuses.iter().any(|(s, _)| *s == status) {
                statuses.push((status, counter.clone()));
            }
            counter
        });
        counter.inc();
        if !provider.is_empty() {
            route
                .latency
                .get_or_init(|| {
                    self.latency
                        .get_or_create(&ModelLabels {
                            model: model.to_owned(),
                            provider: provider.to_owned(),
                        })
                        .clone()
                })
                .observe(latency.as_secs_f64());
        }
    }

    /// Records a stream's time to first token.
    pub fn ttft(&self, model: &str, provider: &str, ttft: Duration) {
        self.routes
            .get(model, provider)
            .ttft
            .get_or_init(|| {
                self.ttft
                    .get_or_create(&ModelLabels {
                        model: model.to_owned(),
                        provider: provider.to_owned(),
                    })
                    .clone()
            })
            .observe(ttft.as_secs_f64());
    }

    /// Adds a request's token counts, by class. A class it did not use adds
    /// no series.
    pub fn tokens(&self, model: &str, provider: &str, usage: &TokenUsage) {
        let counts = [
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.cached_tokens,
            usage.cache_write_5m,
            usage.cache_write_1h,
            usage.reasoning_tokens,
        ];
        let route = self.routes.get(model, provider);
        for (i, n) in counts.into_iter().enumerate() {
            if i >= 2 && n == 0 {
                continue;
            }
            route.tokens[i]
                .get_or_init(|| {
                    self.tokens
                        .get_or_create(&TokenLabels {
                            model: model.to_owned(),
                            provider: provider.to_owned(),
                            kind: TOKEN_CLASSES[i].to_owned(),
                        })
                        .clone()
                })
                .inc_by(n);
        }
    }

    /// Sets a provider's breaker gauge.
    pub fn breaker_state(&self, provider: &str, state: afr_core::breaker::BreakerState) {
        // Set on every admission and settlement: by a handle found by the
        // borrowed name (see `Cache`), not the family's owned labels.
        self.breakers
            .get(provider, "")
            .get_or_init(|| {
                self.breaker
                    .get_or_create(&ProviderLabels {
                        provider: provider.to_owned(),
                    })
                    .clone()
            })
            .set(state.as_gauge());
    }

    /// Counts one request refused for the sidecar's own exhausted resources.
    pub fn local_exhausted(&self) {
        self.local_exhausted.inc();
    }

    /// Counts one failover away from `from`.
    pub fn failover(&self, model: &str, from: &str) {
        self.failovers
            .get_or_create(&FailoverLabels {
                model: model.to_owned(),
                from: from.to_owned(),
            })
            .inc();
    }

    /// Exports the usage store's counters (read at each scrape):
    /// `afr_usage_pending`, `afr_usage_spilled_total`, `afr_usage_dropped_total`.
    pub fn track_usage_store(&mut self, recorder: Recorder) {
        self.registry
            .register_collector(Box::new(UsageStoreCollector(recorder)));
    }

    /// Exports the fleet's Redis state (read at each scrape):
    /// `afr_fleet_redis_up` and `afr_fleet_local_reservations_total`.
    pub fn track_fleet(&mut self, fleet: Arc<Fleet>) {
        self.registry
            .register_collector(Box::new(FleetCollector(fleet)));
    }

    /// Counts a request nginx forwarded while its `afr_fleet` limits were
    /// `global` (Redis) or `local` (the node's share, Redis unreachable).
    pub fn fleet_request(&self, limits: &str) {
        let limits = match limits {
            "global" => "global",
            "local" => "local",
            _ => return,
        };
        self.fleet_requests
            .get_or_create(&FleetLabels {
                limits: limits.to_owned(),
            })
            .inc();
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }
}

/// Reads the fleet's Redis state at scrape time.
struct FleetCollector(Arc<Fleet>);

impl std::fmt::Debug for FleetCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FleetCollector")
    }
}

impl Collector for FleetCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let up = ConstGauge::new(i64::from(self.0.is_up()));
        up.encode(encoder.encode_descriptor(
            "fleet_redis_up",
            "1 while the sidecar reserves tpm and budgets in the fleet's Redis, 0 while it holds keys to their local share",
            None,
            up.metric_type(),
        )?)?;
        let local = ConstCounter::new(self.0.local_reservations());
        local.encode(encoder.encode_descriptor(
            "fleet_local_reservations",
            "Reservations decided on this node's share (limit / nodes) because Redis did not answer",
            None,
            local.metric_type(),
        )?)?;
        Ok(())
    }
}

/// Reads the usage store's counters at scrape time.
struct UsageStoreCollector(Recorder);

impl std::fmt::Debug for UsageStoreCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UsageStoreCollector")
    }
}

impl Collector for UsageStoreCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = self.0.stats();
        let pending = ConstGauge::new(i64::try_from(stats.pending).unwrap_or(i64::MAX));
        pending.encode(encoder.encode_descriptor(
            "usage_pending",
            "Usage records queued for the database",
            None,
            pending.metric_type(),
        )?)?;
        let spilled = ConstCounter::new(stats.spilled);
        spilled.encode(encoder.encode_descriptor(
            "usage_spilled",
            "Usage records written to the spill file because SQLite refused them or the queue was full",
            None,
            spilled.metric_type(),
        )?)?;
        let dropped = ConstCounter::new(stats.dropped);
        dropped.encode(encoder.encode_descriptor(
            "usage_dropped",
            "Usage records lost: SQLite refused them and the spill file was full or unwritable",
            None,
            dropped.metric_type(),
        )?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(prefix))
    }

    /// The handles the cache keeps are the families' own series: counts
    /// accumulate in one series per label set, each status and class apart,
    /// and a class or status never counted never appears.
    #[test]
    fn cached_handles_count_into_the_families_series() {
        let m = Metrics::new();
        let usage = TokenUsage {
            prompt_tokens: 5,
            completion_tokens: 7,
            reasoning_tokens: 3,
            ..TokenUsage::default()
        };
        for _ in 0..3 {
            m.request("gpt", "openai", 200, Duration::from_millis(2));
            m.tokens("gpt", "openai", &usage);
            m.spend("k1", "gpt", 1_500_000_000);
        }
        m.request("gpt", "openai", 429, Duration::from_millis(1));
        m.request("gpt", "azure", 200, Duration::from_millis(1));
        m.breaker_state("openai", afr_core::breaker::BreakerState::Closed);
        let text = m.encode();
        let count = |prefix: &str| {
            line(&text, prefix)
                .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
                .rsplit(' ')
                .next()
                .unwrap()
                .to_owned()
        };
        assert_eq!(
            count(r#"afr_requests_total{model="gpt",provider="openai",status="200"}"#),
            "3"
        );
        assert_eq!(
            count(r#"afr_requests_total{model="gpt",provider="openai",status="429"}"#),
            "1"
        );
        assert_eq!(
            count(r#"afr_requests_total{model="gpt",provider="azure",status="200"}"#),
            "1"
        );
        assert_eq!(
            count(r#"afr_tokens_total{model="gpt",provider="openai",kind="prompt"}"#),
            "15"
        );
        assert_eq!(
            count(r#"afr_tokens_total{model="gpt",provider="openai",kind="reasoning"}"#),
            "9"
        );
        assert!(
            line(
                &text,
                r#"afr_tokens_total{model="gpt",provider="openai",kind="cached_prompt"}"#
            )
            .is_none(),
            "{text}"
        );
        assert_eq!(
            count(r#"afr_spend_usd_total{key_id="k1",model="gpt"}"#),
            "4.5"
        );
        assert_eq!(
            count(r#"afr_request_duration_seconds_count{model="gpt",provider="openai"}"#),
            "4"
        );
        assert_eq!(count(r#"afr_breaker_state{provider="openai"}"#), "0");
    }
}
