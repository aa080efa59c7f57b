//! The `afr` command: one binary for operators.
//!
//! - `afr key …`   manages `keys.toml` (module issue),
//! - `afr serve`   runs the sidecar behind nginx (sidecar issue),
//! - `afr usage …` reports recorded usage (sidecar issue).

use clap::{Parser, Subcommand};

mod key_cli;
mod providers;
mod serve;
mod tls;
mod usage;

/// jemalloc instead of glibc's malloc: a non-streamed request costs 13% fewer
/// instructions (callgrind, `bench/callgrind.py`: 153 364 → 133 347; malloc and
/// free were ~15% of them), with the same memory per stream (41 KiB) and
/// +2 MiB idle. mimalloc cut the same instructions but took 65 KiB per stream
/// and 23 MiB idle. Heap profilers that hook malloc (massif) need
/// `--pages-as-heap=yes` to see its allocations.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read once at its start (`_RJEM_MALLOC_CONF` in the
/// environment still overrides them). `background_thread`: a thread of its own
/// returns freed pages to the system, so the memory a burst of streams took
/// goes back within seconds of their end (2 000 streams: 96 MiB, 11 s later
/// 24 MiB; without it, and with glibc's malloc, 92 MiB until the next burst
/// reuses it).
// SAFETY: jemalloc reads this NUL-terminated string at its initialisation and
// never writes it; nothing else has this symbol name (the `_rjem_` prefix is
// tikv-jemalloc-sys's for every jemalloc symbol).
#[export_name = "_rjem_malloc_conf"]
#[allow(non_upper_case_globals)]
pub static malloc_conf: &[u8; 23] = b"background_thread:true\0";

#[derive(Parser)]
#[command(
    name = "afr",
    version,
    about = "Aeferalow gateway: sidecar, keys and usage"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create, list and disable API keys in a keys.toml file.
    Key(key_cli::KeyArgs),
    /// Run the sidecar behind nginx.
    Serve(serve::ServeArgs),
    /// Report recorded usage by key, model, provider and day.
    Usage(usage::cli::UsageArgs),
}

fn main() -> std::process::ExitCode {
    let result = match Cli::parse().command {
        Command::Key(args) => key_cli::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Usage(args) => usage::cli::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line with the whole cause chain, as an operator reads it; no
            // backtrace even when RUST_BACKTRACE is set for other programs.
            eprintln!("afr: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
