//! Config hot reload (design §6): watch the config file's directory (editors
//! and `mv` replace the file, so watching the inode alone would miss it),
//! re-load on change, and swap the new runtime in atomically. A file that does
//! not load is logged with its config paths and the previous config stays.

use crate::serve::state::{Gateway, Runtime};
use notify::{RecursiveMode, Watcher};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Changes closer together than this are applied once.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// How often the resolved config file is stat'ed, besides the change events.
const POLL: Duration = Duration::from_secs(1);

/// What identifies one version of the config file (following symlinks).
fn stamp(path: &std::path::Path) -> Option<(std::time::SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// Starts watching; the returned watcher must be kept alive.
pub fn watch(gateway: Arc<Gateway>) -> notify::Result<notify::RecommendedWatcher> {
    let path = gateway.config_path.clone();
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let file_name = path.file_name().map(|n| n.to_owned());
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            if event.kind.is_access() {
                return;
            }
            if event
                .paths
                .iter()
                .any(|p| p.file_name() == file_name.as_deref())
            {
                let _ = tx.send(());
            }
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    tokio::spawn(async move {
        // Events name the file that changed; a swap of a symlink somewhere on
        // the way to the config (a Kubernetes ConfigMap's `..data`) names
        // another one. A once-a-second stat of what the path resolves to
        // catches those.
        let mut seen = stamp(&gateway.config_path);
        let mut poll = tokio::time::interval(POLL);
        loop {
            tokio::select! {
                event = rx.recv() => {
                    if event.is_none() {
                        break;
                    }
                    tokio::time::sleep(DEBOUNCE).await;
                    while rx.try_recv().is_ok() {}
                }
                _ = poll.tick() => {
                    if stamp(&gateway.config_path) == seen {
                        continue;
                    }
                }
            }
            seen = stamp(&gateway.config_path);
            let path = gateway.config_path.clone();
            let old = gateway.runtime.load();
            let (old_listen, old_fleet) =
                (old.config.server.listen.clone(), old.config.fleet.clone());
            drop(old);
            match tokio::task::spawn_blocking(move || Runtime::load(&path)).await {
                Ok(Ok(runtime)) => {
                    if runtime.config.server.listen != old_listen {
                        tracing::warn!(config = %gateway.config_path.display(), "server.listen changed; it takes effect on restart");
                    }
                    if runtime.config.fleet != old_fleet {
                        tracing::warn!(config = %gateway.config_path.display(), "[fleet] changed; it takes effect on restart");
                    }
                    gateway.install(runtime);
                    tracing::info!(config = %gateway.config_path.display(), "config reloaded");
                }
                Ok(Err(e)) => {
                    for line in &e.0 {
                        tracing::error!(config = %gateway.config_path.display(), "config rejected, keeping the previous one: {line}");
                    }
                }
                Err(e) => tracing::error!(error = %e, "config reload task failed"),
            }
        }
    });
    Ok(watcher)
}
