"""Anthropic's Messages API through the whole gateway with the official `anthropic`
Python SDK: real nginx (keys from `x-api-key`, Anthropic-shaped refusals) -> the
sidecar -> afr-mock speaking Anthropic (passthrough) or OpenAI (translated).

The stack has its own catalogue entry `claude-haiku-4-5`, routed to two Anthropic
mocks that require a provider key (the first one is the failover test's victim);
`gpt-4o-mini` stays on the quickstart's OpenAI-speaking mock, so Messages requests
for it are translated to chat completions and back."""

from __future__ import annotations

import html
import os
import re
import subprocess
import json
import shutil
import signal
import time

import anthropic
import pytest

from conftest import AFR, REPO, extend_catalogue, http, runtime_dir, start_gateway


PROVIDER_KEY = "sk-ant-provider-0123456789abcdef"
CLAUDE = "claude-haiku-4-5"
UPSTREAM = "claude-haiku-4-5-20251001"
WEATHER = {
    "name": "get_weather",
    "description": "Current weather at a location",
    "input_schema": {"type": "object", "properties": {"location": {"type": "string"}, "days": {"type": "integer"}}, "required": ["location"]},
}


def words(s: str) -> int:
    return len(s.split())


def mock_prompt(messages: list[dict], system: str | None = None) -> int:
    """afr-mock's prompt tokens (mock-provider/src/reply.rs), system counted as a message."""
    return sum(1 + words(m["content"]) for m in messages) + (1 + words(system) if system else 0)


def wait_until(pred, timeout=4.0, step=0.05):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return True
        time.sleep(step)
    return False


@pytest.fixture(scope="module")
def gw():
    home = runtime_dir("messages")
    g, _ = start_gateway(home, {"AFR_TEST_ANTHROPIC_KEY": PROVIDER_KEY})
    g.anth = g.start_mock("--api-key", PROVIDER_KEY)
    g.anth_down = g.start_mock("--api-key", PROVIDER_KEY)
    timeouts = {"connect": "1s", "first_byte": "5s", "idle": "5s", "total": "30s"}
    providers = {
        name: {"kind": "anthropic", "base_url": url + "/v1", "api_key_env": "AFR_TEST_ANTHROPIC_KEY", "timeouts": timeouts}
        for name, url in (("anth_down", g.anth_down), ("anth", g.anth))
    }
    model = {
        "tier": "Fast",
        "description": "Claude Haiku through the Anthropic passthrough",
        "routes": [{"provider": "anth_down", "model": UPSTREAM}, {"provider": "anth", "model": UPSTREAM}],
    }
    extend_catalogue(g, providers, {CLAUDE: model})
    g.key_id = f"msg-{time.time_ns() % 10**10}"
    g.key = g.new_key(g.key_id, "--rpm", "1000")
    yield g
    g.stop()
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(autouse=True)
def healthy_mocks(gw):
    for url in (gw.anth, gw.anth_down):
        gw.mock_config(url)  # default knobs: healthy
        gw.clear_mock_requests(url)


def client(gw, key=None, **kw):
    kw.setdefault("max_retries", 0)
    kw.setdefault("timeout", 20)
    return anthropic.Anthropic(base_url=gw.base, api_key=key or gw.key, **kw)


def served_by(gw, url):
    return [r for r in gw.mock_requests(url) if r["path"].startswith("/v1/messages")]


def test_create_passes_the_clients_bytes_through_with_only_the_model_and_never_its_key(gw):
    messages = [{"role": "user", "content": "Hello through the gateway"}]
    raw = client(gw).messages.with_raw_response.create(model=CLAUDE, max_tokens=300, system="Be brief.", messages=messages)
    msg = raw.parse()
    assert msg.content[0].text == "Mock reply to: Hello through the gateway"
    assert msg.stop_reason == "end_turn"
    assert msg.usage.input_tokens == mock_prompt(messages, "Be brief.")
    assert msg.usage.output_tokens == 7
    assert raw.headers["x-ratelimit-limit"] == "1000"
    assert int(raw.headers["x-ratelimit-remaining"]) < 1000
    assert int(raw.headers["x-ratelimit-reset"]) > time.time() - 1

    [req] = served_by(gw, gw.anth_down) or served_by(gw, gw.anth)
    assert req["body"]["model"] == UPSTREAM
    headers = {k.lower(): v for k, v in req["headers"].items()}
    assert headers["x-api-key"] == PROVIDER_KEY, "the provider gets the provider's key"
    assert gw.key not in json.dumps(req), "the client's key never reaches a provider"
    assert "authorization" not in headers
    assert headers["anthropic-version"], "the SDK's API version goes up with it"


def test_passthrough_is_byte_faithful(gw):
    raw = (
        '{ "max_tokens" : 1000, "model":"%s","top_p":1e-1,"x_future":{"b":1,"a":[1.50]},'
        '"messages":[{"role":"user","content":[{"type":"text","text":"caf\\u00e9 ok","cache_control":{"type":"ephemeral"}}]}]}'
    ) % CLAUDE
    status, _, body = http("POST", gw.base + "/v1/messages", raw.encode(), {"x-api-key": gw.key, "anthropic-version": "2023-06-01", "anthropic-beta": "test-beta-1"})
    assert status == 200, body
    [req] = served_by(gw, gw.anth_down) or served_by(gw, gw.anth)
    assert req["raw_body"] == raw.replace('"%s"' % CLAUDE, '"%s"' % UPSTREAM)
    assert (req["headers"]["anthropic-version"], req["headers"]["anthropic-beta"]) == ("2023-06-01", "test-beta-1")


@pytest.mark.parametrize("model", [CLAUDE, "gpt-4o-mini"])
def test_a_system_message_inside_messages_is_served_in_place(gw, model):
    """Issue 23: Claude Code's first request of every session has a `system` message inside
    `messages`; Anthropic accepts it, and so does the gateway now (it answered 400
    `messages.1.role: Unexpected role "system"`). An Anthropic route gets it as sent; an
    OpenAI-wire route gets a chat system message in the same place."""
    messages = [
        {"role": "user", "content": "hello"},
        {"role": "system", "content": [{"type": "text", "text": "From here on, be brief."}]},
        {"role": "user", "content": "and then?"},
    ]
    body = json.dumps({"model": model, "max_tokens": 50, "messages": messages}).encode()
    headers = {"x-api-key": gw.key, "anthropic-version": "2023-06-01", "content-type": "application/json"}
    status, _, answer = http("POST", gw.base + "/v1/messages", body, headers)
    assert status == 200, answer
    if model == CLAUDE:
        [req] = served_by(gw, gw.anth_down) or served_by(gw, gw.anth)
        assert req["body"]["messages"] == messages
    else:
        chat = [r for r in gw.mock_requests() if r["path"] == "/v1/chat/completions"][-1]
        assert [m["role"] for m in chat["body"]["messages"]] == ["user", "system", "user"]
        assert chat["body"]["messages"][1]["content"] == "From here on, be brief."
        # A role chat completions have nothing for is named, Anthropic-shaped.
        odd = json.dumps({"model": model, "max_tokens": 50, "messages": [{"role": "narrator", "content": "x"}]})
        status, _, answer = http("POST", gw.base + "/v1/messages", odd.encode(), headers)
        assert status == 400, answer
        err = json.loads(answer)
        assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error", err
        assert "messages.0.role" in err["error"]["message"], err


def test_stream_text_and_usage(gw):
    messages = [{"role": "user", "content": "stream these words to me"}]
    with client(gw).messages.stream(model=CLAUDE, max_tokens=300, messages=messages) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Mock reply to: stream these words to me"
    assert final.usage.input_tokens == mock_prompt(messages)
    assert final.usage.output_tokens == 8
    assert final.stop_reason == "end_turn"


@pytest.mark.parametrize("model", [CLAUDE, "gpt-4o-mini"])
def test_stream_with_a_tool_use_and_the_tool_result_turn(gw, model):
    ask = [{"role": "user", "content": "San Francisco, CA"}]
    with client(gw).messages.stream(model=model, max_tokens=300, tools=[WEATHER], messages=ask) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_message()
    assert "input_json" in events
    assert final.stop_reason == "tool_use"
    [call] = [b for b in final.content if b.type == "tool_use"]
    assert (call.name, call.input) == ("get_weather", {"location": "San Francisco, CA"})
    # Not streamed: the same call.
    msg = client(gw).messages.create(model=model, max_tokens=300, tools=[WEATHER], messages=ask)
    assert [(b.type, b.name, b.input) for b in msg.content] == [("tool_use", "get_weather", {"location": "San Francisco, CA"})]
    # The tool's answer goes back; the model answers in text.
    turn = ask + [
        {"role": "assistant", "content": [{"type": "tool_use", "id": call.id, "name": call.name, "input": call.input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "68F, sunny"}, {"type": "text", "text": "thanks"}]},
    ]
    done = client(gw).messages.create(model=model, max_tokens=300, tools=[WEATHER], messages=turn)
    assert done.content[0].text == "Mock reply to: thanks"


def gateway_estimate(messages: list[dict], system: str = "") -> int:
    """The gateway's prompt estimate (afr-core/src/estimate.rs) of plain ASCII messages:
    every key and string in them at a quarter token a character, plus 8 of framing."""
    units = len(system) + sum(len("role") + len(m["role"]) + len("content") + len(m["content"]) for m in messages)
    return -(-units // 4) + 8


def test_count_tokens_passthrough_and_estimate(gw):
    messages = [{"role": "user", "content": "Hello, Claude"}]
    counted = client(gw).messages.count_tokens(model=CLAUDE, system="You are a scientist", messages=messages)
    assert counted.input_tokens == mock_prompt(messages, "You are a scientist")
    [req] = served_by(gw, gw.anth_down) or served_by(gw, gw.anth)
    assert req["path"] == "/v1/messages/count_tokens"
    # An OpenAI-compatible route cannot count: the gateway answers its own estimate, which
    # for this recorded example (Anthropic counted 14) is 20.
    estimate = client(gw).messages.count_tokens(model="gpt-4o-mini", system="You are a scientist", messages=messages)
    assert estimate.input_tokens == gateway_estimate(messages, "You are a scientist") == 20


def test_translated_route_create_and_stream(gw):
    messages = [{"role": "user", "content": "translate me please"}]
    msg = client(gw).messages.create(model="gpt-4o-mini", max_tokens=300, system="Be brief.", messages=messages)
    assert msg.type == "message" and msg.role == "assistant"
    assert msg.content[0].text == "Mock reply to: translate me please"
    assert msg.usage.input_tokens == mock_prompt(messages, "Be brief.")
    assert msg.usage.output_tokens == 6
    with client(gw).messages.stream(model="gpt-4o-mini", max_tokens=300, messages=messages) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Mock reply to: translate me please"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (mock_prompt(messages), 6)
    # max_tokens reached: OpenAI's "length" is Anthropic's "max_tokens".
    short = client(gw).messages.create(model="gpt-4o-mini", max_tokens=2, messages=messages)
    assert short.stop_reason == "max_tokens" and short.content[0].text == "Mock reply"


def test_invalid_or_missing_key_is_the_sdks_authentication_error(gw):
    for key in ("afr_" + "x" * 40, "not-a-key"):
        with pytest.raises(anthropic.AuthenticationError) as e:
            client(gw, key).messages.create(model=CLAUDE, max_tokens=10, messages=[{"role": "user", "content": "hi"}])
        assert e.value.status_code == 401
        assert e.value.body["error"]["type"] == "authentication_error"
    status, headers, body = http("POST", gw.base + "/v1/messages", b"{}", {"content-type": "application/json"})
    assert status == 401
    assert json.loads(body) == {"type": "error", "error": {"type": "authentication_error", "message": json.loads(body)["error"]["message"]}}
    assert "x-api-key" in json.loads(body)["error"]["message"]
    # Two different keys in one request are refused, not guessed between.
    status, _, _ = http("POST", gw.base + "/v1/messages", b"{}", {"x-api-key": gw.key, "authorization": "Bearer afr_" + "y" * 40})
    assert status == 401
    # Elsewhere the body stays OpenAI's.
    status, _, body = http("GET", gw.base + "/v1/models", headers={"x-api-key": "afr_" + "x" * 40})
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"


def test_over_the_limit_is_the_sdks_rate_limit_error_with_retry_after(gw):
    key = gw.new_key(f"msg-rl-{time.time_ns() % 10**10}", "--rpm", "1")
    c = client(gw, key)
    with pytest.raises(anthropic.RateLimitError) as e:
        # new_key's readiness probe may have used the one request already.
        for _ in range(2):
            c.messages.create(model="gpt-4o-mini", max_tokens=10, messages=[{"role": "user", "content": "one"}])
    assert e.value.status_code == 429
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "rate_limit_error"
    # Honest Retry-After (design §3): with 1 request a minute, up to two windows away.
    assert 0 < int(e.value.response.headers["retry-after"]) <= 120
    assert e.value.response.headers["x-ratelimit-remaining"] == "0"


def test_gateway_errors_are_anthropic_shaped(gw):
    c = client(gw)
    with pytest.raises(anthropic.BadRequestError) as e:
        c.messages.create(model="no-such-model", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["error"]["type"] == "invalid_request_error" and "no-such-model" in e.value.body["error"]["message"]
    status, _, body = http("POST", gw.base + "/v1/messages", b'{"model":"gpt-4o-mini","messages":[]}', {"x-api-key": gw.key})
    assert status == 400 and json.loads(body)["error"]["message"] == "max_tokens: Field required"


def test_failover_before_the_first_content_and_one_usage_row_per_request(gw):
    gw.mock_config(gw.anth_down, status=529)
    kid = f"msg-fo-{time.time_ns() % 10**10}"
    c = client(gw, gw.new_key(kid, "--rpm", "1000"))
    messages = [{"role": "user", "content": "fail over please"}]
    msg = c.messages.create(model=CLAUDE, max_tokens=100, messages=messages)
    assert msg.content[0].text == "Mock reply to: fail over please"
    with c.messages.stream(model=CLAUDE, max_tokens=100, messages=messages) as stream:
        assert "".join(stream.text_stream) == "Mock reply to: fail over please"
    assert len(served_by(gw, gw.anth_down)) == 2 and len(served_by(gw, gw.anth)) == 2

    # A provider that breaks after the first content: the stream ends with an
    # Anthropic error event, never silently.
    gw.mock_config(gw.anth_down, status=529)
    gw.mock_config(gw.anth, error_after_chunks=2)
    with pytest.raises(anthropic.APIStatusError) as e:
        with c.messages.stream(model=CLAUDE, max_tokens=100, messages=messages) as stream:
            "".join(stream.text_stream)
    assert "overloaded" in str(e.value).lower() or "stream" in str(e.value).lower()

    def rows():
        out = gw.afr("usage", "--config", str(gw.home / "sidecar.toml"), "--key", kid, "--by", "provider", "--json").stdout
        return {r["provider"]: (r["requests"], r["prompt_tokens"], r["completion_tokens"]) for r in json.loads(out)["data"]}

    p = mock_prompt(messages)
    assert wait_until(lambda: rows().get("anth", (0,))[0] == 3), rows()
    got = rows()["anth"]
    assert got[1] == 3 * p and got[2] >= 2 * 6, got
    assert "anth_down" not in rows(), "a failed-over attempt is no row of its own"


def test_a_200_that_is_not_json_fails_over_on_the_passthrough(gw):
    gw.mock_config(gw.anth_down, non_json=True)
    msg = client(gw).messages.create(model=CLAUDE, max_tokens=100, messages=[{"role": "user", "content": "not a portal page"}])
    assert msg.content[0].text == "Mock reply to: not a portal page"
    assert len(served_by(gw, gw.anth_down)) == 1 and len(served_by(gw, gw.anth)) == 1


def test_translated_stream_broken_after_content_ends_with_an_error_event(gw):
    gw.mock_config(error_after_chunks=2)
    try:
        seen = []
        with pytest.raises(anthropic.APIStatusError):
            with client(gw).messages.stream(model="gpt-4o-mini", max_tokens=100, messages=[{"role": "user", "content": "break after two words please"}]) as stream:
                for text in stream.text_stream:
                    seen.append(text)
        assert "".join(seen) == "Mock reply"
        # Before any content the same failure is a clean error, not a broken stream.
        gw.mock_config(status=500)
        with pytest.raises(anthropic.InternalServerError) as e:
            client(gw).messages.create(model="gpt-4o-mini", max_tokens=100, messages=[{"role": "user", "content": "x"}])
        assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "api_error"
    finally:
        gw.mock_config()


def docs_example(label: str, origin: str) -> str:
    """The text of the docs' example block `aria-label=label`, as a reader copies it."""
    page = (REPO / "web" / "docs" / "index.html").read_text()
    m = re.search(r'<pre[^>]*aria-label="%s"[^>]*><code>(.*?)</code></pre>' % re.escape(label), page, re.S)
    assert m, label
    code = m.group(1).replace("<span data-origin></span>", origin)
    return html.unescape(re.sub(r"<[^>]+>", "", code))


def test_docs_messages_examples_run(gw, tmp_path):
    env = dict(gw.env, AFR_API_KEY=gw.key)
    want = "Mock reply to: Say hello in French."
    out = subprocess.run(["bash", "-c", docs_example("curl messages", gw.base)], env=env, capture_output=True, text=True, timeout=30)
    assert json.loads(out.stdout)["content"][0]["text"] == want, out
    script = tmp_path / "example.py"
    script.write_text(docs_example("Python messages", gw.base))
    out = subprocess.run([str(REPO / "build/venv/bin/python"), str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    counted = gateway_estimate([{"role": "user", "content": "Count to three."}])
    assert out.stdout.splitlines() == [want, "Mock reply to: Count to three.", str(counted)]
    # Inside tests/ so the SDK resolves from tests/node_modules.
    js = REPO / "tests" / f".docs-example-{os.getpid()}.mjs"
    js.write_text(docs_example("JavaScript messages", gw.base))
    try:
        out = subprocess.run(["node", str(js)], env=env, capture_output=True, text=True, timeout=30)
    finally:
        js.unlink()
    assert out.returncode == 0, out.stderr
    assert out.stdout == want + "\nMock reply to: Count to three."


def test_nginx_error_pages_are_anthropic_shaped_on_messages(gw):
    """Runs last: it stops the sidecar."""
    big = b'{"model":"gpt-4o-mini","max_tokens":5,"messages":[{"role":"user","content":"' + b"x" * (33 << 20) + b'"}]}'
    status, _, body = http("POST", gw.base + "/v1/messages", big, {"x-api-key": gw.key})
    assert status == 413 and json.loads(body)["error"]["type"] == "request_too_large"
    status, _, body = http("POST", gw.base + "/v1/chat/completions", big, {"Authorization": f"Bearer {gw.key}"})
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"
    os.kill(gw.pids()["sidecar"], signal.SIGTERM)
    assert wait_until(lambda: http("POST", gw.base + "/v1/messages", b"{}", {"x-api-key": gw.key})[0] == 503, timeout=30)
    status, headers, body = http("POST", gw.base + "/v1/messages", b"{}", {"x-api-key": gw.key})
    assert json.loads(body)["error"]["type"] == "overloaded_error" and headers["Retry-After"] == "30"
    with pytest.raises(anthropic.InternalServerError):
        client(gw).messages.create(model="gpt-4o-mini", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
