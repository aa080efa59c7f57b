#!/usr/bin/env python3
"""Fleet figures for issue 12 (not a test: prints numbers, asserts nothing).

    build/venv/bin/python tests/module/bench_fleet.py [system|vendored] [--seconds 5]

Needs wrk and redis-server. Two nginx nodes (2 workers each) on loopback, one Redis:
  - requests/s and latency p50/p99 of an `afr on` static file with `afr_fleet` vs without
    (wrk, 64 connections, keep-alive, a key far from its limit),
  - Redis commands per 1 000 requests far from the limit, over a whole window's budget,
    in its last tenth, and per 1 000 requests refused after it,
  - how long after Redis comes back a node serving traffic notices (log line).
"""

import argparse
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from afr_nginx import FLAVOURS, Gateway, Key  # noqa: E402
from test_fleet import Redis, young_minute  # noqa: E402


def wrk(url, header, seconds):
    cmd = ["wrk", "-t2", "-c64", f"-d{seconds}s", "--latency", "-H", header, url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    dist = re.search(r"Latency Distribution.*?50%\s+(\S+).*?99%\s+(\S+)", out, re.S)
    p50, p99 = dist.groups() if dist else ("?", "?")
    total = int(re.search(r"(\d+) requests in", out).group(1))
    return rps, p50, p99, total


def commands(redis):
    stats = dict(line.split(":", 1) for line in redis.cli("INFO", "stats") if ":" in line)
    return int(stats["total_commands_processed"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("flavour", nargs="?", default="system", choices=sorted(FLAVOURS))
    ap.add_argument("--seconds", type=int, default=5)
    args = ap.parse_args()
    flavour = (args.flavour, *FLAVOURS[args.flavour])
    root = Path(tempfile.mkdtemp(prefix="afr-fleet-bench-"))
    root.chmod(0o755)
    redis = Redis(root).start()
    far, full = Key("far", rpm=10_000_000), Key("full", rpm=1000)
    keys = [far, full]
    fleet_conf = f"afr_fleet redis://127.0.0.1:{redis.port} nodes=2 timeout=200ms;"
    static = "location = /file.txt {{ root {p}/html; }}"
    nodes, plain = [], None
    try:
        for i in range(2):
            prefix = root / f"node{i}"
            prefix.mkdir()
            gw = Gateway(flavour, prefix, 9, keys, extra_http=fleet_conf, extra_server=static.format(p=prefix))
            (prefix / "html/file.txt").write_text("ok\n")
            nodes.append(gw.start())
        prefix = root / "plain"
        prefix.mkdir()
        plain = Gateway(flavour, prefix, 9, keys, extra_server=static.format(p=prefix))
        (prefix / "html/file.txt").write_text("ok\n")
        plain.start()
        auth = f"Authorization: Bearer {far.token}"

        print(f"# fleet figures, {args.flavour} nginx, 2 workers per node, wrk -c64 {args.seconds}s")
        for name, gw in (("fleet off", plain), ("fleet on ", nodes[0]), ("fleet off", plain), ("fleet on ", nodes[0])):
            before = commands(redis)
            rps, p50, p99, total = wrk(f"http://127.0.0.1:{gw.port}/file.txt", auth, args.seconds)
            calls = commands(redis) - before - 1
            print(f"{name}: {rps:9.0f} req/s  p50 {p50:>8}  p99 {p99:>8}  Redis calls/1000 req {1000 * calls / total:.3f}")

        # A whole window's budget of a 1000/min key, alternating nodes, one request at a time.
        young_minute(40)
        before = commands(redis)
        marks = []
        for i in range(1100):
            nodes[i % 2].request("/file.txt", headers=full.auth)
            marks.append(commands(redis))
        total_calls = marks[999] - before - 1000  # each INFO counts once
        last_tenth = marks[999] - marks[899] - 100
        refused = marks[1099] - marks[999] - 100
        print(f"1000/min key, its whole budget: {total_calls} Redis calls for 1000 admissions; "
              f"last 100 admissions: {last_tenth}; 100 refusals after: {refused}")

        # Redis back: how long until a node under light traffic notices.
        redis.stop()
        stop = threading.Event()

        def trickle():
            while not stop.is_set():
                for gw in nodes:
                    gw.request("/file.txt", headers=far.auth)
                time.sleep(0.01)

        t = threading.Thread(target=trickle)
        t.start()
        while not all("unreachable" in gw.log() for gw in nodes):
            time.sleep(0.05)
        time.sleep(1.5)
        redis.start()
        t0 = time.monotonic()
        while not all("reachable again" in gw.log() for gw in nodes):
            time.sleep(0.01)
        print(f"Redis back: noticed by both nodes {time.monotonic() - t0:.2f} s after it listened "
              f"(probe interval 1 s)")
        stop.set()
        t.join()
    finally:
        for gw in [*nodes, plain]:
            if gw:
                gw.stop()
        redis.stop()


if __name__ == "__main__":
    main()
