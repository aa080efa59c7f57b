"""Rate limits are exact across workers, survive `nginx -s reload`, and a full
zone evicts (and logs) instead of silently no longer limiting."""

import http.client
import threading
import time

from afr_nginx import Key


def away_from_window_boundary(margin=8):
    """Windows are aligned to the minute; keep a test burst inside one."""
    sec = time.time() % 60
    if sec > 60 - margin:
        time.sleep(60 - sec + 0.5)


def burst(port, headers, total, connections):
    """`total` GETs spread over `connections` keep-alive connections at once."""
    statuses = []
    lock = threading.Lock()
    start = threading.Barrier(connections)

    def worker(n):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
        start.wait()
        mine = []
        for _ in range(n):
            conn.request("GET", "/", headers=headers)
            resp = conn.getresponse()
            resp.read()
            mine.append(resp.status)
        conn.close()
        with lock:
            statuses.extend(mine)

    per = [total // connections + (1 if i < total % connections else 0) for i in range(connections)]
    threads = [threading.Thread(target=worker, args=(n,)) for n in per]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return statuses


def test_exact_limit_across_four_workers(gateway):
    k = Key("exact", rpm=50)
    gw = gateway([k], workers=4)
    away_from_window_boundary()
    statuses = burst(gw.port, k.auth, total=300, connections=30)
    assert len(statuses) == 300
    assert statuses.count(200) == 50, {s: statuses.count(s) for s in set(statuses)}
    assert statuses.count(429) == 250


def test_keys_have_independent_counters(gateway):
    a, b = Key("a", rpm=2), Key("b", rpm=2)
    gw = gateway([a, b])
    away_from_window_boundary()
    assert [gw.request("/", a.auth).status for _ in range(3)] == [200, 200, 429]
    assert [gw.request("/", b.auth).status for _ in range(3)] == [200, 200, 429]


def test_counters_survive_nginx_reload(gateway):
    k = Key("survivor", rpm=4)
    gw = gateway([k])
    away_from_window_boundary(15)
    assert [gw.request("/", k.auth).status for _ in range(3)] == [200, 200, 200]
    gw.reload()
    r = gw.request("/", k.auth)
    assert r.status == 200 and r.header("X-RateLimit-Remaining") == "0"
    assert gw.request("/", k.auth).status == 429
    gw.reload()
    assert gw.request("/", k.auth).status == 429


def test_full_zone_evicts_lru_and_keeps_limiting(gateway):
    keys = [Key(f"k{i:04d}-" + "x" * 100, rpm=1) for i in range(600)]
    gw = gateway(keys, zone="32k")
    away_from_window_boundary(20)
    for k in keys:
        assert gw.request("/", k.auth).status == 200
    assert "is full: evicted" in gw.log()
    # The most recent keys are still counted: their second request is refused.
    assert gw.request("/", keys[-1].auth).status == 429
