//! The stream producer shared by every wire format: it paces pre-built SSE
//! events (latency is applied before, TTFT and chunk interval here), injects
//! the stream faults, notices a client that went away, and keeps the log
//! entry's `billed` up to date with the content deltas sent.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::conn::{MockBody, StreamItem};
use crate::knobs::Knobs;
use crate::log::{Entry, Outcome, RequestLog};
use crate::server::State;
use crate::usage::Billed;

/// A stream's events, already framed: sent as one HTTP chunk each.
pub struct StreamPlan {
    /// Events before the content (role chunk; message_start, content_block_start, ping).
    pub head: Vec<Bytes>,
    /// One event per content piece.
    pub content: Vec<Bytes>,
    /// Events after the content (finish, usage, `[DONE]`; block stop, message_delta, message_stop).
    pub tail: Vec<Bytes>,
    /// The provider's mid-stream error event (`error_after_chunks`).
    pub error_event: Bytes,
    /// An event whose data is cut-off JSON (`malformed_sse`).
    pub malformed_event: Bytes,
    /// What the whole stream bills.
    pub billed: Billed,
    /// Index of the first content event that is a delta (Responses streams
    /// open their content with item and part events, which bill nothing).
    pub first_delta: usize,
}

impl StreamPlan {
    /// What the stream bills once `sent` content events went out: all of
    /// it after the last one; before that, the deltas sent plus the
    /// reasoning (generated before the first delta).
    pub fn billed_after(&self, sent: usize) -> Billed {
        if sent >= self.content.len() {
            return self.billed;
        }
        Billed {
            output: sent.saturating_sub(self.first_delta) as u64 + self.billed.reasoning,
            ..self.billed
        }
    }
}

/// What the producer needs besides the plan.
pub struct StreamCtx {
    /// Effective knobs of the request.
    pub knobs: Knobs,
    /// The request's log entry.
    pub entry: Arc<Entry>,
    /// The instance, for the log's stream counters.
    pub state: Arc<State>,
    /// The connection's reset flag.
    pub reset: Arc<AtomicBool>,
}

enum Step {
    Go,
    ClientGone,
}

async fn pause(tx: &mpsc::Sender<StreamItem>, ms: u64) -> Step {
    if ms == 0 {
        return Step::Go;
    }
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_millis(ms)) => Step::Go,
        _ = tx.closed() => Step::ClientGone,
    }
}

/// The body's sending end, counting the events written for `cut_after_events`.
struct Out<'a> {
    tx: &'a mpsc::Sender<StreamItem>,
    written: u32,
    cut: Option<u32>,
}

/// After a send: go on, stop (the client left, or `cut_after_events` was
/// reached with this event).
enum Sent {
    Go,
    Cut,
    ClientGone,
}

impl Out<'_> {
    async fn send(&mut self, b: &Bytes) -> Sent {
        if self.tx.send(Ok(b.clone())).await.is_err() {
            return Sent::ClientGone;
        }
        self.written += 1;
        if self.cut == Some(self.written) {
            Sent::Cut
        } else {
            Sent::Go
        }
    }
}

/// The outcome a stopping send ends the stream with (`None`: go on).
fn stop(sent: Sent) -> Option<Outcome> {
    match sent {
        Sent::Go => None,
        // A clean end: the last chunk, then FIN.
        Sent::Cut => Some(Outcome::Completed),
        Sent::ClientGone => Some(Outcome::ClientDisconnected),
    }
}

/// Starts the producer task and returns the body it feeds.
pub fn spawn(plan: StreamPlan, ctx: StreamCtx) -> MockBody {
    let (tx, rx) = mpsc::channel(16);
    ctx.state.log.stream_started();
    {
        let mut p = ctx.entry.progress();
        p.stream = true;
        p.status = Some(200);
        p.billed = Some(plan.billed_after(0));
    }
    tokio::spawn(async move {
        let outcome = produce(&plan, &ctx, &tx).await;
        let log: &RequestLog = &ctx.state.log;
        match outcome {
            Outcome::ClientDisconnected => log.client_disconnected(&ctx.entry),
            o => {
                let mut p = ctx.entry.progress();
                if p.outcome == Outcome::InFlight {
                    p.outcome = o;
                }
            }
        }
        log.stream_ended();
    });
    MockBody::Channel(rx)
}

async fn produce(plan: &StreamPlan, ctx: &StreamCtx, tx: &mpsc::Sender<StreamItem>) -> Outcome {
    let k = &ctx.knobs;
    let mut out = Out {
        tx,
        written: 0,
        cut: k.cut_after_events,
    };
    if k.cut_after_events == Some(0) {
        return Outcome::Completed;
    }
    for ev in &plan.head {
        if let Some(o) = stop(out.send(ev).await) {
            return o;
        }
    }
    let n = plan.content.len();
    for i in 0..=n {
        let sent = i as u32;
        if k.malformed_sse && (i == 1 || (n == 0 && i == 0)) {
            if let Some(o) = stop(out.send(&plan.malformed_event).await) {
                return o;
            }
        }
        if k.reset_after_chunks
            .is_some_and(|r| r == sent || (i == n && r > sent))
        {
            // Let hyper take and flush what was sent so far, or the RST would
            // discard it with the write buffer (bounded: ~100 ms at most).
            for _ in 0..100 {
                if tx.capacity() == tx.max_capacity() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            if let Step::ClientGone = pause(tx, 5).await {
                return Outcome::ClientDisconnected;
            }
            ctx.reset.store(true, Ordering::Relaxed);
            let _ = tx
                .send(Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "afr-mock: reset_after_chunks",
                )))
                .await;
            return Outcome::Reset;
        }
        if k.error_after_chunks
            .is_some_and(|r| r == sent || (i == n && r > sent))
        {
            return stop(out.send(&plan.error_event).await).unwrap_or(Outcome::Completed);
        }
        if k.end_after_chunks
            .is_some_and(|r| r == sent || (i == n && r > sent))
        {
            // A clean end (last chunk, FIN) with no finish, usage or [DONE].
            return Outcome::Completed;
        }
        if i == n {
            break;
        }
        let wait = if i == 0 {
            k.ttft_ms
        } else {
            k.chunk_interval_ms
        };
        if let Step::ClientGone = pause(tx, wait).await {
            return Outcome::ClientDisconnected;
        }
        let result = out.send(&plan.content[i]).await;
        if !matches!(result, Sent::ClientGone) {
            let mut p = ctx.entry.progress();
            p.chunks_sent = sent + 1;
            p.billed = Some(plan.billed_after(i + 1));
        }
        if let Some(o) = stop(result) {
            return o;
        }
    }
    for ev in &plan.tail {
        if let Some(o) = stop(out.send(ev).await) {
            return o;
        }
    }
    Outcome::Completed
}
