"""Anthropic clients in the access phase: the key from `x-api-key`, dropped before the
upstream, and refusals in Anthropic's error shape on /v1/messages paths."""

import time

from afr_nginx import Key


def anthropic_error(resp, status, type_):
    assert resp.status == status
    assert resp.header("Content-Type") == "application/json"
    body = resp.json()
    assert set(body) == {"type", "error"} and body["type"] == "error"
    assert set(body["error"]) == {"type", "message"} and body["error"]["type"] == type_
    return body["error"]["message"]


def test_x_api_key_is_a_key_and_never_reaches_the_upstream(gateway):
    k = Key("claude-code", rpm=100)
    gw = gateway([k])
    r = gw.request("/v1/messages", {"x-api-key": k.token}, method="POST")
    assert r.status == 200
    assert r.header("X-RateLimit-Limit") == "100"
    seen = r.upstream_headers()
    names = [n.lower() for n, _ in seen]
    assert "x-api-key" not in names and "authorization" not in names
    assert [v for n, v in seen if n.lower() == "x-afr-key-id"] == ["claude-code"]
    assert k.token not in repr(seen)
    # The same key in both headers is one key; two different keys are refused.
    assert gw.request("/v1/messages", {"x-api-key": k.token, **k.auth}, method="POST").status == 200
    other = Key("other")
    msg = anthropic_error(gw.request("/v1/messages", {"x-api-key": k.token, **other.auth}, method="POST"), 401, "authentication_error")
    assert "Malformed" in msg


def test_refusals_are_anthropic_shaped_on_messages_paths_only(gateway):
    off = Key("off", enabled=False)
    limited = Key("one", rpm=1)
    gw = gateway([off, limited])
    for path in ("/v1/messages", "/v1/messages/count_tokens", "/v1/messages?beta=true"):
        assert "Missing" in anthropic_error(gw.request(path, method="POST"), 401, "authentication_error")
        anthropic_error(gw.request(path, {"x-api-key": "afr_" + "x" * 40}, method="POST"), 401, "authentication_error")
        anthropic_error(gw.request(path, {"x-api-key": "sk-ant-not-ours"}, method="POST"), 401, "authentication_error")
        assert "disabled" in anthropic_error(gw.request(path, {"x-api-key": off.token}, method="POST"), 403, "permission_error")
    assert gw.request("/v1/messages", {"x-api-key": limited.token}, method="POST").status == 200
    r = gw.request("/v1/messages", {"x-api-key": limited.token}, method="POST")
    anthropic_error(r, 429, "rate_limit_error")
    assert 0 < int(r.header("Retry-After")) <= 120
    assert int(r.header("X-RateLimit-Reset")) > time.time()
    # Elsewhere the body stays OpenAI's.
    r = gw.request("/v1/messagesx", {"x-api-key": "afr_" + "x" * 40})
    assert r.status == 401 and r.json()["error"]["code"] == "invalid_api_key"
