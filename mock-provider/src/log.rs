//! The request log behind `GET /_mock/requests`: what each API request looked
//! like and how it ended (completed, cancelled by the client, reset by the mock).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::usage::Billed;

/// How a logged request ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Still being answered.
    #[default]
    InFlight,
    /// The whole response was handed to the connection.
    Completed,
    /// The client closed the connection before the response was complete.
    ClientDisconnected,
    /// The mock aborted the connection on purpose (`reset_after_chunks`).
    Reset,
}

/// The mutable part of an entry, filled in while the request is answered.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Progress {
    /// Response status, once decided.
    pub status: Option<u16>,
    /// Whether the response is a stream.
    pub stream: bool,
    /// Content deltas sent so far (streams).
    pub chunks_sent: u32,
    /// How the request ended.
    pub outcome: Outcome,
    /// What the mock billed: set when it answers 200 (streams: updated as
    /// their content deltas are sent).
    pub billed: Option<Billed>,
}

/// One API request as the mock received it.
#[derive(Debug)]
pub struct Entry {
    /// Sequence number, from 1, per instance.
    pub seq: u64,
    /// Which wire format answered (`openai`, `azure`, `anthropic`, `models`, `unknown`).
    pub api: &'static str,
    method: String,
    /// `HTTP/1.1` or `HTTP/2.0`: which protocol the client spoke.
    version: String,
    /// Which connection the request came on (1, 2, … in accept order; 0 for
    /// a request without one), so tests see how many connections a client
    /// spread its streams over.
    connection: u64,
    path: String,
    headers: Vec<(String, String)>,
    body: Bytes,
    received_ms: u64,
    progress: Mutex<Progress>,
}

impl Entry {
    /// Locks the progress for update (never poisoned in practice: no panics
    /// happen while it is held).
    pub fn progress(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn to_json(&self) -> Value {
        let mut headers = Map::new();
        for (k, v) in &self.headers {
            match headers.get_mut(k) {
                Some(Value::String(prev)) => {
                    prev.push_str(", ");
                    prev.push_str(v);
                }
                _ => {
                    headers.insert(k.clone(), Value::String(v.clone()));
                }
            }
        }
        let body = serde_json::from_slice::<Value>(&self.body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&self.body).into_owned()));
        let p = self.progress().clone();
        serde_json::json!({
            "seq": self.seq,
            "api": self.api,
            "method": self.method,
            "version": self.version,
            "connection": self.connection,
            "path": self.path,
            "headers": headers,
            "body": body,
            // The exact bytes, for tests of byte-faithful forwarding (the
            // parsed `body` above reorders keys and rounds big numbers).
            "raw_body": String::from_utf8_lossy(&self.body),
            "received_ms": self.received_ms,
            "status": p.status,
            "stream": p.stream,
            "chunks_sent": p.chunks_sent,
            "outcome": p.outcome,
            "client_disconnected": p.outcome == Outcome::ClientDisconnected,
            "connection_closed_mid_stream": p.stream
                && matches!(p.outcome, Outcome::ClientDisconnected | Outcome::Reset),
            "billed": p.billed,
        })
    }
}

/// A bounded log of recent requests plus counters that are never bounded.
pub struct RequestLog {
    capacity: usize,
    entries: Mutex<VecDeque<Arc<Entry>>>,
    seq: AtomicU64,
    in_flight_streams: AtomicU64,
    client_disconnects: AtomicU64,
}

impl RequestLog {
    /// A log keeping the last `capacity` requests (0 keeps only counters).
    pub fn new(capacity: usize) -> Self {
        RequestLog {
            capacity,
            entries: Mutex::new(VecDeque::new()),
            seq: AtomicU64::new(0),
            in_flight_streams: AtomicU64::new(0),
            client_disconnects: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<Arc<Entry>>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a new request and returns its entry (its connection from the
    /// request's [`ConnectionId`] extension).
    pub fn record(
        &self,
        api: &'static str,
        req: &hyper::http::request::Parts,
        body: Bytes,
    ) -> Arc<Entry> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let keep = self.capacity > 0;
        let entry = Arc::new(Entry {
            seq,
            api,
            method: req.method.as_str().to_owned(),
            version: format!("{:?}", req.version),
            connection: req.extensions.get::<ConnectionId>().map_or(0, |c| c.0),
            path: req
                .uri
                .path_and_query()
                .map_or_else(|| req.uri.path().to_owned(), |p| p.as_str().to_owned()),
            headers: if keep {
                req.headers
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.as_str().to_owned(),
                            String::from_utf8_lossy(v.as_bytes()).into_owned(),
                        )
                    })
                    .collect()
            } else {
                Vec::new()
            },
            body: if keep { body } else { Bytes::new() },
            received_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            progress: Mutex::new(Progress::default()),
        });
        if keep {
            let mut q = self.lock();
            if q.len() == self.capacity {
                q.pop_front();
            }
            q.push_back(entry.clone());
        }
        entry
    }

    /// A stream started.
    pub fn stream_started(&self) {
        self.in_flight_streams.fetch_add(1, Ordering::Relaxed);
    }

    /// A stream ended (any outcome).
    pub fn stream_ended(&self) {
        self.in_flight_streams.fetch_sub(1, Ordering::Relaxed);
    }

    /// Marks `entry` as ended by the client closing the connection, once.
    pub fn client_disconnected(&self, entry: &Entry) {
        let mut p = entry.progress();
        if matches!(p.outcome, Outcome::InFlight) {
            p.outcome = Outcome::ClientDisconnected;
            self.client_disconnects.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Forgets the logged requests and resets the counters.
    pub fn clear(&self) {
        self.lock().clear();
        self.client_disconnects.store(0, Ordering::Relaxed);
        self.seq.store(0, Ordering::Relaxed);
    }

    /// The `GET /_mock/billing` document: the `billed` fields summed over
    /// the logged requests, and how many were billed.
    pub fn billing(&self) -> Value {
        let mut sum = Billed::default();
        let mut requests = 0u64;
        for e in self.lock().iter() {
            if let Some(b) = e.progress().billed {
                sum.add(&b);
                requests += 1;
            }
        }
        let mut v = serde_json::json!(sum);
        v["requests"] = requests.into();
        v
    }

    /// The `GET /_mock/requests` document.
    pub fn to_json(&self) -> Value {
        let entries: Vec<Value> = self.lock().iter().map(|e| e.to_json()).collect();
        serde_json::json!({
            "total": self.seq.load(Ordering::Relaxed),
            "in_flight_streams": self.in_flight_streams.load(Ordering::Relaxed),
            "client_disconnects": self.client_disconnects.load(Ordering::Relaxed),
            "requests": entries,
        })
    }
}

/// The accepted connection a request came on, put in its extensions by the
/// accept loops.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionId(pub u64);

impl ConnectionId {
    /// The next connection's id (1 for the first accepted).
    pub fn next() -> ConnectionId {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        ConnectionId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}
