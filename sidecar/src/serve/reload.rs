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
        while rx.recv().await.is_some() {
            tokio::time::sleep(DEBOUNCE).await;
            while rx.try_recv().is_ok() {}
            let path = gateway.config_path.clone();
            let old_listen = gateway.runtime.load().config.server.listen.clone();
            match tokio::task::spawn_blocking(move || Runtime::load(&path)).await {
                Ok(Ok(runtime)) => {
                    if runtime.config.server.listen != old_listen {
                        tracing::warn!(config = %gateway.config_path.display(), "server.listen changed; it takes effect on restart");
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
