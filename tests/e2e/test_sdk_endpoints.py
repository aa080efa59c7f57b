"""The official `openai` Python SDK on /v1/embeddings, /v1/completions and /v1/responses
through the whole gateway (nginx -> module -> sidecar -> mock): plain and streamed answers,
a function call, rate-limit headers, the catalogue's kinds and one usage row per request."""

from __future__ import annotations

import itertools
import json
import time

import openai
import pytest

from conftest import http

_ids = itertools.count()
EMBED = "text-embedding-3-small"


@pytest.fixture
def key(gateway):
    return gateway.new_key(f"pyep{next(_ids)}-{int(time.time() * 1000) % 10**8}", "--rpm", "1000")


def usage_by_model(gateway, key: str, model: str, requests: int) -> dict:
    """GET /v1/usage?by=model for the key, polled until `model` has `requests` rows."""
    row = {}
    for _ in range(100):
        status, _, body = http("GET", gateway.base + "/v1/usage?by=model", headers={"Authorization": f"Bearer {key}"})
        assert status == 200, body
        rows = {r["model"]: r for r in json.loads(body)["data"]}
        row = rows.get(model, {})
        if row.get("requests") == requests:
            return row
        time.sleep(0.05)
    return row


def test_embeddings_float_and_base64(gateway, key):
    client = gateway.client(key)
    floats = client.embeddings.create(model=EMBED, input="Hello, world!", encoding_format="float")
    assert floats.object == "list" and len(floats.data) == 1
    assert len(floats.data[0].embedding) == 1536
    # The SDK asks for base64 by default and decodes it to floats.
    packed = client.embeddings.create(model=EMBED, input=["Hello, world!", "again"], dimensions=64)
    assert [len(d.embedding) for d in packed.data] == [64, 64]
    assert packed.usage.prompt_tokens == 3
    assert all(isinstance(x, float) for x in packed.data[0].embedding)
    row = usage_by_model(gateway, key, EMBED, 2)
    assert row["requests"] == 2 and row["prompt_tokens"] == 2 + 3 and row["completion_tokens"] == 0


def test_completions_plain_and_streaming(gateway, key):
    client = gateway.client(key)
    plain = client.completions.create(model="gpt-4o-mini", prompt="Tell me a joke")
    assert plain.object == "text_completion"
    assert plain.choices[0].text == "Mock reply to: Tell me a joke"
    pieces = [c.choices[0].text for c in client.completions.create(model="gpt-4o-mini", prompt="Tell me a joke", stream=True) if c.choices]
    assert "".join(pieces) == "Mock reply to: Tell me a joke"
    row = usage_by_model(gateway, key, "gpt-4o-mini", 2)
    assert row["requests"] == 2 and row["estimated_requests"] == 0 and row["completion_tokens"] == 2 * 7


def test_responses_create_and_stream_text(gateway, key):
    client = gateway.client(key)
    resp = client.responses.create(model="gpt-5-mini", input="Say hi")
    assert resp.output_text == "Mock reply to: Say hi"
    deltas = []
    with client.responses.stream(model="gpt-5-mini", input="Say hi") as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()
    assert "".join(deltas) == "Mock reply to: Say hi" and len(deltas) == 5
    assert final.usage.output_tokens == 5
    row = usage_by_model(gateway, key, "gpt-5-mini", 2)
    assert row["requests"] == 2 and row["completion_tokens"] == 10 and row["truncated"] == 0


def test_responses_stream_with_a_function_call(gateway, key):
    tools = [{"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}}]
    with gateway.client(key).responses.stream(model="gpt-4o-mini", input="Weather in SF?", tools=tools) as stream:
        args = "".join(e.delta for e in stream if e.type == "response.function_call_arguments.delta")
        final = stream.get_final_response()
    assert json.loads(args) == {"location": "San Francisco, CA"}
    call = final.output[0]
    assert call.type == "function_call" and call.name == "get_weather"


def test_rate_limit_headers_on_every_new_endpoint(gateway, key):
    client = gateway.client(key)
    raw = client.embeddings.with_raw_response.create(model=EMBED, input="x")
    assert raw.headers["x-ratelimit-limit"] == "1000"
    with client.completions.with_streaming_response.create(model="gpt-4o-mini", prompt="x", stream=True) as r:
        assert r.headers["x-ratelimit-limit"] == "1000" and int(r.headers["x-ratelimit-reset"]) > 0
    with client.responses.with_streaming_response.create(model="gpt-4o-mini", input="x", stream=True) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-ratelimit-limit"] == "1000"


def test_limits_and_wrong_kinds_are_typed_errors(gateway):
    key = gateway.new_key(f"pyep-rl-{int(time.time() * 1000) % 10**8}", "--rpm", "2")
    client = gateway.client(key)
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="gpt-4o-mini", input="x")
    assert e.value.param == "model" and e.value.code == "model_not_supported"
    with pytest.raises(openai.RateLimitError):
        client.with_options(max_retries=0).responses.create(model="gpt-4o-mini", input="x")


def test_query_parameters_reach_a_provider_of_the_same_wire(gateway, key):
    """Issue 23: parameters the gateway does not know pass through untouched — on every
    OpenAI-format endpoint to an OpenAI-format route, as on the Messages passthrough (its
    `?beta=true`). They were dropped."""
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    cases = {
        "/v1/chat/completions": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
        "/v1/responses": {"model": "gpt-4o-mini", "input": "hi"},
        "/v1/embeddings": {"model": EMBED, "input": "hi"},
    }
    http("DELETE", gateway.mock_url() + "/_mock/requests")
    for path, body in cases.items():
        status, _, answer = http("POST", f"{gateway.base}{path}?x-future=a%20b&flag", json.dumps(body).encode(), headers)
        assert status == 200, (path, answer)
    seen = [r["path"] for r in gateway.mock_requests()]
    for path in cases:
        assert f"{path}?x-future=a%20b&flag" in seen, (path, seen)
