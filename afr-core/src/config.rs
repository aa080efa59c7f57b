//! The sidecar configuration (design §6): listen address, shared secret,
//! providers, the model catalogue with its routes, breaker and usage settings.
//!
//! Parsing is strict (`deny_unknown_fields`, human durations such as `"30s"`)
//! and followed by an explicit [`SidecarConfig::validate`] step whose errors
//! name the config path, e.g. `models.gpt-4o-mini.routes[1]: unknown provider "azur"`.

use crate::endpoint::ModelKind;
use crate::splice::Splice;
use crate::sse::TokenUsage;
use indexmap::IndexMap;
use serde::Deserialize;
use serde_json::Value;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// One configuration error, naming where it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConfigError {
    /// Dotted path in the file (`models.gpt-4o-mini.routes[1]`), or the file for syntax errors.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl ConfigError {
    fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// The whole sidecar config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SidecarConfig {
    /// The listener nginx talks to.
    #[serde(default)]
    pub server: ServerConfig,
    /// The admin listener (`/metrics`, `/healthz`).
    #[serde(default)]
    pub admin: AdminConfig,
    /// Circuit breaker policy, shared by all providers.
    #[serde(default)]
    pub breaker: BreakerConfig,
    /// The usage store.
    #[serde(default)]
    pub usage: UsageConfig,
    /// Token and budget limits shared by a fleet's nodes through Redis.
    #[serde(default)]
    pub fleet: Option<FleetConfig>,
    /// OpenTelemetry export; the standard `OTEL_*` variables override it.
    #[serde(default)]
    pub telemetry: Option<TelemetryConfig>,
    /// Upstream providers by name.
    pub providers: IndexMap<String, ProviderConfig>,
    /// The model catalogue, in the order `GET /v1/models` lists it.
    pub models: IndexMap<String, ModelConfig>,
}

/// `[server]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// `unix:/path/to.sock` or a loopback `host:port`.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// The shared secret nginx sends in `X-Afr-Secret` (prefer `secret_env`).
    #[serde(default)]
    pub secret: Option<String>,
    /// Environment variable holding the shared secret.
    #[serde(default)]
    pub secret_env: Option<String>,
    /// Largest request body accepted, in bytes (larger: 413).
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Permissions of the unix socket, octal (`"0660"`: owner and group, so
    /// nginx's workers connect when the sidecar runs with nginx's group).
    #[serde(default = "default_socket_mode")]
    pub socket_mode: String,
    /// How long open requests and streams may run on after SIGTERM; then they
    /// are cut (and recorded as cut short) so the usage store can flush.
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// How long a healthy stream (the provider answered 200) is held back
    /// waiting for its first content before it commits anyway: until then a
    /// failure can still move to the next route; after it the client has its
    /// headers and is not left in silence while a reasoning model thinks.
    #[serde(default = "default_stream_hold", with = "humantime_serde")]
    pub stream_hold: Duration,
    /// Longest silence toward the client on a committed stream before an SSE
    /// comment (`: keep-alive`) is sent, so proxies and load balancers with an
    /// idle timeout (AWS ALB: 60 s) keep the connection.
    #[serde(default = "default_stream_keepalive", with = "humantime_serde")]
    pub stream_keepalive: Duration,
}

impl ServerConfig {
    /// `socket_mode` as permission bits (validated by [`SidecarConfig::validate`]).
    pub fn socket_mode_bits(&self) -> Result<u32, String> {
        let digits = self.socket_mode.trim_start_matches("0o");
        match u32::from_str_radix(digits, 8) {
            Ok(bits) if bits <= 0o777 && !digits.is_empty() => Ok(bits),
            _ => Err(format!(
                "\"{}\" is not an octal file mode such as \"0660\"",
                self.socket_mode
            )),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: default_listen(),
            secret: None,
            secret_env: None,
            max_body_bytes: default_max_body(),
            socket_mode: default_socket_mode(),
            shutdown_grace: default_shutdown_grace(),
            stream_hold: default_stream_hold(),
            stream_keepalive: default_stream_keepalive(),
        }
    }
}

fn default_http2_max_streams() -> u32 {
    100
}

fn default_http2_max_connections() -> u32 {
    100
}

fn default_stream_hold() -> Duration {
    Duration::from_secs(3)
}

fn default_stream_keepalive() -> Duration {
    Duration::from_secs(15)
}

fn default_socket_mode() -> String {
    "0660".into()
}

fn default_shutdown_grace() -> Duration {
    Duration::from_secs(20)
}

fn default_listen() -> String {
    "unix:/run/afr/sidecar.sock".into()
}

fn default_max_body() -> usize {
    // Anthropic's limit on a Messages request; agents send whole sessions.
    32 << 20
}

/// Where a listener binds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A unix domain socket path.
    Unix(PathBuf),
    /// A loopback TCP address.
    Tcp(SocketAddr),
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
            Listen::Tcp(a) => write!(f, "{a}"),
        }
    }
}

/// Parses `unix:/path` or a loopback `ip:port` (the sidecar trusts only nginx, design §7).
pub fn parse_listen(s: &str) -> Result<Listen, String> {
    if let Some(path) = s.strip_prefix("unix:") {
        if path.is_empty() {
            return Err("unix socket path is empty".into());
        }
        return Ok(Listen::Unix(PathBuf::from(path)));
    }
    let addr: SocketAddr = s
        .parse()
        .map_err(|_| format!("{s:?} is neither \"unix:/path\" nor an \"ip:port\" address"))?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "{addr} is not a loopback address; the sidecar must only be reachable by nginx"
        ));
    }
    Ok(Listen::Tcp(addr))
}

/// `[admin]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Loopback address for `/metrics`, `/healthz` and the operator's
    /// dashboard; empty disables it.
    #[serde(default = "default_admin_listen")]
    pub listen: String,
    /// The web files directory the operator's dashboard page and its chart
    /// library are read from (the package installs them here).
    #[serde(default = "default_admin_web")]
    pub web: std::path::PathBuf,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: default_admin_listen(),
            web: default_admin_web(),
        }
    }
}

fn default_admin_listen() -> String {
    "127.0.0.1:9464".into()
}

fn default_admin_web() -> std::path::PathBuf {
    "/usr/share/afr/web".into()
}

/// `[breaker]` (design §4 defaults).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// Consecutive failures that open a provider's breaker.
    #[serde(default = "default_failures")]
    pub failures: u32,
    /// How long an open breaker stays open.
    #[serde(default = "default_cooldown", with = "humantime_serde")]
    pub cooldown: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failures: default_failures(),
            cooldown: default_cooldown(),
        }
    }
}

fn default_failures() -> u32 {
    5
}

fn default_cooldown() -> Duration {
    Duration::from_secs(30)
}

/// `[usage]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageConfig {
    /// Whether usage is recorded at all. `false` opens no store (no rows, no
    /// `GET /v1/usage`): a diagnostic for measuring what recording costs
    /// (the benchmark's governed lane), not a way to run in production.
    #[serde(default = "default_record")]
    pub record: bool,
    /// Where rows go: the embedded SQLite file (default) or PostgreSQL (a fleet).
    #[serde(default)]
    pub backend: UsageBackend,
    /// SQLite database file. With `backend = "postgres"` only the spill file
    /// (`<path>-unwritten.jsonl`) lives here.
    #[serde(default = "default_usage_path")]
    pub path: PathBuf,
    /// Environment variable holding the PostgreSQL URL
    /// (`postgres://user:password@host:5432/db`); the URL carries a password,
    /// so it never appears in the config file or in logs.
    #[serde(default = "default_postgres_url_env")]
    pub postgres_url_env: String,
    /// PEM file of the CA certificates PostgreSQL's TLS certificate is
    /// verified against (besides the built-in roots), for a URL with
    /// `sslmode=require` (or `verify-full`, `verify-ca`).
    #[serde(default)]
    pub postgres_ca_file: Option<PathBuf>,
    /// Records queued for the database past which new ones go to the spill
    /// file (`<path>-unwritten.jsonl`).
    #[serde(default = "default_queue_max")]
    pub queue_max: u64,
    /// Largest spill file, in bytes; records past it are dropped and counted
    /// in `afr_usage_dropped_total`.
    #[serde(default = "default_spill_max_bytes")]
    pub spill_max_bytes: u64,
}

impl Default for UsageConfig {
    fn default() -> Self {
        UsageConfig {
            record: default_record(),
            backend: UsageBackend::default(),
            path: default_usage_path(),
            postgres_url_env: default_postgres_url_env(),
            postgres_ca_file: None,
            queue_max: default_queue_max(),
            spill_max_bytes: default_spill_max_bytes(),
        }
    }
}

fn default_record() -> bool {
    true
}

fn default_queue_max() -> u64 {
    100_000
}

fn default_spill_max_bytes() -> u64 {
    256 * 1024 * 1024
}

/// `[fleet]`: every key's `tpm` and budget hold across the fleet's nodes
/// through one Redis, as nginx's `afr_fleet` does for `rpm` (design §9).
/// Without it each node's sidecar decides on its own.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// Environment variable holding the Redis URL
    /// (`redis://[:password@]host:6379[/db]`): a URL may carry a password, so
    /// it never appears in the config file or in logs.
    #[serde(default = "default_redis_url_env")]
    pub redis_url_env: String,
    /// Nodes sharing the limits: while Redis is unreachable each node holds
    /// every key to limit ÷ nodes on its own.
    pub nodes: u32,
    /// Bound on every Redis call (connect included): no request waits longer for Redis.
    #[serde(default = "default_fleet_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// PEM file of the CA certificates Redis's TLS certificate is verified
    /// against (a `rediss://` URL), instead of the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// `[telemetry]`: GenAI spans and metrics over OTLP/HTTP (the sidecar's
/// `serve/telemetry.rs`). Each field has a standard `OTEL_*` variable, which
/// wins when it is set, so a unit's environment can redirect a packaged
/// config. Read at start.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// The collector's OTLP/HTTP base URL (`http://127.0.0.1:4318`); signals
    /// go to `/v1/traces` and `/v1/metrics` under it
    /// (`OTEL_EXPORTER_OTLP_ENDPOINT`).
    pub endpoint: String,
    /// `service.name` of every span and point (`OTEL_SERVICE_NAME`).
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// The share of requests traced when the client's `traceparent` does
    /// not decide (parent-based, trace-id ratio; `OTEL_TRACES_SAMPLER`).
    #[serde(default = "default_sample_ratio")]
    pub sample_ratio: f64,
    /// Export spans (`OTEL_TRACES_EXPORTER=none` turns them off).
    #[serde(default = "default_true")]
    pub traces: bool,
    /// Export the GenAI metrics (`OTEL_METRICS_EXPORTER=none`).
    #[serde(default = "default_true")]
    pub metrics: bool,
    /// Record message contents on sampled spans (`gen_ai.input.messages`,
    /// `gen_ai.output.messages`, `gen_ai.system_instructions`): the
    /// clients' prompts and the models' answers, so off unless the operator
    /// opts in (`OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT`).
    #[serde(default)]
    pub capture_content: bool,
}

fn default_service_name() -> String {
    "afr".to_owned()
}

fn default_sample_ratio() -> f64 {
    1.0
}

fn default_true() -> bool {
    true
}

fn default_redis_url_env() -> String {
    "AFR_FLEET_REDIS_URL".to_owned()
}

fn default_fleet_timeout() -> Duration {
    Duration::from_millis(200)
}

/// `[usage] backend`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UsageBackend {
    /// One SQLite file per node.
    #[default]
    Sqlite,
    /// One PostgreSQL database for every node of a fleet.
    Postgres,
}

fn default_postgres_url_env() -> String {
    "AFR_USAGE_POSTGRES_URL".to_owned()
}

fn default_usage_path() -> PathBuf {
    PathBuf::from("/var/lib/afr/usage.db")
}

/// Wire format a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// OpenAI and compatible APIs (vLLM, Ollama, Groq, OpenRouter, the mock).
    Openai,
    /// Azure OpenAI (deployment URLs, `api-version`, `api-key`).
    Azure,
    /// Anthropic Messages API.
    Anthropic,
}

/// `[providers.NAME]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// Wire format.
    pub kind: ProviderKind,
    /// Base URL, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// Environment variable holding the provider API key (never logged).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Azure `api-version` query parameter.
    #[serde(default)]
    pub api_version: Option<String>,
    /// Timeouts.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Offer HTTP/2 (negotiated by ALPN over TLS). Off by default: each HTTP/2
    /// connection carries up to `http2_max_streams` requests, a request finding
    /// every connection full opens another, up to `http2_max_connections`, and
    /// requests past those go over HTTP/1.1 keep-alive connections.
    #[serde(default)]
    pub http2: bool,
    /// The server's concurrent-stream limit, as far as it is known (100 at
    /// the large providers): a request past it takes a stream on another
    /// connection instead of waiting for one on a full connection.
    #[serde(default = "default_http2_max_streams")]
    pub http2_max_streams: u32,
    /// The most HTTP/2 connections to this provider at once (100: 10 000
    /// streams at 100 per connection); requests past them use HTTP/1.1.
    #[serde(default = "default_http2_max_connections")]
    pub http2_max_connections: u32,
    /// PEM file of CA certificates trusted for this provider besides the
    /// built-in roots (a private CA in front of a self-hosted model server).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// Per-provider timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// TCP + TLS connect.
    #[serde(default = "default_connect", with = "humantime_serde")]
    pub connect: Duration,
    /// From sending the request to the response headers: the provider has
    /// answered. Bounds a stream and a half-open probe; a non-streaming answer
    /// (headers only once the completion is generated) is bounded by `total`.
    #[serde(default = "default_first_byte", with = "humantime_serde")]
    pub first_byte: Duration,
    /// From sending the request to a stream's first content event. Generous:
    /// a provider that answered and is still silent is a reasoning model
    /// thinking, so an expiry is never failed over nor held against its breaker.
    #[serde(default = "default_first_content", with = "humantime_serde")]
    pub first_content: Duration,
    /// Longest silence between two stream chunks.
    #[serde(default = "default_idle", with = "humantime_serde")]
    pub idle: Duration,
    /// The whole exchange.
    #[serde(default = "default_total", with = "humantime_serde")]
    pub total: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: default_connect(),
            first_byte: default_first_byte(),
            first_content: default_first_content(),
            idle: default_idle(),
            total: default_total(),
        }
    }
}

fn default_connect() -> Duration {
    Duration::from_secs(5)
}
fn default_first_byte() -> Duration {
    Duration::from_secs(60)
}
fn default_first_content() -> Duration {
    Duration::from_secs(600)
}
fn default_idle() -> Duration {
    Duration::from_secs(60)
}
fn default_total() -> Duration {
    Duration::from_secs(600)
}

/// Model tier shown in `GET /v1/models`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
pub enum Tier {
    /// Fastest response, simple tasks.
    Fast,
    /// Balance of speed and intelligence.
    Smart,
    /// Most capable.
    Pro,
}

/// `[models.ID]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Tier.
    pub tier: Tier,
    /// One-line description.
    pub description: String,
    /// `owned_by` in the models list.
    #[serde(default = "default_owned_by")]
    pub owned_by: String,
    /// `created` (Unix seconds) in the models list.
    #[serde(default)]
    pub created: u64,
    /// What the model is, which decides the endpoints it serves
    /// (`"chat"`, the default, or `"embedding"`).
    #[serde(default)]
    pub kind: ModelKind,
    /// Ordered routes; the first is preferred.
    pub routes: Vec<RouteConfig>,
}

fn default_owned_by() -> String {
    "aeferalow".into()
}

/// One `(provider, upstream model)` route with its parameter adaptations.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Provider name from `[providers]`.
    pub provider: String,
    /// Model name sent upstream.
    pub model: String,
    /// Fields removed before sending (e.g. `temperature` for models accepting only the default).
    #[serde(default)]
    pub drop: Vec<String>,
    /// Fields renamed (e.g. `max_tokens = "max_completion_tokens"`).
    #[serde(default)]
    pub rename: IndexMap<String, String>,
    /// Numeric fields clamped into a range (applied after `rename`).
    #[serde(default)]
    pub clamp: IndexMap<String, Clamp>,
    /// List price of this route; `None`: cost unknown (recorded as such, and
    /// no spend counts against budgets).
    #[serde(default)]
    pub price: Option<Price>,
    /// Longest an SSE event of this route may take from its first byte to
    /// its end; `None`: [`DEFAULT_EVENT_IDLE`]. A provider that stalls or
    /// drips mid-event is failing, unlike one that is silent between events
    /// (a reasoning model thinking): before the first content the request
    /// fails over, after it the stream ends with an error event.
    #[serde(default, with = "humantime_serde")]
    pub event_idle: Option<Duration>,
    /// Output cap written into a Responses API request that sets no
    /// `max_output_tokens`, so no provider can bill past what the gateway
    /// reserved; `None`: [`crate::validate::DEFAULT_MAX_TOKENS`].
    #[serde(default)]
    pub max_output_tokens: Option<u64>,
}

/// The default [`RouteConfig::event_idle`]. Providers write each event in
/// one go, so its bytes arrive within a round trip; 2 s is generous for
/// that and shorter than the default `server.stream_hold` (3 s), so a
/// stream that drips from its start fails over before it would commit.
pub const DEFAULT_EVENT_IDLE: Duration = Duration::from_secs(2);

/// A route's price in US dollars per million tokens, one field per token
/// class; [`Price::cost_nanos`] is the one place a usage becomes money.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    /// Prompt tokens.
    pub input: f64,
    /// Prompt tokens served from the provider's cache; `input` when absent
    /// (never under-billed: providers charge a fraction of it).
    #[serde(default)]
    pub cached_input: Option<f64>,
    /// Prompt tokens written to a 5-minute cache (Anthropic); 1.25 × `input`
    /// when absent, Anthropic's published multiplier.
    #[serde(default)]
    pub cache_write: Option<f64>,
    /// Prompt tokens written to a 1-hour cache (Anthropic); 2 × `input` when absent.
    #[serde(default)]
    pub cache_write_1h: Option<f64>,
    /// Completion tokens, reasoning tokens included.
    pub output: f64,
    /// The long-context tier, where the route has one: a request whose
    /// input (every class) is above `above` tokens is billed wholly at
    /// these prices (Anthropic's 1M-context beta above 200 000 tokens).
    #[serde(default)]
    pub long_context: Option<LongContext>,
}

/// Input tokens above which Anthropic bills a request with its 1M-context
/// beta (`anthropic-beta: context-1m-…`) at its long-context prices.
pub const ANTHROPIC_LONG_CONTEXT_ABOVE: u64 = 200_000;

/// A route's long-context prices (see [`Price::long_context`]).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LongContext {
    /// Input tokens above which the request is billed at these prices.
    pub above: u64,
    /// As [`Price::input`].
    pub input: f64,
    /// As [`Price::cached_input`].
    #[serde(default)]
    pub cached_input: Option<f64>,
    /// As [`Price::cache_write`].
    #[serde(default)]
    pub cache_write: Option<f64>,
    /// As [`Price::cache_write_1h`].
    #[serde(default)]
    pub cache_write_1h: Option<f64>,
    /// As [`Price::output`].
    pub output: f64,
}

/// Anthropic's 5-minute cache write, as a multiple of the input price.
pub const CACHE_WRITE_5M_FACTOR: f64 = 1.25;
/// Anthropic's 1-hour cache write, as a multiple of the input price.
pub const CACHE_WRITE_1H_FACTOR: f64 = 2.0;

impl Price {
    /// The prices a request with `input_tokens` of input (every class) is
    /// billed at: the long-context tier's above its threshold.
    pub fn tier(&self, input_tokens: u64) -> Price {
        match self.long_context {
            Some(l) if input_tokens > l.above => Price {
                input: l.input,
                cached_input: l.cached_input,
                cache_write: l.cache_write,
                cache_write_1h: l.cache_write_1h,
                output: l.output,
                long_context: None,
            },
            _ => *self,
        }
    }

    /// Cost in nano-dollars of `usage`, each token class at its price (of
    /// the tier its input falls in). $1 per million tokens is 1000
    /// nano-dollars per token.
    pub fn cost_nanos(&self, usage: &TokenUsage) -> u64 {
        self.tier(usage.prompt_tokens).cost_in_tier(usage)
    }

    fn cost_in_tier(&self, usage: &TokenUsage) -> u64 {
        let per_token = |n: u64, dollars_per_m: f64| n as f64 * dollars_per_m * 1000.0;
        let cached = usage.cached_tokens.min(usage.prompt_tokens);
        let [_, cached_price, write_5m, write_1h] = self.input_prices();
        let nanos = per_token(usage.uncached_input(), self.input)
            + per_token(cached, cached_price)
            + per_token(usage.cache_write_5m, write_5m)
            + per_token(usage.cache_write_1h, write_1h)
            + per_token(usage.completion_tokens, self.output);
        nanos.round() as u64
    }

    /// The highest price any input token can have on this route: with
    /// `writes_cache` (a provider that writes prompt caches, Anthropic) a
    /// cache write, dearer than plain input, since the gateway cannot foresee
    /// which prefix the provider caches.
    pub fn max_input(&self, writes_cache: bool) -> f64 {
        let classes = if writes_cache { 4 } else { 2 };
        self.input_prices()[..classes]
            .iter()
            .fold(0.0, |max, &p| max.max(p))
    }

    /// The price of each input class, defaults applied: plain input, cache
    /// reads, 5-minute and 1-hour cache writes.
    fn input_prices(&self) -> [f64; 4] {
        [
            self.input,
            self.cached_input.unwrap_or(self.input),
            self.cache_write
                .unwrap_or(self.input * CACHE_WRITE_5M_FACTOR),
            self.cache_write_1h
                .unwrap_or(self.input * CACHE_WRITE_1H_FACTOR),
        ]
    }

    /// The worst-case cost of `prompt` input tokens (each at the dearest
    /// input class, see [`Price::max_input`]) and `output` output tokens.
    /// A prompt above the long-context threshold is priced at the dearer of
    /// the two tiers (the estimate never under-counts, so one at or below
    /// it is never billed the long-context prices).
    pub fn worst_nanos(&self, prompt: u64, output: u64, writes_cache: bool) -> u64 {
        let at = |p: &Price| {
            (prompt as f64 * p.max_input(writes_cache) * 1000.0 + output as f64 * p.output * 1000.0)
                .round() as u64
        };
        let long = self.tier(prompt);
        at(self).max(if long == *self { 0 } else { at(&long) })
    }
}

/// A numeric range for [`RouteConfig::clamp`].
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Clamp {
    /// Lower bound.
    #[serde(default)]
    pub min: Option<f64>,
    /// Upper bound.
    #[serde(default)]
    pub max: Option<f64>,
}

impl RouteConfig {
    /// Longest one SSE event may take to arrive once its first byte came.
    pub fn event_idle(&self) -> Duration {
        self.event_idle.unwrap_or(DEFAULT_EVENT_IDLE)
    }

    /// Adapts a validated body to what this route's upstream model accepts:
    /// drop, then rename, then clamp; finally sets `model` to the upstream name.
    /// Members it does not touch keep the client's bytes.
    pub fn adapt(&self, body: &mut Splice<'_>) {
        for field in &self.drop {
            body.remove(field);
        }
        for (from, to) in &self.rename {
            body.rename(from, to);
        }
        for (field, range) in &self.clamp {
            if let Some(clamped) = body.get(field).and_then(|raw| range.apply(raw)) {
                body.set(field, clamped);
            }
        }
        let model = serde_json::to_vec(&self.model).unwrap_or_else(|_| b"\"\"".to_vec());
        body.set("model", model);
    }
}

impl Clamp {
    /// The clamped JSON text of the number `raw`, or `None` when it is not a
    /// number or already in range (its bytes then stay as the client wrote them).
    fn apply(&self, raw: &[u8]) -> Option<Vec<u8>> {
        let Ok(Value::Number(n)) = serde_json::from_slice::<Value>(raw) else {
            return None;
        };
        let v = n.as_f64()?;
        let clamped = v.max(self.min.unwrap_or(v)).min(self.max.unwrap_or(v));
        if clamped == v {
            return None;
        }
        let text = if n.is_u64() || n.is_i64() {
            (clamped.round() as i64).to_string()
        } else {
            Value::from(clamped).to_string()
        };
        Some(text.into_bytes())
    }
}

/// Longest duration any setting accepts. Durations are added to clock
/// readings (deadlines, breaker cooldowns), and `Instant + Duration` panics on
/// overflow: `"300000000000 years"` parses, then crashed the first request.
/// Nothing the gateway times is meant to last longer than this.
pub const MAX_DURATION: Duration = Duration::from_secs(31_557_600); // humantime's "1 year"

/// A duration no longer than [`MAX_DURATION`].
fn check_duration(d: Duration) -> Result<(), String> {
    if d > MAX_DURATION {
        return Err(format!(
            "{} is longer than the limit of {}",
            humantime::format_duration(d),
            humantime::format_duration(MAX_DURATION)
        ));
    }
    Ok(())
}

/// A TOML syntax or type error as `line L, column C: table.key: message`,
/// without the source line the `toml` crate's own `Display` quotes: that line
/// may hold a secret (`secret = "…`). Only the key is taken from the text
/// (keys are names, never values). Anything key-shaped in the message (serde
/// quotes values it could not read) is masked too.
pub fn describe_toml_error(
    text: &str,
    span: Option<std::ops::Range<usize>>,
    message: &str,
) -> String {
    let message = without_values(&crate::redact::mask_secrets(message.trim())).replace('\n', "; ");
    let Some(at) = span.map(|s| s.start.min(text.len())) else {
        return message;
    };
    let before = text.get(..at).unwrap_or(text);
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = before.matches('\n').count() + 1;
    let column = before[line_start..].chars().count() + 1;
    // The key whose value is at fault: what precedes `=` on this line, under
    // the last `[table]` header above it.
    let key = before[line_start..]
        .split_once('=')
        .map(|(key, _)| key.trim())
        .filter(|key| !key.is_empty() && !key.starts_with('#'));
    let table = before[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|header| {
            header
                .trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or("")
                .trim()
        });
    match (table, key) {
        (Some(table), Some(key)) if !table.is_empty() => {
            format!("line {line}, column {column}: {table}.{key}: {message}")
        }
        (_, Some(key)) => format!("line {line}, column {column}: {key}: {message}"),
        _ => format!("line {line}, column {column}: {message}"),
    }
}

/// serde's type errors quote the value they rejected (`invalid type: integer
/// `1234…`, expected a string`): for `secret = 1234…` written without quotes
/// that value is the secret. The key and position say enough without it.
fn without_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    loop {
        let found = ["string \"", "integer `", "floating point `"]
            .iter()
            .filter_map(|kind| rest.find(kind).map(|at| (at, *kind)))
            .min();
        let Some((at, kind)) = found else {
            out.push_str(rest);
            return out;
        };
        let (word, open) = kind.split_at(kind.len() - 1);
        out.push_str(&rest[..at]);
        out.push_str(word.trim_end());
        let value = &rest[at + kind.len()..];
        // serde prints strings Debug-escaped: the first unescaped quote closes it.
        let mut escaped = false;
        let close = value.char_indices().find(|&(_, c)| {
            let closes = !escaped && c.to_string() == open;
            escaped = !escaped && c == '\\';
            closes
        });
        match close {
            Some((end, _)) => rest = &value[end + 1..],
            None => return out,
        }
    }
}

impl SidecarConfig {
    /// Parses and validates TOML text; `origin` (the file path) prefixes syntax errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, Vec<ConfigError>> {
        let config: SidecarConfig = toml::from_str(text).map_err(|e| {
            vec![ConfigError::new(
                origin,
                describe_toml_error(text, e.span(), e.message()),
            )]
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what serde cannot: references between sections, addresses, ranges.
    pub fn validate(&self) -> Result<(), Vec<ConfigError>> {
        let mut errors = Vec::new();
        if let Err(e) = parse_listen(&self.server.listen) {
            errors.push(ConfigError::new("server.listen", e));
        }
        match (&self.server.secret, &self.server.secret_env) {
            (Some(_), Some(_)) => errors.push(ConfigError::new("server", "set either secret or secret_env, not both")),
            (None, None) => errors.push(ConfigError::new(
                "server",
                "a shared secret is required: set secret_env (or secret) to match nginx's afr_upstream_secret",
            )),
            (Some(s), None) if s.len() < 16 => {
                errors.push(ConfigError::new("server.secret", "must be at least 16 characters"))
            }
            _ => {}
        }
        if let Err(e) = self.server.socket_mode_bits() {
            errors.push(ConfigError::new("server.socket_mode", e));
        }
        if self.server.stream_keepalive.is_zero() {
            errors.push(ConfigError::new(
                "server.stream_keepalive",
                "must be positive",
            ));
        }
        if self.usage.postgres_url_env.trim().is_empty() {
            errors.push(ConfigError::new(
                "usage.postgres_url_env",
                "must name an environment variable",
            ));
        }
        if let Some(fleet) = &self.fleet {
            if fleet.redis_url_env.trim().is_empty() {
                errors.push(ConfigError::new(
                    "fleet.redis_url_env",
                    "must name an environment variable",
                ));
            }
            if fleet.nodes == 0 {
                errors.push(ConfigError::new("fleet.nodes", "must be at least 1"));
            }
            if fleet.timeout.is_zero() || fleet.timeout > Duration::from_secs(10) {
                errors.push(ConfigError::new(
                    "fleet.timeout",
                    "must be between 1ms and 10s: requests wait for Redis at most this long",
                ));
            }
        }
        if let Some(telemetry) = &self.telemetry {
            let endpoint = telemetry.endpoint.trim();
            let scheme = endpoint.split_once("://").map(|(scheme, _)| scheme);
            if !matches!(scheme, Some("http" | "https")) || endpoint.len() <= "https://".len() {
                errors.push(ConfigError::new(
                    "telemetry.endpoint",
                    format!("expected the collector's OTLP/HTTP base URL, such as http://127.0.0.1:4318, got {endpoint:?}"),
                ));
            }
            if !(0.0..=1.0).contains(&telemetry.sample_ratio) {
                errors.push(ConfigError::new(
                    "telemetry.sample_ratio",
                    "must be from 0 (no request traced) to 1 (every request)",
                ));
            }
            if telemetry.service_name.trim().is_empty() {
                errors.push(ConfigError::new(
                    "telemetry.service_name",
                    "must not be empty",
                ));
            }
        }
        if self.server.max_body_bytes == 0 {
            errors.push(ConfigError::new(
                "server.max_body_bytes",
                "must be positive",
            ));
        }
        if !self.admin.listen.is_empty() {
            match parse_listen(&self.admin.listen) {
                Ok(Listen::Tcp(_)) => {}
                Ok(Listen::Unix(_)) => errors.push(ConfigError::new(
                    "admin.listen",
                    "must be a loopback ip:port",
                )),
                Err(e) => errors.push(ConfigError::new("admin.listen", e)),
            }
        }
        if self.breaker.failures == 0 {
            errors.push(ConfigError::new("breaker.failures", "must be at least 1"));
        }
        for (field, d) in [
            ("breaker.cooldown", self.breaker.cooldown),
            ("server.shutdown_grace", self.server.shutdown_grace),
            ("server.stream_hold", self.server.stream_hold),
            ("server.stream_keepalive", self.server.stream_keepalive),
        ] {
            if let Err(e) = check_duration(d) {
                errors.push(ConfigError::new(field, e));
            }
        }
        for (name, p) in &self.providers {
            let path = format!("providers.{name}");
            if !(p.base_url.starts_with("http://") || p.base_url.starts_with("https://")) {
                errors.push(ConfigError::new(
                    format!("{path}.base_url"),
                    format!("{:?} must start with http:// or https://", p.base_url),
                ));
            }
            if p.kind == ProviderKind::Azure && p.api_version.is_none() {
                errors.push(ConfigError::new(
                    format!("{path}.api_version"),
                    "required for kind = \"azure\" (e.g. \"2024-10-21\")",
                ));
            }
            if p.http2_max_streams == 0 {
                errors.push(ConfigError::new(
                    format!("{path}.http2_max_streams"),
                    "must be at least 1 (the server's concurrent-stream limit, e.g. 100)",
                ));
            }
            if p.http2_max_connections == 0 {
                errors.push(ConfigError::new(
                    format!("{path}.http2_max_connections"),
                    "must be at least 1 (HTTP/2 connections to this provider at once, e.g. 100)",
                ));
            }
            let t = p.timeouts;
            for (field, d) in [
                ("connect", t.connect),
                ("first_byte", t.first_byte),
                ("first_content", t.first_content),
                ("idle", t.idle),
                ("total", t.total),
            ] {
                let field = format!("{path}.timeouts.{field}");
                if d.is_zero() {
                    errors.push(ConfigError::new(field, "must be positive"));
                } else if let Err(e) = check_duration(d) {
                    errors.push(ConfigError::new(field, e));
                }
            }
        }
        if self.models.is_empty() {
            errors.push(ConfigError::new("models", "the catalogue is empty"));
        }
        for (id, m) in &self.models {
            if m.routes.is_empty() {
                errors.push(ConfigError::new(
                    format!("models.{id}.routes"),
                    "needs at least one route",
                ));
            }
            for (i, r) in m.routes.iter().enumerate() {
                let path = format!("models.{id}.routes[{i}]");
                if !self.providers.contains_key(&r.provider) {
                    errors.push(ConfigError::new(
                        &path,
                        format!("unknown provider {:?}", r.provider),
                    ));
                }
                if let Some(p) = r.price {
                    let long = p.long_context.map(|l| p.tier(l.above.saturating_add(1)));
                    for (tier, p) in [("", Some(p)), ("long_context.", long)] {
                        let Some(p) = p else { continue };
                        for (field, v) in [
                            ("input", Some(p.input)),
                            ("cached_input", p.cached_input),
                            ("cache_write", p.cache_write),
                            ("cache_write_1h", p.cache_write_1h),
                            ("output", Some(p.output)),
                        ] {
                            if v.is_some_and(|v| !(v.is_finite() && (0.0..=1e6).contains(&v))) {
                                errors.push(ConfigError::new(
                                    format!("{path}.price.{tier}{field}"),
                                    "must be a number of dollars per million tokens from 0 to 1000000",
                                ));
                            }
                        }
                    }
                    if p.long_context.is_some_and(|l| l.above == 0) {
                        errors.push(ConfigError::new(
                            format!("{path}.price.long_context.above"),
                            "must be a positive number of input tokens",
                        ));
                    }
                }
                if r.max_output_tokens == Some(0) {
                    errors.push(ConfigError::new(
                        format!("{path}.max_output_tokens"),
                        "must be a positive number of tokens",
                    ));
                }
                if let Some(d) = r.event_idle {
                    let field = format!("{path}.event_idle");
                    if d.is_zero() {
                        errors.push(ConfigError::new(field, "must be positive"));
                    } else if let Err(e) = check_duration(d) {
                        errors.push(ConfigError::new(field, e));
                    }
                }
                for (field, c) in &r.clamp {
                    if let (Some(lo), Some(hi)) = (c.min, c.max) {
                        if lo > hi {
                            errors.push(ConfigError::new(
                                format!("{path}.clamp.{field}"),
                                "min is greater than max",
                            ));
                        }
                    }
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// What is allowed but probably not meant: routes without a price (their
    /// cost is recorded as unknown, and budgeted keys are never served by them).
    pub fn warnings(&self) -> Vec<ConfigError> {
        let mut warnings = Vec::new();
        for (id, m) in &self.models {
            for (i, r) in m.routes.iter().enumerate() {
                if r.price.is_none() {
                    warnings.push(ConfigError::new(
                        format!("models.{id}.routes[{i}].price"),
                        "no price: cost is recorded as unknown, and keys with a budget are never served by this route",
                    ));
                }
            }
        }
        warnings
    }

    /// The `GET /v1/models` body for a key (`allowed = None`: every model),
    /// with its fields in OpenAI's order.
    pub fn models_list(&self, allowed: Option<&[String]>) -> String {
        #[derive(serde::Serialize)]
        struct Entry<'a> {
            id: &'a str,
            object: &'static str,
            created: u64,
            owned_by: &'a str,
            tier: Tier,
            description: &'a str,
            kind: ModelKind,
            endpoints: Vec<&'static str>,
        }
        #[derive(serde::Serialize)]
        struct List<'a> {
            object: &'static str,
            data: Vec<Entry<'a>>,
        }
        let data = self
            .models
            .iter()
            .filter(|(id, _)| allowed.is_none_or(|list| list.iter().any(|m| m == *id)))
            .map(|(id, m)| Entry {
                id,
                object: "model",
                created: m.created,
                owned_by: &m.owned_by,
                tier: m.tier,
                description: &m.description,
                kind: m.kind,
                endpoints: m.kind.endpoints(),
            })
            .collect();
        // Serializing plain strings and numbers cannot fail.
        serde_json::to_string(&List {
            object: "list",
            data,
        })
        .unwrap_or_default()
    }
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
