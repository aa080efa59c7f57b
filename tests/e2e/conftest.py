"""End-to-end harness: the whole gateway as `scripts/run --detach` starts it.

Real nginx (Debian's, with the module built for it) -> the afr module -> the afr
sidecar -> afr-mock, on loopback ports picked free. Tests talk to it with the
official `openai` Python SDK.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import shutil
import subprocess
import tempfile
import time
import sqlite3
import tomllib
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
AFR = REPO / "target" / "release" / "afr"
MOCK = REPO / "target" / "release" / "afr-mock"
KEY_RE = re.compile(r"afr_[A-Za-z0-9]{32,}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mock_tokens(messages: list[dict], chunks: int | None = None) -> tuple[int, int]:
    """The mock's deterministic token counts (mock-provider/src/reply.rs)."""
    prompt = sum(1 + len(str(m["content"]).split()) for m in messages)
    last_user = [m for m in messages if m["role"] == "user"][-1]["content"]
    completion = len(("Mock reply to: " + last_user).split())
    return prompt, chunks if chunks is not None else completion


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 10):
    """A plain HTTP call returning (status, headers, body) without raising on 4xx/5xx."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


class Gateway:
    """A running stack and the operations tests need on it."""

    def __init__(self, home: Path, port: int, demo_key: str, env: dict):
        self.home = home
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.demo_key = demo_key
        self.env = env
        self.keys_file = home / "keys.toml"
        self.extra_procs: list[subprocess.Popen] = []

    # --- clients -------------------------------------------------------------------
    def client(self, key: str | None = None, **kw):
        from openai import OpenAI

        kw.setdefault("max_retries", 0)
        kw.setdefault("timeout", 20)
        return OpenAI(base_url=self.base + "/v1", api_key=key or self.demo_key, **kw)

    # --- keys ----------------------------------------------------------------------
    def afr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([str(AFR), *args], capture_output=True, text=True, timeout=60, check=check, env=self.env)

    def new_key(self, key_id: str, *extra: str, wait: bool = True) -> str:
        out = self.afr("key", "new", "--id", key_id, "--name", f"test {key_id}", *extra, "--file", str(self.keys_file))
        m = KEY_RE.search(out.stdout)
        assert m, out.stdout + out.stderr
        key = m.group(0)
        if wait:
            # Each worker re-reads the file on its own 1 s timer: once one worker knows the
            # key, the others know it within another interval.
            status, _ = self.wait_key_state(key, lambda s: s != 401)
            assert status != 401, "new key not picked up within 2.5 s"
            time.sleep(1.1)
        return key

    def wait_key_state(self, key: str, ok, timeout: float = 2.5) -> tuple[int, float]:
        """Polls GET /v1/models with `key` until ok(status); returns (status, seconds)."""
        t0 = time.monotonic()
        while True:
            status, _, _ = http("GET", self.base + "/v1/models", headers={"Authorization": f"Bearer {key}"})
            took = time.monotonic() - t0
            if ok(status) or took > timeout:
                return status, took
            time.sleep(0.05)

    # --- processes -----------------------------------------------------------------
    def pids(self) -> dict[str, int]:
        out = {}
        for line in (self.home / "pids").read_text().splitlines():
            name, pid = line.split()
            out[name] = int(pid)
        return out

    def nginx(self, *args: str) -> subprocess.CompletedProcess:
        conf = self.home / "nginx.conf"
        return subprocess.run(
            ["/usr/sbin/nginx", "-p", str(self.home), "-c", str(conf), "-e", str(self.home / "logs/nginx-error.log"), *args],
            capture_output=True,
            text=True,
            timeout=30,
        )

    def mock_url(self) -> str:
        port = (self.home / "mock.port").read_text().strip() if (self.home / "mock.port").exists() else None
        assert port, "scripts/run records the mock's port in mock.port"
        return f"http://127.0.0.1:{port}"

    def mock_config(self, url: str | None = None, **knobs) -> None:
        status, _, body = http(
            "POST", (url or self.mock_url()) + "/_mock/config", json.dumps(knobs).encode(), {"Content-Type": "application/json"}
        )
        assert status in (200, 204), body

    def mock_requests(self, url: str | None = None) -> list[dict]:
        status, _, body = http("GET", (url or self.mock_url()) + "/_mock/requests")
        assert status == 200, body
        data = json.loads(body)
        return data["requests"] if isinstance(data, dict) else data

    def clear_mock_requests(self, url: str | None = None) -> None:
        http("DELETE", (url or self.mock_url()) + "/_mock/requests")

    def start_mock(self, *args: str) -> str:
        """Starts another afr-mock; returns its base URL."""
        port_file = self.home / f"mock-{len(self.extra_procs)}.port"
        p = subprocess.Popen(
            [str(MOCK), "--listen", "127.0.0.1:0", "--port-file", str(port_file), *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.extra_procs.append(p)
        for _ in range(100):
            if port_file.exists() and port_file.read_text().strip():
                return f"http://127.0.0.1:{port_file.read_text().strip()}"
            time.sleep(0.05)
        raise AssertionError("afr-mock did not start")

    def stop(self) -> None:
        for p in self.extra_procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        subprocess.run([str(REPO / "scripts/run"), "--stop"], env=self.env, capture_output=True, timeout=60)


def runtime_dir(name: str) -> Path:
    """A fresh runtime directory nginx's workers can reach.

    pytest's tmp dirs sit under 0700 parents; when the tests run as root, nginx's
    workers run as an unprivileged user and must reach keys.toml and the sidecar
    socket, so the directory lives directly in the system temp dir, mode 0755."""
    home = Path(tempfile.mkdtemp(prefix=f"afr-{name}-"))
    home.chmod(0o755)
    return home


def extend_catalogue(g: "Gateway", providers: dict, models: dict) -> None:
    """Adds `providers` and `models` to the stack's sidecar.toml (written the way an
    editor does: a temporary file, then a rename) and waits until the sidecar serves
    the first new model."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sidecar_config", REPO / "scripts" / "sidecar-config.py")
    sidecar_config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sidecar_config)
    path = g.home / "sidecar.toml"
    cfg = tomllib.loads(path.read_text())
    cfg["providers"].update(providers)
    cfg["models"].update(models)
    out: list[str] = []
    for section in ("server", "admin", "breaker", "usage"):
        sidecar_config.table(out, section, cfg[section])
    for name, p in cfg["providers"].items():
        sidecar_config.table(out, f"providers.{name}", p)
    for name, m in cfg["models"].items():
        sidecar_config.table(out, f"models.{sidecar_config.toml_key(name)}", m)
    path.with_suffix(".tmp").write_text("\n".join(out) + "\n")
    path.with_suffix(".tmp").replace(path)
    probe = g.new_key(f"probe-{time.time_ns() % 10**10}", "--rpm", "1000")
    first = next(iter(models))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        _, _, body = http("GET", g.base + "/v1/models", headers={"Authorization": f"Bearer {probe}"})
        if first in body.decode():
            return
        time.sleep(0.05)
    raise AssertionError("the sidecar did not pick up its new config")


def usage_rows(gw, request_id: str, timeout: float = 5) -> list[dict]:
    """The usage rows of one request, once the batch writer has written them."""
    assert request_id, "every response carries x-request-id"
    return usage_select(gw, "request_id = ?", (request_id,), 1, timeout)


def usage_select(gw, where: str, args: tuple, at_least: int, timeout: float = 5) -> list[dict]:
    """Usage rows matching `where`, polled until there are `at_least` (the batch writer
    writes a moment after the answer) or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        db = sqlite3.connect(f"file:{gw.home / 'usage.db'}?mode=ro", uri=True, timeout=5)
        db.row_factory = sqlite3.Row
        try:
            rows = [dict(r) for r in db.execute(f"SELECT * FROM usage WHERE {where} ORDER BY ts_ms", args)]
        finally:
            db.close()
        if len(rows) >= at_least or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def usage_row(gw, request_id: str, timeout: float = 5) -> dict:
    """The one usage row of one request."""
    rows = usage_rows(gw, request_id, timeout)
    assert len(rows) == 1, rows
    return rows[0]


def mock_billed(gw, url: str, request_id: str, timeout: float = 5) -> dict:
    """What the mock says it billed for the gateway's request `request_id`."""
    deadline = time.monotonic() + timeout
    while True:
        found = [
            r for r in gw.mock_requests(url)
            if r["headers"].get("x-request-id") == request_id and r.get("outcome") != "in_flight"
        ]
        if found or time.monotonic() > deadline:
            assert len(found) == 1, found
            return found[0]["billed"]
        time.sleep(0.05)


def billed_nanos(b: dict, price: dict) -> int:
    """The cost of a mock's `billed` at `price`, Anthropic's cache-write multipliers."""
    plain = b["input"] - b["cached_input"] - b["cache_write_5m"] - b["cache_write_1h"]
    usd_per_m = (
        plain * price["input"]
        + b["cached_input"] * price["cached_input"]
        + b["cache_write_5m"] * price["input"] * 1.25
        + b["cache_write_1h"] * price["input"] * 2.0
        + b["output"] * price["output"]
    )
    return round(usd_per_m * 1000)



def start_gateway(home: Path, extra_env: dict | None = None) -> tuple[Gateway, subprocess.CompletedProcess]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY")}
    env.update(AFR_HOME=str(home), AFR_PORT=str(port))
    env.update(extra_env or {})
    out = subprocess.run([str(REPO / "scripts/run"), "--detach"], env=env, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        subprocess.run([str(REPO / "scripts/run"), "--stop"], env=env, capture_output=True, timeout=60)
        raise AssertionError(f"scripts/run --detach failed:\n{out.stdout}\n{out.stderr}")
    m = KEY_RE.search(out.stdout)
    return Gateway(home, port, m.group(0) if m else "", env), out


@pytest.fixture(scope="session")
def gateway(tmp_path_factory):
    home = runtime_dir("e2e")
    g, out = start_gateway(home)
    assert g.demo_key, "the first run prints a demo key:\n" + out.stdout
    yield g
    g.stop()
    shutil.rmtree(home, ignore_errors=True)
