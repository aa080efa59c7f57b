"""The official `openai` Python SDK against the whole gateway (nginx -> module ->
sidecar -> mock): the seed's examples, typed errors and rate-limit headers."""

from __future__ import annotations

import itertools
import time
from datetime import datetime, timedelta, timezone

import openai
import pytest

from conftest import http, mock_tokens

_ids = itertools.count()


@pytest.fixture
def key(gateway):
    """A fresh key with a generous limit, so tests don't share a rate window."""
    return gateway.new_key(f"py{next(_ids)}-{int(time.time() * 1000) % 10**8}", "--rpm", "1000")


MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Explain rate limits in one sentence."},
]


def test_chat_completion_with_system_prompt_temperature_and_max_tokens(gateway, key):
    client = gateway.client(key)
    resp = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, temperature=0.2, max_tokens=256)
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == "Mock reply to: Explain rate limits in one sentence."
    assert resp.choices[0].finish_reason == "stop"
    prompt, completion = mock_tokens(MESSAGES)
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (prompt, completion)
    assert resp.usage.total_tokens == prompt + completion


def test_streaming_loop_yields_the_reply_chunk_by_chunk(gateway, key):
    client = gateway.client(key)
    stream = client.chat.completions.create(model="gpt-5-mini", messages=MESSAGES, stream=True)
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert "".join(pieces) == "Mock reply to: Explain rate limits in one sentence."
    assert sum(1 for p in pieces if p) == mock_tokens(MESSAGES)[1]


def test_stream_include_usage_is_delivered_when_asked(gateway, key):
    client = gateway.client(key)
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == mock_tokens(MESSAGES)[1]


def test_stream_without_include_usage_has_no_usage_chunk(gateway, key):
    client = gateway.client(key)
    chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True))
    assert all(c.choices for c in chunks), "the usage chunk the gateway asked for must be stripped"
    assert all(getattr(c, "usage", None) is None for c in chunks)


def test_models_list_shows_the_default_catalogue_with_tiers(gateway, key):
    models = {m.id: m for m in gateway.client(key).models.list()}
    assert set(models) == {"gpt-5-mini", "gpt-4o-mini", "gpt-5-chat", "text-embedding-3-small"}
    tiers = {mid: (m.model_extra or {}).get("tier") for mid, m in models.items()}
    assert tiers == {"gpt-5-mini": "Fast", "gpt-4o-mini": "Smart", "gpt-5-chat": "Pro", "text-embedding-3-small": "Fast"}
    kinds = {mid: (m.model_extra or {}).get("kind") for mid, m in models.items()}
    assert kinds["text-embedding-3-small"] == "embedding" and kinds["gpt-4o-mini"] == "chat"
    assert all((m.model_extra or {}).get("description") for m in models.values())


def test_models_list_only_shows_models_the_key_may_use(gateway):
    key = gateway.new_key(f"py-limited-{int(time.time() * 1000) % 10**8}", "--models", "gpt-5-mini")
    client = gateway.client(key)
    assert [m.id for m in client.models.list()] == ["gpt-5-mini"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="gpt-5-chat", messages=MESSAGES)
    assert e.value.param == "model"


@pytest.mark.parametrize(
    "kwargs,param",
    [
        ({"temperature": 3}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"model": "no-such-model"}, "model"),
        ({"messages": "hello"}, "messages"),
    ],
)
def test_bad_request_error_names_the_param(gateway, key, kwargs, param):
    args = {"model": "gpt-4o-mini", "messages": MESSAGES, **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        gateway.client(key).chat.completions.create(**args)
    assert e.value.status_code == 400
    assert e.value.param == param


def test_authentication_error_for_unknown_and_malformed_keys(gateway):
    for bad in ("afr_" + "x" * 40, "sk-not-ours", "afr_short"):
        with pytest.raises(openai.AuthenticationError) as e:
            gateway.client(bad).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert e.value.status_code == 401


def test_permission_denied_for_disabled_key(gateway):
    kid = f"py-dis-{int(time.time() * 1000) % 10**8}"
    key = gateway.new_key(kid)
    gateway.afr("key", "disable", kid, "--file", str(gateway.keys_file))
    status, took = gateway.wait_key_state(key, lambda s: s == 403)
    assert status == 403, f"disabled key still answered {status} after {took:.1f}s"
    with pytest.raises(openai.PermissionDeniedError) as e:
        gateway.client(key).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert "disabled" in e.value.message


def test_permission_denied_for_expired_key(gateway):
    past = (datetime.now(timezone.utc) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    key = gateway.new_key(f"py-exp-{int(time.time() * 1000) % 10**8}", "--expires", past)
    with pytest.raises(openai.PermissionDeniedError) as e:
        gateway.client(key).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert "expired" in e.value.message


def test_rate_limit_error_with_headers_and_retry_after(gateway):
    key = gateway.new_key(f"py-rl-{int(time.time() * 1000) % 10**8}", "--rpm", "2")
    client = gateway.client(key)
    # new_key already spent one request of the window probing the key.
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
    assert raw.headers["x-ratelimit-limit"] == "2"
    assert raw.headers["x-ratelimit-remaining"] == "0"
    # On a success Reset is when the full limit is available again: with the sliding
    # window that can be up to two windows away.
    reset = int(raw.headers["x-ratelimit-reset"])
    assert time.time() - 1 <= reset <= time.time() + 121
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    h = e.value.response.headers
    assert h["x-ratelimit-limit"] == "2" and h["x-ratelimit-remaining"] == "0"
    # Sliding window: the last minute's requests still weigh on the next one, so the wait
    # can reach one window plus 60/limit seconds (tight, see afr-core ratelimit tests).
    assert 1 <= int(h["retry-after"]) <= 60 + 60 // 2
    # Honest Reset: on a 429, Retry-After is Reset - now (rounded up).
    assert abs(int(h["x-ratelimit-reset"]) - time.time() - int(h["retry-after"])) <= 2


def test_rate_limit_headers_on_success_and_stream(gateway, key):
    client = gateway.client(key)
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
    assert raw.headers["x-ratelimit-limit"] == "1000"
    first = int(raw.headers["x-ratelimit-remaining"])
    assert raw.parse().choices[0].message.content
    with client.chat.completions.with_streaming_response.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True
    ) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["x-ratelimit-limit"] == "1000"
        assert int(resp.headers["x-ratelimit-remaining"]) == first - 1
        assert int(resp.headers["x-ratelimit-reset"]) > 0
        text = "".join(c.choices[0].delta.content or "" for c in resp.parse() if c.choices)
    assert text.startswith("Mock reply to:")


def test_client_authorization_never_reaches_the_provider(gateway, key):
    gateway.clear_mock_requests()
    gateway.client(key).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    reqs = gateway.mock_requests()
    assert reqs, "the mock saw the request"
    for r in reqs:
        blob = str(r.get("headers"))
        assert key not in blob
        assert "x-afr-secret" not in blob.lower()


def test_openai_error_json_for_nginx_level_errors(gateway):
    # No key at all: decided by the module, JSON not HTML.
    status, headers, body = http("POST", gateway.base + "/v1/chat/completions", b"{}", {"Content-Type": "application/json"})
    assert status == 401 and headers["Content-Type"].startswith("application/json")
    assert b'"error"' in body
