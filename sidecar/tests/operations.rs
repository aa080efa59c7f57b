//! Operations: config hot reload within 2 s, a broken config keeps the old
//! one and is logged with its config path, start-up errors name the path,
//! `/metrics` and `/healthz` on the admin listener.

mod common;

use common::*;
use serde_json::Value;
use std::time::{Duration, Instant};

async fn model_ids(sidecar: &Sidecar) -> Vec<String> {
    let v: Value = sidecar
        .request(reqwest::Method::GET, "/v1/models")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn config_edits_apply_within_two_seconds_and_broken_files_are_rejected() {
    let mock = Mock::start(&[]);
    let provider = openai_provider("mock", &mock.base(), "");
    let sidecar = Sidecar::start(&format!("{provider}{}", model("a", &[("mock", "x")])));
    let path = sidecar.dir.path().join("sidecar.toml");
    assert_eq!(model_ids(&sidecar).await, ["a"]);

    // A valid edit, written the way editors do (new file renamed over the old).
    let text = Sidecar::config_text(
        sidecar.dir.path(),
        &format!(
            "{provider}{}{}",
            model("a", &[("mock", "x")]),
            model("b", &[("mock", "y")])
        ),
        5,
        "30s",
    );
    std::fs::write(sidecar.dir.path().join("new.toml"), &text).unwrap();
    std::fs::rename(sidecar.dir.path().join("new.toml"), &path).unwrap();
    let start = Instant::now();
    while model_ids(&sidecar).await != ["a", "b"] {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "reload took over 2 s"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(sidecar.chat(chat_body("b", false)).await.status(), 200);

    // A broken edit: logged with the path, the previous config stays.
    let broken = text.replace(
        "provider = \"mock\"\nmodel = \"y\"",
        "provider = \"azur\"\nmodel = \"y\"",
    );
    std::fs::write(&path, broken).unwrap();
    let start = Instant::now();
    while !sidecar.log().contains("unknown provider") {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "no error logged: {}",
            sidecar.log()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let log = sidecar.log();
    assert!(
        log.contains(r#"models.b.routes[0]: unknown provider \"azur\""#)
            || log.contains(r#"models.b.routes[0]: unknown provider "azur""#),
        "{log}"
    );
    assert!(log.contains(&path.display().to_string()), "{log}");
    assert_eq!(model_ids(&sidecar).await, ["a", "b"]);
    assert_eq!(sidecar.chat(chat_body("b", false)).await.status(), 200);
}

#[tokio::test]
async fn config_behind_a_swapped_symlink_is_reloaded() {
    // The Kubernetes ConfigMap layout: sidecar.toml -> ..data/sidecar.toml and
    // ..data -> a versioned directory, swapped atomically on update. The change
    // event names `..data`, not the config file.
    use std::os::unix::fs::symlink;
    let mock = Mock::start(&[]);
    let provider = openai_provider("mock", &mock.base(), "");
    let sidecar = Sidecar::start(&format!("{provider}{}", model("a", &[("mock", "x")])));
    let dir = sidecar.dir.path();
    let version = |name: &str, models: &str| {
        let text = Sidecar::config_text(dir, &format!("{provider}{models}"), 5, "30s");
        std::fs::create_dir(dir.join(name)).unwrap();
        std::fs::write(dir.join(name).join("sidecar.toml"), text).unwrap();
    };
    version("..v1", &model("a", &[("mock", "x")]));
    symlink("..v1", dir.join("..data")).unwrap();
    symlink("..data/sidecar.toml", dir.join("link.toml")).unwrap();
    std::fs::rename(dir.join("link.toml"), dir.join("sidecar.toml")).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(model_ids(&sidecar).await, ["a"]);

    version(
        "..v2",
        &format!(
            "{}{}",
            model("a", &[("mock", "x")]),
            model("b", &[("mock", "y")])
        ),
    );
    symlink("..v2", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    let start = Instant::now();
    while model_ids(&sidecar).await != ["a", "b"] {
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "symlink swap not picked up: {}",
            sidecar.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn start_up_config_errors_name_the_path_and_exit_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sidecar.toml");
    let body = format!(
        "{}{}",
        openai_provider("mock", "http://127.0.0.1:9", ""),
        model("gpt-4o-mini", &[("mock", "x"), ("azur", "y")])
    );
    std::fs::write(&path, Sidecar::config_text(dir.path(), &body, 5, "30s")).unwrap();
    let stderr = serve_refuses(&path);
    assert!(
        stderr.contains(r#"models.gpt-4o-mini.routes[1]: unknown provider "azur""#),
        "{stderr}"
    );
    assert!(stderr.contains(&path.display().to_string()), "{stderr}");

    std::fs::write(&path, "[server]\nlisten_on = 1\n").unwrap();
    assert!(serve_refuses(&path).contains("listen_on"));
}

#[tokio::test]
async fn metrics_and_health_are_on_the_admin_listener() {
    let mock = Mock::start(&["--chunks", "3"]);
    let body = format!(
        "{}{}",
        openai_provider("mock", &mock.base(), ""),
        model("m", &[("mock", "x")])
    );
    let sidecar = Sidecar::start(&body);
    assert_eq!(sidecar.chat(chat_body("m", false)).await.status(), 200);
    let _ = sidecar.chat_text(chat_body("m", true)).await;
    let health = reqwest::get(format!("http://127.0.0.1:{}/healthz", sidecar.admin_port))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    // The API listener does not serve metrics (and wants the secret anyway).
    assert_eq!(
        sidecar
            .request(reqwest::Method::GET, "/metrics")
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    let start = Instant::now();
    loop {
        let m = sidecar.metrics().await;
        if m.contains("afr_requests_total{model=\"m\",provider=\"mock\",status=\"200\"} 2") {
            assert!(m.contains("afr_request_duration_seconds_bucket"), "{m}");
            assert!(
                m.contains(
                    "afr_time_to_first_token_seconds_count{model=\"m\",provider=\"mock\"} 1"
                ),
                "{m}"
            );
            assert!(
                m.contains("afr_tokens_total{model=\"m\",provider=\"mock\",kind=\"prompt\"}"),
                "{m}"
            );
            assert!(m.contains("afr_breaker_state{provider=\"mock\"} 0"), "{m}");
            assert!(!m.contains(SECRET));
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(2), "{m}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn serves_on_a_unix_socket() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let socket = write_unix_socket_config(dir.path());
    let admin_file = dir.path().join("admin.port");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_afr"))
        .arg("serve")
        .arg("--config")
        .arg(dir.path().join("sidecar.toml"))
        .arg("--admin-port-file")
        .arg(&admin_file)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !admin_file.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "afr serve did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut stream = tokio::net::UnixStream::connect(&socket).await.unwrap();
    let request = format!("GET /v1/models HTTP/1.1\r\nHost: afr\r\nX-Afr-Secret: {SECRET}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    assert!(answer.contains("\"id\":\"m\""), "{answer}");
}

#[test]
fn absurd_durations_stop_start_up_naming_the_path() {
    // `Instant + 300000000000 years` overflows: before validation capped
    // durations, this config started and every request to the provider
    // panicked where its deadline is computed.
    let stderr = serve_refuses_body(&format!(
        "{}[providers.mock.timeouts]\ntotal = \"300000000000 years\"\n{}",
        openai_provider("mock", "http://127.0.0.1:9", ""),
        model("m", &[("mock", "x")])
    ));
    assert!(
        stderr.contains(
            "providers.mock.timeouts.total: 300000000000years is longer than the limit of 1year"
        ),
        "{stderr}"
    );
}

#[test]
fn a_file_at_the_socket_path_is_never_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let socket = write_unix_socket_config(dir.path());
    let serve = || {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_afr"));
        cmd.arg("serve")
            .arg("--config")
            .arg(dir.path().join("sidecar.toml"))
            .arg("--admin-port-file")
            .arg(dir.path().join("admin.port"));
        cmd
    };

    // A regular file (say, server.listen pointing at the usage database by mistake).
    std::fs::write(&socket, "precious data\n").unwrap();
    let stderr = refused_start_up(serve(), dir.path());
    assert!(
        stderr.contains(&format!(
            "{} exists and is not a socket; not removing it",
            socket.display()
        )),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&socket).unwrap(), "precious data\n");

    // A stale socket left by a crashed sidecar is still replaced.
    std::fs::remove_file(&socket).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let mut child = serve().stderr(std::process::Stdio::null()).spawn().unwrap();
    let start = Instant::now();
    while !dir.path().join("admin.port").exists() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("afr serve exited: {status}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "afr serve did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Writes `dir/sidecar.toml` listening on `dir/sidecar.sock`; returns the socket path.
fn write_unix_socket_config(dir: &std::path::Path) -> std::path::PathBuf {
    let socket = dir.join("sidecar.sock");
    let body = format!(
        "{}{}",
        openai_provider("mock", "http://127.0.0.1:9", ""),
        model("m", &[("mock", "x")])
    );
    let text = Sidecar::config_text(dir, &body, 5, "30s").replace(
        "listen = \"127.0.0.1:0\"\nsecret",
        &format!("listen = \"unix:{}\"\nsecret", socket.display()),
    );
    std::fs::write(dir.join("sidecar.toml"), text).unwrap();
    socket
}
