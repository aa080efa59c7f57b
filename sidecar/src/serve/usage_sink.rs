//! Hands usage records to the store in bursts. The store's writer thread
//! wakes for every record it is sent; at 1000 req/s that was a thread
//! switch per request on the hot path. Records are queued here (a push, no
//! wake-up while a burst is pending) and passed on every [`BURST_DELAY`].

use crate::usage::Recorder;
use afr_core::usage::UsageRecord;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// How long records wait to be passed on together.
const BURST_DELAY: Duration = Duration::from_millis(50);

/// The request path's handle: cheap to clone, never blocks.
#[derive(Clone)]
pub struct UsageSink {
    tx: mpsc::UnboundedSender<UsageRecord>,
}

/// Stops the forwarding task after passing on everything queued.
pub struct SinkCloser {
    stop: tokio::sync::oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl SinkCloser {
    /// Passes on every queued record, then returns.
    pub async fn close(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

impl UsageSink {
    /// Starts the forwarding task.
    pub fn start(recorder: Recorder) -> (UsageSink, SinkCloser) {
        let (tx, mut rx) = mpsc::unbounded_channel::<UsageRecord>();
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut stopping = false;
            while !stopping {
                tokio::select! {
                    _ = &mut stopped => stopping = true,
                    first = rx.recv() => {
                        let Some(first) = first else { break };
                        tokio::select! {
                            _ = tokio::time::sleep(BURST_DELAY) => {}
                            _ = &mut stopped => stopping = true,
                        }
                        recorder.record(first);
                    }
                }
                while let Ok(next) = rx.try_recv() {
                    recorder.record(next);
                }
            }
        });
        (UsageSink { tx }, SinkCloser { stop, task })
    }

    /// Queues one record.
    pub fn record(&self, record: UsageRecord) {
        if self.tx.send(record).is_err() {
            tracing::error!("usage record dropped: the usage sink has stopped");
        }
    }
}
