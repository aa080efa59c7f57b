//! Pure decisions of the Aeferalow gateway.
//!
//! Everything here is plain Rust with no nginx and no tokio dependency, so it
//! runs under `cargo test`: the nginx module and the sidecar are thin I/O
//! layers around these types.

pub mod anthropic;
pub mod attempt;
pub mod billing;
pub mod breaker;
pub mod concurrency;
pub mod config;
pub mod endpoint;
pub mod error;
pub mod estimate;
pub mod fleet;
pub mod fleet_ledger;
pub mod genai_content;
pub mod keyfile;
pub mod keys;
pub mod ledger;
pub mod limits;
pub mod messages;
pub mod outage;
pub mod pins;
pub mod ratelimit;
mod readable;
pub mod redact;
pub mod retry_after;
pub mod route;
pub mod splice;
pub mod sse;
pub mod tracecontext;
pub mod usage;
pub mod validate;
