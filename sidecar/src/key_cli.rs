//! `afr key new|list|disable`: edits keys.toml (owned by the module issue).

use clap::Args;

/// Arguments of `afr key`.
#[derive(Args)]
pub struct KeyArgs {}

/// Runs `afr key …`.
pub fn run(_args: KeyArgs) -> anyhow::Result<()> {
    anyhow::bail!("afr key: not implemented yet")
}
