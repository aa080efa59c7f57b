"""Hostile Authorization headers get a 4xx and never crash a worker."""

import random

from afr_nginx import Key


def get(path, *header_lines):
    lines = [f"GET {path} HTTP/1.1".encode(), b"Host: localhost", *header_lines, b"Connection: close", b"", b""]
    return b"\r\n".join(lines)


def test_hostile_authorization_headers(gateway):
    k = Key("victim")
    gw = gateway([k])
    cases = {
        "10 KB header": get("/", b"Authorization: Bearer afr_" + b"a" * 10_000),
        "7 KB token": get("/", b"Authorization: Bearer afr_" + b"a" * 7_000),
        "Bearer, no token": get("/", b"Authorization: Bearer"),
        "Bearer and spaces": get("/", b"Authorization: Bearer     "),
        "lowercase bearer, unknown key": get("/", b"authorization: bearer afr_" + b"Z" * 40),
        "non-UTF-8 token": get("/", b"Authorization: Bearer afr_" + bytes(range(0x80, 0xC0))),
        "NUL in token": get("/", b"Authorization: Bearer afr_" + b"a" * 20 + b"\x00" + b"a" * 20),
        "duplicate Authorization": get(
            "/", b"Authorization: " + k.auth["Authorization"].encode(), b"Authorization: Bearer afr_" + b"b" * 40
        ),
        "empty value": get("/", b"Authorization: "),
        "valid key in a second header name case": get("/", b"AUTHORIZATION: Basic Zm9vOmJhcg=="),
    }
    for name, data in cases.items():
        status = gw.raw(data)
        assert 400 <= status < 500, (name, status)
    gw.assert_no_crash()
    # still serving, and the limit was not consumed by refused requests
    r = gw.request("/", k.auth)
    assert r.status == 200 and r.header("X-RateLimit-Remaining") == "59"


def test_lowercase_scheme_is_accepted_per_rfc7235(gateway):
    k = Key("lower")
    gw = gateway([k])
    assert gw.request("/", {"Authorization": "bearer " + k.token}).status == 200


def test_random_key_flood_is_refused(gateway):
    k = Key("real")
    gw = gateway([k])
    rng = random.Random(7)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    for _ in range(300):
        token = "afr_" + "".join(rng.choice(alphabet) for _ in range(40))
        assert gw.request("/", {"Authorization": f"Bearer {token}"}).status == 401
    gw.assert_no_crash()
    assert gw.request("/", k.auth).status == 200
