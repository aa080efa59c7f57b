//! Starts the real `afr-mock` binary on a free loopback port and talks to it.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use afr_core::sse::{event_data, event_name, EventFramer};
use serde_json::Value;

/// A running mock, killed on drop.
pub struct Mock {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    port_file: PathBuf,
}

impl Mock {
    /// Starts `afr-mock` with extra CLI arguments.
    pub fn start(args: &[&str]) -> Mock {
        static N: AtomicU32 = AtomicU32::new(0);
        let port_file = std::env::temp_dir().join(format!(
            "afr-mock-test-{}-{}.port",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&port_file);
        let child = Command::new(env!("CARGO_BIN_EXE_afr-mock"))
            .args(["--listen", "127.0.0.1:0", "--port-file"])
            .arg(&port_file)
            .args(args)
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn afr-mock");
        let deadline = Instant::now() + Duration::from_secs(10);
        let port = loop {
            if let Ok(s) = std::fs::read_to_string(&port_file) {
                if let Ok(p) = s.parse::<u16>() {
                    break p;
                }
            }
            assert!(Instant::now() < deadline, "afr-mock did not write its port");
            std::thread::sleep(Duration::from_millis(20));
        };
        Mock {
            child,
            base: format!("http://127.0.0.1:{port}"),
            port_file,
        }
    }

    /// The mock's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `base` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The request log document.
    pub async fn requests(&self) -> Value {
        reqwest::get(self.url("/_mock/requests"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.port_file);
    }
}

/// A minimal OpenAI chat request.
pub fn chat(stream: bool, include_usage: bool, text: &str) -> Value {
    let mut v = serde_json::json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}],
        "stream": stream,
    });
    if include_usage {
        v["stream_options"] = serde_json::json!({"include_usage": true});
    }
    v
}

/// One SSE event: name, data, and its raw bytes.
#[derive(Debug)]
pub struct Event {
    pub name: Option<String>,
    pub data: String,
    pub raw: Vec<u8>,
}

/// Splits bytes into events with the sidecar's framer; asserts nothing is left over.
pub fn events(bytes: &[u8]) -> Vec<Event> {
    let mut f = EventFramer::new();
    f.push(bytes);
    let mut out = Vec::new();
    while let Some(raw) = f.next_event().expect("events fit the limit") {
        out.push(Event {
            name: event_name(&raw),
            data: event_data(&raw).unwrap_or_default(),
            raw,
        });
    }
    assert!(
        f.pending().is_empty(),
        "trailing bytes without a blank line"
    );
    out
}

/// Reads a response body chunk by chunk until it ends or fails; returns the
/// bytes and whether it ended with an error.
pub async fn read_all(mut resp: reqwest::Response) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => out.extend_from_slice(&c),
            Ok(None) => return (out, false),
            Err(_) => return (out, true),
        }
    }
}

/// The keys of a JSON object, in order of appearance in its text.
pub fn key_order(json: &str) -> Vec<String> {
    let v: Value = serde_json::from_str(json).unwrap();
    let mut keys: Vec<(usize, String)> = v
        .as_object()
        .unwrap()
        .keys()
        .map(|k| (json.find(&format!("\"{k}\":")).unwrap(), k.clone()))
        .collect();
    keys.sort();
    keys.into_iter().map(|(_, k)| k).collect()
}
