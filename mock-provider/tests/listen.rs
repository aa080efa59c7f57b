//! The mock's listen backlog: a bench opening thousands of streams at once
//! must not have its connects dropped before the mock accepts them.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use common::Mock;

/// Sends `signal` (`STOP`, `CONT`) to `pid` with kill(1).
fn signal(pid: u32, signal: &str) {
    let ok = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill -{signal} {pid} failed");
}

#[test]
fn a_burst_of_connects_waits_in_the_backlog_while_the_mock_is_not_accepting() {
    let mock = Mock::start(&[]);
    let addr: SocketAddr = mock.base.trim_start_matches("http://").parse().unwrap();
    // Stopped, the mock accepts nothing: every connect that completes was
    // completed by the kernel into the listen backlog.
    signal(mock.pid(), "STOP");
    let mut held = Vec::new();
    let mut refused = None;
    for i in 0..1_000 {
        // A connect past a full backlog is not answered (its SYN is dropped
        // and only retried after a second), so this short timeout tells.
        match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            Ok(s) => held.push(s),
            Err(e) => {
                refused = Some((i, e));
                break;
            }
        }
    }
    signal(mock.pid(), "CONT");
    // tokio's default (std's) backlog of 128 ends the burst at about 129.
    assert!(
        refused.is_none(),
        "the backlog held {} connects: {refused:?}",
        held.len()
    );
}

#[test]
fn a_port_in_use_is_refused_naming_the_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_afr-mock"))
        .args(["--listen", &addr.to_string()])
        .output()
        .expect("run afr-mock");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("listening on {addr}")), "{stderr}");
}
