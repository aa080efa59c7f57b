"""A two-node fleet started by `scripts/run --fleet` (Redis, PostgreSQL, two whole nodes),
and the operations tests need on it: keys shipped to both nodes, the mocks, the sidecars'
metrics, Redis stopped and started. Used by test_fleet_stack.py and test_fleet_chaos.py."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import time
import tomllib

import openai

from conftest import AFR, KEY_RE, REPO, free_port, http, runtime_dir

BODY = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}).encode()
HI = [{"role": "user", "content": "hi"}]  # mock: 2 prompt + 4 completion tokens
_ids = itertools.count()


class Fleet:
    def __init__(self, home, ports, env, out):
        self.home, self.ports, self.env, self.out = home, ports, env, out
        self.demo_key = KEY_RE.search(out).group(0)
        self.pg_url = re.search(r"postgres://\S+/afr_usage", out).group(0)
        self.nodes = [home / "node1", home / "node2"]

    def base(self, i: int) -> str:
        return f"http://127.0.0.1:{self.ports[i % 2]}"

    def client(self, i: int, key: str, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base(i) + "/v1", api_key=key, max_retries=0, **kw)

    def mock(self, i: int) -> str:
        return "http://127.0.0.1:" + (self.nodes[i] / "mock.port").read_text().strip()

    def mock_config(self, **knobs) -> None:
        for i in range(2):
            status, _, body = http("POST", self.mock(i) + "/_mock/config", json.dumps(knobs).encode())
            assert status in (200, 204), body

    def mock_calls(self) -> int:
        n = 0
        for i in range(2):
            data = json.loads(http("GET", self.mock(i) + "/_mock/requests")[2])
            n += len(data["requests"] if isinstance(data, dict) else data)
        return n

    def clear_mocks(self) -> None:
        for i in range(2):
            http("DELETE", self.mock(i) + "/_mock/requests")

    def new_key(self, prefix: str, *limits: str) -> tuple[str, str]:
        """A key in node 1's keys.toml, shipped to node 2 as config management would."""
        kid = f"{prefix}{next(_ids)}-{int(time.time() * 1000) % 10**8}"
        out = subprocess.run(
            [str(AFR), "key", "new", "--id", kid, "--name", f"test {kid}", "--file", str(self.nodes[0] / "keys.toml"), *limits],
            capture_output=True, text=True, check=True,
        )
        tmp = self.nodes[1] / "keys.toml.new"
        shutil.copyfile(self.nodes[0] / "keys.toml", tmp)
        os.replace(tmp, self.nodes[1] / "keys.toml")
        key = KEY_RE.search(out.stdout).group(0)
        deadline = time.monotonic() + 5
        for i in range(2):
            # Known once it is not a 401 (a 429 is a known key: after Redis lost its
            # counters a key without a lease is refused until the window ends).
            while http("GET", self.base(i) + "/v1/models", headers={"Authorization": f"Bearer {key}"})[0] == 401:
                assert time.monotonic() < deadline, "both nodes load the new key within the reload interval"
                time.sleep(0.1)
        # Each worker re-reads the file on its own 1 s timer: the others follow within one.
        time.sleep(1.1)
        return kid, key

    def metrics(self, i: int) -> str:
        admin = tomllib.loads((self.nodes[i] / "sidecar.toml").read_text())["admin"]["listen"]
        return http("GET", f"http://{admin}/metrics")[2].decode()

    def metric(self, i: int, name: str) -> float:
        m = re.search(rf"^{re.escape(name)} (\S+)$", self.metrics(i), re.M)
        return float(m.group(1)) if m else 0.0

    # --- Redis -------------------------------------------------------------------------
    def stop_redis(self, keep_data: bool = False, sig: int = signal.SIGTERM) -> None:
        """Stops Redis (with `sig`: SIGKILL is a crash); with `keep_data` it saves its
        counters first (a restart of the same Redis, not one that lost them)."""
        if keep_data:
            port = (self.home / "redis.port").read_text().strip()
            subprocess.run(["redis-cli", "-p", port, "SAVE"], check=True, capture_output=True, timeout=30)
        pid = int((self.home / "redis.pid").read_text())
        os.kill(pid, sig)
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        raise AssertionError("redis-server did not stop")

    def start_redis(self, keep_data: bool = False) -> None:
        """Redis again on the same port: empty (no persistence, as scripts/fleet runs it),
        or with what `stop_redis(keep_data=True)` saved."""
        (self.home / "redis.pid").unlink(missing_ok=True)
        if not keep_data:
            (self.home / "redis" / "dump.rdb").unlink(missing_ok=True)
        port = (self.home / "redis.port").read_text().strip()
        subprocess.run(
            ["redis-server", "--port", port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.home / "redis"), "--logfile", str(self.home / "redis/redis.log"),
             "--daemonize", "yes", "--pidfile", str(self.home / "redis.pid")],
            check=True,
        )
        for _ in range(100):
            if (self.home / "redis.pid").exists() and (self.home / "redis.pid").read_text().strip():
                return
            time.sleep(0.05)
        raise AssertionError("redis-server did not start")

    def wait_redis_in_use(self, timeout: float = 15) -> None:
        """Both sidecars back on Redis: requests of a tpm key probe it once a second. (Until
        a window Redis was lost or held in ends, they may be refused: that is retried.)"""
        _, key = self.new_key("probe", "--rpm", "100000", "--tpm", "100000000")
        deadline = time.monotonic() + timeout

        def one(i) -> bool:
            try:
                self.client(i, key).chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=5)
                return True
            except openai.RateLimitError:
                return False

        for i in range(2):
            # The first call finds the old connection broken (if the node had one). A
            # refusal may come from the module (no lease in such a window) before the
            # sidecar has even asked Redis: only an answered request says it did.
            while not one(i) or self.metric(i, "afr_fleet_redis_up") != 1:
                assert time.monotonic() < deadline, self.metrics(i)
                time.sleep(0.3)


def away_from_a_window_edge() -> None:
    """Token and request windows are wall-clock minutes: stay inside one."""
    while 60 - time.time() % 60 < 20:
        time.sleep(0.5)


@contextlib.contextmanager
def running_fleet(name: str = "fleet", extra_env: dict | None = None):
    """`scripts/run --fleet` in a runtime directory of its own; stopped and removed after."""
    home = runtime_dir(name)
    # Two ports found free: node 2's default, AFR_PORT+1, was once another test's
    # ephemeral port under pytest -n 3 and the whole module errored.
    ports = [free_port(), free_port()]
    while ports[1] == ports[0]:
        ports[1] = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY")}
    env.update(AFR_FLEET_HOME=str(home), AFR_PORT=str(ports[0]), AFR_PORT2=str(ports[1]))
    env.update(extra_env or {})
    try:
        out = subprocess.run([str(REPO / "scripts/run"), "--fleet"], env=env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stdout + out.stderr
        yield Fleet(home, ports, env, out.stdout)
    finally:
        subprocess.run([str(REPO / "scripts/run"), "--fleet", "--stop"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(home, ignore_errors=True)
