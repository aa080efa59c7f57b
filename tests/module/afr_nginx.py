"""Helpers for ngx_http_afr_module tests and benchmarks against real nginx.

Every test runs against both builds: Debian's /usr/sbin/nginx with
build/system/libngx_http_afr_module.so, and build/vendored/nginx with its own
.so (scripts/build-module system|vendored). A flavour is skipped only when its
build artifact is missing.

Each gateway is a private nginx (own prefix, pid, temp paths, error log, a
free port) in front of a tiny threaded upstream that echoes the request
headers as JSON, can answer 500 and can stream SSE.
"""

import hashlib
import http.client
import json
import os
import secrets
import signal
import socket
import string
import subprocess
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
FLAVOURS = {
    "system": (Path("/usr/sbin/nginx"), ROOT / "build/system/libngx_http_afr_module.so"),
    "vendored": (ROOT / "build/vendored/nginx", ROOT / "build/vendored/libngx_http_afr_module.so"),
}
UPSTREAM_SECRET = "test-secret-123"
BASE62 = string.ascii_letters + string.digits


def new_token():
    return "afr_" + "".join(secrets.choice(BASE62) for _ in range(40))


def sha(token):
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


class Key:
    """A key entry: the secret plus the fields written to keys.toml."""

    def __init__(self, id, rpm=None, enabled=True, expires=None, models=None, token=None, max_concurrent=None):
        self.id = id
        self.max_concurrent = max_concurrent
        self.token = token or new_token()
        self.rpm = rpm
        self.enabled = enabled
        self.expires = expires
        self.models = models

    @property
    def auth(self):
        return {"Authorization": f"Bearer {self.token}"}

    def toml(self):
        lines = ["[[key]]", f'id = "{self.id}"', f'name = "test key {self.id}"', f'hash = "{sha(self.token)}"']
        if self.rpm is not None:
            lines.append(f"rpm = {self.rpm}")
        if self.max_concurrent is not None:
            lines.append(f"max_concurrent = {self.max_concurrent}")
        lines.append(f"enabled = {'true' if self.enabled else 'false'}")
        if self.expires:
            lines.append(f'expires = "{self.expires}"')
        if self.models is not None:
            lines.append("models = [" + ", ".join(f'"{m}"' for m in self.models) + "]")
        return "\n".join(lines) + "\n"


def keys_toml(keys, default_rpm=60):
    return f"[defaults]\nrpm = {default_rpm}\n\n" + "\n".join(k.toml() for k in keys)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EchoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Every path the upstream was asked for, in order (tests check what was forwarded).
    seen: list[str] = []

    def log_message(self, *args):
        pass

    def _body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def do_GET(self):
        self._body()
        path = self.path
        EchoHandler.seen.append(path)
        if path.endswith("/sse"):
            return self._sse()
        if path.endswith("/hold"):
            return self._hold()
        if path.endswith("/drop"):
            return self._drop()
        status = 500 if path.endswith("/500") else 200
        body = json.dumps({"path": path, "headers": [[k, v] for k, v in self.headers.items()]}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if path.endswith("/spoof"):
            self.send_header("X-RateLimit-Limit", "999999")
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def _hold(self):
        """A slow stream: an event every 100 ms for up to 30 s, until the
        other side goes away (a request that stays in flight)."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for i in range(300):
                chunk = f"data: {{\"n\": {i}}}\n\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
                time.sleep(0.1)
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass
        self.close_connection = True

    def _drop(self):
        """Headers and half a body, then the connection is dropped: nginx
        sees the upstream fail mid-response."""
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "100")
        self.end_headers()
        self.wfile.write(b'{"partial":')
        self.wfile.flush()
        self.close_connection = True

    def _sse(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i in range(3):
            chunk = f"data: {{\"n\": {i}}}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.flush()
            time.sleep(0.05)
        done = b"data: [DONE]\n\n"
        self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
        self.wfile.flush()


class Gateway:
    """A private nginx with the module loaded."""

    def __init__(
        self,
        flavour,
        prefix,
        upstream_port,
        keys,
        workers=2,
        default_rpm=60,
        zone="1m",
        extra_http="",
        extra_server="",
        reload_interval="200ms",
        user=None,
        extra_main="",
        env=None,
    ):
        self.name, self.nginx, self.module = flavour
        self.prefix = Path(prefix)
        self.port = free_port()
        self.upstream_port = upstream_port
        self.workers = workers
        self.zone = zone
        self.extra_http = extra_http
        self.extra_server = extra_server
        self.reload_interval = reload_interval
        self.user = user
        self.extra_main = extra_main
        self.env = env
        self.keys_path = self.prefix / "keys.toml"
        self.error_log = self.prefix / "error.log"
        self.proc = None
        (self.prefix / "html/errors").mkdir(parents=True, exist_ok=True)
        (self.prefix / "html/errors/500.json").write_text('{"error":{"message":"upstream failed"}}')
        self.write_keys(keys, default_rpm)
        self.conf = self.prefix / "nginx.conf"
        self.conf.write_text(self.render())

    def write_keys(self, keys, default_rpm=60):
        text = keys if isinstance(keys, str) else keys_toml(keys, default_rpm)
        tmp = self.keys_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.keys_path)

    def render(self):
        p = self.prefix
        user = f"user {self.user};" if self.user else "user root root;" if os.geteuid() == 0 else ""
        temps = " ".join(f"{t}_temp_path {p}/{t};" for t in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        return f"""
load_module {self.module};
{user}
daemon off;
master_process on;
worker_processes {self.workers};
pid {p}/nginx.pid;
{self.extra_main}
error_log {self.error_log} notice;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    {temps}
    afr_keys {self.keys_path};
    afr_zone afr:{self.zone};
    afr_reload_interval {self.reload_interval};
    upstream backend {{ server 127.0.0.1:{self.upstream_port}; keepalive 16; }}
    {self.extra_http}
    server {{
        listen 127.0.0.1:{self.port} reuseport;
        afr on;
        afr_upstream_secret "{UPSTREAM_SECRET}";
        {self.extra_server}
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_buffering off;
        location / {{ proxy_pass http://backend; }}
        location /intercept/ {{
            proxy_pass http://backend;
            proxy_intercept_errors on;
            error_page 500 /errors/500.json;
        }}
        location /errors/ {{ internal; afr off; root {p}/html; }}
        location /open/ {{ afr off; proxy_pass http://backend; }}
        location = /static {{ afr off; return 200 "static\\n"; }}
    }}
}}
"""

    def run(self, *args):
        return subprocess.run(
            [str(self.nginx), "-p", str(self.prefix), "-c", str(self.conf), "-e", str(self.error_log), *args],
            capture_output=True,
            text=True,
            timeout=30,
        )

    def start(self):
        self.proc = subprocess.Popen(
            [str(self.nginx), "-p", str(self.prefix), "-c", str(self.conf), "-e", str(self.error_log)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {self.proc.stdout.read().decode()}\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("nginx did not start listening")

    def reload(self):
        """`nginx -s reload` and wait until a new generation of workers serves."""
        before = self.worker_pids()
        r = self.run("-s", "reload")
        assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            now = self.worker_pids()
            if now and not (now & before) and len(now) == self.workers:
                return
            time.sleep(0.05)
        raise AssertionError(f"workers did not restart: {before} -> {self.worker_pids()}")

    def worker_pids(self):
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True, text=True)
        return {int(x) for x in out.stdout.split()}

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self):
        return self.error_log.read_text(errors="replace") if self.error_log.exists() else ""

    def assert_no_crash(self):
        log = self.log()
        for bad in ("exited on signal", "signal 11", "signal 6", "panicked"):
            assert bad not in log, f"{bad!r} in error log:\n{log}"

    def request(self, path="/", headers=None, method="GET", timeout=10):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, headers=headers or {})
            resp = conn.getresponse()
            return Response(resp.status, resp.getheaders(), resp.read())
        finally:
            conn.close()

    def raw(self, data, timeout=5):
        """Sends raw bytes, returns the status code of the reply (0 if none)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(data)
            buf = b""
            while b"\r\n" not in buf:
                chunk = s.recv(4096)
                if not chunk:
                    break
                buf += chunk
        return int(buf.split(b" ", 2)[1]) if buf.startswith(b"HTTP/") else 0


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name):
        vals = self.all(name)
        return vals[0] if vals else None

    def all(self, name):
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self):
        return json.loads(self.body)

    def upstream_headers(self):
        """Headers the upstream received, as a list of (name, value)."""
        return [tuple(h) for h in self.json()["headers"]]


def wait_for(pred, timeout, interval=0.05):
    """Polls `pred` until true or `timeout` seconds pass; returns the last value."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(interval)
