//! Test harness: the real `afr` binary and real `afr-mock` instances on
//! loopback port 0, each in its own temporary directory, killed on drop.

#![allow(dead_code)]

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The shared secret every test sidecar requires.
pub const SECRET: &str = "test-secret-0123456789abcdef";

/// Path of `afr-mock`, built next to `afr` (building it if this test run did not).
pub fn mock_bin() -> PathBuf {
    let afr = PathBuf::from(env!("CARGO_BIN_EXE_afr"));
    let dir = afr.parent().expect("afr has a directory").to_path_buf();
    let mock = dir.join("afr-mock");
    if !mock.exists() {
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-q", "-p", "afr-mock"]);
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo build -p afr-mock");
        assert!(status.success(), "building afr-mock failed");
    }
    mock
}

fn wait_for_file(path: &Path, child: &mut Child, what: &str) -> u16 {
    let start = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if let Ok(port) = text.trim().parse() {
                return port;
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited during start-up: {status}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{what} did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One `afr-mock` process.
pub struct Mock {
    child: Child,
    /// Its port.
    pub port: u16,
    /// Its TLS listener's port (`start_tls`).
    pub tls_port: Option<u16>,
    dir: tempfile::TempDir,
}

impl Mock {
    /// Starts a mock with extra CLI flags (fault knobs).
    pub fn start(args: &[&str]) -> Mock {
        Self::spawn(args, false)
    }

    /// Starts a mock that also serves TLS (HTTP/1.1 and h2 by ALPN, h2 with
    /// `--h2-max-streams`, 100 unless `args` say otherwise), its CA in `ca_file()`.
    pub fn start_tls(args: &[&str]) -> Mock {
        Self::spawn(args, true)
    }

    fn spawn(args: &[&str], tls: bool) -> Mock {
        let dir = tempfile::tempdir().expect("tempdir");
        let port_file = dir.path().join("port");
        let mut cmd = Command::new(mock_bin());
        cmd.args(["--listen", "127.0.0.1:0", "--port-file"])
            .arg(&port_file);
        if tls {
            cmd.args(["--tls-listen", "127.0.0.1:0", "--tls-port-file"])
                .arg(dir.path().join("tls.port"))
                .arg("--tls-ca-file")
                .arg(dir.path().join("ca.pem"));
        }
        let mut child = cmd
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning afr-mock");
        // The mock writes the TLS port file before the plain one.
        let port = wait_for_file(&port_file, &mut child, "afr-mock");
        let tls_port = tls.then(|| {
            std::fs::read_to_string(dir.path().join("tls.port"))
                .expect("tls port file")
                .trim()
                .parse()
                .expect("tls port")
        });
        Mock {
            child,
            port,
            tls_port,
            dir,
        }
    }

    /// `https://localhost:TLS_PORT` (`start_tls`).
    pub fn tls_base(&self) -> String {
        format!(
            "https://localhost:{}",
            self.tls_port.expect("started with TLS")
        )
    }

    /// The PEM file of the CA that signed the TLS listener's certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The request log.
    pub async fn log(&self) -> Value {
        reqwest::get(format!("{}/_mock/requests", self.base()))
            .await
            .expect("mock log")
            .json()
            .await
            .expect("mock log json")
    }

    /// API requests the mock received.
    pub async fn requests(&self) -> Vec<Value> {
        self.log().await["requests"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Replaces the instance knobs (`{}` makes it healthy).
    pub async fn set(&self, knobs: Value) {
        let r = reqwest::Client::new()
            .post(format!("{}/_mock/config", self.base()))
            .json(&knobs)
            .send()
            .await
            .expect("mock config");
        assert!(
            r.status().is_success(),
            "mock config refused: {}",
            r.status()
        );
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `[providers.NAME]` of kind openai pointing at `base` (`…/v1` appended).
pub fn openai_provider(name: &str, base: &str, extra: &str) -> String {
    format!("[providers.{name}]\nkind = \"openai\"\nbase_url = \"{base}/v1\"\n{extra}\n")
}

/// Timeouts table for a provider (append right after its block).
pub fn timeouts(name: &str, first_byte: &str, idle: &str) -> String {
    format!("[providers.{name}.timeouts]\nconnect = \"1s\"\nfirst_byte = \"{first_byte}\"\nidle = \"{idle}\"\ntotal = \"30s\"\n")
}

/// `[models.ID]` with routes `(provider, upstream model)`.
pub fn model(id: &str, routes: &[(&str, &str)]) -> String {
    let mut s = format!("[models.{id}]\ntier = \"Smart\"\ndescription = \"test model {id}\"\n");
    for (provider, upstream) in routes {
        s.push_str(&format!(
            "[[models.{id}.routes]]\nprovider = \"{provider}\"\nmodel = \"{upstream}\"\n"
        ));
    }
    s
}

/// One `afr serve` process.
pub struct Sidecar {
    child: Option<Child>,
    /// Main listener port.
    pub port: u16,
    /// Admin listener port.
    pub admin_port: u16,
    /// Its directory (config, usage db, log).
    pub dir: tempfile::TempDir,
    /// A client for it.
    pub client: reqwest::Client,
    /// Environment variables `afr serve` gets beside the test's own.
    pub env: Vec<(String, String)>,
}

impl Sidecar {
    /// Starts a sidecar whose config is the standard header plus `body`
    /// (providers and models) and `breaker` settings.
    pub fn start(body: &str) -> Sidecar {
        Self::start_with(body, 5, "30s")
    }

    /// Like `start` with a breaker policy.
    pub fn start_with(body: &str, failures: u32, cooldown: &str) -> Sidecar {
        Self::start_with_server(body, failures, cooldown, "")
    }

    /// Like `start_with`, with extra `[server]` lines.
    pub fn start_with_server(
        body: &str,
        failures: u32,
        cooldown: &str,
        server_extra: &str,
    ) -> Sidecar {
        Self::start_with_sections(body, failures, cooldown, server_extra, "")
    }

    /// Like `start_with`, with extra `[server]` and `[usage]` lines.
    pub fn start_with_sections(
        body: &str,
        failures: u32,
        cooldown: &str,
        server_extra: &str,
        usage_extra: &str,
    ) -> Sidecar {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = Self::config_text(dir.path(), body, failures, cooldown)
            .replacen("[server]\n", &format!("[server]\n{server_extra}\n"), 1)
            .replacen("[usage]\n", &format!("[usage]\n{usage_extra}\n"), 1);
        std::fs::write(dir.path().join("sidecar.toml"), config).expect("writing config");
        let mut sidecar = Sidecar {
            child: None,
            port: 0,
            admin_port: 0,
            dir,
            client: reqwest::Client::new(),
            env: Vec::new(),
        };
        sidecar.spawn();
        sidecar
    }

    /// Starts a sidecar whose config is the standard header plus `body`,
    /// with `usage` as its whole `[usage]` section (`{dir}` in it is the
    /// sidecar's directory) and `env` in its environment.
    pub fn start_with_usage_env(
        body: &str,
        failures: u32,
        usage: &str,
        env: &[(&str, &str)],
    ) -> Sidecar {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = Self::config_text(dir.path(), body, failures, "30s");
        let start = config.find("[usage]\n").expect("a usage section");
        let end = start
            + config[start..]
                .find("[breaker]")
                .expect("a breaker section");
        let usage = usage.replace("{dir}", &dir.path().display().to_string());
        let config = format!("{}[usage]\n{usage}\n{}", &config[..start], &config[end..]);
        std::fs::write(dir.path().join("sidecar.toml"), config).expect("writing config");
        let mut sidecar = Sidecar {
            child: None,
            port: 0,
            admin_port: 0,
            dir,
            client: reqwest::Client::new(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        sidecar.spawn();
        sidecar
    }

    /// Starts `afr serve` again in the same directory (same config, same
    /// usage database) after [`Sidecar::terminate`].
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "terminate it first");
        self.spawn();
    }

    fn spawn(&mut self) {
        let dir = self.dir.path();
        for file in ["port", "admin.port"] {
            let _ = std::fs::remove_file(dir.join(file));
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("sidecar.log"))
            .expect("log file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_afr"));
        // Telemetry is what a test configures, not what the caller's shell says.
        for (name, _) in std::env::vars().filter(|(k, _)| k.starts_with("OTEL_")) {
            command.env_remove(name);
        }
        let mut child = command
            .arg("serve")
            .arg("--config")
            .arg(dir.join("sidecar.toml"))
            .arg("--port-file")
            .arg(dir.join("port"))
            .arg("--admin-port-file")
            .arg(dir.join("admin.port"))
            .args(["--threads", "2"])
            .env("AFR_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawning afr serve");
        self.port = wait_for_file(&dir.join("port"), &mut child, "afr serve");
        self.admin_port = wait_for_file(&dir.join("admin.port"), &mut child, "afr serve admin");
        self.child = Some(child);
    }

    /// The full config text for `body`.
    pub fn config_text(dir: &Path, body: &str, failures: u32, cooldown: &str) -> String {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nsecret = \"{SECRET}\"\nmax_body_bytes = 65536\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n\
             [usage]\npath = \"{}\"\n\
             [breaker]\nfailures = {failures}\ncooldown = \"{cooldown}\"\n{body}",
            dir.join("usage.db").display()
        )
    }

    /// The `afr serve` process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// A request as nginx would send it for key `test-key`.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, self.url(path))
            .header("X-Afr-Secret", SECRET)
            .header("X-Afr-Key-Id", "test-key")
    }

    /// Polls `GET /v1/usage?by=model` (usage is written in batches) until
    /// `done` holds for its first row, for up to 5 s; returns the last body.
    pub async fn usage_by_model_until(&self, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let usage: Value = self
                .request(reqwest::Method::GET, "/v1/usage?by=model")
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if done(&usage["data"][0]) || Instant::now() >= deadline {
                return usage;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The whole response body of `POST /v1/chat/completions` as text.
    pub async fn chat_text(&self, body: Value) -> String {
        self.chat(body).await.text().await.unwrap()
    }

    /// `POST /v1/chat/completions` with a JSON body.
    pub async fn chat(&self, body: Value) -> reqwest::Response {
        self.request(reqwest::Method::POST, "/v1/chat/completions")
            .json(&body)
            .send()
            .await
            .expect("sidecar answered")
    }

    /// `POST /v1/chat/completions` with `body` sent exactly as given.
    pub async fn chat_raw(&self, body: &str) -> reqwest::Response {
        self.request(reqwest::Method::POST, "/v1/chat/completions")
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .expect("sidecar answered")
    }

    /// `/metrics` text.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://127.0.0.1:{}/metrics", self.admin_port))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// The sidecar's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sidecar.log")).unwrap_or_default()
    }

    /// Sends SIGKILL (no flush, no shutdown at all) and waits for the exit.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status;
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                panic!("afr serve did not exit after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A minimal valid chat body for `model`.
pub fn chat_body(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hello there"}]})
}

/// A loopback port with nothing listening on it.
pub fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// Splits an SSE body into events (each with its blank line).
pub fn events(body: &str) -> Vec<String> {
    body.split_inclusive("\n\n").map(str::to_owned).collect()
}

/// Replaces per-request values the mock generates (ids, timestamps) so two
/// streams of the same request can be compared byte for byte.
pub fn normalize(body: &str) -> String {
    let mut out = String::with_capacity(body.len());
    let mut rest = body;
    while let Some(pos) = rest.find("chatcmpl-") {
        out.push_str(&rest[..pos]);
        out.push_str("chatcmpl-ID");
        rest = &rest[pos + 9..];
        let end = rest
            .find(|c: char| !c.is_ascii_alphanumeric())
            .unwrap_or(rest.len());
        rest = &rest[end..];
    }
    out.push_str(rest);
    let mut result = String::with_capacity(out.len());
    let mut rest = out.as_str();
    while let Some(pos) = rest.find("\"created\":") {
        result.push_str(&rest[..pos]);
        result.push_str("\"created\":0");
        rest = &rest[pos + 10..];
        let end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        rest = &rest[end..];
    }
    result.push_str(rest);
    result
}

/// Runs `afr serve` expecting it to exit with an error within 10 s (a
/// sidecar that starts instead is killed, failing the test); returns stderr,
/// kept in `dir/refused.log`.
pub fn refused_start_up(mut serve: std::process::Command, dir: &Path) -> String {
    let log = dir.join("refused.log");
    let mut child = serve
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if start.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    match status {
        Some(status) => assert!(!status.success(), "{stderr}"),
        None => panic!("afr serve started instead of refusing: {stderr}"),
    }
    stderr
}

/// `afr serve --config config`, expected to refuse to start; returns stderr.
/// What `afr serve` prints when it refuses a config made of `body` (with the
/// usual server and usage sections), written to a throwaway directory.
pub fn serve_refuses_body(body: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sidecar.toml");
    std::fs::write(&path, Sidecar::config_text(dir.path(), body, 5, "30s")).expect("config");
    serve_refuses(&path)
}

pub fn serve_refuses(config: &Path) -> String {
    let mut serve = Command::new(env!("CARGO_BIN_EXE_afr"));
    serve.arg("serve").arg("--config").arg(config);
    refused_start_up(serve, config.parent().unwrap_or(Path::new(".")))
}

/// A CA and a certificate for 127.0.0.1 signed by it, made with openssl in
/// `dir`: (CA file, certificate, key).
pub fn certificates(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let p = |f: &str| dir.join(format!("{name}-{f}"));
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let (ca, ca_key, crt, key, csr, ext) = (
        p("ca.crt"),
        p("ca.key"),
        p("srv.crt"),
        p("srv.key"),
        p("srv.csr"),
        p("ext"),
    );
    let s = |p: &PathBuf| p.display().to_string();
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        &format!("/CN={name} test CA"),
        "-keyout",
        &s(&ca_key),
        "-out",
        &s(&ca),
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        &s(&key),
        "-out",
        &s(&csr),
    ]);
    std::fs::write(&ext, "subjectAltName=IP:127.0.0.1,DNS:localhost\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        &s(&csr),
        "-CA",
        &s(&ca),
        "-CAkey",
        &s(&ca_key),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        &s(&ext),
        "-out",
        &s(&crt),
    ]);
    (ca, crt, key)
}
