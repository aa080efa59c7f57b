//! A throwaway PostgreSQL cluster for the tests: Debian's `postgresql`
//! (installed by `scripts/setup`), `initdb` in a temporary directory, the
//! server on a loopback port, run as an unprivileged user when the tests run
//! as root (PostgreSQL refuses to run as root). [`shared`] starts one per test
//! binary on first use; each test takes its own database from it
//! ([`Cluster::database`]). A watchdog stops the server by its PID and
//! removes the directory when the test process exits (the test harness has
//! no teardown for statics).
//!
//! Set `AFR_TEST_POSTGRES_BIN` to a directory holding `initdb` and `postgres`
//! to use another build than the newest under `/usr/lib/postgresql`.

#![allow(dead_code)]

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The unprivileged user the server runs as when the tests run as root.
const USER: &str = "afr-pgtest";
/// The cluster's superuser (trust authentication on loopback).
const SUPERUSER: &str = "afr";

/// A running (or stopped) test cluster.
pub struct Cluster {
    /// The loopback port it listens on.
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
    /// `Some(user)` when commands run through `runuser`.
    run_as: Option<&'static str>,
    /// The server's launcher (`runuser` or `postgres`), reaped by [`Cluster::stop`].
    server: std::sync::Mutex<Option<std::process::Child>>,
}

static SHARED: OnceLock<Cluster> = OnceLock::new();
static DATABASES: AtomicU32 = AtomicU32::new(0);

/// The test binary's cluster, started on first use.
pub fn shared() -> &'static Cluster {
    SHARED.get_or_init(Cluster::start)
}

fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("AFR_TEST_POSTGRES_BIN") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).expect(
        "no PostgreSQL under /usr/lib/postgresql: run scripts/setup (Debian's postgresql package)",
    )
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Creates [`USER`] once; another test binary racing to create it is fine.
fn ensure_user() {
    let exists = || {
        Command::new("id")
            .arg(USER)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !exists() {
        let _ = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                USER,
            ])
            .status();
        assert!(exists(), "cannot create the user {USER} for PostgreSQL");
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl Cluster {
    /// `initdb` and start a new cluster (use [`shared`] unless the test stops
    /// and starts the server).
    pub fn start() -> Cluster {
        let bin = bin_dir();
        let run_as = if is_root() {
            ensure_user();
            Some(USER)
        } else {
            None
        };
        let dir = tempfile::Builder::new()
            .prefix("afr-pg-")
            .tempdir()
            .expect("tempdir")
            .keep();
        if let Some(user) = run_as {
            let ok = Command::new("chown")
                .args(["-R", user])
                .arg(&dir)
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "chown {}", dir.display());
        }
        let cluster = Cluster {
            port: free_port(),
            dir,
            bin,
            run_as,
            server: std::sync::Mutex::new(None),
        };
        let out = cluster
            .command("initdb")
            .arg("-D")
            .arg(cluster.data())
            .args(["-U", SUPERUSER, "-A", "trust", "-E", "UTF8", "--no-sync"])
            .stdout(Stdio::null())
            .output()
            .expect("running initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.run();
        cluster.watch(std::process::id());
        cluster
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// A command from the PostgreSQL bin directory, as the cluster's user.
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        match self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(path);
                c
            }
            None => Command::new(path),
        }
    }

    /// Starts the server (again) and waits until it takes connections.
    pub fn run(&self) {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.join("postgres.log"))
            .expect("log file");
        if let Some(user) = self.run_as {
            let _ = Command::new("chown")
                .arg(user)
                .arg(self.dir.join("postgres.log"))
                .status();
        }
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(self.data())
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.dir.display()))
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off", "-c", "max_connections=200"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting postgres");
        *self.server.lock().unwrap_or_else(|p| p.into_inner()) = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.ready() {
            assert!(
                Instant::now() < deadline,
                "postgres did not start: {}",
                fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn ready(&self) -> bool {
        Command::new(self.bin.join("pg_isready"))
            .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
            .status()
            .is_ok_and(|s| s.success())
    }

    /// The postmaster's PID (first line of `postmaster.pid`), while it runs.
    fn pid(&self) -> Option<u32> {
        fs::read_to_string(self.data().join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// Stops the server by its PID (fast shutdown) and waits until it is gone.
    pub fn stop(&self) {
        let Some(pid) = self.pid() else { return };
        let _ = Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Path::new(&format!("/proc/{pid}")).exists() && self.pid() == Some(pid) {
            assert!(Instant::now() < deadline, "postgres {pid} did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(mut child) = self.server.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = child.wait();
        }
    }

    /// When the process `owner` exits: stop the server by PID, remove the
    /// directory.
    fn watch(&self, owner: u32) {
        let script = format!(
            "while kill -0 {owner} 2>/dev/null; do sleep 0.5; done; \
             pid=$(head -n1 '{data}/postmaster.pid' 2>/dev/null); \
             [ -n \"$pid\" ] && kill -INT \"$pid\"; \
             for i in $(seq 100); do [ -n \"$pid\" ] && kill -0 \"$pid\" 2>/dev/null || break; sleep 0.1; done; \
             rm -rf '{dir}'",
            data = self.data().display(),
            dir = self.dir.display(),
        );
        // It outlives this process on purpose; init reaps it.
        #[allow(clippy::zombie_processes)]
        Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("watchdog");
    }

    /// Turns TLS on with certificate `crt` and key `key` (copied into the
    /// data directory, owned by the server's user) and restarts the server.
    pub fn enable_ssl(&self, crt: &Path, key: &Path) {
        for (from, name) in [(crt, "server.crt"), (key, "server.key")] {
            let to = self.data().join(name);
            fs::copy(from, &to).expect("copying the certificate");
            let ok = Command::new("chmod").arg("600").arg(&to).status();
            assert!(ok.is_ok_and(|s| s.success()));
            if let Some(user) = self.run_as {
                let ok = Command::new("chown").arg(user).arg(&to).status();
                assert!(ok.is_ok_and(|s| s.success()));
            }
        }
        let conf = self.data().join("postgresql.conf");
        let mut text = fs::read_to_string(&conf).expect("postgresql.conf");
        text.push_str("\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        fs::write(&conf, text).expect("postgresql.conf");
        self.stop();
        self.run();
    }

    /// The URL of database `db`.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://{SUPERUSER}@127.0.0.1:{}/{db}?connect_timeout=5",
            self.port
        )
    }

    /// Runs `sql` in database `db` with psql; its output, unaligned.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                &self.url(db),
            ])
            .args(["-c", sql])
            .output()
            .expect("running psql");
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// A new empty database; returns its URL.
    pub fn database(&self) -> String {
        let n = DATABASES.fetch_add(1, Ordering::Relaxed);
        let name = format!("afr_test_{n}");
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        self.url(&name)
    }
}

/// The database name of a URL made by [`Cluster::url`].
pub fn db_name(url: &str) -> &str {
    let tail = url.rsplit('/').next().unwrap_or("");
    tail.split('?').next().unwrap_or(tail)
}
