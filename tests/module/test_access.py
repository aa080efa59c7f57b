"""Access phase: statuses, OpenAI error bodies, identity headers, X-RateLimit-*."""

import http.client
import time

from afr_nginx import UPSTREAM_SECRET, Key


def assert_openai_error(resp, status, type_, code):
    assert resp.status == status
    assert resp.header("Content-Type") == "application/json"
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert (err["type"], err["code"], err["param"]) == (type_, code, None)
    return err


def assert_rate_headers(resp, limit):
    assert resp.header("X-RateLimit-Limit") == str(limit), resp.headers
    assert len(resp.all("X-RateLimit-Limit")) == 1
    remaining = int(resp.header("X-RateLimit-Remaining"))
    assert 0 <= remaining <= limit
    reset = int(resp.header("X-RateLimit-Reset"))
    # Honest Reset (issue 9): when the full limit is back on a 2xx, when the next
    # request fits on a 429 — at most two 60 s windows away either way.
    assert 0 < reset - time.time() <= 121
    return remaining


def test_missing_and_unknown_keys_get_401(gateway):
    gw = gateway([Key("a")])
    err = assert_openai_error(gw.request("/v1/models"), 401, "invalid_request_error", "invalid_api_key")
    assert "Missing" in err["message"]
    r = gw.request("/v1/models", {"Authorization": "Bearer afr_" + "x" * 40})
    err = assert_openai_error(r, 401, "invalid_request_error", "invalid_api_key")
    assert "Incorrect" in err["message"]
    assert r.header("X-RateLimit-Limit") is None  # not authenticated
    assert r.header("WWW-Authenticate") == "Bearer"


def test_malformed_keys_get_401(gateway):
    gw = gateway([Key("a")])
    for value in ["Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Bearer sk-" + "a" * 40, "Bearer afr_short", "afr_" + "a" * 40]:
        r = gw.request("/", {"Authorization": value})
        assert_openai_error(r, 401, "invalid_request_error", "invalid_api_key")


def test_disabled_and_expired_keys_get_403(gateway):
    disabled = Key("off", enabled=False)
    expired = Key("old", expires="2001-01-01T00:00:00Z")
    future = Key("new", expires="2999-01-01T00:00:00+02:00")
    gw = gateway([disabled, expired, future])
    err = assert_openai_error(gw.request("/", disabled.auth), 403, "permission_denied", "key_disabled")
    assert "disabled" in err["message"]
    err = assert_openai_error(gw.request("/", expired.auth), 403, "permission_denied", "key_expired")
    assert "expired" in err["message"]
    assert gw.request("/", future.auth).status == 200


def test_admitted_request_carries_identity_not_authorization(gateway):
    k = Key("team-a", models=["gpt-5-mini", "gpt-4o-mini"])
    gw = gateway([k])
    spoof = {
        **k.auth,
        "X-Afr-Key-Id": "admin",
        "x-afr-models": "everything",
        "X-AFR-Secret": "guess",
        "X-Afr-Other": "1",
    }
    r = gw.request("/v1/chat/completions", spoof)
    assert r.status == 200
    seen = r.upstream_headers()
    names = [n.lower() for n, _ in seen]
    assert "authorization" not in names
    assert [v for n, v in seen if n.lower() == "x-afr-key-id"] == ["team-a"]
    assert [v for n, v in seen if n.lower() == "x-afr-models"] == ["gpt-5-mini,gpt-4o-mini"]
    assert [v for n, v in seen if n.lower() == "x-afr-secret"] == [UPSTREAM_SECRET]
    assert "x-afr-other" not in names
    assert ("Host" in [n for n, _ in seen]) or ("host" in names)


def test_key_without_models_sends_no_models_header(gateway):
    k = Key("all-models")
    gw = gateway([k])
    names = [n.lower() for n, _ in gw.request("/", {**k.auth, "X-Afr-Models": "x"}).upstream_headers()]
    assert "x-afr-models" not in names and "x-afr-key-id" in names


def test_rate_headers_on_success_upstream_error_stream_and_error_page(gateway):
    k = Key("hdr", rpm=100)
    gw = gateway([k])
    r = gw.request("/ok", k.auth)
    assert r.status == 200
    first = assert_rate_headers(r, 100)
    assert first == 99
    r = gw.request("/fail/500", k.auth)
    assert r.status == 500
    assert assert_rate_headers(r, 100) == 98
    r = gw.request("/intercept/500", k.auth)
    assert r.status == 500 and b"upstream failed" in r.body
    assert assert_rate_headers(r, 100) == 97  # error_page redirect counted once
    r = gw.request("/x/spoof", k.auth)
    assert assert_rate_headers(r, 100) == 96  # upstream's X-RateLimit-* replaced
    assert r.all("X-RateLimit-Limit") == ["100"]

    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    conn.request("GET", "/v1/sse", headers=k.auth)
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.getheader("Content-Type") == "text/event-stream"
    assert resp.getheader("X-RateLimit-Limit") == "100"
    assert resp.getheader("X-RateLimit-Remaining") == "95"
    body = resp.read()
    conn.close()
    assert body.endswith(b"data: [DONE]\n\n") and body.count(b"data: ") == 4


def test_over_limit_gets_429_with_retry_after(gateway):
    k = Key("tight", rpm=3)
    gw = gateway([k])
    statuses = [gw.request("/", k.auth).status for _ in range(3)]
    assert statuses == [200, 200, 200]
    r = gw.request("/", k.auth)
    assert_openai_error(r, 429, "requests", "rate_limit_exceeded")
    assert assert_rate_headers(r, 3) == 0
    retry = int(r.header("Retry-After"))
    assert 1 <= retry <= 120


def test_default_rpm_applies(gateway):
    k = Key("dflt")
    gw = gateway([k], default_rpm=2)
    assert [gw.request("/", k.auth).status for _ in range(3)] == [200, 200, 429]


def test_afr_off_location_needs_no_key(gateway):
    gw = gateway([Key("a")])
    r = gw.request("/open/x")
    assert r.status == 200 and r.header("X-RateLimit-Limit") is None
    assert gw.request("/static").body == b"static\n"


def test_head_request_is_refused_without_body(gateway):
    gw = gateway([Key("a")])
    r = gw.request("/", method="HEAD")
    assert r.status == 401 and r.body == b""


def test_post_body_is_discarded_on_refusal(gateway):
    gw = gateway([Key("a")])
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    body = b'{"model":"x","messages":[]}' * 1000
    for _ in range(3):  # keep-alive survives the discarded body
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 401
        resp.read()
    conn.close()
