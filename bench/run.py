#!/usr/bin/env python3
"""The benchmark suite (issue 10, design §8): every target side by side in one run.

Run it through `scripts/bench` (which builds what it needs and installs the plotting venv
and the pinned LiteLLM); this file only orchestrates and reports. Loopback only; every
load loop is bounded by time and every lane by count.

Targets, all in front of ONE afr-mock:
  direct      the mock itself (the floor)
  nginx       plain nginx proxy_pass to the mock (the limit), same worker count
  gateway     nginx + afr module + afr sidecar (keys, limits, usage all on)
  floor       nginx (plain proxy_pass, no module) + afr-bench-floor (bench/floor: a bare hyper
              proxy on a unix socket, the leanest second hop) in front of the same mock: the
              floor the sidecar's own cost is judged against (issue 24); the floor lane only
  gateway-bare  the governed-lane diagnostic: the same nginx with `afr off` in the
              location (no key check, no counters, no X-RateLimit-*) in front of a second
              sidecar started with `[usage] record = false` (no usage rows)
  litellm     LiteLLM (pinned, its own venv) configured to the same mock

Lanes: c1 (added p99 at concurrency 1), max (max req/s, wrk), sweep (open loop at rising
rates: the 200 and 1000 req/s figures, added latency vs rate, the highest rate held with
p99 under 1/5/10 ms), ttft (added time to first content token and per-chunk delay),
streams (concurrent streams sustained, RSS of each process), governed (gateway vs
gateway-bare), reject (401 and 429 vs nginx `return 401`), soak (RSS slope, MB/hour), floor
(nginx, floor and gateway at one fixed rate well under every maximum: CPU per request of each
process, and the sidecar's ÷ the floor's).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOADGEN = REPO / "target/release/examples/loadgen"
AFR = REPO / "target/release/afr"
MOCK = REPO / "target/release/afr-mock"
FLOOR = REPO / "target/release/afr-bench-floor"
MODULE = REPO / "build/system/libngx_http_afr_module.so"
NGINX = "/usr/sbin/nginx"
LITELLM = REPO / "build/litellm-venv/bin/litellm"
LITELLM_VERSION = "1.74.9"  # keep in step with scripts/bench; never 1.107.0 (compromised)
NGINX_WORKERS = 2
LITELLM_WORKERS = 2
CHAT = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello there"}]}'


@dataclass
class Profile:
    """How long and how often: the full suite or the few-seconds smoke check."""

    name: str
    runs: int
    c1_secs: int
    wrk_secs: int
    wrk_conns: int
    rates: list[int]
    rate_secs: int
    ttft_rate: int
    ttft_secs: int
    streams: list[int]
    stream_hold: int
    soak_secs: int
    soak_rate: int
    # The floor lane: one fixed rate, well under every target's maximum (the gateway's is
    # ~16 000 req/s with wrk on 2 cores), so each process's CPU per request is its cost at
    # the same work, not at saturation.
    floor_rate: int = 2000
    floor_secs: int = 10


# ttft_rate: design §8 sets added TTFT at 16 concurrent streams; a stream here lasts ~31 ms
# (ten deltas ~3 ms apart), so 500 streams/s keeps about 16 open.
FULL = Profile("full", runs=3, c1_secs=10, wrk_secs=10, wrk_conns=32,
               rates=[200, 500, 1000, 2000, 4000, 8000, 16000], rate_secs=5,
               ttft_rate=500, ttft_secs=5, streams=[1000, 10000], stream_hold=10,
               soak_secs=300, soak_rate=500)
QUICK = Profile("quick", runs=1, c1_secs=1, wrk_secs=1, wrk_conns=16,
                rates=[200, 1000], rate_secs=1, ttft_rate=50, ttft_secs=1,
                streams=[100], stream_hold=2, soak_secs=4, soak_rate=200, floor_rate=200, floor_secs=1)


def log(msg: str) -> None:
    print(f"==> {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    """A loopback port free now, below the kernel's ephemeral range: a port from bind(0) is
    in that range, where every outgoing connection (the load generators', the tests' run
    beside this) takes its local port too, and could take it before nginx binds it."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12_000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port below {low}")


def wait_http(url: str, timeout: float = 30.0, ok=(200, 401, 404, 405)) -> None:
    """Waits until something answers HTTP at url (any of `ok`)."""
    import urllib.error
    import urllib.request
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status in ok:
                    return
        except urllib.error.HTTPError as e:
            if e.code in ok:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"nothing answered at {url} within {timeout:.0f}s")


def post_json(url: str, body: dict) -> None:
    import urllib.request
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        r.read()


# --- process bookkeeping ---------------------------------------------------------------

def without_usage(toml: str) -> str:
    """A sidecar.toml (as sidecar-config.py writes it) with `[usage] record = false`."""
    if "\n[usage]\n" not in toml:
        raise RuntimeError("the sidecar config has no [usage] table to turn recording off in")
    return toml.replace("\n[usage]\n", "\n[usage]\nrecord = false\n", 1)


def bearer(headers: list[str]) -> str | None:
    """The value of the Authorization header among `Name:value` headers."""
    return next((h.split(":", 1)[1] for h in headers if h.lower().startswith("authorization:")), None)


def main_context(d: Path, user: str) -> str:
    """The main context every benchmarked nginx shares: user, workers, files, events."""
    return f"""{user}
worker_processes {NGINX_WORKERS};
worker_rlimit_nofile 65536;
pid {d}/nginx.pid;
error_log {d}/logs/error.log;
events {{ worker_connections 32768; }}
"""


def proxy_conf(d: Path, port: int, server: str, extra: str = "", user: str = "") -> str:
    """An nginx.conf that only proxies /v1/ to one upstream `server` (the same worker count,
    logging and buffers as the gateway's nginx): plain nginx, and nginx in front of the floor."""
    return f"""
{main_context(d, user)}http {{
    access_log {d}/logs/access.log;
    client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
    upstream up {{ {server} keepalive 64; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location /v1/ {{ proxy_pass http://up; proxy_http_version 1.1;
                        proxy_set_header Connection ""; proxy_buffering off; }}
        {extra}
    }}
}}
"""


def tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def rss_mib(pids: list[int]) -> float:
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_secs(pids: list[int]) -> float:
    """User + system CPU seconds the processes have used so far (all their threads)."""
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (stat fields 14, 15)
        except (OSError, IndexError, ValueError):
            pass
    return total / CLK_TCK


def children_cpu() -> float:
    """CPU seconds of the load generators this script has run and waited for."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


class Stack:
    """Every process of the run; stopped (by pid) on exit."""

    def __init__(self, home: Path, with_litellm: bool, sidecar_threads: int | None, with_floor: bool = False):
        self.home = home
        self.with_floor = with_floor
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.nginx_pids: list[tuple[str, Path]] = []
        self.with_litellm = with_litellm
        self.sidecar_threads = sidecar_threads
        self.urls: dict[str, str] = {}
        self.groups: dict[str, dict[str, int]] = {}  # target -> {process name: root pid}
        self.admin: dict[str, str] = {}  # target -> its sidecar's /metrics URL

    def spawn(self, name: str, cmd: list[str], env: dict | None = None) -> subprocess.Popen:
        logf = open(self.home / "logs" / f"{name}.log", "ab")
        p = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env={**os.environ, **(env or {})}, start_new_session=True)
        self.procs.append((name, p))
        return p

    def nginx(self, name: str, conf: str) -> int:
        d = self.home / name
        (d / "logs").mkdir(parents=True, exist_ok=True)
        (d / "nginx.conf").write_text(conf)
        args = [NGINX, "-p", str(d), "-c", str(d / "nginx.conf"), "-e", str(d / "logs/error.log")]
        r = subprocess.run(args + ["-t", "-q"], capture_output=True, text=True)
        if r.returncode != 0:  # with -e, nginx says why in that file, not on stderr
            log = d / "logs/error.log"
            said = log.read_text().strip() if log.exists() else ""
            raise RuntimeError(f"nginx -t of {d}/nginx.conf exited {r.returncode}: "
                               f"{r.stderr.strip()}\n{said}")
        subprocess.run(args, check=True)
        self.nginx_pids.append((name, d / "nginx.pid"))
        for _ in range(100):
            if (d / "nginx.pid").exists():
                return int((d / "nginx.pid").read_text())
            time.sleep(0.05)
        raise RuntimeError(f"nginx {name} wrote no pid file")

    def start(self) -> None:
        h = self.home
        (h / "logs").mkdir(parents=True, exist_ok=True)
        (h / "tmp").mkdir(exist_ok=True)
        mock_port_file = h / "mock.port"
        mock = self.spawn("mock", [str(MOCK), "--listen", "127.0.0.1:0", "--port-file",
                                   str(mock_port_file), "--log-capacity", "0"])
        for _ in range(200):
            if mock_port_file.exists() and mock_port_file.read_text().strip():
                break
            time.sleep(0.05)
        self.mock_port = int(mock_port_file.read_text())
        self.mock = f"http://127.0.0.1:{self.mock_port}"
        self.urls["direct"] = f"{self.mock}/v1/chat/completions"
        self.groups["direct"] = {"mock": mock.pid}

        # Plain nginx: same binary, worker count and logging as the gateway's nginx.
        plain_port = free_port()
        d = h / "plain"
        plain = self.nginx("plain", proxy_conf(d, plain_port, f"server 127.0.0.1:{self.mock_port};",
                                               "location = /static401 { return 401; }"))
        self.urls["nginx"] = f"http://127.0.0.1:{plain_port}/v1/chat/completions"
        self.urls["static401"] = f"http://127.0.0.1:{plain_port}/static401"
        self.groups["nginx"] = {"nginx": plain}
        if self.with_floor:
            self.start_floor()

        # The gateway: the shipped nginx snippets and sidecar.toml, as scripts/run uses them.
        secret = os.urandom(32).hex()
        (h / "upstream-secret.conf").write_text(f'afr_upstream_secret "{secret}";\n')
        (h / "nginx").mkdir(exist_ok=True)
        for f in ("afr-http.conf", "afr-server.conf"):
            text = (REPO / "conf/nginx" / f).read_text()
            text = text.replace("/run/afr/sidecar.sock", f"{h}/sidecar/sidecar.sock")
            text = text.replace("/etc/afr/", f"{h}/").replace("/run/afr/", f"{h}/")
            text = text.replace("/usr/share/afr/web", str(REPO / "web"))
            (h / "nginx" / f).write_text(text)
        keys = h / "keys.toml"
        self.key = self.new_key(keys, "bench", rpm=10_000_000)  # the most afr allows
        self.limited_key = self.new_key(keys, "limited", rpm=1)

        sidecars = {}
        for name, record in (("sidecar", True), ("sidecar-bare", False)):
            sh = h / name
            sh.mkdir(exist_ok=True)
            admin_port = free_port()
            target = "gateway" if record else "gateway-bare"
            self.admin[target] = f"http://127.0.0.1:{admin_port}/metrics"
            subprocess.run([sys.executable, str(REPO / "scripts/sidecar-config.py"), "--shipped",
                            str(REPO / "conf/sidecar.toml"), "--home", str(sh), "--secret", secret,
                            "--admin-port", str(admin_port), "--mock-port", str(self.mock_port)],
                           check=True, capture_output=True, env={k: v for k, v in os.environ.items()
                                                                 if not k.endswith("_API_KEY")})
            if not record:
                (sh / "sidecar.toml").write_text(without_usage((sh / "sidecar.toml").read_text()))
            threads = ["--threads", str(self.sidecar_threads)] if self.sidecar_threads else []
            sidecars[name] = self.spawn(name, [str(AFR), "serve", "--config", str(sh / "sidecar.toml"),
                                               *threads]).pid
        for name in sidecars:
            for _ in range(200):
                m = re.search(r"afr serve started.* threads=(\d+)", (h / "logs" / f"{name}.log").read_text())
                if m:
                    break
                time.sleep(0.05)
            else:
                raise RuntimeError(f"{name} did not start; see {h}/logs/{name}.log")
            self.threads_started = int(m.group(1))  # what the report states, from the sidecar itself

        gw_port, bare_port = free_port(), free_port()
        d = h / "gw"
        user = "user root root;" if os.geteuid() == 0 else ""
        gw = self.nginx("gw", f"""
load_module {MODULE};
{main_context(d, user)}http {{
    default_type application/octet-stream;
    access_log {d}/logs/access.log;
    client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
    include {h}/nginx/afr-http.conf;
    upstream afr_sidecar_bare {{ server unix:{h}/sidecar-bare/sidecar.sock max_fails=0; keepalive 64; }}
    server {{
        listen 127.0.0.1:{gw_port} backlog=4096;
        include {h}/nginx/afr-server.conf;
    }}
    # The governed lane's diagnostic: no key check, no counters (afr off), and a
    # sidecar that records no usage. The secret is set by hand since the module is off.
    server {{
        listen 127.0.0.1:{bare_port} backlog=4096;
        location /v1/ {{
            afr off;
            proxy_set_header X-Afr-Secret "{secret}";
            proxy_pass http://afr_sidecar_bare; proxy_http_version 1.1;
            proxy_set_header Connection ""; proxy_buffering off;
        }}
    }}
}}
""")
        self.urls["gateway"] = f"http://127.0.0.1:{gw_port}/v1/chat/completions"
        self.urls["gateway-bare"] = f"http://127.0.0.1:{bare_port}/v1/chat/completions"
        self.groups["gateway"] = {"nginx": gw, "sidecar": sidecars["sidecar"]}
        self.groups["gateway-bare"] = {"nginx": gw, "sidecar": sidecars["sidecar-bare"]}
        time.sleep(2.5)  # every worker has (re-)read keys.toml
        wait_http(self.urls["gateway"].replace("chat/completions", "models"))

        if self.with_litellm:
            port = free_port()
            cfg = h / "litellm.yaml"
            cfg.write_text(f"""model_list:
  - model_name: gpt-4o-mini
    litellm_params:
      model: openai/gpt-4o-mini
      api_base: {self.mock}/v1
      api_key: sk-mock
general_settings:
  master_key: sk-bench-master-key
litellm_settings:
  drop_params: true
""")
            lp = self.spawn("litellm", [str(LITELLM), "--config", str(cfg), "--host", "127.0.0.1",
                                        "--port", str(port), "--num_workers", str(LITELLM_WORKERS)],
                            env={"LITELLM_LOG": "ERROR", "LITELLM_MODE": "PRODUCTION",
                                 # the bundled cost map, not a download from GitHub
                                 "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
            self.urls["litellm"] = f"http://127.0.0.1:{port}/v1/chat/completions"
            self.groups["litellm"] = {"litellm": lp.pid}
            wait_http(f"http://127.0.0.1:{port}/health/liveliness", timeout=180)

    def start_floor(self) -> None:
        """nginx (plain proxy_pass, no module; the gateway's upstream settings) in front of
        afr-bench-floor on a unix socket, in front of the mock: the leanest second hop."""
        h, d = self.home, self.home / "floor"
        d.mkdir(exist_ok=True)
        sock = d / "floor.sock"
        threads = ["--threads", str(self.sidecar_threads)] if self.sidecar_threads else []
        floor = self.spawn("floor", [str(FLOOR), "--listen", str(sock), "--upstream",
                                     f"127.0.0.1:{self.mock_port}", *threads])
        log, started = h / "logs/floor.log", None
        for _ in range(200):  # its start line comes once the socket is bound
            started = re.search(r"afr-bench-floor listening .* threads=(\d+)", log.read_text())
            if started or floor.poll() is not None:
                break
            time.sleep(0.05)
        if not started:
            raise RuntimeError(f"afr-bench-floor did not start; see {log}")
        self.floor_threads = started.group(1)  # what the report states, from the floor itself
        port, d = free_port(), h / "floor-nginx"  # self.nginx's directory
        user = "user root root;" if os.geteuid() == 0 else ""  # as the gateway's: workers reach the socket
        nginx = self.nginx("floor-nginx", proxy_conf(d, port, f"server unix:{sock} max_fails=0;", user=user))
        self.urls["floor"] = f"http://127.0.0.1:{port}/v1/chat/completions"
        self.groups["floor"] = {"nginx": nginx, "floor": floor.pid}

    def new_key(self, keys: Path, kid: str, rpm: int) -> str:
        out = subprocess.run([str(AFR), "key", "new", "--id", kid, "--name", kid, "--rpm", str(rpm),
                              "--file", str(keys)], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"afr key new failed: {out.stderr.strip()}")
        m = re.search(r"afr_[A-Za-z0-9]{32,}", out.stdout + out.stderr)
        if not m:
            raise RuntimeError(f"afr key new printed no key: {out.stdout}{out.stderr}")
        return m.group(0)

    def auth(self, target: str) -> list[str]:
        if target in ("gateway",):
            return [f"Authorization:Bearer {self.key}"]
        if target == "litellm":
            return ["Authorization:Bearer sk-bench-master-key"]
        return []

    def rss(self, target: str) -> dict[str, float]:
        return {name: rss_mib(tree(pid)) for name, pid in self.groups.get(target, {}).items()}

    def cpu(self, target: str) -> dict[str, float]:
        """CPU seconds so far of the target's processes and of the mock behind it."""
        procs = dict(self.groups.get(target, {}))
        procs.setdefault("mock", self.groups["direct"]["mock"])
        return {name: cpu_secs(tree(pid)) for name, pid in procs.items()}

    def measured(self, target: str, load):
        """Runs `load()` (one wrk or loadgen call on `target`) and adds to its result the
        CPU each process spent per request, in µs (`cpu_us`): where the time goes."""
        before, gen = self.cpu(target), children_cpu()
        r = load()
        after, gen = self.cpu(target), children_cpu() - gen
        n = r.get("total") or r.get("n") or 0
        if n:
            spent = {k: after[k] - before.get(k, 0.0) for k in after}
            spent["load generator"] = gen
            r["cpu_us"] = {k: v * 1e6 / n for k, v in spent.items()}
        return r

    def stop(self) -> None:
        for name, pidfile in reversed(self.nginx_pids):
            try:
                os.kill(int(pidfile.read_text()), 15)
            except (OSError, ValueError):
                pass
        for name, p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, 15)
                except OSError:
                    pass
        for name, p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)


# --- load tools ------------------------------------------------------------------------

LINE = re.compile(r"n=(\d+) errors=(\d+) p50=([\w.]+)ms p90=([\w.]+)ms p99=([\w.]+)ms "
                  r"p99\.9=([\w.]+)ms max=([\w.]+)ms(?: achieved=(\d+)/s)?(?: late_p99=([\w.]+)ms)?"
                  r"(?: sustained=(\d+))?")


def parse_line(line: str) -> dict:
    m = LINE.search(line)
    if not m:
        raise RuntimeError(f"loadgen printed no result: {line!r}")
    keys = ["n", "errors", "p50", "p90", "p99", "p999", "max", "achieved", "late_p99", "sustained"]
    out = {}
    for k, v in zip(keys, m.groups()):
        if v is not None:
            out[k] = float(v)
    return out


def loadgen(mode: str, url: str, n: int, secs: int, headers: list[str],
            samples: Path | None = None, timeout: float | None = None) -> list[dict]:
    env = dict(os.environ)
    if samples:
        env["LOADGEN_SAMPLES"] = str(samples)
    r = subprocess.run([str(LOADGEN), mode, url, str(n), str(secs), *headers], capture_output=True,
                       text=True, env=env, timeout=timeout or secs * 4 + 60)
    lines = [parse_line(l) for l in r.stdout.splitlines() if "n=" in l]
    if not lines:
        raise RuntimeError(f"loadgen {mode} {url}: {r.stdout}{r.stderr}")
    return lines


def wrk(url: str, secs: int, conns: int, headers: list[str], chat: bool) -> dict:
    args = ["wrk", "-t2", f"-c{conns}", f"-d{secs}s"]
    if chat:
        args += ["-s", str(REPO / "bench/chat.lua")]
    env = dict(os.environ)
    env["AFR_BENCH_AUTH"] = bearer(headers) or ""
    r = subprocess.run(args + [url], capture_output=True, text=True, env=env, timeout=secs + 60)
    m = re.search(r"Requests/sec:\s+([\d.]+)", r.stdout)
    if not m:
        raise RuntimeError(f"wrk printed no rate: {r.stdout}{r.stderr}")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", r.stdout)
    total = re.search(r"(\d+) requests in", r.stdout)
    return {"rps": float(m.group(1)), "non2xx": int(non2xx.group(1)) if non2xx else 0,
            "total": int(total.group(1)) if total else 0}


# --- the lanes -------------------------------------------------------------------------

@dataclass
class Results:
    profile: Profile
    targets: list[str]
    data: dict = field(default_factory=dict)  # lane -> key -> list of per-run values
    samples: dict = field(default_factory=dict)  # target -> path of c1 samples (last run)
    notes: list[str] = field(default_factory=list)
    sidecar_threads: int | None = None  # as the sidecar's start line says
    threads_asked: bool = False  # set by --sidecar-threads, not the default
    floor_threads: str = "?"  # as afr-bench-floor's start line says

    def add(self, lane: str, key: str, value) -> None:
        self.data.setdefault(lane, {}).setdefault(key, []).append(value)


def lane_c1(st: Stack, res: Results, run: int, out: Path) -> None:
    for t in res.targets:
        path = out / f"c1-{t}.samples"
        r = st.measured(t, lambda: loadgen("closed", st.urls[t], 1, res.profile.c1_secs, st.auth(t),
                                           samples=path)[0])
        res.add("c1", t, r)
        res.samples[t] = str(path)


def lane_max(st: Stack, res: Results, run: int) -> None:
    for t in res.targets:
        res.add("max", t, st.measured(t, lambda: wrk(st.urls[t], res.profile.wrk_secs, res.profile.wrk_conns,
                                                     st.auth(t), True)))


def lane_sweep(st: Stack, res: Results, run: int) -> None:
    """Open loop at rising rates; a target stops climbing once it misses 10 ms p99 or the rate."""
    for t in res.targets:
        for rate in res.profile.rates:
            r = loadgen("rate", st.urls[t], rate, res.profile.rate_secs, st.auth(t))[0]
            res.add("sweep", f"{t}@{rate}", r)
            held = r.get("achieved", 0) >= 0.95 * rate and r["errors"] <= 0.001 * max(r["n"], 1)
            # 200 and 1000 req/s are lanes of their own: always measured.
            if rate >= 1000 and (not held or r["p99"] > 10.0):
                break


def lane_ttft(st: Stack, res: Results, run: int) -> None:
    # Ten content deltas 2 ms apart: the first arrives right after the role chunk.
    post_json(f"{st.mock}/_mock/config", {"chunks": 10, "chunk_interval_ms": 2})
    try:
        for t in res.targets:
            lines: list[dict] = []

            def load() -> dict:
                lines.extend(loadgen("ttft", st.urls[t], res.profile.ttft_rate, res.profile.ttft_secs,
                                     st.auth(t)))
                return lines[0]
            res.add("ttft", t, st.measured(t, load))
            if len(lines) > 1:
                res.add("chunk", t, lines[1])
    finally:
        post_json(f"{st.mock}/_mock/config", {})


def lane_streams(st: Stack, res: Results, run: int) -> None:
    hold = res.profile.stream_hold
    # Streams outlast the hold: one content delta a second.
    post_json(f"{st.mock}/_mock/config", {"chunks": hold + 30, "chunk_interval_ms": 1000})
    try:
        for count in res.profile.streams:
            for t in res.targets:
                if t == "litellm" and count > 1000:
                    continue  # 10 000 Python streams on 2 cores only time out; stated in the report
                idle = st.rss(t)
                before = sidecar_state(st, t).get("local_exhausted", 0) if t in st.admin else 0
                p = subprocess.Popen([str(LOADGEN), "streams", st.urls[t], str(count), str(hold),
                                      *st.auth(t)], stdout=subprocess.PIPE, text=True)
                peak: dict[str, float] = {}
                end = time.monotonic() + hold + 30
                while p.poll() is None and time.monotonic() < end:
                    for k, v in st.rss(t).items():
                        peak[k] = max(peak.get(k, 0.0), v)
                    time.sleep(0.5)
                if p.poll() is None:
                    p.kill()
                out = p.communicate()[0]
                r = parse_line(next(l for l in out.splitlines() if "n=" in l))
                r["rss_idle"] = idle
                r["rss_peak"] = peak
                if t in st.admin:
                    # Why streams failed, where the sidecar knows: a connect it could
                    # not make for want of descriptors is answered 503 and counted.
                    exhausted = sidecar_state(st, t).get("local_exhausted", 0) - before
                    r["sidecar_out_of_descriptors"] = exhausted
                    if exhausted:
                        res.notes.append(f"run {run + 1}: {count} streams, {t}: {exhausted:.0f} answered 503 "
                                         "gateway_overloaded (the sidecar was out of file descriptors)")
                res.add("streams", f"{t}@{count}", r)
                time.sleep(1)  # let the closed connections go
    finally:
        post_json(f"{st.mock}/_mock/config", {})


def lane_governed(st: Stack, res: Results, run: int) -> None:
    p = res.profile
    for t in ("gateway", "gateway-bare"):
        r = st.measured(t, lambda: wrk(st.urls[t], p.wrk_secs, p.wrk_conns, st.auth(t), True))
        res.add("governed-max", t, r)
        note_failures(st, res, run, f"governed lane, {t}, max req/s", t, r.get("non2xx", 0))
        r = loadgen("rate", st.urls[t], 1000, p.rate_secs, st.auth(t))[0]
        res.add("governed-1000", t, r)
        note_failures(st, res, run, f"governed lane, {t}, 1000 req/s", t, r.get("errors", 0))


FLOOR_TARGETS = ["direct", "nginx", "floor", "gateway"]


def lane_floor(st: Stack, res: Results, run: int) -> None:
    """Every target at one fixed rate (open loop, loadgen), with the CPU each process spent
    per request: the sidecar's against the bare hyper floor's, at the same work."""
    p = res.profile
    for t in FLOOR_TARGETS:
        r = st.measured(t, lambda: loadgen("rate", st.urls[t], p.floor_rate, p.floor_secs, st.auth(t))[0])
        res.add("floor", t, r)
        note_failures(st, res, run, f"floor lane, {t}, {p.floor_rate} req/s", t, r.get("errors", 0))


def floor_table(d: dict, p: Profile, floor_threads: str) -> list[str]:
    """The floor lane's latencies and the ratios issue 24 asks for."""
    rows = d.get("floor", {})
    if not rows:
        return []
    L = ["", "## The floor: the sidecar against a bare hyper second hop", "",
         f"{p.floor_rate} req/s open loop (loadgen), {p.floor_secs} s per target, non-streaming chat. `floor` = "
         "nginx (plain proxy_pass, no module) → afr-bench-floor (bench/floor: hyper on a unix socket, pooled "
         f"keep-alive to the mock, no logic; {floor_threads} thread(s), as many as the sidecar runs) → the same mock. "
         "CPU per request by process is in \"Where the CPU goes\" below.", "",
         "| target | p50 ms | p99 ms | errors | achieved req/s |", "|---|---|---|---|---|"]
    for t in FLOOR_TARGETS:
        rs = rows.get(t, [])
        if rs:
            L.append(f"| {t} | {spread([r['p50'] for r in rs], '.3f')} | {spread([r['p99'] for r in rs], '.3f')} | "
                     f"{spread([r['errors'] for r in rs], '.0f')} | {spread([r.get('achieved', float('nan')) for r in rs], '.0f')} |")
    gw = [r["cpu_us"] for r in rows.get("gateway", []) if "cpu_us" in r]
    fl = [r["cpu_us"] for r in rows.get("floor", []) if "cpu_us" in r]
    pl = [r["cpu_us"] for r in rows.get("nginx", []) if "cpu_us" in r]
    if gw and fl:
        def ratio(a, b):
            return [x / y for x, y in zip(a, b) if y]
        side = ratio([c.get("sidecar", float("nan")) for c in gw], [c.get("floor", float("nan")) for c in fl])
        ngx = ratio([c.get("nginx", float("nan")) for c in gw], [c.get("nginx", float("nan")) for c in fl])
        both = ratio([c.get("nginx", 0) + c.get("sidecar", 0) for c in gw],
                     [c.get("nginx", 0) + c.get("floor", 0) for c in fl])
        L += ["", "| CPU per request, per run | ratio |", "|---|---|",
              f"| sidecar ÷ floor (the second hop; issue 24's target ≤ 1.3×) | {spread(side, '.2f')} |",
              f"| gateway's nginx (with the module) ÷ floor's nginx (plain) | {spread(ngx, '.2f')} |",
              f"| nginx + sidecar ÷ nginx + floor | {spread(both, '.2f')} |"]
        if pl:
            hop = ratio([c.get("nginx", 0) + c.get("floor", 0) for c in fl], [c.get("nginx", 0) for c in pl])
            L.append(f"| nginx + floor ÷ plain nginx (what a second hop costs at all) | {spread(hop, '.2f')} |")
    return L


def note_failures(st: Stack, res: Results, run: int, lane: str, t: str, failed: float) -> None:
    """A lane whose answers failed says what one request right after it gets, so
    the report tells an exhausted limit from a broken target (wrk and loadgen
    count failures without their statuses)."""
    if not failed:
        return
    auth = bearer(st.auth(t))
    try:
        after = str(status_of(st.urls[t], auth))
    except OSError as e:
        after = f"no answer ({e})"
    state = sidecar_state(st, t)
    why = ""
    if state.get("open_breakers"):
        why += f"; the sidecar's breaker open for {', '.join(state['open_breakers'])}"
    if state.get("local_exhausted"):
        why += f"; the sidecar has answered {state['local_exhausted']:.0f} requests 503 for want of descriptors"
    res.notes.append(f"run {run + 1}: {lane}: {int(failed)} failed answers; one request right after got {after}{why}")


def sidecar_state(st, t: str) -> dict:
    """What the target's sidecar says of itself in /metrics: providers whose breaker
    is open, and requests it refused for want of its own descriptors (so a failed lane
    tells the gateway's limits from the provider's)."""
    import urllib.request
    url = getattr(st, "admin", {}).get(t)
    if not url:
        return {}
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    state: dict = {"open_breakers": []}
    for line in text.splitlines():
        m = re.match(r'afr_breaker_state\{provider="([^"]+)"\} (\d+)', line)
        if m and m.group(2) != "0":  # 1 half-open, 2 open: either way not closed yet
            state["open_breakers"].append(m.group(1) + (" (half-open)" if m.group(2) == "1" else ""))
        m = re.match(r"afr_local_exhausted_total (\d+(?:\.\d+)?)", line)
        if m:
            state["local_exhausted"] = float(m.group(1))
    return state


def settle(st, res: Results, run: int, after: str | None, wait_secs: float = 45.0) -> None:
    """Starts the next lane on a healthy gateway. A lane that made the mock fail (10 000
    streams at once outran its accept queue of 128 until 2026-12-01) leaves the sidecar's
    breaker for it open for the cooldown (30 s), and the next lane would measure only 503s
    (run 3 of 2026-12-01's third run lost its governed lane so). Waits for the breakers to
    close, one probe request at a time, and notes it with the provider failures the sidecar
    logged since the last call (so during the lane `after`; None before the first lane)."""
    marks = st.__dict__.setdefault("log_marks", {})  # target -> sidecar log size at the last call
    for t in list(getattr(st, "admin", {})):
        log = st.home / "logs" / f"{'sidecar' if t == 'gateway' else 'sidecar-bare'}.log"
        since = marks.get(t, 0)
        first = sidecar_state(st, t).get("open_breakers")
        if first:
            started = time.monotonic()
            auth = bearer(st.auth(t))
            while time.monotonic() - started < wait_secs:
                time.sleep(1)
                if not sidecar_state(st, t).get("open_breakers"):
                    break
                try:
                    status_of(st.urls[t], auth)  # past the cooldown, this is the probe
                except OSError:
                    pass
            why = failure_reasons(log, since)
            still = sidecar_state(st, t).get("open_breakers")
            where = f"after the {after} lane" if after else "before the first lane"
            res.notes.append(f"run {run + 1}: {where} the {t} sidecar's breaker was not closed for "
                             f"{', '.join(first)}; " + (f"still not closed after {wait_secs:.0f} s" if still
                                                        else f"closed after {time.monotonic() - started:.0f} s")
                             + (f" (the provider failures it logged: {why})" if why else ""))
        try:
            marks[t] = log.stat().st_size
        except OSError:
            marks[t] = 0


def failure_reasons(log: Path, since: int = 0) -> str:
    """The provider failures a sidecar logged from byte `since` on, most frequent first
    (error texts, counted)."""
    counts: dict[str, int] = {}
    try:
        with open(log, "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    for line in text.splitlines():
        if "trying the next route" in line or "not retried" in line:
            m = re.search(r"error=(.*?)(?= \w+=|$)", line)
            if m:
                reason = re.sub(r"\d+", "N", m.group(1).strip('"'))[:120]
                counts[reason] = counts.get(reason, 0) + 1
    return "; ".join(f"{n}× {r}" for r, n in sorted(counts.items(), key=lambda kv: -kv[1])[:3])


def status_of(url: str, auth: str | None) -> int:
    """The status one chat request gets (to show each rejection lane measured what it says)."""
    import urllib.error
    import urllib.request
    headers = {"content-type": "application/json"}
    if auth:
        headers["authorization"] = auth
    req = urllib.request.Request(url, data=CHAT.encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def lane_reject(st: Stack, res: Results, run: int) -> None:
    p = res.profile
    lanes = [("nginx return 401", "nginx", st.urls["static401"], None, False),
             ("gateway 401 (unknown key)", "gateway", st.urls["gateway"],
              "Bearer afr_unknownunknownunknownunknownunknown1", True),
             ("gateway 429 (rpm exhausted)", "gateway", st.urls["gateway"], f"Bearer {st.limited_key}", True)]
    for name, t, url, auth, chat in lanes:
        status_of(url, auth)  # the limited key's one request a minute is spent here
        seen = status_of(url, auth)
        r = st.measured(t, lambda: wrk(url, p.wrk_secs, p.wrk_conns, [f"Authorization:{auth}"] if auth else [],
                                       chat))
        r["status"] = seen
        res.add("reject", name, r)


def lane_soak(st: Stack, res: Results, out: Path) -> None:
    """Open-loop load on the gateway while its RSS is sampled; least-squares slope."""
    p = res.profile
    proc = subprocess.Popen([str(LOADGEN), "rate", st.urls["gateway"], str(p.soak_rate), str(p.soak_secs),
                             *st.auth("gateway")], stdout=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    points: list[tuple[float, float, float]] = []
    while proc.poll() is None:
        r = st.rss("gateway")
        points.append((time.monotonic() - t0, r.get("nginx", 0.0), r.get("sidecar", 0.0)))
        time.sleep(1 if p.soak_secs > 30 else 0.25)
    proc.communicate()

    def slope(xs, ys):
        if len(xs) < 2:
            return float("nan")
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        den = sum((x - mx) ** 2 for x in xs)
        return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den * 3600 if den else float("nan")

    # The first tenth is warm-up (pools and arenas filling), not growth.
    keep = [pt for pt in points if pt[0] >= p.soak_secs * 0.1] or points
    xs = [pt[0] for pt in keep]
    res.data["soak"] = {
        "secs": p.soak_secs, "rate": p.soak_rate,
        "nginx_slope": slope(xs, [pt[1] for pt in keep]),
        "sidecar_slope": slope(xs, [pt[2] for pt in keep]),
        "points": points,
    }


# --- report ----------------------------------------------------------------------------

def med(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def spread(xs: list[float], fmt: str) -> str:
    xs = [x for x in xs if x == x]
    if not xs:
        return "n/a"
    m = statistics.median(xs)
    if len(xs) == 1:
        return format(m, fmt)
    return f"{format(m, fmt)} ({format(min(xs), fmt)}–{format(max(xs), fmt)})"


def sh(*cmd: str) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip() \
            or subprocess.run(cmd, capture_output=True, text=True, timeout=10).stderr.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def machine(load_before: str, threads: int | None, asked: bool, with_litellm: bool) -> list[str]:
    cpu = "unknown"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = next((l.split(":", 1)[1].strip() for l in open("/proc/meminfo") if l.startswith("MemTotal")), "?")
    commit = sh("git", "-C", str(REPO), "rev-parse", "--short", "HEAD")
    # The run's own plots are written before this report: not a change to the code measured.
    status = sh("git", "-C", str(REPO), "status", "--porcelain", "--", ".", ":(exclude)bench/results")
    dirty = " (+ uncommitted changes)" if status not in ("", "unknown") else ""
    return [
        f"- machine: {os.cpu_count()} cores, {cpu}, {mem} RAM; kernel {platform.release()}",
        f"- load average when the run started: {load_before}; at the end: {loadavg()}",
        f"- nginx: {sh(NGINX, '-v').replace('nginx version: ', '')}, {NGINX_WORKERS} workers for every nginx",
        f"- gateway commit: {commit}{dirty}; sidecar threads: "
        + (f"{threads} (--sidecar-threads)" if asked else f"{threads} (afr serve's default: half the CPUs, at least one)"),
        f"- LiteLLM: {litellm_version()} ({LITELLM_WORKERS} workers, master key on, configured to the same mock)"
        if with_litellm else "- LiteLLM: left out of this run (--no-litellm)",
        f"- load generators: loadgen (sidecar/examples/loadgen.rs, reqwest, open loop) and "
        f"{sh('wrk', '--version').splitlines()[0] if sh('wrk', '--version') else 'wrk'}; "
        "they share the machine's cores with every target",
    ]


def litellm_version() -> str:
    py = LITELLM.parent / "python"
    if not py.exists():
        return "not installed (left out)"
    return sh(str(py), "-c", "import importlib.metadata as m; print(m.version('litellm'))")


def loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


def cpu_tables(d: dict, T: list[str]) -> list[str]:
    """Where the time goes: the CPU each process spent per request in the lanes that record it."""
    L = ["", "## Where the CPU goes: µs per request, by process", "",
         "User + system CPU each process used during the lane (read from /proc, all its threads), divided by "
         "the requests the lane completed; `load generator` is wrk's or loadgen's own. On these 2 cores a "
         "saturated target makes at most about 2 000 000 µs / (the row's sum) req/s, since the mock and the "
         "load generator share the cores with it.", ""]
    lanes = (("c1", "Concurrency 1 (loadgen closed loop)", T),
             ("max", "Max req/s (wrk)", T),
             ("ttft", "Streams at a fixed rate, per stream (ten content deltas each)", T),
             ("governed-max", "Governed lane, max req/s", ["gateway", "gateway-bare"]),
             ("reject", "Rejections, max req/s", list(d.get("reject", {}))),
             ("floor", "Floor lane: a fixed rate, open loop (loadgen)", FLOOR_TARGETS))
    for lane, title, keys in lanes:
        rows = d.get(lane, {})
        procs: list[str] = []
        for k in keys:
            for r in rows.get(k, []):
                procs += [n for n in r.get("cpu_us", {}) if n not in procs]
        if not procs:
            continue
        procs.sort(key=lambda n: n in ("mock", "load generator"))  # the target's own first
        L += [f"**{title}**", "", "| target | " + " | ".join(procs) + " | sum |",
              "|---" * (len(procs) + 2) + "|"]
        for k in keys:
            cs = [r["cpu_us"] for r in rows.get(k, []) if "cpu_us" in r]
            if cs:
                cells = [spread([c.get(n, float("nan")) for c in cs], ".1f") for n in procs]
                L.append(f"| {k} | {' | '.join(cells)} | {spread([sum(c.values()) for c in cs], '.1f')} |")
        L.append("")
    return L


def report(res: Results, out: Path, md: Path, load_before: str, plots: list[str]) -> None:
    """Writes the results file (markdown) and the raw figures next to it (json)."""
    p, T = res.profile, res.targets
    d = res.data
    L = [f"# Benchmark results {dt.date.today().isoformat()} ({p.name} profile)", ""]
    busy = max(float(load_before.split()[0]), float(loadavg().split()[0])) if load_before[:1].isdigit() else 0.0
    if busy > 1.5:
        L += [f"> **The machine was busy (load average up to {busy:.1f} on {os.cpu_count()} cores while this ran):",
              "> other work shared the cores with every target and the load generators, so absolute figures",
              "> and even ratios are noise.**", ""]
    if p.name != "full":
        L += ["> **Smoke run (`--quick`): a few seconds per lane, one run. These figures are NOT",
              "> measurements to quote; they only show that every lane runs.**", ""]
    L += machine(load_before, res.sidecar_threads, res.threads_asked, "litellm" in T) + [f"- runs per figure: {p.runs}; figures are median (min–max over runs)", ""]

    def added(lane_vals, target, key):
        base = [r[key] for r in lane_vals.get("direct", [])]
        mine = [r[key] for r in lane_vals.get(target, [])]
        return [m - b for m, b in zip(mine, base)]

    L += ["## Added latency at concurrency 1 (closed loop)", "",
          f"{p.c1_secs} s per run. Added = target − direct to the mock, per run.", "",
          "| target | p50 ms | p99 ms | added p50 ms | added p99 ms | req/s |", "|---|---|---|---|---|---|"]
    for t in T:
        rs = d.get("c1", {}).get(t, [])
        L.append(f"| {t} | {spread([r['p50'] for r in rs], '.3f')} | {spread([r['p99'] for r in rs], '.3f')} | "
                 f"{spread(added(d.get('c1', {}), t, 'p50'), '+.3f')} | {spread(added(d.get('c1', {}), t, 'p99'), '+.3f')} | "
                 f"{spread([r.get('achieved', float('nan')) for r in rs], '.0f')} |")

    L += ["", "## Throughput and the highest rate held", "",
          f"Max req/s: wrk -t2 -c{p.wrk_conns}, {p.wrk_secs} s, keep-alive. Held: the highest rate of the open-loop "
          f"sweep ({', '.join(map(str, p.rates))} req/s, {p.rate_secs} s each) reached within 5% with no errors "
          "and total p99 under the bound.", "",
          "| target | max req/s | × plain nginx | non-2xx | held p99<1 ms | held p99<5 ms | held p99<10 ms |",
          "|---|---|---|---|---|---|---|"]
    nginx_max = [r["rps"] for r in d.get("max", {}).get("nginx", [])]
    sweep = d.get("sweep", {})
    for t in T:
        rs = [r["rps"] for r in d.get("max", {}).get(t, [])]
        ratio = [a / b for a, b in zip(rs, nginx_max) if b]
        held = []
        for bound in (1.0, 5.0, 10.0):
            per_run = []
            for run in range(p.runs):
                best = 0
                for rate in p.rates:
                    vals = sweep.get(f"{t}@{rate}", [])
                    if run < len(vals):
                        r = vals[run]
                        if r.get("achieved", 0) >= 0.95 * rate and r["errors"] == 0 and r["p99"] <= bound:
                            best = rate
                per_run.append(best)
            held.append(spread(per_run, ".0f"))
        bad = [r["non2xx"] for r in d.get("max", {}).get(t, [])]
        L.append(f"| {t} | {spread(rs, '.0f')} | {spread(ratio, '.2f')} | {spread(bad, '.0f')} | {' | '.join(held)} |")

    L += ["", "## Fixed rate, open loop (latency from the scheduled send)", "",
          "Sends are paced by a thread on the kernel's high-resolution timer; `sends late p99` is how late the "
          "generator itself was (before 2026-12-01 tokio's 1 ms timer made it 0.5–1 ms late, which every figure "
          "here included).", "",
          "| target | rate | p50 ms | p99 ms | added p50 ms | added p99 ms | errors | sends late p99 ms |",
          "|---|---|---|---|---|---|---|---|"]
    for rate in (200, 1000):
        base = sweep.get(f"direct@{rate}", [])
        for t in T:
            rs = sweep.get(f"{t}@{rate}", [])
            if not rs:
                L.append(f"| {t} | {rate} | not reached (stopped lower in the sweep) | | | | | |")
                continue
            a50 = [r["p50"] - b["p50"] for r, b in zip(rs, base)]
            a99 = [r["p99"] - b["p99"] for r, b in zip(rs, base)]
            L.append(f"| {t} | {rate} | {spread([r['p50'] for r in rs], '.3f')} | {spread([r['p99'] for r in rs], '.3f')} | "
                     f"{spread(a50, '+.3f')} | {spread(a99, '+.3f')} | {spread([r['errors'] for r in rs], '.0f')} | "
                     f"{spread([r.get('late_p99', float('nan')) for r in rs], '.3f')} |")

    L += ["", "## Streaming: time to first content token and per-chunk delay", "",
          f"{p.ttft_rate} streams/s open loop, {p.ttft_secs} s; the mock sends a role chunk, then 10 content "
          "deltas 2 ms apart. TTFT is measured to the first *content* delta (the gateway holds the role chunk "
          "until its commit point). Per-chunk = (end of stream − first content) / further deltas.", "",
          "| target | TTFT p50 ms | TTFT p99 ms | added TTFT p50 ms | added TTFT p99 ms | per-chunk p50 ms | added per-chunk ms | errors |",
          "|---|---|---|---|---|---|---|---|"]
    for t in T:
        rs = d.get("ttft", {}).get(t, [])
        cs = d.get("chunk", {}).get(t, [])
        L.append(f"| {t} | {spread([r['p50'] for r in rs], '.3f')} | {spread([r['p99'] for r in rs], '.3f')} | "
                 f"{spread(added(d.get('ttft', {}), t, 'p50'), '+.3f')} | {spread(added(d.get('ttft', {}), t, 'p99'), '+.3f')} | "
                 f"{spread([r['p50'] for r in cs], '.3f')} | {spread(added(d.get('chunk', {}), t, 'p50'), '+.3f')} | "
                 f"{spread([r['errors'] for r in rs], '.0f')} |")

    L += ["", "## Concurrent streams sustained, with RSS", "",
          f"All streams opened at once and held {p.stream_hold} s (the mock sends one delta a second). "
          "Sustained = streams still open and healthy at the end. RSS: peak while held (MiB), "
          "per process group (nginx = master + workers).", "",
          "| target | streams | sustained | TTFB p99 ms | RSS idle → peak (MiB) |", "|---|---|---|---|---|"]
    for count in p.streams:
        for t in T:
            rs = d.get("streams", {}).get(f"{t}@{count}", [])
            if not rs:
                if t == "litellm":
                    L.append(f"| {t} | {count} | not run (past 1 000 Python streams on 2 cores only time out) | | |")
                continue
            procs = list(rs[0]["rss_peak"].keys()) or list(rs[0]["rss_idle"].keys())
            rss = "; ".join(f"{k} {spread([r['rss_idle'].get(k, float('nan')) for r in rs], '.0f')} → "
                            f"{spread([r['rss_peak'].get(k, float('nan')) for r in rs], '.0f')}" for k in procs)
            L.append(f"| {t} | {count} | {spread([r.get('sustained', 0) for r in rs], '.0f')} | "
                     f"{spread([r['p99'] for r in rs], '.1f')} | {rss} |")

    L += ["", "## Governed lane: keys, limits and usage on vs off", "",
          "`gateway` = keys checked, rpm counted in shared memory, X-RateLimit-* added, usage recorded. "
          "`gateway-bare` (diagnostic only) = the same nginx location with `afr off;` (no key check, no "
          "counters) and the secret set with `proxy_set_header X-Afr-Secret`, in front of a second sidecar "
          "whose sidecar.toml has `[usage] record = false` (no usage store at all).", "",
          "| target | max req/s | non-2xx | governed / bare | p50 ms @1000 | p99 ms @1000 | errors @1000 |",
          "|---|---|---|---|---|---|---|"]
    gm = d.get("governed-max", {})
    bare = [r["rps"] for r in gm.get("gateway-bare", [])]
    for t in ("gateway", "gateway-bare"):
        rs = [r["rps"] for r in gm.get(t, [])]
        ratio = [a / b for a, b in zip(rs, bare) if b]
        lat = d.get("governed-1000", {}).get(t, [])
        bad = [r["non2xx"] for r in gm.get(t, [])]
        L.append(f"| {t} | {spread(rs, '.0f')} | {spread(bad, '.0f')} | {spread(ratio, '.2f')} | "
                 f"{spread([r['p50'] for r in lat], '.3f')} | {spread([r['p99'] for r in lat], '.3f')} | "
                 f"{spread([r['errors'] for r in lat], '.0f')} |")

    L += ["", "## Rejection throughput", "",
          f"wrk -t2 -c{p.wrk_conns}, {p.wrk_secs} s. The gateway answers 401/429 in nginx's access phase.", "",
          "| answer | status seen | req/s | × nginx return 401 | share non-2xx |", "|---|---|---|---|---|"]
    rej = d.get("reject", {})
    base = [r["rps"] for r in rej.get("nginx return 401", [])]
    for k, rs in rej.items():
        v = [r["rps"] for r in rs]
        share = [r["non2xx"] / r["total"] for r in rs if r["total"]]
        seen = sorted({str(r.get("status", "?")) for r in rs})
        L.append(f"| {k} | {', '.join(seen)} | {spread(v, '.0f')} | {spread([a / b for a, b in zip(v, base) if b], '.2f')} | "
                 f"{spread(share, '.3f')} |")

    L += floor_table(d, p, getattr(res, "floor_threads", "?"))
    L += cpu_tables(d, T)

    s = d.get("soak")
    if s:
        first, last = s["points"][0], s["points"][-1]
        L += ["", "## RSS over a soak", "",
              f"The gateway at {s['rate']} req/s open loop for {s['secs']} s; RSS sampled throughout, slope by "
              "least squares after the first tenth (warm-up).", "",
              "| process | RSS start → end (MiB) | slope MB/hour |", "|---|---|---|",
              f"| nginx (master + workers) | {first[1]:.1f} → {last[1]:.1f} | {s['nginx_slope']:+.1f} |",
              f"| sidecar | {first[2]:.1f} → {last[2]:.1f} | {s['sidecar_slope']:+.1f} |"]
        if s["secs"] < 60:
            L.append("\n(A soak this short says nothing about leaks; the full profile runs 5 minutes.)")

    if plots:
        L += ["", "## Plots", ""] + [f"![{Path(x).stem}]({Path(x).name})" for x in plots]
    if res.notes:
        L += ["", "## Notes", ""] + [f"- {n}" for n in res.notes]
    L += ["", "Rerun: `scripts/bench` (full, about 30 minutes) or `scripts/bench --quick` (smoke).", ""]
    md.write_text("\n".join(L))
    (out / f"{md.stem}.json").write_text(json.dumps({"profile": p.name, "targets": T, "data": d},
                                                    indent=1, default=str))


def plot(res: Results, out: Path, stem: str) -> list[str]:
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    # 1. latency CDF per target at concurrency 1.
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for t in res.targets:
        path = res.samples.get(t)
        if not path or not Path(path).exists():
            continue
        xs = sorted(int(x) / 1000 for x in Path(path).read_text().split())
        if xs:
            ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=t)
    ax.set_xscale("log")
    ax.set_xlabel("latency, ms (log)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("Latency CDF at concurrency 1 (non-streaming chat)")
    ax.grid(alpha=0.3)
    ax.legend()
    f = out / f"{stem}-latency-cdf.png"
    fig.tight_layout()
    fig.savefig(f, dpi=110)
    plt.close(fig)
    made.append(str(f))

    # 2. added p50/p99 vs rate.
    fig, ax = plt.subplots(figsize=(7, 4.2))
    sweep = res.data.get("sweep", {})
    for t in res.targets:
        if t == "direct":
            continue
        xs, y50, y99 = [], [], []
        for rate in res.profile.rates:
            mine, base = sweep.get(f"{t}@{rate}", []), sweep.get(f"direct@{rate}", [])
            if mine and base:
                xs.append(rate)
                y50.append(med([m["p50"] - b["p50"] for m, b in zip(mine, base)]))
                y99.append(med([m["p99"] - b["p99"] for m, b in zip(mine, base)]))
        if xs:
            line = ax.plot(xs, y99, marker="o", label=f"{t} p99")[0]
            ax.plot(xs, y50, marker=".", linestyle="--", color=line.get_color(), label=f"{t} p50")
    ax.set_xscale("log")
    # symlog: LiteLLM's seconds and the gateway's fractions of a millisecond on one plot.
    ax.set_yscale("symlog", linthresh=1.0)
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("offered rate, req/s (open loop, log)")
    ax.set_ylabel("added latency vs direct, ms")
    ax.set_title("Added latency vs rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    f = out / f"{stem}-added-latency-vs-rate.png"
    fig.tight_layout()
    fig.savefig(f, dpi=110)
    plt.close(fig)
    made.append(str(f))

    # 3. concurrent streams vs RSS.
    fig, ax = plt.subplots(figsize=(7, 4.2))
    streams = res.data.get("streams", {})
    for t in res.targets:
        series: dict[str, tuple[list, list]] = {}
        for count in res.profile.streams:
            runs = streams.get(f"{t}@{count}", [])
            if not runs:
                continue
            for proc in runs[0]["rss_peak"]:
                xs, ys = series.setdefault(proc, ([], []))
                xs.append(count)
                ys.append(med([r["rss_peak"].get(proc, float("nan")) for r in runs]))
        for proc, (xs, ys) in series.items():
            ax.plot(xs, ys, marker="o", label=f"{t}: {proc}")
    ax.set_xscale("log")
    ax.set_xlabel("concurrent streams (log)")
    ax.set_ylabel("peak RSS, MiB")
    ax.set_title("Concurrent streams vs RSS")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    f = out / f"{stem}-streams-rss.png"
    fig.tight_layout()
    fig.savefig(f, dpi=110)
    plt.close(fig)
    made.append(str(f))
    return made


LANES = ["c1", "max", "sweep", "ttft", "streams", "governed", "reject", "soak", "floor"]


def build_floor() -> bool:
    """Builds afr-bench-floor (bench/floor; scripts/bench builds the rest), a no-op when it
    is up to date; without cargo, the binary already built will do."""
    if shutil.which("cargo"):
        r = subprocess.run(["cargo", "build", "--release", "-q", "-p", "afr-bench-floor"], cwd=REPO)
        if r.returncode != 0:
            print("bench: building afr-bench-floor failed", file=sys.stderr)
            return False
    if not FLOOR.exists():
        print(f"bench: {FLOOR} is missing: cargo build --release -p afr-bench-floor", file=sys.stderr)
        return False
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few seconds per lane, one run (smoke check)")
    ap.add_argument("--no-litellm", action="store_true", help="leave LiteLLM out")
    ap.add_argument("--out", type=Path, default=REPO / "bench/results", help="results directory")
    ap.add_argument("--name", help="results file stem (default: the date, -quick for --quick)")
    ap.add_argument("--runs", type=int, help="override the runs per figure")
    ap.add_argument("--sidecar-threads", type=int, help="the sidecars' worker threads (afr serve --threads)")
    ap.add_argument("--floor-rate", type=int, help="the floor lane's fixed rate, req/s (default: 2000, "
                    "--quick 200); keep it well under every target's maximum")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--lanes", default=",".join(LANES),
                    help=f"comma-separated lanes to run (default all: {','.join(LANES)}); plots need all")
    a = ap.parse_args()
    chosen = set(a.lanes.split(","))
    if not chosen <= set(LANES):
        ap.error(f"--lanes: unknown lane(s) {', '.join(sorted(chosen - set(LANES)))}; the lanes are {', '.join(LANES)}")

    profile = QUICK if a.quick else FULL
    if a.runs:
        profile.runs = max(1, min(a.runs, 10))
    if a.floor_rate:
        profile.floor_rate = max(1, a.floor_rate)
    with_litellm = not a.no_litellm
    if with_litellm and not LITELLM.exists():
        print(f"bench: {LITELLM} is missing; scripts/bench installs it (or pass --no-litellm)", file=sys.stderr)
        return 2
    for path in (LOADGEN, AFR, MOCK, MODULE):
        if not path.exists():
            print(f"bench: {path} is missing; run scripts/bench, which builds it", file=sys.stderr)
            return 2
    # 10 000 streams through nginx and the sidecar need about 20 000 descriptors each.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if "floor" in chosen and not build_floor():
        return 2
        if hard < 25000 and max(profile.streams) > 5000:
            print(f"bench: the open-file limit is {hard}; 10 000 streams need ~25 000", file=sys.stderr)

    a.out.mkdir(parents=True, exist_ok=True)
    stem = a.name or (dt.date.today().isoformat() + ("-quick" if a.quick else ""))
    load_before = loadavg()
    targets = ["direct", "nginx", "gateway"] + (["litellm"] if with_litellm else [])
    res = Results(profile, targets, threads_asked=a.sidecar_threads is not None)
    home = Path(tempfile.mkdtemp(prefix="afr-bench-"))
    os.chmod(home, 0o755)
    st = Stack(home, with_litellm, a.sidecar_threads, with_floor="floor" in chosen)
    started = time.monotonic()
    try:
        log(f"starting the targets in {home}")
        st.start()
        res.sidecar_threads = st.threads_started
        res.floor_threads = getattr(st, "floor_threads", "?")
        work = Path(tempfile.mkdtemp(prefix="samples-", dir=home))
        previous = None  # the lane run last, for settle()'s note
        for run in range(profile.runs):
            lanes = [("c1", "concurrency 1", lambda: lane_c1(st, res, run, work)),
                     ("max", "max req/s", lambda: lane_max(st, res, run)),
                     ("sweep", "open-loop rate sweep", lambda: lane_sweep(st, res, run)),
                     ("ttft", "streaming TTFT", lambda: lane_ttft(st, res, run)),
                     ("streams", "concurrent streams", lambda: lane_streams(st, res, run)),
                     ("governed", "governed lane", lambda: lane_governed(st, res, run)),
                     ("reject", "rejections", lambda: lane_reject(st, res, run)),
                     ("floor", "floor lane (fixed rate)", lambda: lane_floor(st, res, run))]
            for key, name, lane in lanes:
                if key not in chosen:
                    continue
                settle(st, res, run, previous)
                log(f"run {run + 1}/{profile.runs}: {name}")
                lane()
                previous = name
        if "soak" in chosen:
            settle(st, res, profile.runs - 1, previous)
            log(f"soak ({profile.soak_secs} s)")
            lane_soak(st, res, work)
        if chosen != set(LANES):
            res.notes.append(f"lanes run: {', '.join(l for l in LANES if l in chosen)} (--lanes); the others' "
                             "tables are empty")
        plots = [] if a.no_plots or chosen != set(LANES) else plot(res, a.out, stem)
        res.notes.append(f"whole run took {time.monotonic() - started:.0f} s")
        md = a.out / f"{stem}.md"
        report(res, a.out, md, load_before, plots)
        log(f"wrote {md}")
        print(md)
    finally:
        st.stop()
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
