//! `afr serve`: the sidecar behind nginx (design §2–§7). Reads its config,
//! opens the usage store, listens on the configured socket, serves until
//! SIGTERM/SIGINT, then drains open connections and flushes usage.
//!
//! - [`handler`]: secret check and dispatch; [`chat`]: route plan and failover;
//!   [`passthrough`]: embeddings, completions, responses; [`relay`]: stream passthrough and its usage meter; [`error`]: the one
//!   mapping from errors to OpenAI bodies; [`state`]: config snapshot and
//!   breakers; [`listener`], [`reload`], [`metrics`].

pub mod accounting;
pub mod admin;
pub mod chat;
pub mod clock;
pub mod error;
pub mod fleet;
pub mod handler;
pub mod listener;
pub mod messages;
pub mod metrics;
pub mod passthrough;
pub mod relay;
pub mod reload;
pub mod state;
pub mod telemetry;
pub mod usage_sink;

use crate::usage::{PostgresTarget, Store, StoreOptions};
use afr_core::config::{parse_listen, Listen, UsageBackend};
use anyhow::Context;
use listener::Bound;
use state::{Budgets, Gateway, Runtime};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// `afr serve` arguments.
#[derive(clap::Args)]
pub struct ServeArgs {
    /// The sidecar config file.
    #[arg(long, default_value = "/etc/afr/sidecar.toml")]
    pub config: PathBuf,
    /// Write the main listener's TCP port here once bound (for tests with port 0).
    #[arg(long)]
    pub port_file: Option<PathBuf>,
    /// Write the admin listener's TCP port here once bound.
    #[arg(long)]
    pub admin_port_file: Option<PathBuf>,
    /// Worker threads (default: TOKIO_WORKER_THREADS, else half the CPUs, at
    /// least one: the sidecar shares the cores with nginx's workers).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: Option<u16>,
}

/// How long a shutdown waits for settlements still trying to reach the
/// fleet's Redis: longer than a Redis failover's usual blip, shorter than a
/// service manager's stop timeout (systemd's default is 90 s).
const FLEET_DRAIN: Duration = Duration::from_secs(10);

/// Runs the sidecar until SIGTERM/SIGINT.
pub fn run(mut args: ServeArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("AFR_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    let threads = match args.threads {
        Some(n) => n,
        None => default_threads()?,
    };
    builder.worker_threads(usize::from(threads));
    args.threads = Some(threads); // what the start line reports
    builder
        .build()
        .context("starting the async runtime")?
        .block_on(serve(args))
}

/// TOKIO_WORKER_THREADS if set, else half the CPUs, at least one. The
/// sidecar shares its host with nginx, whose workers run one per CPU: on 2
/// cores one sidecar thread served 7–10% more requests per second than two
/// and answered as fast at concurrency 1, since a second thread mostly added
/// context switches against nginx, the provider's connections and the
/// clients (bench/results/README.md, "One sidecar thread on 2 cores").
/// A value that is not a number of threads is refused, naming the variable,
/// as `--threads` is: silently ignoring it would run a count nobody chose.
fn default_threads() -> anyhow::Result<u16> {
    if let Some(value) = std::env::var_os("TOKIO_WORKER_THREADS") {
        let text = value.to_string_lossy();
        return match text.trim().parse::<u16>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => anyhow::bail!(
                "TOKIO_WORKER_THREADS: expected a number of threads from 1 to {}, got {text:?}",
                u16::MAX
            ),
        };
    }
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    Ok(u16::try_from(cpus / 2).unwrap_or(u16::MAX).max(1))
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let runtime = Runtime::load(&args.config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let listen = parse_listen(&runtime.config.server.listen)
        .map_err(|e| anyhow::anyhow!("server.listen: {e}"))?;
    let socket_mode = runtime
        .config
        .server
        .socket_mode_bits()
        .map_err(|e| anyhow::anyhow!("server.socket_mode: {e}"))?;
    let admin_listen = runtime.config.admin.listen.clone();
    let usage = runtime.config.usage.clone();
    // `[usage] record = false` (a diagnostic) opens no store at all.
    let store = if usage.record {
        if let Some(dir) = usage.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let options = StoreOptions {
            max_pending: usage.queue_max,
            spill_max_bytes: usage.spill_max_bytes,
            ..StoreOptions::default()
        };
        let store = match usage.backend {
            UsageBackend::Sqlite => Store::open_with(&usage.path, options)
                .with_context(|| format!("usage.path: {}", usage.path.display()))?,
            UsageBackend::Postgres => {
                let tls = crate::tls::client_config(
                    usage.postgres_ca_file.as_deref(),
                    "usage.postgres_ca_file",
                )?;
                let target = PostgresTarget::from_env(&usage.postgres_url_env)
                    .context("usage.postgres_url_env")?
                    .with_tls(tls);
                // It blocks on its own runtime, which must not be inside this one.
                let path = usage.path.clone();
                tokio::task::spawn_blocking(move || Store::open_postgres(target, &path, options))
                    .await
                    .context("opening the usage store")??
            }
        };
        Some(store)
    } else {
        tracing::warn!(
            "usage recording is off ([usage] record = false): no usage rows are written"
        );
        None
    };
    let (sink, sink_closer) = match &store {
        Some(store) => {
            let (sink, closer) = usage_sink::UsageSink::start(store.recorder());
            (Some(sink), Some(closer))
        }
        None => (None, None),
    };
    let fleet = match &runtime.config.fleet {
        Some(config) => {
            let fleet = fleet::Fleet::from_config(config)?;
            tracing::info!(
                nodes = config.nodes,
                "fleet: tpm and budgets are held across the fleet through Redis"
            );
            Some(Arc::new(fleet))
        }
        None => None,
    };
    let mut gateway = Gateway::new(
        runtime,
        args.config.clone(),
        sink,
        store.as_ref().map(Store::reader),
    );
    if let Some(store) = &store {
        gateway.metrics.track_usage_store(store.recorder());
    }
    if let Some(fleet) = &fleet {
        gateway.metrics.track_fleet(Arc::clone(fleet));
    }
    gateway.fleet = fleet;
    let telemetry_config = gateway.runtime.load().config.telemetry.clone();
    gateway.telemetry =
        telemetry::Telemetry::start_exporting(&gateway.metrics, telemetry_config.as_ref())?
            .map(Arc::new);
    if let Some(t) = &gateway.telemetry {
        tracing::info!(telemetry = ?t, "OpenTelemetry: exporting traces and metrics over OTLP");
    }
    let reader = gateway.reader.clone();
    if reader.is_none() {
        gateway.set_budgets(Budgets::NoStore);
        tracing::warn!("[usage] record = false: keys with a budget are refused, since what they spent could not survive a restart");
    }
    let gateway = Arc::new(gateway);
    if let Some(reader) = reader {
        if !reseed_ledger(&gateway, reader.clone()).await {
            // Budgets stay refused (503) until the seed succeeds: starting
            // the period at $0 would let every key spend its budget again.
            let gateway = Arc::clone(&gateway);
            tokio::spawn(async move {
                while !reseed_ledger(&gateway, reader.clone()).await {
                    tokio::time::sleep(SEED_RETRY).await;
                }
            });
        }
    }

    let bound = Bound::bind(&listen, socket_mode)
        .await
        .with_context(|| format!("server.listen: binding {listen}"))?;
    if let (Some(file), Some(port)) = (&args.port_file, bound.port()) {
        std::fs::write(file, port.to_string())
            .with_context(|| format!("writing {}", file.display()))?;
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let admin = if admin_listen.is_empty() {
        None
    } else {
        let Listen::Tcp(addr) =
            parse_listen(&admin_listen).map_err(|e| anyhow::anyhow!("admin.listen: {e}"))?
        else {
            anyhow::bail!("admin.listen: must be a loopback ip:port");
        };
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("admin.listen: binding {addr}"))?;
        if let Some(file) = &args.admin_port_file {
            let port = l.local_addr()?.port();
            std::fs::write(file, port.to_string())
                .with_context(|| format!("writing {}", file.display()))?;
        }
        Some(tokio::spawn(listener::serve_admin(
            l,
            gateway.clone(),
            stop_rx.clone(),
        )))
    };
    let _watcher = match reload::watch(gateway.clone()) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::error!(error = %e, config = %args.config.display(), "cannot watch the config; hot reload is off");
            None
        }
    };
    tracing::info!(listen = %listen, admin = %admin_listen, config = %args.config.display(), threads = args.threads.unwrap_or(1), "afr serve started");
    let grace = gateway.runtime.load().config.server.shutdown_grace;
    let api = tokio::spawn(listener::serve_api(bound, gateway.clone(), stop_rx, grace));

    shutdown_signal().await;
    tracing::info!("shutting down: no new connections; waiting for open ones");
    let _ = stop_tx.send(true);
    // serve_api ends by itself within `grace`, cutting what is still open.
    let _ = api.await;
    if let Some(admin) = admin {
        admin.abort();
    }
    // Every connection is gone, and with it every stream's relay, which
    // wrote its row when it was dropped.
    // Every request has ended: give its settlement in the fleet's Redis a
    // moment to land if Redis is slow or briefly away.
    if let Some(fleet) = gateway.fleet.clone() {
        match fleet.drain(FLEET_DRAIN).await {
            (0, 0) => {}
            (settlements, debts) => tracing::error!(
                settlements,
                keys_owed = debts,
                "fleet: Redis did not answer within {FLEET_DRAIN:?} of shutdown; these reservations stay counted at their worst case until their window or period ends, and what those keys used on local shares is not counted fleet-wide"
            ),
        }
    }
    if let Some(telemetry) = gateway.telemetry.clone() {
        // The last spans and metric points, to a collector that answers within 2 s.
        let flushed = tokio::task::spawn_blocking(move || telemetry.shutdown(TELEMETRY_FLUSH));
        let _ = tokio::time::timeout(TELEMETRY_FLUSH * 3, flushed).await;
    }
    drop(gateway);
    let (Some(sink_closer), Some(store)) = (sink_closer, store) else {
        tracing::info!("bye");
        return Ok(());
    };
    sink_closer.close().await;
    let report = tokio::task::spawn_blocking(move || store.shutdown())
        .await
        .context("usage store shutdown")??;
    tracing::info!(written = report.written, "usage store flushed; bye");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// How long the last telemetry export may take at shutdown, per signal.
const TELEMETRY_FLUSH: std::time::Duration = std::time::Duration::from_secs(2);

/// How often a failed seed of the ledger is retried (and the `Retry-After`
/// of a budgeted key refused meanwhile).
pub const SEED_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

/// Seeds the ledger from the usage store, so a restart renews neither a
/// key's budget nor its token window (design §3); whether it did. A store
/// that cannot be read is not an outage: keys without a budget are served,
/// budgeted keys are refused until a retry succeeds (budgets fail closed).
async fn reseed_ledger(gateway: &Gateway, reader: crate::usage::UsageReader) -> bool {
    let now = clock::unix_ms();
    let seeds =
        tokio::task::spawn_blocking(move || crate::usage::reseed::ledger_seeds(&reader, now)).await;
    match seeds {
        Ok(Ok(seeds)) => {
            let mut ledger = gateway.ledger();
            for (key, seed) in &seeds {
                ledger.seed(key, *seed);
            }
            drop(ledger);
            gateway.set_budgets(Budgets::Ready);
            tracing::info!(keys = seeds.len(), "ledger seeded from the usage store");
            true
        }
        Ok(Err(e)) => {
            tracing::error!("{e}: keys with a budget are refused until the ledger can be seeded (retried every {}s)", SEED_RETRY.as_secs());
            false
        }
        Err(e) => {
            tracing::error!("seeding the ledger: {e}");
            false
        }
    }
}
