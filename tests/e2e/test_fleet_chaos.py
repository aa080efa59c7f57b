"""The fleet's chaos test (issue 22): two nodes (nginx with two workers + module + sidecar +
mock each), one real Redis behind a TCP forwarder the test controls, one PostgreSQL, under
mixed load — `rpm` keys at their limit, a `tpm` key at its limit, a budgeted key, streams —
while Redis has its connections cut, is frozen, made read-only, killed (down, then back
empty) and restarted empty. Then, from what the clients saw and the gateway's own books:

- every answer is a 200 or a 429 (no 5xx, no dropped connection), and none took longer than
  the two Redis waits a request can meet (the module's lease, the sidecar's reservation,
  each bounded by `timeout`) plus a margin for this shared 2-core machine;
- for every `rpm` key and every Redis window (wall-clock minute), the requests admitted
  wholly inside it are at most the limit; for the `tpm` key, the tokens they used — exactly,
  outages or not (`afr_core::outage`: no share in the window Redis went away in, fixed shares
  after it, held windows when it is back), but where Redis came back empty: there each node
  may add what is left of its share to what it admitted before, so an `rpm` window holds at
  most the sum over nodes of the larger of the two (rule 4's documented bound);
- the budgeted key's spend in the usage store is at most its budget;
- no nginx worker crashed, no "open socket left" alert, no sidecar panic.

Not run by the plain pytest pass (other tests running beside it on two cores would make its
latencies meaningless): `scripts/test` runs a short form alone (`scripts/chaos 40`), and
`scripts/chaos [SECONDS]` is the long one; both print the figures the README quotes.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections import defaultdict

import pytest

from conftest import AFR
from fleet_stack import running_fleet

SECONDS = float(os.environ.get("AFR_CHAOS_SECONDS", "0"))
pytestmark = pytest.mark.skipif(SECONDS <= 0, reason="run alone by scripts/chaos (scripts/test runs its short form)")

TIMEOUT_S = 0.2  # scripts/fleet's `timeout=200ms` (module) and the sidecars' default
RPM, TPM, BUDGET_USD = 30, 1500, 0.002
CHUNKS = 40  # the mock's completion tokens per request (prompt: 2)
# gpt-4o-mini at $0.15 / $0.60 per 1M tokens: 2 × 150 + 40 × 600 nano-dollars a request.
COST_NANOS = 2 * 150 + CHUNKS * 600


class Forwarder:
    """A TCP forwarder on loopback in front of Redis: both nodes' modules and sidecars reach
    Redis through it, and `cut()` closes every connection it carries, as a firewall or a
    proxy restart would."""

    def __init__(self, upstream_port: int):
        self.upstream = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.socks: set[socket.socket] = set()
        self.cuts = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client):
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream), timeout=2)
            upstream.settimeout(None)
        except OSError:
            client.close()
            return
        with self.lock:
            self.socks |= {client, upstream}
        threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()
        self._pump(client, upstream)

    def _pump(self, src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            self._close(s)

    def _close(self, s):
        with self.lock:
            self.socks.discard(s)
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()

    def cut(self):
        with self.lock:
            socks = list(self.socks)
        for s in socks:
            self._close(s)
        self.cuts += len(socks)

    def close(self):
        self.listener.close()
        self.cut()


class Chaos:
    """What is done to Redis, each for a few seconds, with healthy spells between."""

    def __init__(self, fleet, fwd: Forwarder):
        self.fleet, self.fwd = fleet, fwd
        self.log: list[tuple[float, str]] = []

    def _pid(self) -> int:
        return int((self.fleet.home / "redis.pid").read_text())

    def _cli(self, *args):
        port = (self.fleet.home / "redis.port").read_text().strip()
        return subprocess.run(["redis-cli", "-p", port, *args], capture_output=True, text=True, timeout=10).stdout

    def _kill(self):
        self.fleet.stop_redis(sig=signal.SIGKILL)

    def cut(self):
        self.fwd.cut()

    def freeze(self, hold):
        os.kill(self._pid(), signal.SIGSTOP)
        try:
            time.sleep(hold)
        finally:
            os.kill(self._pid(), signal.SIGCONT)

    def read_only(self, hold):
        # A replica of a master that is not there: it keeps its data and refuses writes
        # (READONLY), as a failed-over-to replica does before it is promoted.
        dead = socket.create_server(("127.0.0.1", 0))
        dead_port = dead.getsockname()[1]
        dead.close()
        assert "OK" in self._cli("REPLICAOF", "127.0.0.1", str(dead_port))
        try:
            time.sleep(hold)
        finally:
            assert "OK" in self._cli("REPLICAOF", "NO", "ONE")

    def kill(self, hold):
        self._kill()
        time.sleep(hold)
        self.fleet.start_redis()  # empty: no persistence

    def restart_empty(self):
        self._kill()
        self.fleet.start_redis()

    def run(self, until: float, stop: threading.Event):
        steps = [
            ("cut", lambda: self.cut()),
            ("freeze 3 s", lambda: self.freeze(3)),
            ("read-only 3 s", lambda: self.read_only(3)),
            ("kill, down 3 s, back empty", lambda: self.kill(3)),
            ("restart empty", lambda: self.restart_empty()),
        ]
        i = 0
        while time.time() < until - 4 and not stop.is_set():
            time.sleep(4)  # healthy spell
            name, act = steps[i % len(steps)]
            self.log.append((time.time(), name))
            act()
            i += 1


def request(port: int, key: str, kind: str) -> dict:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}
    if kind == "stream":
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    t0 = time.time()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body),
                     {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        status = resp.status
    except (OSError, http.client.HTTPException) as e:
        status, data = 0, repr(e).encode()
    finally:
        conn.close()
    t1 = time.time()
    tokens = 0
    if status == 200 and kind != "stream":
        tokens = json.loads(data)["usage"]["total_tokens"]
    elif status == 200:
        events = [json.loads(line[6:]) for line in data.decode().splitlines()
                  if line.startswith("data: {")]
        tokens = sum((e.get("usage") or {}).get("total_tokens", 0) for e in events)
        assert data.rstrip().endswith(b"data: [DONE]"), data[-200:]
    return {"kind": kind, "t0": t0, "t1": t1, "status": status, "tokens": tokens,
            "body": data[:300] if status not in (200, 429) else b""}


def windows(results, kind, value):
    """Per wall-clock minute, the sum of `value` over the admitted requests of `kind` that
    began and ended inside it (one that straddles a boundary may be counted in either)."""
    per = defaultdict(int)
    for r in results:
        if r["kind"] == kind and r["status"] == 200 and int(r["t0"] // 60) == int(r["t1"] // 60):
            per[int(r["t0"] // 60)] += value(r)
    return dict(per)


def timeline(results, kind, log, fleet) -> str:
    """What a failed window assertion shows: each admission of `kind` (time, node, tokens)
    beside the chaos events, and what the sidecars logged about Redis."""
    t0 = min(r["t0"] for r in results)
    rows = [(r["t0"] - t0, f"node{r['node'] + 1} +{r['tokens'] or 1}")
            for r in results if r["kind"] == kind and r["status"] == 200]
    rows += [(t - t0, f"EVENT {n}") for t, n in log]
    lines = [f"{t:7.2f} {what}" for t, what in sorted(rows)]
    for i, node in enumerate(fleet.nodes):
        log_lines = (node / "logs/sidecar.log").read_text().splitlines()
        lines += [f"sidecar{i + 1}: {line[:300]}" for line in log_lines if "fleet" in line][-40:]
    return "\n" + "\n".join(lines)


def test_the_fleet_stays_exact_while_redis_is_cut_frozen_read_only_killed_and_restarted():
    redis_port = socket.create_server(("127.0.0.1", 0))
    port = redis_port.getsockname()[1]
    redis_port.close()
    fwd = Forwarder(port)
    try:
        with running_fleet("chaos", {"AFR_REDIS_PORT": str(port), "AFR_REDIS_CLIENT_PORT": str(fwd.port)}) as fleet:
            run(fleet, fwd)
    finally:
        fwd.close()


def run(fleet, fwd):
    keys = {
        "rpm-a": fleet.new_key("chaos-rpm-a", "--rpm", str(RPM)),
        "rpm-b": fleet.new_key("chaos-rpm-b", "--rpm", str(RPM)),
        "tpm": fleet.new_key("chaos-tpm", "--rpm", "100000", "--tpm", str(TPM)),
        "budget": fleet.new_key("chaos-bud", "--rpm", "100000", "--budget-usd", str(BUDGET_USD), "--budget-per", "day"),
        "stream": fleet.new_key("chaos-stream", "--rpm", "100000"),
    }
    fleet.mock_config(chunks=CHUNKS)
    kinds = list(keys)
    results: list[dict] = []
    lock = threading.Lock()
    stop = threading.Event()
    until = time.time() + SECONDS

    def load(n):
        i = n
        while time.time() < until and not stop.is_set():
            kind = kinds[i % len(kinds)]
            r = request(fleet.ports[i % 2], keys[kind][1], kind)
            r["node"] = i % 2
            with lock:
                results.append(r)
            i += 1
            time.sleep(0.1)

    chaos = Chaos(fleet, fwd)
    threads = [threading.Thread(target=load, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    try:
        chaos.run(until, stop)
    finally:
        stop.set() if time.time() < until - 1 else None
        for t in threads:
            t.join(timeout=SECONDS + 60)

    # --- what the clients saw --------------------------------------------------------------
    by_status = defaultdict(int)
    for r in results:
        by_status[r["status"]] += 1
    latencies = sorted(r["t1"] - r["t0"] for r in results)
    p99 = latencies[int(len(latencies) * 0.99)]
    slow = [r for r in results if r["t1"] - r["t0"] > 0.1]
    local_rpm = sum(fleet.metric(i, 'afr_fleet_requests_total{limits="local"}') for i in range(2))
    local_res = sum(fleet.metric(i, "afr_fleet_local_reservations_total") for i in range(2))
    print(f"\nCHAOS {SECONDS:.0f} s: {len(results)} requests, statuses {dict(by_status)}, "
          f"latency p50 {latencies[len(latencies) // 2] * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
          f"max {latencies[-1] * 1000:.0f} ms, {len(slow)} over 100 ms; "
          f"rpm decided locally {local_rpm:.0f}, reservations decided locally {local_res:.0f}; "
          f"events {[n for _, n in chaos.log]}; connections cut {fwd.cuts}")
    bad = [r for r in results if r["status"] not in (200, 429)]
    assert not bad, bad[:5]
    # Two waits on Redis at most (the module's, then the sidecar's), each `timeout`; the
    # margin is for two nginx nodes, two sidecars, two mocks, Redis, PostgreSQL and this
    # load generator on two cores. A hang would be seconds.
    bound = 2 * TIMEOUT_S + 0.4
    late = sorted((round(r["t1"] - r["t0"], 3), r["kind"], time.strftime("%H:%M:%S", time.localtime(r["t0"])))
                  for r in results if r["t1"] - r["t0"] > bound)
    assert not late, (late[-10:], chaos.log)

    # --- per key and Redis window ---------------------------------------------------------------
    # Exact in every window, outages or not, but rule 4's bound where Redis came back empty.
    emptied = [t for t, n in chaos.log if "empty" in n]
    for kind, limit in (("rpm-a", RPM), ("rpm-b", RPM), ("tpm", TPM)):
        per = windows(results, kind, (lambda r: 1) if kind != "tpm" else (lambda r: r["tokens"]))
        print(f"CHAOS {kind} (limit {limit}/min) per minute: {per}")
        for w, n in per.items():
            bound = limit
            first = min((t for t in emptied if int(t // 60) == w), default=None)
            if kind != "tpm" and first is not None:
                before = [sum(r["kind"] == kind and r["status"] == 200 and r["node"] == i
                              and int(r["t0"] // 60) == w and r["t1"] < first for r in results)
                          for i in range(2)]
                bound = max(limit, sum(max(b, limit // 2) for b in before))
            assert n <= bound, (kind, w, n, bound, per, timeline(results, kind, chaos.log, fleet))
            if n > limit:
                print(f"CHAOS {kind} window {w}: {n} of {limit}, within rule 4's bound {bound}")
        if kind != "tpm":
            assert max(per.values()) >= limit * 0.8, f"the key was not held near its limit: {per}"

    # --- the budget, from the gateway's own books ----------------------------------------------
    kid = keys["budget"][0]
    admitted = sum(r["kind"] == "budget" and r["status"] == 200 for r in results)
    deadline = time.monotonic() + 15
    while True:
        out = subprocess.run(
            [str(AFR), "usage", "--config", str(fleet.home / "node1/sidecar.toml"), "--key", kid, "--json"],
            env={**fleet.env, "AFR_USAGE_POSTGRES_URL": fleet.pg_url}, capture_output=True, text=True, check=True)
        rows = json.loads(out.stdout)["data"]
        # Refused requests have rows too (errors, no tokens): the served ones are the rest.
        served = rows[0]["requests"] - rows[0]["errors"] if rows else 0
        if served >= admitted or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert served == admitted, (rows, admitted)
    spent = rows[0]["cost_usd"]
    print(f"CHAOS budget ${BUDGET_USD}: {admitted} admitted, spent ${spent:.6f} "
          f"({admitted * COST_NANOS / 1e9:.6f} by the mock's tokens)")
    assert spent <= BUDGET_USD + 1e-9, (spent, rows)
    assert admitted >= int(BUDGET_USD * 1e9 / COST_NANOS) * 0.8, "the budget was not spent near its end"

    # --- nothing crashed ---------------------------------------------------------------------
    for node in fleet.nodes:
        err = (node / "logs/nginx-error.log").read_text()
        assert "exited on signal" not in err and "open socket" not in err, err[-3000:]
        assert "panicked" not in (node / "logs/sidecar.log").read_text()
