//! `afr key new` refuses a bad argument before a secret exists: nothing on
//! stdout, the keys file untouched, and the error names the flag.

use std::process::Command;

const FILE: &str = "# operator comment\n[defaults]\nrpm = 30\n\n[[key]]\nid = \"taken\"\nname = \"n\"\nhash = \"sha256:0000000000000000000000000000000000000000000000000000000000000000\"\n";

#[test]
fn an_invalid_argument_prints_no_secret_and_leaves_the_file_alone() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["--rpm", "100000000"],
            "--rpm: must be between 1 and 10000000",
        ),
        (&["--rpm", "0"], "--rpm: must be between 1 and 10000000"),
        (&["--expires", "tomorrow"], "--expires: must be an RFC 3339"),
        (
            &["--models", "gpt-4o,with space"],
            "--models: invalid model name",
        ),
        (
            &["--id", "bad id"],
            "--id \"bad id\": must be 1-128 characters",
        ),
        (
            &["--id", "taken"],
            "--id: a key with id \"taken\" already exists",
        ),
    ];
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("keys.toml");
    std::fs::write(&path, FILE).expect("write");
    for (extra, expected) in cases {
        let mut args = vec!["key", "new", "--name", "New"];
        if !extra.contains(&"--id") {
            args.extend_from_slice(&["--id", "new"]);
        }
        args.extend_from_slice(extra);
        let out = Command::new(env!("CARGO_BIN_EXE_afr"))
            .args(&args)
            .arg("--file")
            .arg(&path)
            .output()
            .expect("running afr");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            out.stdout.is_empty(),
            "{args:?} printed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            FILE,
            "{args:?}"
        );
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("dir").count(),
            1,
            "no temporary file left"
        );
    }
    // The same arguments, valid, do add the key.
    let out = Command::new(env!("CARGO_BIN_EXE_afr"))
        .args([
            "key", "new", "--id", "new", "--name", "New", "--rpm", "10000000",
        ])
        .args([
            "--expires",
            "2030-01-01T00:00:00Z",
            "--models",
            "gpt-4o, gpt-5-mini",
        ])
        .arg("--file")
        .arg(&path)
        .output()
        .expect("running afr");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("afr_"));
}
