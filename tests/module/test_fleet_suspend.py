"""Requests suspended while their key's fleet lease is refilled (issue 22, item 1), under
real nginx (both builds) and a real redis-server frozen with SIGSTOP so that refills hang
until the Redis timeout.

A suspended request is decided exactly once, whatever events its connection sees while it
waits (body bytes on a keep-alive connection); a client that leaves is not forwarded; no
request waits longer than `timeout` however many keys wait at once; and a reload answers
suspended requests before the old worker exits.
"""

import signal
import socket
import subprocess
import threading
import time
import uuid

import pytest

from afr_nginx import EchoHandler, Key, wait_for
from test_fleet import REDIS, redis  # noqa: F401  (the private redis-server fixture)

pytestmark = pytest.mark.skipif(REDIS is None, reason="redis-server missing: run scripts/setup")
TIMEOUT_MS = 300


def node(gateway, redis, keys, workers=1):
    conf = f"afr_fleet redis://127.0.0.1:{redis.port} nodes=2 timeout={TIMEOUT_MS}ms;"
    return gateway(keys, workers=workers, extra_http=conf, extra_server="add_header X-Afr-Fleet $afr_fleet always;")


def read_response(sock):
    """One HTTP/1.1 response off `sock` (Content-Length bodies): (status, head, body)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a whole response: {buf!r}")
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed mid-body")
        rest += chunk
    return int(head.split(b" ")[1]), head.decode(errors="replace"), rest[:length], rest[length:]


def freeze(redis):
    redis.proc.send_signal(signal.SIGSTOP)


def thaw(redis):
    redis.proc.send_signal(signal.SIGCONT)


def test_a_body_arriving_while_suspended_does_not_decide_the_request_twice(gateway, redis):
    """The write event of a keep-alive connection whose previous request was proxied is
    armed; body bytes arriving while the request waits fire it. If that re-runs the access
    phase after the worker has turned local (another key's refill failed first), the
    request is decided while still suspended: it must be decided once, answered once,
    and keep no `max_concurrent` place. (Decided in the window Redis went away in, it is
    refused: a key spends only its lease there, `afr_core::outage`.)"""
    a, b, c = Key("susp-a", rpm=600), Key("susp-b", rpm=600, max_concurrent=1), Key("susp-c", rpm=600)
    gw = node(gateway, redis, [a, b, c])
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s, \
            socket.create_connection(("127.0.0.1", gw.port), timeout=5) as other:
        # A proxied request first, on the same keep-alive connection.
        s.sendall(f"GET /first HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {a.token}\r\n\r\n".encode())
        status, _, _, extra = read_response(s)
        assert status == 200 and extra == b""
        freeze(redis)
        try:
            # Another key's request waits first: its refill fails first.
            other.sendall(f"GET /other HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {c.token}\r\n\r\n".encode())
            time.sleep(0.1)
            # A key without a lease: suspended until its refill times out.
            s.sendall(f"POST /second HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {b.token}\r\n"
                      "Content-Length: 10\r\n\r\n".encode())
            time.sleep(TIMEOUT_MS / 1000 + 0.05)
            s.sendall(b"0123456789")  # the body, after the worker turned local
            t0 = time.monotonic()
            status, head, _, extra = read_response(s)
            waited = time.monotonic() - t0
            assert status == 429 and "X-Afr-Fleet: local" in head, head
            assert read_response(other)[0] == 429
            # Exactly one answer: nothing more arrives, and the connection still serves.
            s.settimeout(0.5)
            try:
                more = extra or s.recv(65536)
            except socket.timeout:
                more = b""
            assert more == b"", more
            s.settimeout(5)
        finally:
            thaw(redis)
        # Back on Redis (within the window it went away in: no share, no hold), the key's
        # one place is free: the suspended request kept none.
        assert wait_for(lambda: gw.request("/", headers=c.auth).header("X-Afr-Fleet") == "global", 5), gw.log()
        s.sendall(f"GET /third HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {b.token}\r\n\r\n".encode())
        status, head, _, _ = read_response(s)
        assert status == 200, f"the place of the request was not given back: {head}"
    assert waited < TIMEOUT_MS / 1000 + 1.0, waited
    gw.assert_no_crash()
    assert "open socket" not in gw.log(), gw.log()


def test_a_client_gone_while_suspended_is_not_forwarded(gateway, redis):
    key = Key("susp-gone", rpm=600)
    gw = node(gateway, redis, [key])
    path = f"/gone-{uuid.uuid4().hex}"
    freeze(redis)
    try:
        with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key.token}\r\n\r\n".encode())
            time.sleep(0.05)
        time.sleep(TIMEOUT_MS / 1000 * 3)  # past the deadline and the refill's end
    finally:
        thaw(redis)
    # The worker is healthy (back on Redis within a probe interval) and the request never
    # reached the upstream.
    assert wait_for(lambda: gw.request("/after", headers=key.auth).status == 200, 5), gw.log()
    assert path not in EchoHandler.seen, "a request whose client left was forwarded"
    gw.assert_no_crash()


def test_no_request_waits_longer_than_the_timeout_however_many_keys_wait(gateway, redis):
    """More keys than the thread pool has threads, all without a lease, while Redis is
    frozen: refills queue behind each other, but every request is answered at its own
    deadline (decided on the local path: refused, as none has a lease in the window Redis
    went away in)."""
    keys = [Key(f"susp-many-{i}", rpm=600) for i in range(100)]
    gw = node(gateway, redis, keys)
    freeze(redis)
    took = [None] * len(keys)
    statuses = [None] * len(keys)

    fleet_header = [None] * len(keys)

    def one(i):
        t0 = time.monotonic()
        r = gw.request("/", headers=keys[i].auth, timeout=10)
        statuses[i], fleet_header[i] = r.status, r.header("X-Afr-Fleet")
        took[i] = time.monotonic() - t0

    try:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(keys))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(15)
    finally:
        thaw(redis)
    assert all(s == 429 for s in statuses), statuses
    # Each says how it was decided (on the local path), whatever its worker's mode
    # was when the header was written.
    assert set(fleet_header) == {"local"}, fleet_header
    # The deadline is the timeout; the margin is for a busy 2-core machine, far below
    # the several timeouts the last of 100 queued refills would take.
    assert max(took) < TIMEOUT_MS / 1000 + 0.4, sorted(took)[-5:]
    gw.assert_no_crash()


def test_a_reload_answers_suspended_requests_before_the_old_worker_exits(gateway, redis):
    keys = [Key(f"susp-reload-{i}", rpm=600) for i in range(5)]
    gw = node(gateway, redis, keys)
    freeze(redis)
    socks = []
    try:
        for k in keys:
            s = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
            s.sendall(f"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {k.token}\r\n\r\n".encode())
            socks.append(s)
        time.sleep(0.05)
        r = gw.run("-s", "reload")
        assert r.returncode == 0, r.stderr
        for s in socks:
            status, head, _, _ = read_response(s)
            assert status == 429 and "X-Afr-Fleet: local" in head, head
    finally:
        thaw(redis)
        for s in socks:
            s.close()
    gw.assert_no_crash()


def h2_node(gateway, redis, keys):
    """A node with a second server speaking HTTP/2 (prior knowledge, cleartext)."""
    from afr_nginx import free_port
    h2 = free_port()
    conf = (f"afr_fleet redis://127.0.0.1:{redis.port} nodes=2 timeout={TIMEOUT_MS}ms;\n"
            f"server {{ listen 127.0.0.1:{h2} http2; afr on; afr_upstream_secret \"s\";\n"
            f"  add_header X-Afr-Fleet $afr_fleet always;\n"
            f"  location / {{ proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}")
    gw = gateway(keys, workers=1, extra_http=conf)
    return gw, h2


def curl_h2(port, path, key, max_time):
    out = subprocess.run(
        ["curl", "-s", "--http2-prior-knowledge", "-o", "/dev/null", "-D", "-", "--max-time", str(max_time),
         "-H", f"Authorization: Bearer {key.token}", f"http://127.0.0.1:{port}{path}"],
        capture_output=True, text=True, timeout=max_time + 5,
    )
    return out.stdout


def test_over_http2_a_suspended_stream_is_answered_at_its_deadline_and_a_reset_one_is_not_forwarded(gateway, redis):
    keys = [Key("susp-h2-a", rpm=600), Key("susp-h2-b", rpm=600)]
    gw, port = h2_node(gateway, redis, keys)
    freeze(redis)
    try:
        t0 = time.monotonic()
        head = curl_h2(port, "/h2-answered", keys[0], 5)
        took = time.monotonic() - t0
        assert head.startswith("HTTP/2 429"), head
        assert "x-afr-fleet: local" in head.lower(), head
        # A client that resets its stream while it waits: never forwarded.
        path = f"/h2-gone-{uuid.uuid4().hex}"
        curl_h2(port, path, keys[1], 0.1)
        time.sleep(TIMEOUT_MS / 1000 * 3)
    finally:
        thaw(redis)
    # Answered at its deadline, not left to curl's 5 s: the bound is loose because
    # it is not a latency figure (1.32 s was seen on a busy 2-core CI machine).
    assert took < TIMEOUT_MS / 1000 + 2.0, took
    assert path not in EchoHandler.seen, "a reset stream was forwarded"
    assert wait_for(lambda: curl_h2(port, "/h2-after", keys[1], 5).startswith("HTTP/2 200"), 5)
    gw.assert_no_crash()
