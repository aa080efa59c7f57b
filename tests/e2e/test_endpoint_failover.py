"""Failover on /v1/embeddings, /v1/completions, /v1/responses and /v1/messages through the
whole stack (nginx -> module -> sidecar -> afr-mock), with the official SDKs.

Every endpoint has two catalogue models per fault, each routed to [its own primary mock with
the fault set, the shared healthy backup]; the backup is reached under a per-case upstream
model name, so its request log says which case it served. Faults: the primary answers 503,
or never answers (its first byte is later than the primary's short `first_byte`/`total`
timeouts). Plain and streamed requests alike must be answered by the backup, unchanged to
the client. The Messages primary is an Anthropic provider and the backup an OpenAI-compatible
one: the failover crosses the translation."""

from __future__ import annotations

import shutil
import time
import tomllib

import anthropic
import pytest

from conftest import http, runtime_dir, start_gateway
from test_faults import write_config

ANTHROPIC_ENV = "AFR_FAILOVER_ANTHROPIC_KEY"
FAST = {"connect": "300ms", "first_byte": "700ms", "first_content": "2s", "idle": "1s", "total": "2s"}
FAULTS = {"503": {"status": 503}, "timeout": {"latency_ms": 60000}}
ENDPOINTS = ("embeddings", "completions", "responses", "messages")


@pytest.fixture(scope="module")
def stack():
    home = runtime_dir("endpoint-failover")
    gw, _ = start_gateway(home, {ANTHROPIC_ENV: "sk-ant-failover-" + "k" * 24})
    gw.original_config = (home / "sidecar.toml").read_text()
    backup = gw.start_mock("--threads", "1")
    primaries = {}
    for endpoint in ENDPOINTS:
        for fault, knobs in FAULTS.items():
            url = gw.start_mock("--threads", "1")
            gw.mock_config(url, **knobs)
            primaries[(endpoint, fault)] = url

    def mutate(cfg):
        cfg["providers"]["backup"] = {"kind": "openai", "base_url": backup + "/v1"}
        for (endpoint, fault), url in primaries.items():
            name = f"{endpoint}-{fault}"
            p = {"kind": "openai", "base_url": url + "/v1", "timeouts": dict(FAST)}
            upstream = "gpt-4o-mini"
            if endpoint == "messages":
                p.update(kind="anthropic", api_key_env=ANTHROPIC_ENV)
                upstream = "claude-haiku-4-5"
            cfg["providers"][f"p-{name}"] = p
            model = {"tier": "Fast", "description": f"failover {name}"}
            if endpoint == "embeddings":
                model["kind"] = "embedding"
            model["routes"] = [
                {"provider": f"p-{name}", "model": upstream},
                {"provider": "backup", "model": f"backup-{name}"},
            ]
            cfg["models"][f"fo-{name}"] = model

    write_config(gw, mutate)
    key = gw.new_key("failover", "--rpm", "100000")
    deadline = time.monotonic() + 5
    while b"fo-messages-timeout" not in http("GET", gw.base + "/v1/models", headers={"Authorization": f"Bearer {key}"})[2]:
        assert time.monotonic() < deadline, "the sidecar did not load the failover config"
        time.sleep(0.1)
    gw.key, gw.backup, gw.primaries = key, backup, primaries
    yield gw
    gw.stop()
    shutil.rmtree(home, ignore_errors=True)


def served(gw, url: str, upstream: str | None = None) -> int:
    return sum(1 for r in gw.mock_requests(url) if upstream is None or (isinstance(r["body"], dict) and r["body"].get("model") == upstream))


def check_failed_over(gw, endpoint: str, fault: str, calls: int) -> None:
    """The primary was tried `calls` times and the backup answered each of them."""
    assert served(gw, gw.primaries[(endpoint, fault)]) == calls, "the primary is tried first"
    assert served(gw, gw.backup, f"backup-{endpoint}-{fault}") == calls, "the backup answered"


@pytest.mark.parametrize("fault", FAULTS)
def test_embeddings_fail_over(stack, fault):
    client = stack.client(stack.key)
    out = client.embeddings.create(model=f"fo-embeddings-{fault}", input="Hello, world!", encoding_format="float")
    assert len(out.data[0].embedding) == 1536 and out.usage.prompt_tokens == 2
    check_failed_over(stack, "embeddings", fault, 1)


@pytest.mark.parametrize("fault", FAULTS)
def test_completions_fail_over_plain_and_streamed(stack, fault):
    client = stack.client(stack.key)
    model = f"fo-completions-{fault}"
    assert client.completions.create(model=model, prompt="Tell me a joke").choices[0].text == "Mock reply to: Tell me a joke"
    pieces = [c.choices[0].text for c in client.completions.create(model=model, prompt="Tell me a joke", stream=True) if c.choices]
    assert "".join(pieces) == "Mock reply to: Tell me a joke"
    check_failed_over(stack, "completions", fault, 2)


@pytest.mark.parametrize("fault", FAULTS)
def test_responses_fail_over_plain_and_streamed(stack, fault):
    client = stack.client(stack.key)
    model = f"fo-responses-{fault}"
    assert client.responses.create(model=model, input="Say hi").output_text == "Mock reply to: Say hi"
    with client.responses.stream(model=model, input="Say hi") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == "Mock reply to: Say hi" and final.status == "completed"
    check_failed_over(stack, "responses", fault, 2)


@pytest.mark.parametrize("fault", FAULTS)
def test_messages_fail_over_plain_and_streamed(stack, fault):
    client = anthropic.Anthropic(base_url=stack.base, api_key=stack.key, max_retries=0, timeout=20)
    model = f"fo-messages-{fault}"
    messages = [{"role": "user", "content": "Say hi"}]
    msg = client.messages.create(model=model, max_tokens=100, messages=messages)
    assert msg.content[0].text == "Mock reply to: Say hi"
    with client.messages.stream(model=model, max_tokens=100, messages=messages) as stream:
        text = "".join(stream.text_stream)
    assert text == "Mock reply to: Say hi"
    check_failed_over(stack, "messages", fault, 2)


def test_messages_refuse_an_embedding_model_naming_model(stack):
    client = anthropic.Anthropic(base_url=stack.base, api_key=stack.key, max_retries=0, timeout=20)
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="fo-embeddings-503", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "invalid_request_error"
    assert "model" in e.value.body["error"]["message"] and "fo-embeddings-503" in e.value.body["error"]["message"]
    assert served(stack, stack.primaries[("embeddings", "503")], None) <= 1, "refused before any provider"
