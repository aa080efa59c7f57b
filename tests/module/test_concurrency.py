"""`max_concurrent`: requests in flight per key, decided in the access phase
like nginx's limit_conn — exact across workers, given back when a request ends
however it ends (normal end, client gone mid-stream, upstream failure), a 429
`rate_limit_exceeded` naming concurrency with Retry-After."""

import http.client
import json
import os
import signal
import socket
import threading
import time

from afr_nginx import Key, wait_for


class Stream:
    """A request to the upstream's slow stream, held open until closed."""

    def __init__(self, gw, key):
        self.conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=15)
        self.conn.request("GET", "/hold", headers=key.auth)
        self.resp = self.conn.getresponse()
        self.status = self.resp.status
        if self.status == 200:
            self.resp.fp.readline()  # the first event's chunk: the stream is live
        else:
            self.body = self.resp.read()

    def close(self):
        # Shut the socket down, as a client that goes away mid-stream does.
        sock = self.conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.conn.close()


def busy(gw, key):
    return gw.request("/", key.auth)


def test_nth_plus_one_stream_gets_429_naming_concurrency(gateway):
    k = Key("conc", rpm=1000, max_concurrent=3)
    gw = gateway([k], workers=2)
    streams = [Stream(gw, k) for _ in range(3)]
    try:
        assert [s.status for s in streams] == [200, 200, 200]
        r = busy(gw, k)
        assert r.status == 429
        err = r.json()["error"]
        assert err["code"] == "rate_limit_exceeded"
        assert "Concurrency limit reached: 3 requests in flight" in err["message"]
        assert r.header("Retry-After") == "1"
        # The request window was not charged for the refusal: 3 streams used.
        assert r.header("X-RateLimit-Limit") == "1000"
        assert r.header("X-RateLimit-Remaining") == "997"
    finally:
        for s in streams:
            s.close()


def test_a_client_gone_mid_stream_frees_its_place(gateway):
    k = Key("gone", rpm=1000, max_concurrent=2)
    gw = gateway([k], workers=2)
    a, b = Stream(gw, k), Stream(gw, k)
    try:
        assert (a.status, b.status) == (200, 200)
        assert busy(gw, k).status == 429
        a.close()
        # nginx notices the closed client on its next write (≤ 100 ms here). A
        # stream opened in the meantime is refused; so was one opened right after
        # a probe that saw the place come back, which held the place itself a
        # moment after its answer (CI, 2026-12-01). Without the release every try
        # is refused until the deadline.
        c = past_concurrency(gw, k, open_one=lambda: Stream(gw, k))
        assert c.status == 200
        assert busy(gw, k).status == 429
        c.close()
    finally:
        a.close()
        b.close()


def test_ended_requests_give_their_place_back_whatever_their_status(gateway):
    """Sequential requests of a key with max_concurrent = 1: each ends before
    the next starts — a plain 200, an upstream 500, an upstream that drops the
    connection mid-body, a finished stream, an error_page redirect — so each
    is admitted. Without the release the second one is refused."""
    k = Key("seq", rpm=1000, max_concurrent=1)
    gw = gateway([k], workers=2)
    paths = ["/", "/500", "/drop", "/sse", "/intercept/500", "/", "/"]

    def once(path):
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
        conn.request("GET", path, headers=k.auth)
        resp = conn.getresponse()
        try:
            resp.read()
        except http.client.IncompleteRead:
            pass  # /drop: the upstream's half body
        conn.close()
        return resp.status

    for path in paths:
        # The previous request's place comes back a moment after its client
        # read the answer (see past_concurrency): wait that moment out, never
        # longer — without the release every retry is refused until the deadline.
        deadline = time.monotonic() + 10
        while (status := once(path)) == 429:
            assert time.monotonic() < deadline, f"{path}: the previous request's place was never given back"
            time.sleep(0.01)
        assert status != 429, path
    assert past_concurrency(gw, k).status == 200


def test_keep_alive_requests_release_between_requests(gateway):
    k = Key("ka", rpm=1000, max_concurrent=1)
    gw = gateway([k])
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    statuses = []
    for _ in range(5):
        conn.request("GET", "/", headers=k.auth)
        resp = conn.getresponse()
        resp.read()
        statuses.append(resp.status)
    conn.close()
    assert statuses == [200] * 5


def test_refused_requests_hold_no_place_and_use_no_requests(gateway):
    k = Key("mixed", rpm=3, max_concurrent=1)
    gw = gateway([k])
    s = Stream(gw, k)
    try:
        assert s.status == 200
        for _ in range(5):
            assert busy(gw, k).status == 429
    finally:
        s.close()
    # The five refusals counted against neither limit: two requests left.
    r = past_concurrency(gw, k)
    assert r.status == 200 and r.header("X-RateLimit-Remaining") == "1"
    r = past_concurrency(gw, k)
    assert r.status == 200 and r.header("X-RateLimit-Remaining") == "0"
    # And a request refused by rpm holds no place in flight: the next one
    # is refused by rpm again, not by concurrency.
    r = past_concurrency(gw, k)
    assert r.status == 429 and "requests per minute" in r.json()["error"]["message"]
    r = busy(gw, k)
    assert r.status == 429 and "requests per minute" in r.json()["error"]["message"]


def past_concurrency(gw, key, timeout=10, open_one=None):
    """The next answer (by default to `busy`, else to `open_one()`, e.g. a
    Stream) that is not a concurrency refusal. A place is given back when
    nginx frees the request, a moment after the client has read its answer
    (the worker may be preempted in between on a busy machine, and the next
    request may reach another worker first); those refusals count against no
    limit, so waiting them out changes nothing else."""
    open_one = open_one or (lambda: busy(gw, key))
    deadline = time.monotonic() + timeout
    while True:
        r = open_one()
        if r.status != 429 or b"Concurrency" not in r.body:
            return r
        if isinstance(r, Stream):
            r.close()
        assert time.monotonic() < deadline, "the place in flight was never given back"
        time.sleep(0.01)


def test_exact_across_four_workers(gateway):
    k = Key("many", rpm=10_000, max_concurrent=5)
    other = Key("other", rpm=10_000)
    gw = gateway([k, other], workers=4)
    start = threading.Barrier(20)
    streams, lock = [], threading.Lock()

    def open_one():
        start.wait()
        s = Stream(gw, k)
        with lock:
            streams.append(s)

    threads = [threading.Thread(target=open_one) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        statuses = sorted(s.status for s in streams)
        assert statuses == [200] * 5 + [429] * 15, statuses
        # Another key is not affected.
        assert busy(gw, other).status == 200
    finally:
        for s in streams:
            s.close()
    assert wait_for(lambda: busy(gw, k).status == 200, timeout=10)


def test_a_lowered_limit_applies_after_a_keys_reload(gateway):
    k = Key("lower", rpm=1000, max_concurrent=3)
    gw = gateway([k])
    a, b = Stream(gw, k), Stream(gw, k)
    try:
        k.max_concurrent = 1
        gw.write_keys([k])
        assert wait_for(lambda: busy(gw, k).status == 429, timeout=10)
        a.close()
        b.close()
        assert wait_for(lambda: busy(gw, k).status == 200, timeout=10)
    finally:
        a.close()
        b.close()


def test_a_worker_killed_with_sigkill_keeps_its_places(gateway):
    """Documents the limit_conn-like edge: a worker killed with SIGKILL runs
    no cleanups, so the places its requests held stay taken (README,
    "Concurrency"); the other keys and the respawned worker are unaffected."""
    k = Key("killed", rpm=1000, max_concurrent=1)
    other = Key("other2", rpm=1000, max_concurrent=1)
    gw = gateway([k, other], workers=1)
    s = Stream(gw, k)
    assert s.status == 200
    (pid,) = gw.worker_pids()
    os.kill(pid, signal.SIGKILL)
    s.close()
    assert wait_for(lambda: gw.worker_pids() and pid not in gw.worker_pids(), timeout=10)
    assert busy(gw, other).status == 200
    r = busy(gw, k)
    assert r.status == 429 and "Concurrency" in json.loads(r.body)["error"]["message"]
    # The conftest's no-crash check would flag the kill we caused.
    gw.error_log.write_text(gw.log().replace("exited on signal", "exited (killed by the test)"))
