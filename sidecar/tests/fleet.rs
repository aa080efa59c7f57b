//! The sidecar's `[fleet]` (issue 22, item 4) against a real `redis-server`
//! on loopback (and, for the seed, a real PostgreSQL), started and stopped by
//! the tests: settlements land exactly once even when Redis is briefly away,
//! a reserve whose answer came too late is released, token windows follow
//! Redis's clock, and a usage store that cannot seed a budget counter is a
//! refused budget, not a Redis outage.

mod common;
mod pg;

use common::*;
use serde_json::{json, Value};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const URL_ENV: &str = "AFR_TEST_FLEET_REDIS_URL";

/// A private redis-server on a loopback port, killed on drop.
struct Redis {
    child: Child,
    port: u16,
    args: Vec<String>,
    dir: tempfile::TempDir,
}

impl Redis {
    fn start() -> Redis {
        Redis::start_with(&[])
    }

    /// A redis-server with `args` besides its plain loopback port (which
    /// `cli` uses).
    fn start_with(args: &[&str]) -> Redis {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let child = Redis::spawn(port, &args, dir.path());
        let redis = Redis {
            child,
            port,
            args,
            dir,
        };
        redis.wait_ready();
        redis
    }

    /// Kills it and starts it again on the same port, empty (no persistence).
    fn restart_empty(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Redis::spawn(self.port, &self.args, self.dir.path());
        self.wait_ready();
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.cli(&["PING"]) != "PONG" {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn spawn(port: u16, args: &[String], dir: &Path) -> Child {
        Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(args)
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (scripts/setup installs it)")
    }

    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(ok.success());
    }

    /// Tokens counted in every token-window counter.
    fn tokens_counted(&self) -> u64 {
        self.cli(&["--scan", "--pattern", "afr:*:t:*"])
            .lines()
            .filter(|k| !k.is_empty())
            .map(|k| self.cli(&["GET", k]).parse::<u64>().unwrap_or(0))
            .sum()
    }

    /// Redis's clock, Unix ms.
    fn now_ms(&self) -> u64 {
        let t: Vec<u64> = self
            .cli(&["TIME"])
            .lines()
            .map(|l| l.trim().parse().unwrap())
            .collect();
        t[0] * 1000 + t[1] / 1000
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP forwarder to Redis whose answers can be held back (`slow`), as a
/// Redis too slow to answer within the timeout after it ran a command.
struct Forwarder {
    port: u16,
    slow: Arc<AtomicBool>,
}

impl Forwarder {
    async fn start(to: u16, delay: Duration) -> Forwarder {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let slow = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&slow);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await else {
                    continue;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut cr, &mut sw).await;
                });
                let flag = Arc::clone(&flag);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    while let Ok(n) = sr.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        if flag.load(Ordering::SeqCst) {
                            tokio::time::sleep(delay).await;
                        }
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Forwarder { port, slow }
    }
}

/// A sidecar with `[fleet]` on Redis at `redis_port` (timeout 100 ms) and
/// one priced model `m` on `mock`.
fn fleet_sidecar(mock: &Mock, redis_port: u16, usage: &str, env: &[(&str, &str)]) -> Sidecar {
    let url = format!("redis://127.0.0.1:{redis_port}");
    fleet_sidecar_at(mock, &url, "", usage, env)
}

/// Like `fleet_sidecar`, with Redis at `url` and more `[fleet]` lines.
fn fleet_sidecar_at(
    mock: &Mock,
    url: &str,
    fleet_extra: &str,
    usage: &str,
    env: &[(&str, &str)],
) -> Sidecar {
    let body = format!(
        "[fleet]\nredis_url_env = \"{URL_ENV}\"\nnodes = 2\ntimeout = \"100ms\"\n{fleet_extra}\n{}{}price = {{ input = 1000.0, output = 1000.0 }}\n",
        openai_provider("mock", &mock.base(), ""),
        model("m", &[("mock", "up")]),
    );
    let mut all: Vec<(&str, &str)> = vec![(URL_ENV, url)];
    all.extend_from_slice(env);
    Sidecar::start_with_usage_env(&body, 1000, usage, &all)
}

const SQLITE: &str = "path = \"{dir}/usage.db\"";

/// A chat request of `key` under `limits` (X-Afr-Limits) asking at most
/// `max_tokens`, as nginx sends it.
async fn send(sidecar: &Sidecar, key: &str, limits: &str, max_tokens: u32) -> reqwest::Response {
    sidecar
        .client
        .post(sidecar.url("/v1/chat/completions"))
        .header("X-Afr-Secret", SECRET)
        .header("X-Afr-Key-Id", key)
        .header("X-Afr-Limits", limits)
        .json(&json!({"model": "m", "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hello there"}]}))
        .send()
        .await
        .expect("sidecar answered")
}

/// One chat request of `key` under `limits`: status, body.
async fn chat(sidecar: &Sidecar, key: &str, limits: &str) -> (u16, Value) {
    let resp = send(sidecar, key, limits, 500).await;
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ok() {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_settlement_lands_once_even_when_redis_is_briefly_away() {
    let redis = Redis::start();
    let mock = Mock::start(&[]);
    // The answer takes 600 ms: Redis is frozen after the reservation and
    // before the settlement, and thawed a moment after.
    mock.set(json!({"latency_ms": 600})).await;
    let sidecar = fleet_sidecar(&mock, redis.port, SQLITE, &[]);
    let request = chat(&sidecar, "k", "tpm=100000");
    let freeze = async {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let reserved = redis.tokens_counted();
        redis.signal("-STOP");
        tokio::time::sleep(Duration::from_millis(900)).await;
        redis.signal("-CONT");
        reserved
    };
    let ((status, body), reserved) = tokio::join!(request, freeze);
    assert_eq!(status, 200, "{body}");
    let used = body["usage"]["total_tokens"].as_u64().unwrap();
    assert!(reserved >= 500, "the worst case was reserved: {reserved}");
    until("the settlement landed after Redis came back", || {
        redis.tokens_counted() == used
    })
    .await;
    assert!(
        sidecar.log().contains("retrying"),
        "the first settlement failed: {}",
        sidecar.log()
    );
}

#[tokio::test]
async fn a_reserve_answered_too_late_is_released() {
    let redis = Redis::start();
    let forwarder = Forwarder::start(redis.port, Duration::from_millis(400)).await;
    let mock = Mock::start(&[]);
    let sidecar = fleet_sidecar(&mock, forwarder.port, SQLITE, &[]);
    // A first request opens the connection (and the key's window).
    assert_eq!(chat(&sidecar, "k", "tpm=100000").await.0, 200);
    until("the first request was settled", || {
        all_holds_settled(&redis)
    })
    .await;
    let before = redis.tokens_counted();
    // Redis runs the next reserve at once, but its answer comes after the
    // timeout: the node decides locally (refused: no share of the window
    // Redis went away in, `afr_core::outage`), and that reservation must not
    // stay counted in Redis.
    forwarder.slow.store(true, Ordering::SeqCst);
    let (status, body) = chat(&sidecar, "k", "tpm=100000").await;
    assert_eq!(status, 429, "{body}");
    tokio::time::sleep(Duration::from_millis(600)).await;
    forwarder.slow.store(false, Ordering::SeqCst);
    until("the late reservation was released", || {
        redis.tokens_counted() == before
    })
    .await;
    // Every hold is settled or released (tombstones only).
    assert!(all_holds_settled(&redis));
}

/// Whether every reservation hold in Redis is settled (a tombstone).
fn all_holds_settled(redis: &Redis) -> bool {
    let holds = redis.cli(&["--scan", "--pattern", "afr:*:h:*"]);
    let holds: Vec<&str> = holds.lines().filter(|k| !k.is_empty()).collect();
    !holds.is_empty() && holds.iter().all(|h| redis.cli(&["GET", h]) == "done")
}

#[tokio::test]
async fn token_windows_follow_redis_s_clock_not_the_node_s() {
    let lib = Path::new("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1");
    assert!(lib.exists(), "libfaketime missing: run scripts/setup");
    let redis = Redis::start();
    let mock = Mock::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let offset: PathBuf = dir.path().join("faketime");
    // This node's wall clock is ten minutes ahead.
    std::fs::write(&offset, "+600\n").unwrap();
    let lib = lib.display().to_string();
    let offset = offset.display().to_string();
    let env = [
        ("LD_PRELOAD", lib.as_str()),
        ("FAKETIME_TIMESTAMP_FILE", offset.as_str()),
        ("FAKETIME_NO_CACHE", "1"),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ];
    let sidecar = fleet_sidecar(&mock, redis.port, SQLITE, &env);
    assert_eq!(chat(&sidecar, "k", "tpm=100000").await.0, 200);
    let now = redis.now_ms();
    let windows: Vec<u64> = redis
        .cli(&["--scan", "--pattern", "afr:*:t:*"])
        .lines()
        .filter_map(|k| k.rsplit(':').next()?.parse().ok())
        .collect();
    assert_eq!(windows.len(), 1, "{windows:?}");
    assert!(
        windows[0] <= now && now - windows[0] < 60_000,
        "the window starts at {} by Redis's clock ({now}), not the node's",
        windows[0]
    );
}

#[tokio::test]
async fn a_budget_the_store_cannot_seed_is_refused_not_a_redis_outage() {
    let redis = Redis::start();
    let cluster = pg::Cluster::start();
    let url = cluster.database();
    let mock = Mock::start(&[]);
    let usage = format!(
        "backend = \"postgres\"\npostgres_url_env = \"{}\"\npath = \"{{dir}}/usage.db\"\n",
        "AFR_TEST_USAGE_URL"
    );
    let sidecar = fleet_sidecar(&mock, redis.port, &usage, &[("AFR_TEST_USAGE_URL", &url)]);
    // Seeded at start (the database is up), then the database goes away.
    assert_eq!(chat(&sidecar, "plain", "tpm=100000").await.0, 200);
    cluster.stop();
    // A budget Redis holds no counter for: the store must say what was spent.
    let (status, body) = chat(&sidecar, "budgeted", "budget=1000000000/day").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("budget_unavailable")),
        "{body}"
    );
    // Redis is fine: no outage declared, keys without a budget stay fleet-wide.
    assert!(
        !sidecar.log().contains("Redis unreachable"),
        "{}",
        sidecar.log()
    );
    let before = redis.tokens_counted();
    assert_eq!(chat(&sidecar, "plain", "tpm=100000").await.0, 200);
    assert!(redis.tokens_counted() > before, "still counted in Redis");
}

/// A small chat request (worst case about two cents at the test price):
/// status and `x-afr-budget-remaining-usd`.
async fn small_chat(sidecar: &Sidecar, key: &str, limits: &str) -> (u16, f64) {
    let resp = send(sidecar, key, limits, 10).await;
    let status = resp.status().as_u16();
    let left = resp
        .headers()
        .get("x-afr-budget-remaining-usd")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(f64::NAN);
    (status, left)
}

/// `key`'s rows and their total cost in the sidecar's usage store.
fn booked(sidecar: &Sidecar, key: &str) -> (u64, u64) {
    let db = rusqlite::Connection::open(sidecar.dir.path().join("usage.db")).expect("usage.db");
    db.query_row(
        "SELECT COUNT(*), COALESCE(SUM(cost_nanos), 0) FROM usage WHERE key_id = ?1",
        [key],
        |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
    )
    .expect("query")
}

#[tokio::test]
async fn during_an_outage_a_budget_holds_its_share_of_what_was_left_and_redis_learns_of_it() {
    let redis = Redis::start();
    let mock = Mock::start(&[]);
    let sidecar = fleet_sidecar(&mock, redis.port, SQLITE, &[]);
    let budget = "budget=1000000000/day"; // $1 a day, two nodes
                                          // Fleet-wide, more than half of it is spent: more than this node's even share.
    let mut sent = 0u64;
    loop {
        let (status, left) = small_chat(&sidecar, "k", budget).await;
        assert_eq!(status, 200);
        sent += 1;
        if left < 0.45 {
            break;
        }
        assert!(sent < 200, "never spent");
    }
    redis.signal("-STOP");
    // Alone, the node holds the key to half of what was left (~$0.22): it
    // is neither locked out nor free to spend the rest.
    let mut local = 0u64;
    loop {
        let (status, _) = small_chat(&sidecar, "k", budget).await;
        sent += 1;
        if status != 200 {
            assert_eq!(status, 429);
            break;
        }
        local += 1;
        assert!(local < 200, "never refused on the local share");
    }
    assert!(
        local >= 5,
        "a key with budget left was locked out: {local} admitted"
    );
    redis.signal("-CONT");
    // Redis answers the next reservation and learns what was used meanwhile.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _) = small_chat(&sidecar, "k", budget).await;
        sent += 1;
        if status == 200 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let counter = || -> u64 {
        redis
            .cli(&["--scan", "--pattern", "afr:*:b:day:*"])
            .lines()
            .filter(|k| !k.is_empty())
            .map(|k| redis.cli(&["GET", k]).parse::<u64>().unwrap_or(0))
            .sum()
    };
    until("Redis's budget counter equals the books", || {
        let (rows, cost) = booked(&sidecar, "k");
        rows == sent && counter() == cost
    })
    .await;
    // Spent fleet-wide: no more than the budget.
    assert!(counter() <= 1_000_000_000, "{}", counter());
}

#[tokio::test]
async fn redis_over_tls_is_verified_against_the_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, crt, key) = certificates(dir.path(), "redis");
    let (other_ca, _, _) = certificates(dir.path(), "other");
    let tls_port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (crt, key, ca_s) = (
        crt.display().to_string(),
        key.display().to_string(),
        ca.display().to_string(),
    );
    let redis = Redis::start_with(&[
        "--tls-port",
        &tls_port.to_string(),
        "--tls-cert-file",
        &crt,
        "--tls-key-file",
        &key,
        "--tls-ca-cert-file",
        &ca_s,
        "--tls-auth-clients",
        "no",
    ]);
    let url = format!("rediss://127.0.0.1:{tls_port}");
    let mock = Mock::start(&[]);
    // Trusting the CA that signed Redis's certificate: counted in Redis. The
    // first call connects, shakes hands and loads the script within the test's
    // 100 ms Redis timeout; on a busy machine it can outlast it (twice in full
    // `cargo test` runs), which leaves the node on its share, and so refusing,
    // for that window, until Redis answers again. Hence: asked until counted,
    // and never a certificate refusal.
    let trusted = fleet_sidecar_at(
        &mock,
        &url,
        &format!("ca_file = \"{}\"", ca.display()),
        SQLITE,
        &[],
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while chat(&trusted, "k", "tpm=100000").await.0 != 200 || redis.tokens_counted() == 0 {
        assert!(
            Instant::now() < deadline,
            "never counted in Redis:\n{}",
            trusted.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !trusted.log().contains("invalid peer certificate"),
        "{}",
        trusted.log()
    );
    // Trusting another CA: the certificate is refused, so Redis is not used.
    let before = redis.tokens_counted();
    let wary = fleet_sidecar_at(
        &mock,
        &url,
        &format!("ca_file = \"{}\"", other_ca.display()),
        SQLITE,
        &[],
    );
    // Refused: Redis is unreachable to it, and a node has no share of the
    // window it lost Redis in (`afr_core::outage`).
    assert_eq!(chat(&wary, "k2", "tpm=100000").await.0, 429);
    assert!(
        wary.log().contains("Redis unreachable") && wary.log().contains("invalid peer certificate"),
        "{}",
        wary.log()
    );
    assert_eq!(redis.tokens_counted(), before);
}

#[tokio::test]
async fn a_redis_restarted_empty_holds_the_node_to_its_share_of_the_window() {
    let mut redis = Redis::start();
    let mock = Mock::start(&[]);
    // Answers take 2 s: the reservations below stay in the window meanwhile.
    mock.set(json!({"latency_ms": 2000})).await;
    let sidecar = Arc::new(fleet_sidecar(&mock, redis.port, SQLITE, &[]));
    let tpm = "tpm=2000";
    // Three requests in flight hold ~3 × 512 of the key's 2000 tokens.
    let mut inflight = Vec::new();
    for _ in 0..3 {
        let s = Arc::clone(&sidecar);
        inflight.push(tokio::spawn(async move { chat(&s, "k", tpm).await.0 }));
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(redis.tokens_counted() >= 1500, "{}", redis.tokens_counted());
    redis.restart_empty();
    // An empty Redis would grant the whole window again; the node holds the key to
    // its share of what was left (about (2000 − 1536) ÷ 2), which this one exceeds.
    // The first call after the restart reconnects and loads the script; on a
    // busy machine that can outlast the 100 ms timeout, and the node is then
    // on its share as if Redis were away (429 all the same) until a later
    // call is answered and sees the new epoch. Every answer meanwhile is 429.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = chat(&sidecar, "k", tpm).await;
        assert_eq!(status, 429, "{body}");
        if sidecar.log().contains("lost its counters") {
            break;
        }
        assert!(Instant::now() < deadline, "{}", sidecar.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for t in inflight {
        assert_eq!(t.await.unwrap(), 200);
    }
}

/// Redis back empty after an outage (the usual way its counters are lost:
/// killed, then started without persistence) is said in the log: once the
/// node was already without Redis, it used not to be.
#[tokio::test]
async fn redis_back_empty_after_an_outage_is_logged_as_having_lost_its_counters() {
    let mut redis = Redis::start();
    let mock = Mock::start(&[]);
    let sidecar = fleet_sidecar(&mock, redis.port, SQLITE, &[]);
    let tpm = "tpm=100000";
    assert_eq!(chat(&sidecar, "k", tpm).await.0, 200);
    redis.signal("-STOP");
    // No answer within the timeout: the node is on its own.
    assert_eq!(chat(&sidecar, "k", tpm).await.0, 429);
    assert!(
        sidecar.log().contains("Redis unreachable"),
        "{}",
        sidecar.log()
    );
    redis.signal("-CONT");
    redis.restart_empty();
    // The node asks once a second while away; its first answer has another epoch.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sidecar.log().contains("lost its counters") {
        assert!(Instant::now() < deadline, "{}", sidecar.log());
        let _ = chat(&sidecar, "k", tpm).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(sidecar.log().matches("lost its counters").count(), 1);
}

/// Issue 22, item 7: the Lua twin of `afr_core::ratelimit::room` (what the
/// module's lease script and the sidecar's reserve script run) against the
/// same table of vectors as the Rust rule, evaluated by a real redis-server.
#[test]
fn the_sliding_window_vectors_hold_in_lua() {
    let doc: Value =
        serde_json::from_str(include_str!("../../afr-core/vectors/sliding-window.json")).unwrap();
    let redis = Redis::start();
    let script = concat!(
        afr_core::sliding_window_lua!(),
        "return tostring(afr_room(tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), \
         tonumber(ARGV[4]), tonumber(ARGV[5])))"
    );
    let w = doc["window_ms"].to_string();
    let rule = doc["rule"].as_array().unwrap();
    assert!(rule.len() >= 10);
    for v in rule {
        let s = |k: &str| v[k].to_string();
        let (limit, prev, curr, e) = (s("limit"), s("prev"), s("curr"), s("elapsed_ms"));
        let out = redis.cli(&["EVAL", script, "0", &limit, &w, &prev, &curr, &e]);
        // Lua prints whole doubles without a fraction ("29", or "2.9e+01" never
        // for these magnitudes); a fraction or an exponent would be a failure.
        let room: i64 = out
            .parse()
            .unwrap_or_else(|_| panic!("{}: Lua answered {out:?}", v["name"]));
        assert_eq!(room, v["room"].as_i64().unwrap(), "{}", v["name"]);
        let grant = room.min(v["want"].as_i64().unwrap()).max(0);
        assert_eq!(grant, v["grant"].as_i64().unwrap(), "{}", v["name"]);
    }
}

/// The Lua twin of `afr_core::outage::held_windows` (`afr_held`, in both
/// fleet scripts) marks the windows the Rust rule names, for requests around
/// window starts, middles and ends, evaluated by a real redis-server.
#[test]
fn the_hold_rule_holds_in_lua() {
    let redis = Redis::start();
    let script = concat!(
        afr_core::hold_lua!(),
        "local held = afr_held('t:held', tonumber(ARGV[1]), 60000, tonumber(ARGV[2]), \
         tonumber(ARGV[3]))\n\
         return redis.call('KEYS', 't:held:*')"
    );
    let w = 60_000;
    let base = 1_800_000_000_000 - 1_800_000_000_000 % w;
    let nows = [base, base + 1, base + 29_999, base + 30_000, base + w - 1];
    let asks = [
        (0, 0),
        (0, 1),
        (0, w),
        (0, w + 31_000),
        (1_000, w),
        (1_000, 2 * w),
        (31_000, 3 * w),
        (59_999, 61_000),
    ];
    for now in nows {
        for (after, upto) in asks {
            redis.cli(&["FLUSHALL"]);
            let (n, a, u) = (now.to_string(), after.to_string(), upto.to_string());
            let out = redis.cli(&["EVAL", script, "0", &n, &a, &u]);
            let mut lua: Vec<u64> = out
                .split_whitespace()
                .map(|k| k.trim_start_matches("t:held:").parse().unwrap())
                .collect();
            lua.sort_unstable();
            let rust = afr_core::outage::held_windows(now, after, upto);
            assert_eq!(lua, rust, "now {now}, after {after}, upto {upto}");
        }
    }
}

/// Issue 22, item 4: a sidecar stopped while a settlement is still trying
/// to reach a Redis that is briefly away waits for it (up to 10 s) instead
/// of dropping it, which left the reservation's worst case counted in the
/// fleet's window (and, for a budget, its period).
#[tokio::test]
async fn a_shutdown_waits_for_settlements_still_trying_to_reach_redis() {
    let redis = Redis::start();
    let mock = Mock::start(&[]);
    mock.set(json!({"latency_ms": 600})).await;
    let mut sidecar = fleet_sidecar(&mock, redis.port, SQLITE, &[]);
    let request = chat(&sidecar, "k", "tpm=100000");
    let freeze = async {
        tokio::time::sleep(Duration::from_millis(250)).await;
        redis.signal("-STOP");
    };
    let ((status, body), ()) = tokio::join!(request, freeze);
    assert_eq!(status, 200, "{body}");
    let used = body["usage"]["total_tokens"].as_u64().unwrap();
    // The settlement is failing against the frozen Redis; stop the sidecar
    // and thaw Redis a second later.
    let stopped = std::thread::scope(|s| {
        let stop = s.spawn(|| {
            let started = Instant::now();
            let status = sidecar.terminate();
            (status, started.elapsed())
        });
        std::thread::sleep(Duration::from_millis(1000));
        redis.signal("-CONT");
        stop.join().unwrap()
    });
    assert!(stopped.0.success(), "{:?}", stopped.0);
    assert!(
        stopped.1 >= Duration::from_millis(900),
        "it waited for Redis: {:?}",
        stopped.1
    );
    assert_eq!(
        redis.tokens_counted(),
        used,
        "the settlement landed before the exit"
    );
    assert!(all_holds_settled(&redis));
    assert!(
        !sidecar.log().contains("did not answer within"),
        "{}",
        sidecar.log()
    );
}
