"""scripts/run as a newcomer meets it, and the shipped configuration as an operator
installs it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import AFR, KEY_RE, REPO, free_port, http, runtime_dir, start_gateway


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def test_rerun_keeps_keys_and_usage_and_ctrl_c_stops_everything():
    home = runtime_dir("quickstart")
    try:
        g, first = start_gateway(home)
        assert g.demo_key, first.stdout
        assert "curl http://127.0.0.1:" in first.stdout and "OpenAI(base_url=" in first.stdout
        status, _, body = http(
            "POST", g.base + "/v1/chat/completions",
            json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "remember me"}]}).encode(),
            {"Authorization": f"Bearer {g.demo_key}", "Content-Type": "application/json"},
        )
        assert status == 200, body
        g.stop()

        # Second run, in the foreground as a newcomer runs it; Ctrl-C must stop it all.
        env = dict(g.env, AFR_PORT=str(free_port()))
        proc = subprocess.Popen([str(REPO / "scripts/run")], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out = ""
        deadline = time.monotonic() + 300
        while "press Ctrl-C to stop" not in out and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            out += line
        assert "press Ctrl-C to stop" in out, out
        assert not KEY_RE.search(out), "a re-run must not mint another demo key"
        base = f"http://127.0.0.1:{env['AFR_PORT']}"
        status, _, _ = http("GET", base + "/v1/models", headers={"Authorization": f"Bearer {g.demo_key}"})
        assert status == 200, "the demo key from the first run still works"
        usage = subprocess.run(
            [str(AFR), "usage", "--config", str(home / "sidecar.toml"), "--key", "demo", "--json"],
            capture_output=True, text=True, check=True,
        )
        assert json.loads(usage.stdout)["data"][0]["requests"] >= 1, "usage from the first run is kept"
        pids = [int(line.split()[1]) for line in (home / "pids").read_text().splitlines()]
        assert len(pids) == 3 and all(alive(p) for p in pids)

        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        assert proc.returncode == 0
        assert not any(alive(p) for p in pids), "Ctrl-C stops nginx, the sidecar and the mock"
    finally:
        subprocess.run([str(REPO / "scripts/run"), "--stop"], env={**os.environ, "AFR_HOME": str(home)}, capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.parametrize("stderr_too", [False, True], ids=["stdout", "stdout-and-stderr"])
def test_ctrl_c_stops_everything_when_output_is_piped_through_tee(stderr_too):
    """`scripts/run | tee run.log` (or `2>&1 | tee`), then Ctrl-C: the SIGINT reaches tee
    too, which dies first; the script's cleanup must still stop nginx, the sidecar and
    the mock (its first echo into the dead pipe used to kill it with SIGPIPE, leaving
    them running)."""
    home = runtime_dir("tee")
    log = home / "run.log"
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY")}
    env.update(AFR_HOME=str(home), AFR_PORT=str(free_port()))
    try:
        run = subprocess.Popen([str(REPO / "scripts/run")], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT if stderr_too else subprocess.PIPE, text=True)
        tee = subprocess.Popen(["tee", str(log)], stdin=run.stdout, stdout=subprocess.DEVNULL)
        run.stdout.close()
        seen = ""
        deadline = time.monotonic() + 300
        while "press Ctrl-C to stop" not in seen and time.monotonic() < deadline and run.poll() is None:
            if stderr_too:
                time.sleep(0.1)
                seen = log.read_text() if log.exists() else ""
            else:
                seen += run.stderr.readline()
        assert "press Ctrl-C to stop" in seen, seen
        pids = [int(line.split()[1]) for line in (home / "pids").read_text().splitlines()]
        assert len(pids) == 3 and all(alive(p) for p in pids)
        # tee writes the banner when it gets to it: on a busy machine, after the
        # script's stderr has already said "press Ctrl-C".
        banner_by = time.monotonic() + 10
        while "Aeferalow gateway is running" not in log.read_text() and time.monotonic() < banner_by:
            time.sleep(0.05)
        assert "Aeferalow gateway is running" in log.read_text()

        # A terminal's Ctrl-C signals the whole pipeline; tee is gone before the trap runs.
        tee.send_signal(signal.SIGINT)
        tee.wait(timeout=10)
        run.send_signal(signal.SIGINT)
        run.wait(timeout=60)
        assert not any(alive(p) for p in pids), "Ctrl-C stops nginx, the sidecar and the mock"
        assert run.returncode == 0
    finally:
        subprocess.run([str(REPO / "scripts/run"), "--stop"], env={**os.environ, "AFR_HOME": str(home)}, capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


def sidecar_config(tmp_path, **env_overrides) -> tuple[dict, str]:
    import tomllib

    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env.update(env_overrides)
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts/sidecar-config.py"), "--shipped", str(REPO / "conf/sidecar.toml"),
         "--home", str(tmp_path), "--secret", "s" * 32, "--admin-port", "9", "--mock-port", "10"],
        env=env, capture_output=True, text=True, check=True,
    )
    return tomllib.loads((tmp_path / "sidecar.toml").read_text()), out.stdout


def test_quickstart_routes_to_the_mock_without_provider_keys(tmp_path):
    cfg, shell = sidecar_config(tmp_path)
    assert list(cfg["providers"]) == ["mock"]
    assert "MOCK_PORT=10" in shell
    assert list(cfg["models"]) == ["gpt-5-mini", "gpt-4o-mini", "gpt-5-chat", "text-embedding-3-small"]


def test_quickstart_routes_to_real_providers_and_never_to_the_mock(tmp_path):
    cfg, shell = sidecar_config(tmp_path, OPENAI_API_KEY="sk-test", ANTHROPIC_API_KEY="sk-ant-test")
    assert set(cfg["providers"]) == {"openai", "anthropic"}
    assert "MOCK_PORT=\n" in shell
    for model in cfg["models"].values():
        assert {r["provider"] for r in model["routes"]} <= {"openai", "anthropic"}
    # The provider keys stay in the environment, never in the file.
    text = (tmp_path / "sidecar.toml").read_text()
    assert "sk-test" not in text and "sk-ant-test" not in text
    cfg, _ = sidecar_config(tmp_path, ANTHROPIC_API_KEY="sk-ant-test")
    assert list(cfg["providers"]) == ["anthropic"]
    assert list(cfg["models"]) == ["gpt-5-mini", "gpt-4o-mini", "gpt-5-chat"]


def test_generated_config_is_accepted_by_the_sidecar(tmp_path):
    tmp_path.chmod(0o755)
    sidecar_config(tmp_path, OPENAI_API_KEY="sk-test")
    # `afr serve` validates the config before listening; a bad one exits at once.
    p = subprocess.Popen([str(AFR), "serve", "--config", str(tmp_path / "sidecar.toml")],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(100):
            if (tmp_path / "sidecar.sock").exists() or p.poll() is not None:
                break
            time.sleep(0.05)
        assert p.poll() is None, p.stdout.read()
    finally:
        p.terminate()
        p.wait(10)


@pytest.mark.skipif(not shutil.which("openssl"), reason="openssl not installed")
def test_shipped_tls_site_passes_nginx_t(tmp_path):
    """conf/nginx as an operator installs it: load_module, the http snippet, the TLS site."""
    etc = tmp_path / "etc"
    (etc / "nginx").mkdir(parents=True)
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=llm.example.com",
         "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem")],
        check=True, capture_output=True,
    )
    shutil.copy(REPO / "conf/keys.toml", etc / "keys.toml")
    (etc / "upstream-secret.conf").write_text('afr_upstream_secret "0123456789abcdef0123456789abcdef";\n')
    for name in ("afr-http.conf", "afr-server.conf", "example-site.conf"):
        text = (REPO / "conf/nginx" / name).read_text()
        text = (text.replace("/etc/afr/nginx/", f"{etc}/nginx/").replace("/etc/afr/", f"{etc}/")
                .replace("/run/afr/", f"{tmp_path}/").replace("/usr/share/afr/web", str(REPO / "web"))
                .replace("/etc/ssl/llm.example.com/fullchain.pem", str(tmp_path / "cert.pem"))
                .replace("/etc/ssl/llm.example.com/privkey.pem", str(tmp_path / "key.pem")))
        (etc / "nginx" / name).write_text(text)
    module = REPO / "build/system/libngx_http_afr_module.so"
    (tmp_path / "nginx.conf").write_text(
        f"load_module {module};\n"
        f"pid {tmp_path}/nginx.pid;\n"
        "events {}\n"
        "http {\n"
        f"  include {etc}/nginx/afr-http.conf;\n"
        f"  include {etc}/nginx/example-site.conf;\n"
        "}\n"
    )
    r = subprocess.run(
        ["/usr/sbin/nginx", "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-e", str(tmp_path / "error.log")],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "syntax is ok" in r.stderr
