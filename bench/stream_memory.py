#!/usr/bin/env python3
"""Memory per held stream in the sidecar, and where each KiB of it goes.

The sidecar runs alone in front of one afr-mock (this checkout's release
binaries), and N streaming chat completions are opened on its unix socket and
held (the mock sends one delta a second, for a minute) -- nginx opens one
upstream connection per stream in the same way, so the sidecar's side is the
same as behind the module. The figure is the sidecar's RSS with all N streams
held less its RSS after one warm-up stream, divided by N.

    bench/stream_memory.py [--streams 2000] [--provider http1|http2] [--runs 1]
    bench/stream_memory.py --massif DIR [--streams 300] [--provider http2]

--provider http2 puts the mock behind its TLS listener (ALPN h2, 100 streams per
connection, as OpenAI's and Anthropic's APIs) with `http2 = true`; http1 is the
plain keep-alive pool, one provider connection per stream.

--massif builds the sidecar with the system allocator (valgrind's massif sees
malloc, not jemalloc) into DIR/target, runs it under massif, takes a detailed
snapshot while the streams are held (vgdb) and prints the heap per stream by
allocation site: the "where each KiB goes" table of the README.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from callgrind import sidecar_home  # noqa: E402  (the same sidecar.toml writer)

SECRET = "stream-memory-secret-0123456789"
BODY = b'{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Say hello to the benchmark."}]}'


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def wait_for(path: Path, seconds: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"stream_memory: {path} never appeared")
        time.sleep(0.05)


async def hold_streams(sock: Path, n: int, settle: float, at_hold) -> int:
    """Opens n streams (each until its first data event), calls at_hold(), then
    closes them all. Returns how many started."""
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: afr\r\nContent-Type: application/json\r\n"
            b"X-Afr-Key-Id: stream-memory\r\nX-Afr-Secret: " + SECRET.encode()
            + b"\r\nContent-Length: %d\r\n\r\n" % len(BODY)) + BODY
    started: list[int] = []
    release = asyncio.Event()

    async def one() -> None:
        reader, writer = await asyncio.open_unix_connection(str(sock))
        try:
            writer.write(head)
            await writer.drain()
            data = b""
            while b"data:" not in data:
                chunk = await asyncio.wait_for(reader.read(65536), 60)
                if not chunk:
                    raise RuntimeError(f"closed before the first event: {data[:300]!r}")
                data += chunk
            started.append(1)
            await release.wait()
        finally:
            writer.close()

    tasks = []
    for i in range(n):
        tasks.append(asyncio.create_task(one()))
        if i % 200 == 199:
            await asyncio.sleep(0.05)  # no accept-queue overflow
    deadline = time.monotonic() + 60
    while len(started) < n and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    await asyncio.sleep(settle)
    at_hold()
    release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    failed = [r for r in results if isinstance(r, Exception)]
    if failed:
        print(f"  {len(failed)} streams failed, first: {failed[0]!r}", file=sys.stderr)
    return len(started)


def run(bin_dir: Path, n: int, http2: bool, massif: Path | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="afr-stream-memory-") as tmp:
        tmp = Path(tmp)
        tls = ["--tls-listen", "127.0.0.1:0", "--tls-port-file", str(tmp / "tls.port"),
               "--tls-ca-file", str(tmp / "ca.pem"), "--h2-max-streams", "100"] if http2 else []
        mock = subprocess.Popen([str(bin_dir / "afr-mock"), "--port-file", str(tmp / "port"),
                                 "--log-capacity", "0", *tls],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        side = None
        try:
            wait_for(tmp / "port", 30, mock)
            time.sleep(0.1)
            port = (tmp / "port").read_text().strip()
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/_mock/config", method="POST",
                data=json.dumps({"chunks": 60, "chunk_interval_ms": 1000}).encode(),
                headers={"content-type": "application/json"})
            urllib.request.urlopen(req, timeout=5).read()
            home = tmp / "home"
            home.mkdir()
            config = sidecar_home(REPO, home, SECRET, port)
            if http2:
                text = config.read_text()
                plain = f'base_url = "http://127.0.0.1:{port}/v1"'
                if plain not in text:
                    raise SystemExit("stream_memory: the mock provider's base_url was not found")
                tls_port = (tmp / "tls.port").read_text().strip()
                config.write_text(text.replace(
                    plain, f'base_url = "https://localhost:{tls_port}/v1"\nhttp2 = true\n'
                           f'ca_file = "{tmp / "ca.pem"}"'))
            wrap = (["valgrind", "--tool=massif", "--threshold=0.5", f"--massif-out-file={massif}"]
                    if massif else [])
            side = subprocess.Popen([*wrap, str(bin_dir / "afr"), "serve", "--config", str(config),
                                     "--threads", "1"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    env={**os.environ, "AFR_UPSTREAM_SECRET": SECRET})
            sock = home / "sidecar.sock"
            wait_for(sock, 120, side)
            if massif:
                time.sleep(3)
            figures: dict = {}
            asyncio.run(hold_streams(sock, 1, 0.5, lambda: None))
            time.sleep(1)
            figures["idle_mib"] = rss_mib(side.pid)

            def at_hold() -> None:
                figures["held_mib"] = rss_mib(side.pid)
                if massif:
                    subprocess.run(["vgdb", f"--pid={side.pid}", "detailed_snapshot",
                                    f"{massif}.hold"], capture_output=True, timeout=120)

            figures["held"] = asyncio.run(hold_streams(sock, n, 15 if massif else 2, at_hold))
            figures["kib_per_stream"] = ((figures["held_mib"] - figures["idle_mib"]) * 1024
                                         / max(figures["held"], 1))
            return figures
        finally:
            if side:
                side.send_signal(signal.SIGINT)
                try:
                    side.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    side.kill()
            mock.terminate()
            mock.wait(timeout=10)


def sites(snapshot: Path, streams: int) -> list[tuple[int, str]]:
    """The heap of a massif detailed snapshot by allocation site: for each
    top-level site, its bytes and the first frames of its largest caller
    chain that name the sidecar, hyper, h2, tokio's channels or bytes."""
    nodes = []
    for line in snapshot.read_text().splitlines():
        m = re.match(r"(\s*)n\d+: (\d+) (.*)", line)
        if m:
            nodes.append((len(m.group(1)), int(m.group(2)), m.group(3)))
    interesting = re.compile(r"afr::|hyper::|hyper_util::|h2::|tokio::sync|tokio::runtime::task::core::Cell|"
                             r"rustls|BytesMut|serve_connection|io\.rs|Envelope|StreamBody")
    out = []
    for i, (depth, size, _) in enumerate(nodes):
        if depth != 1:
            continue
        chain, j = [], i
        while j < len(nodes) and (j == i or nodes[j][0] == nodes[j - 1][0] + 1):
            chain.append(nodes[j][2])
            j += 1
        names = [re.sub(r"^0x[0-9A-F]+: ", "", c) for c in chain if interesting.search(c)]
        names = [re.sub(r"\(/root/.*?/src/", "(", c)[:110] for c in names[:3]]
        out.append((size, " <- ".join(names) or "(below the threshold or unnamed)"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, help="streams held (default 2000; 300 with --massif)")
    ap.add_argument("--provider", choices=["http1", "http2"], default="http1")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--massif", type=Path, help="profile the heap under massif; DIR keeps the build and profiles")
    args = ap.parse_args()
    n = args.streams or (300 if args.massif else 2000)
    bin_dir = REPO / "target/release"
    massif_out = None
    if args.massif:
        if not shutil.which("valgrind"):
            raise SystemExit("stream_memory: --massif needs valgrind (apt-get install valgrind)")
        args.massif.mkdir(parents=True, exist_ok=True)
        # The same source with the system allocator: jemalloc's allocations are
        # invisible to massif. Built from a copy so the checkout is untouched.
        src = args.massif / "src"
        if src.exists():
            shutil.rmtree(src)
        shutil.copytree(REPO, src, ignore=shutil.ignore_patterns("target", "build", ".git", "node_modules"))
        main_rs = src / "sidecar/src/main.rs"
        text = main_rs.read_text()
        if "#[global_allocator]" not in text:
            raise SystemExit("stream_memory: no #[global_allocator] in sidecar/src/main.rs")
        main_rs.write_text(text.replace("#[global_allocator]", "#[cfg(any())]\n#[global_allocator]", 1))
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "afr-sidecar", "-p", "afr-mock"],
                       cwd=src, check=True, env={**os.environ, "CARGO_TARGET_DIR": str(args.massif / "target")})
        bin_dir = args.massif / "target/release"
        massif_out = args.massif / f"massif-{args.provider}.out"
    for run_no in range(args.runs):
        f = run(bin_dir, n, args.provider == "http2", massif_out)
        print(f"{args.provider}: {f['held']}/{n} streams held; sidecar RSS idle {f['idle_mib']:.1f} MiB, "
              f"held {f['held_mib']:.1f} MiB: {f['kib_per_stream']:.1f} KiB per stream"
              + (" (under valgrind: RSS is valgrind's; read the heap below)" if massif_out else ""))
    if massif_out:
        snapshot = Path(f"{massif_out}.hold")
        text = snapshot.read_text()
        heap = int(re.search(r"mem_heap_B=(\d+)", text).group(1))
        print(f"heap with {n} streams held: {heap / 1024:.0f} KiB ({snapshot})")
        print(f"{'KiB':>8} {'B/stream':>9}  site")
        for size, where in sites(snapshot, n):
            print(f"{size / 1024:8.0f} {size / n:9.0f}  {where}")


if __name__ == "__main__":
    main()
