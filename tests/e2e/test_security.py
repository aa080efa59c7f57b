"""Security checks through the whole stack (design §7).

- No secret (client keys, the provider key, the nginx -> sidecar shared secret) in any
  log file, in /metrics, or in any response (headers and body) after a mixed workload:
  successes, streams, validation errors, unknown and over-limit keys, provider
  failures whose error bodies name a key.
- The client's Authorization never reaches a provider; the provider gets only its
  configured key, and never the shared secret.
- The sidecar refuses anything that did not come through nginx: no or a wrong
  X-Afr-Secret, on its unix socket and on a loopback TCP listener.
- Keys at rest are SHA-256 hashes only; file modes after `scripts/run` and `afr key`.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import socket
import stat
import subprocess
import time
import tomllib

import pytest

from conftest import AFR, KEY_RE, free_port, runtime_dir, start_gateway
from conftest import http as http_call
from test_faults import write_config

PROVIDER_ENV = "AFR_SECURITY_PROVIDER_KEY"
PROVIDER_KEY = "sk-proj-SECURITYCHECK" + "p" * 40
MESSAGES = [{"role": "user", "content": "is my key safe"}]


@pytest.fixture(scope="module")
def sec():
    home = runtime_dir("security")
    gw, out = start_gateway(home, {PROVIDER_ENV: PROVIDER_KEY})
    gw.original_config = (home / "sidecar.toml").read_text()
    gw.run_output = out.stdout
    # Modes as scripts/run left them (the config is rewritten below).
    gw.modes_after_run = {n: mode(home / n) for n in ("upstream-secret", "upstream-secret.conf", "sidecar.toml",
                                                      "keys.toml", "usage.db", "sidecar.sock")}
    # A provider that requires its key, and one configured with a wrong key whose
    # 401 body names that key the way OpenAI's does.
    gw.provider = gw.start_mock("--api-key", PROVIDER_KEY)
    gw.wrong = gw.start_mock("--api-key", "sk-some-other-key")

    def mutate(cfg):
        cfg["providers"]["keyed"] = {"kind": "openai", "base_url": gw.provider + "/v1", "api_key_env": PROVIDER_ENV}
        cfg["providers"]["wrongkey"] = {"kind": "openai", "base_url": gw.wrong + "/v1", "api_key_env": PROVIDER_ENV}
        cfg["models"]["gpt-4o-mini"]["routes"] = [{"provider": "keyed", "model": "gpt-4o-mini"}]
        cfg["models"]["gpt-5-mini"]["routes"] = [{"provider": "wrongkey", "model": "gpt-5-mini"}]

    write_config(gw, mutate)
    gw.key = gw.new_key("sec-main", "--rpm", "100000")
    gw.tight_key = gw.new_key("sec-tight", "--rpm", "2")
    deadline = time.monotonic() + 5
    while not gw.mock_requests(gw.provider):
        assert time.monotonic() < deadline, "config with the keyed provider not loaded"
        chat(gw, gw.key, {"model": "gpt-4o-mini", "messages": MESSAGES})
        time.sleep(0.1)
    yield gw
    gw.stop()
    shutil.rmtree(home, ignore_errors=True)


def chat(gw, key: str | None, body, stream: bool = False, headers: dict | None = None):
    h = {"Content-Type": "application/json", **(headers or {})}
    if key:
        h["Authorization"] = f"Bearer {key}"
    data = body if isinstance(body, bytes) else json.dumps(dict(body, stream=stream)).encode()
    return http_call("POST", gw.base + "/v1/chat/completions", data, h)


def secrets(gw) -> dict[str, str]:
    out = {
        "client key": gw.key,
        "tight client key": gw.tight_key,
        "provider key": PROVIDER_KEY,
        "upstream secret": (gw.home / "upstream-secret").read_text().strip(),
    }
    demo = KEY_RE.search(gw.run_output)
    if demo:
        out["demo key"] = demo.group(0)
    return out


def test_no_secret_in_logs_metrics_or_responses(sec):
    gw = sec
    fake = "afr_" + "Z" * 40  # well-formed, unknown
    responses = []
    for key, body, stream in [
        (gw.key, {"model": "gpt-4o-mini", "messages": MESSAGES}, False),
        (gw.key, {"model": "gpt-4o-mini", "messages": MESSAGES}, True),
        (gw.key, {"model": "gpt-5-mini", "messages": MESSAGES}, False),  # provider 401 -> 500
        (gw.key, {"model": "gpt-5-mini", "messages": MESSAGES}, True),
        (gw.key, {"model": "gpt-4o-mini", "messages": "not a list"}, False),  # 400
        (gw.key, {"model": "no-such-model", "messages": MESSAGES}, False),  # 400
        (gw.key, b'{"model": "gpt-4o-mini", "messages": [', False),  # bad JSON
        (fake, {"model": "gpt-4o-mini", "messages": MESSAGES}, False),  # 401
        (gw.key + "x", {"model": "gpt-4o-mini", "messages": MESSAGES}, False),  # 401
        (None, {"model": "gpt-4o-mini", "messages": MESSAGES}, False),  # 401
    ] + [(gw.tight_key, {"model": "gpt-4o-mini", "messages": MESSAGES}, False)] * 4:  # 429s
        responses.append(chat(gw, key, body, stream))
    statuses = sorted({s for s, _, _ in responses})
    assert {200, 400, 401, 429, 500} <= set(statuses), statuses
    # The key itself is echoed nowhere, even where the client sent it wrong.
    for status, headers, body in responses:
        blob = body.decode("utf-8", "replace") + "\n" + "\n".join(f"{k}: {v}" for k, v in headers.items())
        for what, value in secrets(gw).items():
            assert value not in blob, f"{what} in a {status} response"
        assert fake not in blob
        # The provider's own credential error (it names its key, redacted) is not relayed.
        assert "not-a-re" not in blob and "sk-some-other" not in blob
    admin = tomllib.loads(gw.original_config)["admin"]["listen"]
    _, _, metrics = http_call("GET", f"http://{admin}/metrics")
    assert b"afr_" in metrics
    files = {"/metrics": metrics.decode()}
    time.sleep(0.5)  # the sidecar's and nginx's last log lines
    for path in (gw.home / "logs").iterdir():
        files[str(path)] = path.read_text(errors="replace")
    assert any("nginx-error" in f for f in files) and any("sidecar" in f for f in files), list(files)
    for name, text in files.items():
        for what, value in secrets(gw).items():
            assert value not in text, f"{what} in {name}"
        assert fake not in text, f"a client's unknown key in {name}"
        # Not even a prefix long enough to narrow a key down.
        assert gw.key[:16] not in text, f"a prefix of the client key in {name}"


def test_client_authorization_never_reaches_the_provider(sec):
    gw = sec
    gw.clear_mock_requests(gw.provider)
    assert chat(gw, gw.key, {"model": "gpt-4o-mini", "messages": MESSAGES})[0] == 200
    assert chat(gw, gw.key, {"model": "gpt-4o-mini", "messages": MESSAGES}, stream=True)[0] == 200
    # Headers a client might try to smuggle through to the provider or the sidecar.
    status, _, _ = chat(gw, gw.key, {"model": "gpt-4o-mini", "messages": MESSAGES},
                        headers={"X-Afr-Key-Id": "someone-else", "X-Api-Key": gw.key, "Api-Key": gw.key})
    assert status == 200
    reqs = gw.mock_requests(gw.provider)
    assert len(reqs) == 3
    upstream_secret = secrets(gw)["upstream secret"]
    for r in reqs:
        h = {k.lower(): v for k, v in r["headers"].items()}
        assert h["authorization"] == f"Bearer {PROVIDER_KEY}", h
        flat = json.dumps(r)
        assert gw.key not in flat and gw.key[:16] not in flat
        assert upstream_secret not in flat
        assert not any(k.startswith("x-afr") for k in h), h
    # Usage is attributed to the key nginx authenticated, not the client's header.
    out = gw.afr("usage", "--config", str(gw.home / "sidecar.toml"), "--key", "someone-else", "--json")
    assert json.loads(out.stdout)["data"] == []


def unix_socket(path: str):
    def connect() -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(path)
        return s
    return connect


def tcp_socket(port: int):
    return lambda: socket.create_connection(("127.0.0.1", port), timeout=10)


def direct(s: socket.socket, secret: str | None, key_id: str = "sec-main") -> tuple[int, bytes]:
    """One request straight to the sidecar, written in one piece: the sidecar may answer
    401 and close before reading a body sent separately."""
    body = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES}).encode()
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += f"X-Afr-Key-Id: {key_id}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
    if secret is not None:
        head += f"X-Afr-Secret: {secret}\r\n"
    with s:
        s.sendall(head.encode() + b"\r\n" + body)
        reply = b""
        try:
            while chunk := s.recv(65536):
                reply += chunk
        except ConnectionResetError:
            pass
    response = http.client.HTTPResponse(FakeSock(reply))
    response.begin()
    return response.status, response.read()


class FakeSock:
    def __init__(self, data: bytes):
        self.data = data

    def makefile(self, *_a, **_k):
        import io
        return io.BytesIO(self.data)


def assert_refuses_without_the_secret(connect, secret: str) -> None:
    for sent in (None, "", "wrong-secret-of-enough-length", secret[:-1], secret + "x", secret.upper()):
        if sent == secret:
            continue
        status, body = direct(connect(), sent)
        assert status == 401, (sent, status, body)
        assert json.loads(body)["error"]["code"] == "invalid_api_key"
        assert secret not in body.decode()
    # Positive control: with the secret the same request is served.
    status, body = direct(connect(), secret)
    assert status == 200, body


def test_sidecar_refuses_requests_that_bypass_nginx_on_its_socket(sec):
    gw = sec
    sock = str(gw.home / "sidecar.sock")
    assert stat.S_ISSOCK(os.stat(sock).st_mode)
    assert_refuses_without_the_secret(unix_socket(sock), secrets(gw)["upstream secret"])


def test_sidecar_refuses_requests_that_bypass_nginx_on_tcp(sec):
    gw = sec
    cfg_text = (gw.home / "sidecar.toml").read_text()
    port = free_port()
    cfg_text = cfg_text.replace(f'listen = "unix:{gw.home}/sidecar.sock"', f'listen = "127.0.0.1:{port}"')
    cfg_text = cfg_text.replace(f'path = "{gw.home}/usage.db"', f'path = "{gw.home}/usage-tcp.db"')
    admin = tomllib.loads(cfg_text)["admin"]["listen"]
    cfg_text = cfg_text.replace(f'listen = "{admin}"', 'listen = ""')
    conf = gw.home / "sidecar-tcp.toml"
    conf.write_text(cfg_text)
    p = subprocess.Popen([str(AFR), "serve", "--config", str(conf)], env=gw.env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert p.poll() is None, p.stderr.read().decode()
                assert time.monotonic() < deadline, "afr serve did not listen on TCP"
                time.sleep(0.05)
        assert_refuses_without_the_secret(tcp_socket(port), secrets(gw)["upstream secret"])
    finally:
        p.terminate()
        p.wait(15)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_keys_at_rest_are_hashes_only_and_file_modes(sec):
    gw = sec
    text = gw.keys_file.read_text()
    assert not KEY_RE.search(text), "a plaintext key in keys.toml"
    hashes = {k["id"]: k["hash"] for k in tomllib.loads(text)["key"]}
    for kid, key in (("sec-main", gw.key), ("sec-tight", gw.tight_key)):
        assert hashes[kid] == "sha256:" + hashlib.sha256(key.encode()).hexdigest()
    # Files holding secrets are the owner's alone (scripts/run writes them 0600).
    modes = gw.modes_after_run
    for name in ("upstream-secret", "upstream-secret.conf", "sidecar.toml"):
        assert modes[name] == 0o600, (name, oct(modes[name]))
    # The socket has the configured socket_mode.
    want = int(tomllib.loads(gw.original_config)["server"].get("socket_mode", "0660"), 8)
    assert modes["sidecar.sock"] == want == mode(gw.home / "sidecar.sock")
    # Nothing the gateway writes is writable by others; keys.toml and usage.db hold no secret.
    for name in ("keys.toml", "usage.db"):
        assert modes[name] & 0o022 == 0, (name, oct(modes[name]))
    # `afr key` keeps the file's mode when it rewrites it (a 0640 root:www-data file stays so).
    os.chmod(gw.keys_file, 0o640)
    gw.afr("key", "new", "--id", "sec-mode", "--name", "mode check", "--file", str(gw.keys_file))
    assert mode(gw.keys_file) == 0o640
    gw.afr("key", "disable", "sec-mode", "--file", str(gw.keys_file))
    assert mode(gw.keys_file) == 0o640
    assert not KEY_RE.search(gw.keys_file.read_text())
    os.chmod(gw.keys_file, 0o644)
    # A new keys file made by `afr key new` is not writable by others either.
    fresh = gw.home / "fresh-keys.toml"
    out = gw.afr("key", "new", "--id", "fresh", "--name", "fresh", "--file", str(fresh))
    assert KEY_RE.search(out.stdout) and not KEY_RE.search(fresh.read_text())
    assert mode(fresh) & 0o022 == 0, oct(mode(fresh))
