//! The sidecar out of its own resources: a connect that fails for want of a
//! descriptor is the gateway's problem, not the provider's.

mod common;

use common::*;
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn fd_numbers(pid: u32) -> Vec<usize> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the sidecar's /proc entry")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

fn open_fds(pid: u32) -> usize {
    fd_numbers(pid).len()
}

/// The number the process's next descriptor would get (the lowest free one):
/// a soft limit of it leaves the process not one more.
fn next_fd(pid: u32) -> usize {
    let open = fd_numbers(pid);
    (0..).find(|n| !open.contains(n)).expect("a free number")
}

/// Sets the process's soft open-file limit (its hard limit stays).
fn set_soft_nofile(pid: u32, soft: &str) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let hard = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4))
        .expect("a Max open files line")
        .to_owned();
    let soft = if soft == "hard" { hard.as_str() } else { soft };
    let out = Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={soft}:{hard}"))
        .output()
        .expect("running prlimit (util-linux)");
    assert!(
        out.status.success(),
        "prlimit: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One chat request on an open connection, as nginx would send it; the whole
/// response (the sidecar answers errors with Content-Length and no keep-alive
/// games: read until the body is in).
async fn ask(conn: &mut TcpStream) -> String {
    let body = chat_body("m", false).to_string();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: sidecar\r\nx-afr-secret: {SECRET}\r\n\
         x-afr-key-id: test-key\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(body.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = tokio::time::timeout_at(deadline.into(), conn.read(&mut buf))
            .await
            .expect("an answer within 10 s")
            .unwrap();
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(str::to_owned)
                })
                .and_then(|v| v.trim().parse::<usize>().ok());
            if n == 0 || length.is_some_and(|len| got.len() >= end + 4 + len) {
                return text;
            }
        }
        assert!(n > 0, "connection closed mid-answer: {text}");
    }
}

#[tokio::test]
async fn out_of_descriptors_is_a_503_and_never_opens_the_providers_breaker() {
    let mock = Mock::start(&[]);
    let body = format!(
        "{}{}",
        openai_provider("p", &mock.base(), ""),
        model("m", &[("p", "x")])
    );
    // Two failures would open the breaker for 30 s.
    let sidecar = Sidecar::start_with(&body, 2, "30s");
    let pid = sidecar.pid();

    // Connections nginx holds: each costs the sidecar one descriptor now,
    // and a request on one needs another for the provider.
    let before = open_fds(pid);
    let mut conns = Vec::new();
    for _ in 0..4 {
        conns.push(
            TcpStream::connect(("127.0.0.1", sidecar.port))
                .await
                .unwrap(),
        );
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while open_fds(pid) < before + 4 {
        assert!(Instant::now() < deadline, "the sidecar did not accept");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Not one descriptor to spare.
    set_soft_nofile(pid, &next_fd(pid).to_string());
    for conn in &mut conns {
        let answer = ask(conn).await;
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(answer.contains("gateway_overloaded"), "{answer}");
        assert!(
            answer.to_ascii_lowercase().contains("retry-after: 1\r\n"),
            "{answer}"
        );
    }
    assert_eq!(mock.requests().await.len(), 0);

    // Descriptors back: the provider was never at fault, so the very next
    // request reaches it (before the fix its breaker was open for 30 s).
    set_soft_nofile(pid, "hard");
    let r = sidecar.chat(chat_body("m", false)).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(mock.requests().await.len(), 1);
    let metrics = sidecar.metrics().await;
    assert!(
        metrics.contains("afr_breaker_state{provider=\"p\"} 0"),
        "{metrics}"
    );
    assert!(metrics.contains("afr_local_exhausted_total 4"), "{metrics}");
    assert!(
        sidecar.log().contains("out of local resources"),
        "{}",
        sidecar.log()
    );
}

/// Memory a burst freed goes back to the system while the sidecar idles:
/// jemalloc runs its background purging thread (2 000 streams took the RSS
/// from 14 to 96 MiB; 11 s after they ended it was 24 MiB with the thread and
/// still 92 MiB without it, until a later burst reused the memory).
#[tokio::test]
async fn the_allocator_returns_freed_memory_from_a_thread_of_its_own() {
    let mock = Mock::start(&[]);
    let sidecar = Sidecar::start(&format!(
        "{}{}",
        openai_provider("p", &mock.base(), ""),
        model("m", &[("p", "x")])
    ));
    assert_eq!(sidecar.chat(chat_body("m", false)).await.status(), 200);
    let pid = sidecar.pid();
    let threads: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the sidecar's threads")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_owned())
        .collect();
    assert!(
        threads.iter().any(|name| name.starts_with("jemalloc_bg")),
        "no jemalloc background thread among {threads:?}"
    );
}

/// Without `--threads` the sidecar runs half the CPUs' worth of worker threads
/// (at least one): it shares the host with nginx's workers, and on 2 cores a
/// second thread cost 7-10% of the requests per second in context switches.
/// `afr serve` on a working config in `dir`, its stderr in `dir/log`, with
/// `TOKIO_WORKER_THREADS` set to `threads_env` (or unset).
fn serve_in(dir: &std::path::Path, threads_env: Option<&str>) -> std::process::Child {
    let body = format!(
        "{}{}",
        openai_provider("p", "http://127.0.0.1:9", ""),
        model("m", &[("p", "x")])
    );
    let config = Sidecar::config_text(dir, &body, 5, "30s");
    std::fs::write(dir.join("sidecar.toml"), config).expect("config");
    let mut command = Command::new(env!("CARGO_BIN_EXE_afr"));
    command
        .arg("serve")
        .arg("--config")
        .arg(dir.join("sidecar.toml"))
        .env_remove("TOKIO_WORKER_THREADS")
        .env("AFR_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("log")).expect("log file"));
    if let Some(value) = threads_env {
        command.env("TOKIO_WORKER_THREADS", value);
    }
    command.spawn().expect("spawning afr serve")
}

#[test]
fn the_sidecar_takes_half_the_cpus_by_default() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = serve_in(dir.path(), None);
    // The start line is logged once every listener is up, after the port
    // file is written: wait for the line itself.
    let log_path = dir.path().join("log");
    let read_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !read_log().contains("afr serve started") && Instant::now() < deadline {
        assert!(
            child.try_wait().expect("status").is_none(),
            "afr serve exited: {}",
            read_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    let log = read_log();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let started = log
        .lines()
        .find(|l| l.contains("afr serve started"))
        .unwrap_or_else(|| panic!("no start line within 10 s: {log}"));
    assert!(
        started.contains(&format!("threads={}", (cpus / 2).max(1))),
        "{cpus} CPUs: {started}"
    );
}

/// A TOKIO_WORKER_THREADS that is not a number of threads stops the start
/// with a message naming it (it used to be ignored for the default).
#[test]
fn a_bad_thread_count_in_the_environment_is_refused_by_name() {
    for bad in ["lots", "0", "-2"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut child = serve_in(dir.path(), Some(bad));
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = child.try_wait().expect("status") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("TOKIO_WORKER_THREADS={bad}: afr serve started anyway");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let log = std::fs::read_to_string(dir.path().join("log")).expect("log");
        assert!(!status.success(), "TOKIO_WORKER_THREADS={bad}: {log}");
        assert!(
            log.contains("TOKIO_WORKER_THREADS") && log.contains(&format!("{bad:?}")),
            "TOKIO_WORKER_THREADS={bad}: {log}"
        );
    }
}
