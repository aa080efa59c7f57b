"""The module stays exact when clients expect 100-continue, files change
mid-write or become readable late, workers die, and helper processes run
(issue 9)."""

import json
import os
import re
import shutil
import signal
import socket
import tempfile
import time
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest

from afr_nginx import ROOT as REPO, Gateway, Key, keys_toml, wait_for

RELOAD_WITHIN = 2.0


def expect_continue_status(gw, auth=None, length=5000):
    """Sends a POST's headers with `Expect: 100-continue` and no body yet, as
    curl does for bodies over 1 KiB; returns the first status nginx sends."""
    lines = [
        "POST / HTTP/1.1",
        "Host: localhost",
        f"Content-Length: {length}",
        "Expect: 100-continue",
    ]
    if auth:
        lines.append(f"Authorization: {auth}")
    return gw.raw(("\r\n".join(lines) + "\r\n\r\n").encode())


def test_refusals_send_no_100_continue(gateway):
    good, off = Key("good", rpm=1), Key("off", enabled=False)
    gw = gateway([good, off])
    assert expect_continue_status(gw) == 401
    assert expect_continue_status(gw, "Bearer afr_" + "x" * 40) == 401
    assert expect_continue_status(gw, f"Bearer {off.token}") == 403
    # An admitted request is invited to send its body, as before.
    assert expect_continue_status(gw, f"Bearer {good.token}") == 100
    assert expect_continue_status(gw, f"Bearer {good.token}") == 429


@pytest.fixture
def own_gateway(flavour, upstream):
    """Factory for gateways in a world-traversable directory of their own
    (pytest's temp dirs are 0700), stopped and removed afterwards."""
    made = []
    root = Path(tempfile.mkdtemp(prefix="afr-exact-"))
    root.chmod(0o755)

    def make(keys, **kw):
        prefix = root / f"gw{len(made)}"
        prefix.mkdir()
        gw = Gateway(flavour, prefix, upstream, keys, **kw)
        made.append(gw)
        return gw

    yield make
    for gw in made:
        gw.stop()
    shutil.rmtree(root, ignore_errors=True)


def test_respawned_worker_reads_the_keys_file_at_start(own_gateway):
    old, new = Key("old"), Key("new")
    # An interval far longer than the test: only a check at start can help.
    gw = own_gateway([old], workers=1, reload_interval="60s").start()
    assert gw.request("/", old.auth).status == 200
    gw.write_keys([new])
    (victim,) = gw.worker_pids()
    os.kill(victim, signal.SIGKILL)
    assert wait_for(lambda: len(gw.worker_pids() - {victim}) == 1, 10), gw.log()
    assert gw.request("/", old.auth).status == 401
    assert gw.request("/", new.auth).status == 200
    assert "loaded 1 keys at worker start" in gw.log()
    log = gw.log().replace(f"{victim} exited on signal 9", "")
    assert "exited on signal" not in log and "panicked" not in log, log


def test_keys_file_readable_only_later_is_read_then(own_gateway):
    """A keys file replaced as root-only 0600 (workers can stat, not read it),
    then `chmod 644`: chmod changes no part of the stamp, so only retrying
    after the failed read picks it up. Workers run as an unprivileged user
    (root reads anything); without root, mode 000 fails the read the same way."""
    old, new = Key("old"), Key("new")
    root = os.geteuid() == 0
    gw = own_gateway([old], user="nobody nogroup" if root else None).start()
    assert gw.request("/", old.auth).status == 200
    tmp = gw.keys_path.with_suffix(".tmp")
    tmp.write_text(keys_toml([new]))
    tmp.chmod(0o600 if root else 0)
    os.replace(tmp, gw.keys_path)
    assert wait_for(lambda: "cannot read keys file" in gw.log(), RELOAD_WITHIN + 1), gw.log()
    assert "Permission denied" in gw.log()
    assert gw.request("/", old.auth).status == 200  # the previous keys stay
    gw.keys_path.chmod(0o644)
    assert wait_for(lambda: gw.request("/", new.auth).status == 200, RELOAD_WITHIN), gw.log()
    # Every worker retries on its own: each must have the new table within the
    # same bound (one may have it a moment before another on a busy machine).
    assert wait_for(
        lambda: {gw.request("/", old.auth).status for _ in range(10)} == {401}, RELOAD_WITHIN
    ), gw.log()
    # A lasting failure is logged once per version of the file, not per tick.
    assert gw.log().count("cannot read keys file") == 2  # once per worker
    gw.assert_no_crash()


def test_truncate_then_write_never_serves_an_empty_table(gateway):
    """`cat > keys.toml` or an editor writing in place: the file is empty for
    a moment, and an empty file is valid. Keys must keep working through it."""
    a, b, c = Key("a"), Key("b"), Key("c")
    gw = gateway([a, b])
    with open(gw.keys_path, "r+") as f:
        f.truncate(0)
        f.flush()
        # Longer than a tick (200 ms) plus a parse: an unguarded watcher
        # takes the empty table in this time.
        statuses = []
        deadline = time.monotonic() + 0.6
        while time.monotonic() < deadline:
            statuses.append(gw.request("/", a.auth).status)
            time.sleep(0.02)
        f.write(keys_toml([a, c]))
    assert set(statuses) == {200}, (statuses, gw.log())
    assert wait_for(lambda: gw.request("/", c.auth).status == 200, RELOAD_WITHIN), gw.log()
    assert wait_for(lambda: gw.request("/", b.auth).status == 401, RELOAD_WITHIN), gw.log()
    assert {gw.request("/", a.auth).status for _ in range(10)} == {200}
    assert "loaded 0 keys" not in gw.log()


def test_emptying_the_keys_file_on_purpose_takes_effect(gateway):
    a = Key("a")
    gw = gateway([a])
    gw.write_keys("")
    # EMPTY_SETTLE (1 s) after the first tick that sees it, plus a tick.
    assert wait_for(lambda: gw.request("/", a.auth).status == 401, 1.0 + 3 * 0.2 + 1.0), gw.log()
    assert "loaded 0 keys" in gw.log()


def test_helper_processes_start_no_watcher(own_gateway):
    """The cache manager and loader run init_process too; they must not watch
    the keys file (a watcher's log lines carry its process's pid)."""
    a, b = Key("a"), Key("b")
    gw = own_gateway([a], workers=1)
    gw.extra_http = f"proxy_cache_path {gw.prefix}/cache keys_zone=c:1m;"
    gw.conf.write_text(gw.render())
    gw.start()
    # The worker plus the cache manager and loader.
    assert wait_for(lambda: len(gw.worker_pids()) == 3, 5), gw.worker_pids()
    gw.write_keys([a, b])
    assert wait_for(lambda: gw.request("/", b.auth).status == 200, RELOAD_WITHIN), gw.log()
    time.sleep(0.6)  # three more ticks: time for any other watcher to log too
    loaded = [line for line in gw.log().splitlines() if "afr: loaded 2 keys" in line]
    assert len(loaded) == 1, loaded


def test_reset_and_retry_after_are_honest(gateway):
    """On a 2xx, Reset is when the full limit is back; on a 429, Retry-After
    is Reset − now and a request sent at Reset is admitted."""
    k = Key("small", rpm=60)
    gw = gateway([k])
    first = gw.request("/", k.auth)
    assert first.status == 200
    now = time.time()
    reset = int(first.header("X-RateLimit-Reset"))
    # The full limit is back once this window and the next are over: 60–120 s.
    assert now + 60 - 1 <= reset <= now + 120 + 1, (now, reset)
    for _ in range(59):
        assert gw.request("/", k.auth).status == 200
    refused = gw.request("/", k.auth)
    assert refused.status == 429
    date = int(parsedate_to_datetime(refused.header("Date")).timestamp())
    reset = int(refused.header("X-RateLimit-Reset"))
    retry = int(refused.header("Retry-After"))
    assert retry == reset - date, refused.headers
    assert 1 <= retry <= 62
    assert int(refused.header("X-RateLimit-Remaining")) == 0
    time.sleep(max(0.0, reset - time.time()))
    assert gw.request("/", k.auth).status == 200


def raw_response(port, data, timeout=5):
    """Sends raw bytes and reads one reply (headers and Content-Length body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        buf = b""
        while True:
            head, sep, body = buf.partition(b"\r\n\r\n")
            if sep:
                m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                if m and len(body) >= int(m.group(1)):
                    return buf
            chunk = s.recv(65536)
            if not chunk:
                return buf
            buf += chunk


def test_shipped_server_conf_answers_nginx_own_errors_in_json(flavour, upstream):
    """A duplicate Authorization (400, before any location) and an oversized
    Content-Length (413, before the module) come from nginx itself; the
    shipped afr-server.conf makes them OpenAI-shaped JSON."""
    root = Path(tempfile.mkdtemp(prefix="afr-conf-"))
    try:
        root.chmod(0o755)
        gw = Gateway(flavour, root, upstream, [Key("a")])
        for name in ("afr-http.conf", "afr-server.conf"):
            text = (REPO / "conf/nginx" / name).read_text()
            text = text.replace("/etc/afr/keys.toml", str(gw.keys_path))
            text = text.replace("/etc/afr/", f"{root}/").replace("/run/afr/", f"{root}/")
            text = text.replace("/usr/share/afr/web", str(REPO / "web"))
            (root / name).write_text(text)
        (root / "upstream-secret.conf").write_text('afr_upstream_secret "s";\n')
        http_block = gw.render().split("http {", 1)[0]
        temps = " ".join(f"{t}_temp_path {root}/{t};" for t in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        gw.conf.write_text(
            http_block
            + f"http {{ access_log off; {temps} include {root}/afr-http.conf;\n"
            + f"server {{ listen 127.0.0.1:{gw.port}; include {root}/afr-server.conf; }} }}\n"
        )
        gw.start()
        try:
            cases = {
                400: b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer a\r\n"
                b"Authorization: Bearer b\r\nContent-Length: 2\r\n\r\n{}",
                413: b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer a\r\n"
                b"Content-Length: 40000000\r\nConnection: close\r\n\r\n",
                414: b"GET /v1/" + b"x" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
                # A malformed request line: no URI yet, still JSON.
                -400: b"GET /v1/\x01 HTTP/1.1\r\n\r\n",
            }
            for status, request in cases.items():
                status = abs(status)
                reply = raw_response(gw.port, request)
                head, _, body = reply.partition(b"\r\n\r\n")
                assert head.startswith(f"HTTP/1.1 {status} ".encode()), (status, reply[:300])
                assert b"Content-Type: application/json" in head, (status, head)
                err = json.loads(body)["error"]
                assert err["type"] == "invalid_request_error" and err["message"], (status, err)
        finally:
            gw.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
