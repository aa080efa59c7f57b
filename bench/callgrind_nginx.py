#!/usr/bin/env python3
"""Instructions per request in an nginx worker with the module, counted by valgrind's
callgrind: what the module adds to nginx, as a count rather than a noisy CPU time.

nginx runs as one process (master_process off) under callgrind and serves a small static
file at /v1/x over keep-alive, with `afr on` (a key checked, its counters, the request
headers for the sidecar, the rate headers) or `afr off` (plain nginx, the same request).
A client sends N and then 3N requests to two runs; the difference of the two totals
divided by 2N is one request (start-up and shutdown cancel out).

    bench/callgrind_nginx.py [--module PATH.so] [--requests 500] [--nginx /usr/sbin/nginx]

Prints instructions per request for `afr off` and `afr on`, and the module's share.
"""

from __future__ import annotations

import argparse
import http.client
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from run import free_port  # noqa: E402  (the bench's port picker)


def conf(d: Path, module: Path, port: int, afr: bool) -> str:
    return f"""load_module {module};
master_process off;
daemon off;
worker_processes 1;
error_log {d}/error.log warn;
pid {d}/nginx.pid;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
    afr_keys {d}/keys.toml;
    afr_zone afr:1m;
    server {{
        listen 127.0.0.1:{port};
        location /v1/ {{
            afr {"on" if afr else "off"};
            alias {d}/www/;
        }}
    }}
}}
"""


def count(nginx: str, module: Path, d: Path, key: str, afr: bool, n: int) -> int:
    """callgrind's instruction total for one nginx run that serves `n` requests."""
    port = free_port()
    (d / "nginx.conf").write_text(conf(d, module, port, afr))
    out = d / f"callgrind.{afr}.{n}"
    proc = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                             nginx, "-p", str(d), "-c", str(d / "nginx.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                c.connect()
                break
            except OSError:
                time.sleep(0.1)
        else:
            log = d / "error.log"
            raise RuntimeError(f"nginx did not start: {log.read_text() if log.exists() else 'no error log'}")
        headers = {"Authorization": f"Bearer {key}"}
        for _ in range(n):
            c.request("GET", "/v1/x", headers=headers)
            r = c.getresponse()
            r.read()
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}: {(d / 'error.log').read_text()[-2000:]}")
        c.close()
    finally:
        proc.send_signal(signal.SIGQUIT)
        proc.wait(timeout=120)
    m = re.search(r"^(?:summary|totals): (\d+)", out.read_text(), re.M)
    if not m:
        raise RuntimeError(f"no totals in {out}")
    return int(m.group(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--module", type=Path, default=REPO / "build/system/libngx_http_afr_module.so")
    ap.add_argument("--nginx", default="/usr/sbin/nginx")
    ap.add_argument("--requests", type=int, default=500)
    args = ap.parse_args()
    args.module = args.module.resolve()  # nginx reads a relative path from its prefix
    with tempfile.TemporaryDirectory(prefix="afr-cg-nginx-") as tmp:
        d = Path(tmp)
        (d / "www").mkdir()
        (d / "www/x").write_text("ok\n")
        out = subprocess.run([str(REPO / "target/release/afr"), "key", "new", "--id", "bench", "--name",
                              "bench", "--rpm", "10000000", "--file", str(d / "keys.toml")],
                             capture_output=True, text=True, check=True)
        key = re.search(r"afr_[A-Za-z0-9]{32,}", out.stdout + out.stderr).group(0)
        n = args.requests
        per = {}
        for afr in (False, True):
            per[afr] = (count(args.nginx, args.module, d, key, afr, 3 * n)
                        - count(args.nginx, args.module, d, key, afr, n)) / (2 * n)
    print(f"nginx, afr off: {per[False]:,.0f} instructions per request")
    print(f"nginx, afr on:  {per[True]:,.0f} instructions per request "
          f"({per[True] / per[False]:.2f}x; the module's own: {per[True] - per[False]:,.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
