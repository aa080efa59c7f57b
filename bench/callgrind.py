#!/usr/bin/env python3
"""Instructions per request in the sidecar, counted by valgrind's callgrind.

Wall-clock figures need a quiet machine; instruction counts do not: they are the
same under any load, so a change to the hot path can be judged on a busy
2-core box. The sidecar runs under callgrind (one runtime thread) in front of
one afr-mock; a client on its unix socket sends N and then 3N non-streamed chat
completions (keep-alive, the nginx → sidecar headers a module would add), and
the difference of the two totals divided by 2N is the cost of one request
(start-up and shutdown cancel out). Usage recording stays on: its writer thread
is counted too, as it shares the cores.

    bench/callgrind.py [--requests 1000] [--afr target/release/afr] [--keep DIR]

Prints the per-request figure and where the profile files are
(`callgrind_annotate --inclusive=yes DIR/3000.out | head -80`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from run import without_usage  # noqa: E402  (the bench's own edit of sidecar.toml)
SECRET = "callgrind-secret-0123456789"
BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello to the benchmark."}]}'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(path: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"callgrind.py: {path} never appeared")
        time.sleep(0.1)


def send(sock_path: Path, n: int) -> None:
    """N keep-alive requests, each read to its end; any non-200 stops the run."""
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: afr\r\nContent-Type: application/json\r\n"
        b"X-Afr-Key-Id: callgrind\r\nX-Afr-Secret: " + SECRET.encode() + b"\r\n"
        b"Content-Length: %d\r\n\r\n" % len(BODY)
    ) + BODY
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(60)
        s.connect(str(sock_path))
        f = s.makefile("rb")
        for _ in range(n):
            s.sendall(request)
            status = f.readline()
            length, chunked = 0, False
            while (line := f.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
                elif name.lower() == b"transfer-encoding":
                    chunked = True
            if chunked:
                while (size := int(f.readline(), 16)) != 0:
                    f.read(size + 2)
                f.read(2)
            else:
                f.read(length)
            if b" 200 " not in status:
                raise SystemExit(f"callgrind.py: the sidecar answered {status!r}")


def run(afr: Path, config: Path, home: Path, n: int, out: Path) -> int:
    sock = home / "sidecar.sock"
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", str(afr), "serve",
         "--config", str(config), "--threads", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "AFR_UPSTREAM_SECRET": SECRET},
    )
    try:
        wait_for(sock, 120)
        send(sock, n)
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    for line in err.splitlines():
        if "Collected :" in line:
            return int(line.split(":")[-1].replace(",", "").strip())
    raise SystemExit(f"callgrind.py: no instruction count from valgrind:\n{err[-2000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1000, help="N (the runs send N and 3N)")
    ap.add_argument("--afr", type=Path, default=REPO / "target/release/afr")
    ap.add_argument("--keep", type=Path, help="keep the profiles in this directory")
    ap.add_argument("--no-usage", action="store_true",
                    help="with `[usage] record = false`: the difference to a run without it "
                         "is what recording a usage row costs")
    args = ap.parse_args()
    if not shutil.which("valgrind"):
        raise SystemExit("callgrind.py: needs valgrind (apt-get install valgrind)")
    if args.requests < 1:
        raise SystemExit("callgrind.py: --requests must be at least 1")

    with tempfile.TemporaryDirectory(prefix="afr-callgrind-") as tmp:
        tmp = Path(tmp)
        out_dir = args.keep or tmp
        out_dir.mkdir(parents=True, exist_ok=True)
        mock_port_file = tmp / "mock.port"
        mock = subprocess.Popen(
            [str(REPO / "target/release/afr-mock"), "--port-file", str(mock_port_file),
             "--log-capacity", "0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            wait_for(mock_port_file, 30)
            time.sleep(0.1)  # the file is written once listening; let it close
            mock_port = mock_port_file.read_text().strip()
            totals = {}
            for n in (args.requests, 3 * args.requests):
                home = tmp / f"sidecar-{n}"
                home.mkdir()
                subprocess.run(
                    [sys.executable, str(REPO / "scripts/sidecar-config.py"), "--shipped",
                     str(REPO / "conf/sidecar.toml"), "--home", str(home), "--secret", SECRET,
                     "--admin-port", str(free_port()), "--mock-port", mock_port],
                    check=True, capture_output=True,
                    env={k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")},
                )
                if args.no_usage:
                    (home / "sidecar.toml").write_text(without_usage((home / "sidecar.toml").read_text()))
                totals[n] = run(args.afr, home / "sidecar.toml", home, n, out_dir / f"{n}.out")
        finally:
            mock.terminate()
            mock.wait(timeout=10)
        per_request = (totals[3 * args.requests] - totals[args.requests]) / (2 * args.requests)
        print(f"instructions per non-streamed chat completion: {per_request:,.0f}")
        print(f"totals: {args.requests} requests {totals[args.requests]:,}; "
              f"{3 * args.requests} requests {totals[3 * args.requests]:,}")
        if args.keep:
            print(f"profiles: {out_dir}/{args.requests}.out, {out_dir}/{3 * args.requests}.out")


if __name__ == "__main__":
    main()
