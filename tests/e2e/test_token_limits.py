"""Token limits, budgets and OpenAI's rate-limit headers through the whole stack
(nginx -> module -> sidecar -> mock) with the official `openai` Python SDK: each
429 kind raises RateLimitError with its code, reservations never over-admit under
concurrency, settlement frees tokens, a cut stream settles at its estimate."""

from __future__ import annotations

import itertools
import json
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from conftest import http

_ids = itertools.count()
HI = [{"role": "user", "content": "hi"}]  # mock: 2 prompt + 4 completion tokens


def key_id(prefix: str) -> str:
    return f"{prefix}{next(_ids)}-{int(time.time() * 1000) % 10**8}"


def test_tokens_429_is_a_rate_limit_error_naming_tokens(gateway):
    key = gateway.new_key(key_id("tpm"), "--rpm", "1000", "--tpm", "500")
    client = gateway.client(key)
    # The worst case (prompt + max_tokens) can never fit: refused before any provider,
    # without a Retry-After and with x-should-retry: false, since no wait helps.
    gateway.clear_mock_requests()
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=600)
    assert e.value.code == "rate_limit_exceeded"
    assert "tokens per min" in e.value.message
    assert "retry-after" not in e.value.response.headers
    assert e.value.response.headers["x-should-retry"] == "false"
    assert e.value.response.headers["x-ratelimit-limit-tokens"] == "500"
    assert gateway.mock_requests() == []
    ok = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=HI, max_tokens=100)
    assert ok.parse().usage.total_tokens == 6


def test_requests_429_is_a_rate_limit_error_with_openai_headers(gateway):
    key = gateway.new_key(key_id("rpm"), "--rpm", "2")
    client = gateway.client(key)
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=HI)
    h = raw.headers
    assert h["x-ratelimit-limit-requests"] == "2" and h["x-ratelimit-remaining-requests"] == "0"
    assert h["x-ratelimit-reset-requests"].endswith("s")
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(model="gpt-4o-mini", messages=HI)
    assert e.value.code == "rate_limit_exceeded" and "requests" in e.value.message
    assert int(e.value.response.headers["retry-after"]) >= 1


def test_fifty_at_once_admit_exactly_the_ten_that_fit_then_settlement_frees_tokens(gateway):
    # Worst case per request: ~1 prompt token (estimated) + max_tokens 1000.
    # 10 fit in 10500, 11 do not.
    key = gateway.new_key(key_id("conc"), "--rpm", "10000", "--tpm", "10500")
    client = gateway.client(key, timeout=30)
    gateway.mock_config(latency_ms=1500)
    gateway.clear_mock_requests()
    try:

        def one(_):
            try:
                client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=1000)
                return "ok"
            except openai.RateLimitError as e:
                return e.code

        with ThreadPoolExecutor(50) as pool:
            results = list(pool.map(one, range(50)))
        assert results.count("ok") == 10, results
        assert results.count("rate_limit_exceeded") == 40, results
        assert len(gateway.mock_requests()) == 10
    finally:
        gateway.mock_config(latency_ms=0)
    # They settled at their real 6 tokens each: 60 of 10500 used, so ten more
    # worst cases fit at once again.
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=HI, max_tokens=10)
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) >= 10500 - 70 - 11
    with ThreadPoolExecutor(10) as pool:
        more = list(
            pool.map(lambda _: client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=1000), range(10))
        )
    assert len(more) == 10


def test_budget_with_prices_is_insufficient_quota_and_cost_is_recorded(gateway):
    # gpt-4o-mini at $0.15 / $0.60 per 1M: each request costs 2*150 + 4*600 = 2700
    # nano-dollars; its worst case with max_tokens 5 is 13*150 + 5*600 = 4950 (the
    # prompt estimate of HI is 13). A $0.000013 (13000 nano) budget admits three, then refuses.
    key = gateway.new_key(key_id("bud"), "--rpm", "1000", "--budget-usd", "0.000013", "--budget-per", "day")
    client = gateway.client(key)
    for _ in range(3):
        raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=HI, max_tokens=5)
        assert raw.parse().usage.total_tokens == 6
    assert raw.headers["x-afr-budget-remaining-usd"] == "0.000005"
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=5)
    assert e.value.code == "insufficient_quota"
    assert e.value.body["type"] == "insufficient_quota"
    assert int(e.value.response.headers["retry-after"]) >= 1
    # Cost on the usage rows, by model and day (rows are written in batches).
    for _ in range(40):
        status, _, body = http(
            "GET", gateway.base + "/v1/usage?by=model,day", headers={"Authorization": f"Bearer {key}"}
        )
        data = json.loads(body)["data"]
        ok = [d for d in data if d.get("model") == "gpt-4o-mini"]
        if ok and ok[0]["requests"] >= 4:
            break
        time.sleep(0.1)
    assert status == 200
    assert ok[0]["cost_usd"] == pytest.approx(3 * 2700e-9)


def test_cut_stream_settles_at_its_estimate_and_streams_carry_token_headers(gateway):
    key = gateway.new_key(key_id("cut"), "--rpm", "1000", "--tpm", "5000")
    client = gateway.client(key)
    gateway.mock_config(chunks=40, chunk_interval_ms=50)
    try:
        with client.chat.completions.with_streaming_response.create(
            model="gpt-4o-mini", messages=HI, stream=True, max_tokens=4000
        ) as resp:
            h = resp.headers
            assert h["x-ratelimit-limit-tokens"] == "5000"
            # Reserved: ~1 prompt + 4000 max_tokens.
            assert int(h["x-ratelimit-remaining-tokens"]) <= 1000
            assert h["x-ratelimit-reset-tokens"].endswith("s")
            assert h["x-ratelimit-limit-requests"] == "1000"
            for i, _ in enumerate(resp.iter_lines()):
                if i > 6:
                    break  # cut: the client goes away mid-stream
    finally:
        gateway.mock_config(chunks=None, chunk_interval_ms=0)
    # The cut stream settled at its estimate (a few tokens), not its 4001 worst case.
    for _ in range(40):
        status, h, _ = http("GET", gateway.base + "/v1/models", headers={"Authorization": f"Bearer {key}"})
        remaining = int(h["x-ratelimit-remaining-tokens"])
        if remaining > 4900:
            break
        time.sleep(0.1)
    assert remaining > 4900, remaining


def test_concurrency_429_is_a_rate_limit_error_naming_concurrency(gateway):
    # Decided in nginx (max_concurrent): two slow requests in flight, the third
    # at once is refused before the sidecar; once they end, the key is free again.
    key = gateway.new_key(key_id("mc"), "--rpm", "1000", "--max-concurrent", "2")
    client = gateway.client(key, max_retries=0, timeout=30)
    gateway.mock_config(latency_ms=1500)
    try:

        def one(_):
            try:
                client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=10)
                return "ok"
            except openai.RateLimitError as e:
                assert "Concurrency limit reached: 2" in e.message
                assert e.response.headers["retry-after"] == "1"
                return e.code

        with ThreadPoolExecutor(5) as pool:
            results = list(pool.map(one, range(5)))
        assert results.count("ok") == 2, results
        assert results.count("rate_limit_exceeded") == 3, results
    finally:
        gateway.mock_config(latency_ms=0)
    assert client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=10).usage.total_tokens > 0
