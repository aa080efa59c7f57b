#!/usr/bin/env python3
"""Benchmarks of ngx_http_afr_module (not a test: prints numbers, asserts nothing).

    python3 tests/module/bench.py [system|vendored] [--seconds 5]

Needs wrk. Measures, side by side in one nginx:
  - requests/s of an `afr on` location vs the same location `afr off`
    (static file; `return` would run before the access phase),
  - 401 (unknown key) and 429 (over limit) rejections vs a static `return 401`,
  - reload of a 100 000-key file: parse time, swap time on the event loop, and
    the worst request latency while the file is rewritten, vs without reloads.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from afr_nginx import FLAVOURS, Gateway, Key, free_port, keys_toml  # noqa: E402


RANDOM_KEYS_LUA = """
local chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
request = function()
  local t = {}
  for i = 1, 40 do local n = math.random(1, 62); t[i] = chars:sub(n, n) end
  return wrk.format(nil, nil, {["Authorization"] = "Bearer afr_" .. table.concat(t)})
end
"""


def wrk(url, header, seconds, conns=64, threads=2, script=None):
    cmd = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds}s", "--latency"]
    if header:
        cmd += ["-H", header]
    if script:
        cmd += ["-s", str(script)]
    out = subprocess.run(cmd + [url], capture_output=True, text=True, timeout=seconds + 30).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    mx = re.search(r"Latency\s+\S+\s+\S+\s+(\S+)", out).group(1)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rps, mx, int(non2xx.group(1)) if non2xx else 0, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("flavour", nargs="?", default="system", choices=sorted(FLAVOURS))
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    nginx, module = FLAVOURS[args.flavour]
    tmp = Path(tempfile.mkdtemp(prefix="afr-bench-"))
    tmp.chmod(0o755)
    (tmp / "gw/html/on").mkdir(parents=True)
    (tmp / "gw/html/on/index.html").write_text("ok\n")
    (tmp / "gw/html/off").mkdir(parents=True)
    (tmp / "gw/html/off/index.html").write_text("ok\n")
    port = free_port()
    bench_server = f"""
    server {{
        listen 127.0.0.1:{port};
        root {tmp}/gw/html;
        open_file_cache max=100;
        location /on/ {{ afr on; }}
        location /off/ {{ afr off; }}
        location = /static401 {{ afr off; return 401 '{{"error":{{}}}}'; }}
    }}"""
    lua = tmp / "random-keys.lua"
    lua.write_text(RANDOM_KEYS_LUA)
    good = Key("bench", rpm=10_000_000)
    limited = Key("limited", rpm=1)
    gw = Gateway((args.flavour, nginx, module), tmp / "gw", 9, [good, limited], extra_http=bench_server, workers=args.workers)
    gw.start()
    base = f"http://127.0.0.1:{port}"
    s = args.seconds
    try:
        print(f"nginx {args.flavour}, {args.workers} worker(s), wrk -t2 -c64 -d{s}s, keep-alive, same 2 cores, median of {args.rounds}")
        rows = [
            ("afr off, static file", f"{base}/off/", None),
            ("afr on, valid key, static file", f"{base}/on/", f"Authorization: Bearer {good.token}"),
            ("static `return 401`", f"{base}/static401", None),
            ("afr 401, unknown key", f"{base}/on/", "Authorization: Bearer afr_" + "u" * 40),
            ("afr 401, no key", f"{base}/on/", None),
            ("afr 429, over limit", f"{base}/on/", f"Authorization: Bearer {limited.token}"),
        ]
        rows += [
            ("static `return 401`, wrk+lua", f"{base}/static401", "lua"),
            ("afr 401, random key per request", f"{base}/on/", "lua"),
        ]
        samples = {name: [] for name, _, _ in rows}
        # Interleaved rounds, median per row: the machine is shared, so
        # compared rows should see the same background load.
        for _ in range(args.rounds):
            for name, url, header in rows:
                script = lua if header == "lua" else None
                rps, _, non2xx, _ = wrk(url, None if script else header, s, script=script)
                samples[name].append((rps, non2xx))
        results = {}
        for name, _, _ in rows:
            runs = sorted(samples[name])
            rps, non2xx = runs[len(runs) // 2]
            results[name] = rps
            spread = f"{runs[0][0]:.0f}-{runs[-1][0]:.0f}"
            print(f"  {name:34s} {rps:8.0f} req/s median (range {spread:>13s})  non-2xx {non2xx}")
        print(f"  ratio on/off:            {results['afr on, valid key, static file'] / results['afr off, static file']:.2f}")
        print(f"  ratio 401/static 401:    {results['afr 401, unknown key'] / results['static `return 401`']:.2f}")
        print(f"  ratio 429/static 401:    {results['afr 429, over limit'] / results['static `return 401`']:.2f}")
        flood = results["afr 401, random key per request"] / results["static `return 401`, wrk+lua"]
        print(f"  ratio random-key 401/static 401 (both via lua): {flood:.2f}")

        # Reload of a large file.
        big = [good] + [Key(f"user-{i:06d}", token=f"afr_{i:040d}") for i in range(args.keys - 1)]
        text = keys_toml(big)
        print(f"\nreload: {args.keys} keys, {len(text) / 1e6:.1f} MB")
        hdr = f"Authorization: Bearer {good.token}"
        _, base_max, _, _ = wrk(f"{base}/on/", hdr, s, conns=8)
        done = threading.Event()

        def rewrite():
            n = 0
            while not done.is_set():
                gw.write_keys(text if n % 2 == 0 else text + "\n# touched\n")
                n += 1
                time.sleep(1.5)

        t = threading.Thread(target=rewrite)
        t.start()
        rps, reload_max, non2xx, _ = wrk(f"{base}/on/", hdr, s * 2, conns=8)
        done.set()
        t.join()
        time.sleep(1.5)
        loads = re.findall(r"loaded (\d+) keys .*?parsed in (\d+) ms, swapped in (\d+) us", gw.log())
        big_loads = [(int(p), int(sw)) for n, p, sw in loads if int(n) == args.keys]
        if big_loads:
            parse = sorted(p for p, _ in big_loads)
            swap = sorted(sw for _, sw in big_loads)
            print(f"  reloads seen by workers: {len(big_loads)}")
            print(f"  parse (off the event loop): median {parse[len(parse) // 2]} ms, max {parse[-1]} ms")
            print(f"  swap on the event loop:     median {swap[len(swap) // 2]} us, max {swap[-1]} us")
        print(f"  worst request latency, 8 conns: {base_max} without reloads, {reload_max} while reloading ({rps:.0f} req/s, non-2xx {non2xx})")
        # Idle reload: from the rename of the new file to every worker serving it.
        for attempt in range(3):
            before = len(re.findall(r"loaded \d+ keys", gw.log()))
            variant = text + f"\n# idle {attempt}\n"
            t0 = time.monotonic()
            gw.write_keys(variant)
            while len(re.findall(r"loaded \d+ keys", gw.log())) < before + gw.workers:
                time.sleep(0.005)
            took = time.monotonic() - t0
            parsed = re.findall(r"loaded \d+ keys .*?parsed in (\d+) ms, swapped in (\d+) us", gw.log())[-gw.workers :]
            print(
                f"  idle reload {attempt + 1}: all workers serving the new file {1000 * took:.0f} ms after the write "
                f"(includes up to 200 ms of polling; parse {', '.join(p for p, _ in parsed)} ms, "
                f"swap {', '.join(w for _, w in parsed)} us)"
            )
    finally:
        gw.stop()
        gw.assert_no_crash()
        print(f"\nlogs in {tmp}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    sys.exit(main())
