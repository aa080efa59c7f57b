"""What a request costs (issue 21, design §3), through real nginx, module, sidecar and
afr-mock with the official `openai` and `anthropic` SDKs: the reservation bounds what a
provider may bill on every endpoint (the client's own caps, `n`, `best_of`, the caps the
gateway writes in), a request that can never fit is refused without a Retry-After, every
token class is priced, a cut or usage-less answer is billed what the provider did, and
`count_tokens` is free.

The stack has its own catalogue entry `claude-haiku-4-5` routed to an Anthropic-speaking
mock, priced like Anthropic's list ($1 in, $0.10 cache reads, $5 out; cache writes at the
published 1.25x / 2x input). `gpt-4o-mini` stays on the quickstart's OpenAI mock ($0.15
in, $0.075 cached, $0.60 out). Each usage row is compared with what the mock reports it
billed for the same request (matched by the gateway's x-request-id)."""

from __future__ import annotations

import json
import shutil
import sqlite3
import time

import anthropic
import openai
import pytest

from conftest import REPO, billed_nanos, extend_catalogue, http, mock_billed, runtime_dir, start_gateway, usage_row

PROVIDER_KEY = "sk-ant-provider-costs-0123456789"
CLAUDE = "claude-haiku-4-5"
CLAUDE_PRICE = {"input": 1.0, "cached_input": 0.1, "output": 5.0}
GPT_PRICE = {"input": 0.15, "cached_input": 0.075, "output": 0.60}
HI = [{"role": "user", "content": "hi"}]
LONG_PRICE = {"above": 100, "input": 2.0, "cached_input": 0.2, "output": 7.5}
CONTEXT_1M = {"anthropic-beta": "context-1m-2025-08-07"}


@pytest.fixture(scope="module")
def gw():
    home = runtime_dir("costs")
    g, _ = start_gateway(home, {"AFR_TEST_ANTHROPIC_KEY": PROVIDER_KEY})
    g.anth = g.start_mock("--api-key", PROVIDER_KEY)
    timeouts = {"connect": "1s", "first_byte": "5s", "idle": "5s", "total": "30s"}
    anth = {"kind": "anthropic", "base_url": g.anth + "/v1", "api_key_env": "AFR_TEST_ANTHROPIC_KEY", "timeouts": timeouts}
    claude_model = {
        "tier": "Fast",
        "description": "Claude Haiku through the Anthropic passthrough",
        "routes": [{"provider": "anth", "model": "claude-haiku-4-5-20251001", "price": CLAUDE_PRICE}],
    }
    # Two more mocks that answer 200 and then break before any content, each the first
    # route of a model that fails over to a healthy one.
    g.anth_broken = g.start_mock("--api-key", PROVIDER_KEY)
    g.oai_broken = g.start_mock()
    anth_broken = dict(anth, base_url=g.anth_broken + "/v1")
    oai_broken = {"kind": "openai", "base_url": g.oai_broken + "/v1", "timeouts": timeouts}
    claude_failover = {
        "tier": "Fast",
        "description": "a broken Anthropic route, then a healthy one",
        "routes": [
            {"provider": "anth_broken", "model": "claude-haiku-4-5-20251001", "price": CLAUDE_PRICE},
            {"provider": "anth", "model": "claude-haiku-4-5-20251001", "price": CLAUDE_PRICE},
        ],
    }
    gpt_failover = {
        "tier": "Fast",
        "description": "a broken OpenAI route, then a healthy one",
        "routes": [
            {"provider": "oai_broken", "model": "gpt-4o-mini", "price": GPT_PRICE},
            {"provider": "mock", "model": "gpt-4o-mini", "price": GPT_PRICE},
        ],
    }
    claude_long = {
        "tier": "Fast",
        "description": "Claude with a long-context tier above 100 input tokens",
        "routes": [{"provider": "anth", "model": "claude-sonnet-4-5", "price": dict(CLAUDE_PRICE, long_context=LONG_PRICE)}],
    }
    extend_catalogue(
        g,
        {"anth": anth, "anth_broken": anth_broken, "oai_broken": oai_broken},
        {CLAUDE: claude_model, "claude-failover": claude_failover, "gpt-failover": gpt_failover, "claude-long": claude_long},
    )
    yield g
    g.stop()
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(autouse=True)
def healthy_mocks(gw):
    urls = (gw.anth, gw.mock_url(), gw.anth_broken, gw.oai_broken)
    for url in urls:
        gw.mock_config(url)
        gw.clear_mock_requests(url)
    yield
    for url in urls:
        gw.mock_config(url)


_n = iter(range(10**6))


KEY_IDS: dict[str, str] = {}


def new_key(gw, *limits: str) -> str:
    key_id = f"cost{next(_n)}-{time.time_ns() % 10**9}"
    key = gw.new_key(key_id, "--rpm", "10000", *limits)
    KEY_IDS[key] = key_id
    return key


def claude(gw, key, **kw):
    kw.setdefault("max_retries", 0)
    return anthropic.Anthropic(base_url=gw.base, api_key=key, timeout=20, **kw)


def gpt(gw, key, **kw):
    kw.setdefault("max_retries", 0)
    return openai.OpenAI(base_url=gw.base + "/v1", api_key=key, timeout=20, **kw)


def rows_of(gw, key: str) -> int:
    """How many usage rows the key has (every request leaves exactly one)."""
    time.sleep(0.5)  # past the batch writer's interval
    db = sqlite3.connect(f"file:{gw.home / 'usage.db'}?mode=ro", uri=True, timeout=5)
    try:
        return db.execute("SELECT COUNT(*) FROM usage WHERE key_id = ?", (KEY_IDS[key],)).fetchone()[0]
    finally:
        db.close()


def assert_row_is_what_was_billed(r: dict, b: dict, price: dict) -> None:
    assert r["prompt_tokens"] == b["input"], (r, b)
    assert r["cached_tokens"] == b["cached_input"], (r, b)
    assert r["cache_write_5m_tokens"] == b["cache_write_5m"], (r, b)
    assert r["cache_write_1h_tokens"] == b["cache_write_1h"], (r, b)
    assert r["completion_tokens"] == b["output"], (r, b)
    assert r["reasoning_tokens"] == b["reasoning"], (r, b)
    assert r["token_source"] == "provider", r
    assert r["cost_nanos"] == billed_nanos(b, price), (r, b)


# --- 1. the reservation is a true bound -------------------------------------------------


def test_messages_reserve_the_clients_max_tokens_and_what_can_never_fit_is_not_retried(gw):
    key = new_key(gw, "--tpm", "10000")
    with pytest.raises(anthropic.RateLimitError) as e:
        claude(gw, key).messages.create(model=CLAUDE, max_tokens=32000, messages=HI)
    h = e.value.response.headers
    assert h["x-should-retry"] == "false" and "retry-after" not in h, dict(h)
    assert "10000" in e.value.message and "32" in e.value.message, e.value.message
    assert gw.mock_requests(gw.anth) == [], "refused before any provider"
    # The SDKs honour x-should-retry: with retries on, still one request each.
    before = rows_of(gw, key)
    with pytest.raises(anthropic.RateLimitError):
        claude(gw, key, max_retries=3).messages.create(model=CLAUDE, max_tokens=32000, messages=HI)
    with pytest.raises(openai.RateLimitError):
        gpt(gw, key, max_retries=3).chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=32000)
    assert rows_of(gw, key) == before + 2
    ok = claude(gw, key).messages.create(model=CLAUDE, max_tokens=5000, messages=HI)
    assert ok.usage.output_tokens > 0


def test_every_openai_endpoint_reserves_its_caps_times_its_choices(gw):
    key = new_key(gw, "--tpm", "10000")
    c = gpt(gw, key)
    refused = [
        lambda: c.responses.create(model="gpt-4o-mini", input="hi", max_output_tokens=32000),
        lambda: c.completions.create(model="gpt-4o-mini", prompt="hi", max_tokens=20000),
        lambda: c.completions.create(model="gpt-4o-mini", prompt="hi", max_tokens=2000, n=2, best_of=6),
        lambda: c.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=2000, n=8),
    ]
    for call in refused:
        with pytest.raises(openai.RateLimitError) as e:
            call()
        h = e.value.response.headers
        assert h["x-should-retry"] == "false" and "retry-after" not in h, dict(h)
        assert e.value.code == "rate_limit_exceeded"
    assert gw.mock_requests() == []
    # The same with fewer choices fits; n choices are billed n times, and so recorded.
    raw = c.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=HI, max_tokens=2000, n=4)
    rid = raw.headers["x-request-id"]
    assert len(raw.parse().choices) == 4
    b = mock_billed(gw, gw.mock_url(), rid)
    assert b["output"] == 4 * 4
    assert_row_is_what_was_billed(usage_row(gw, rid), b, GPT_PRICE)


def test_without_a_client_cap_the_gateway_writes_the_one_it_reserved(gw):
    key = new_key(gw)
    c = gpt(gw, key)
    c.responses.create(model="gpt-4o-mini", input="hi")
    c.completions.create(model="gpt-4o-mini", prompt="hi")
    bodies = {r["path"]: r["body"] for r in gw.mock_requests()}
    assert bodies["/v1/responses"]["max_output_tokens"] == 4096, bodies
    assert bodies["/v1/completions"]["max_tokens"] == 16, bodies
    # A small tpm can use these endpoints (it could not while 4096 was assumed).
    small = new_key(gw, "--tpm", "1000")
    s = gpt(gw, small)
    s.responses.create(model="gpt-4o-mini", input="hi", max_output_tokens=200)
    s.completions.create(model="gpt-4o-mini", prompt="hi")
    claude(gw, small).messages.create(model=CLAUDE, max_tokens=200, messages=HI)


def test_a_budget_smaller_than_the_worst_case_is_refused_up_front(gw):
    # $0.00001 = 10 000 nano-dollars; 32 000 output tokens at $5/M cost $0.16.
    key = new_key(gw, "--budget-usd", "0.00001", "--budget-per", "day")
    with pytest.raises(anthropic.RateLimitError) as e:
        claude(gw, key).messages.create(model=CLAUDE, max_tokens=32000, messages=HI)
    h = e.value.response.headers
    assert h["x-should-retry"] == "false" and "retry-after" not in h, dict(h)
    assert "budget" in e.value.message, e.value.message
    assert gw.mock_requests(gw.anth) == []


# --- 4. every token class has its price ------------------------------------------------


def test_anthropic_cache_reads_and_writes_are_priced_by_class(gw):
    key = new_key(gw)
    gw.mock_config(gw.anth, cache_read=4, cache_write_5m=2, cache_write_1h=1)
    msgs = [{"role": "user", "content": "a longer prompt of several words to be cached here"}]
    for stream in (False, True):
        if stream:
            with claude(gw, key).messages.with_streaming_response.create(
                model=CLAUDE, max_tokens=100, messages=msgs, stream=True
            ) as raw:
                rid = raw.headers["x-request-id"]
                assert "message_stop" in raw.text()
        else:
            raw = claude(gw, key).messages.with_raw_response.create(model=CLAUDE, max_tokens=100, messages=msgs)
            rid = raw.headers["x-request-id"]
            u = raw.parse().usage
            assert (u.cache_read_input_tokens, u.cache_creation_input_tokens) == (4, 3)
        b = mock_billed(gw, gw.anth, rid)
        assert (b["cached_input"], b["cache_write_5m"], b["cache_write_1h"]) == (4, 2, 1)
        assert_row_is_what_was_billed(usage_row(gw, rid), b, CLAUDE_PRICE)


def test_openai_cached_input_and_reasoning_are_priced_on_chat_and_responses(gw):
    key = new_key(gw)
    gw.mock_config(cache_read=3, reasoning_tokens=7)
    c = gpt(gw, key)
    msgs = [{"role": "user", "content": "several words of prompt for the cache"}]
    raws = [
        c.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=msgs, max_tokens=50),
        c.responses.with_raw_response.create(model="gpt-4o-mini", input=msgs, max_output_tokens=50),
    ]
    with c.chat.completions.with_streaming_response.create(
        model="gpt-4o-mini", messages=msgs, max_tokens=50, stream=True
    ) as s:
        s.read()
        raws.append(s)
    for raw in raws:
        rid = raw.headers["x-request-id"]
        b = mock_billed(gw, gw.mock_url(), rid)
        assert (b["cached_input"], b["reasoning"]) == (3, 7), b
        assert_row_is_what_was_billed(usage_row(gw, rid), b, GPT_PRICE)
    status, _, body = http("GET", gw.base + "/v1/usage", headers={"Authorization": f"Bearer {key}"})
    total = json.loads(body)["data"][0]
    assert status == 200 and total["cached_tokens"] == 9 and total["reasoning_tokens"] == 21, total


# --- 3. the settlement bills what the provider did --------------------------------------


def test_an_anthropic_stream_cut_before_message_delta_is_billed_what_was_streamed(gw):
    key = new_key(gw)
    # message_start, content_block_start, ping, then 20 of 40 deltas; no message_delta.
    gw.mock_config(gw.anth, chunks=40, cut_after_events=23)
    with claude(gw, key).messages.with_streaming_response.create(
        model=CLAUDE, max_tokens=100, messages=HI, stream=True
    ) as raw:
        rid = raw.headers["x-request-id"]
        raw.read()
    b = mock_billed(gw, gw.anth, rid)
    r = usage_row(gw, rid)
    assert b["output"] == 20, b
    assert r["token_source"] == "estimated" and r["truncated"] == 1, r
    assert r["prompt_tokens"] == b["input"], (r, b)
    assert r["completion_tokens"] >= b["output"], (r, b)
    assert r["cost_nanos"] >= billed_nanos(b, CLAUDE_PRICE), (r, b)


def test_a_messages_stream_on_an_openai_route_cut_short_is_not_free(gw):
    key = new_key(gw)
    gw.mock_config(chunks=40, cut_after_events=21)  # role chunk + 20 deltas, no usage
    with claude(gw, key).messages.with_streaming_response.create(
        model="gpt-4o-mini", max_tokens=100, messages=HI, stream=True
    ) as raw:
        rid = raw.headers["x-request-id"]
        raw.read()
    b = mock_billed(gw, gw.mock_url(), rid)
    r = usage_row(gw, rid)
    assert b["output"] == 20, b
    assert r["token_source"] == "estimated", r
    assert r["prompt_tokens"] >= 1 and r["completion_tokens"] >= b["output"], (r, b)
    assert r["cost_nanos"] >= billed_nanos(b, GPT_PRICE) > 0, (r, b)


@pytest.mark.parametrize("stream", [False, True])
def test_a_200_without_usage_is_billed_its_estimate(gw, stream):
    key = new_key(gw)
    gw.mock_config(omit_usage=True, chunks=12)
    c = gpt(gw, key)
    if stream:
        with c.chat.completions.with_streaming_response.create(
            model="gpt-4o-mini", messages=HI, max_tokens=50, stream=True
        ) as raw:
            raw.read()
    else:
        raw = c.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=HI, max_tokens=50)
    rid = raw.headers["x-request-id"]
    b = mock_billed(gw, gw.mock_url(), rid)
    r = usage_row(gw, rid)
    assert r["token_source"] == "estimated", r
    assert r["completion_tokens"] >= b["output"] and r["prompt_tokens"] >= 1, (r, b)
    assert r["cost_nanos"] >= billed_nanos(b, GPT_PRICE) > 0, (r, b)


@pytest.mark.parametrize("wire", ["anthropic", "openai"])
def test_an_attempt_that_answered_and_failed_over_is_billed_what_it_may_have_cost(gw, wire):
    """The first route answers 200, sends its preamble (Anthropic's message_start reports
    the input it read) and an error event before any content: the gateway fails over, and
    the provider may have billed the prompt. That attempt gets its own row and is settled
    against the key's budget with the answer that followed."""
    key = new_key(gw, "--budget-usd", "1", "--budget-per", "day")
    broken, healthy = (gw.anth_broken, gw.anth) if wire == "anthropic" else (gw.oai_broken, gw.mock_url())
    price = CLAUDE_PRICE if wire == "anthropic" else GPT_PRICE
    gw.mock_config(broken, error_after_chunks=0)
    msgs = [{"role": "user", "content": "tell me a story about a lighthouse keeper " * 20}]
    if wire == "anthropic":
        with claude(gw, key).messages.with_streaming_response.create(
            model="claude-failover", max_tokens=100, messages=msgs, stream=True
        ) as raw:
            rid = raw.headers["x-request-id"]
            raw.read()
    else:
        with gpt(gw, key).chat.completions.with_streaming_response.create(
            model="gpt-failover", max_tokens=100, messages=msgs, stream=True
        ) as raw:
            rid = raw.headers["x-request-id"]
            raw.read()
    tried = mock_billed(gw, broken, rid)
    answered = mock_billed(gw, healthy, rid)
    assert tried["input"] > 100 and tried["output"] == 0, tried
    final = usage_row(gw, rid)
    assert_row_is_what_was_billed(final, answered, price)
    attempt = usage_row(gw, rid + "/attempt-1")
    assert attempt["provider"] == ("anth_broken" if wire == "anthropic" else "oai_broken"), attempt
    assert (attempt["status"], attempt["truncated"], attempt["token_source"]) == (502, 1, "estimated"), attempt
    if wire == "anthropic":
        assert attempt["prompt_tokens"] == tried["input"], (attempt, tried)  # message_start reported it
    else:
        assert attempt["prompt_tokens"] >= tried["input"], (attempt, tried)  # the estimate
    assert attempt["cost_nanos"] >= billed_nanos(tried, price) > 0, (attempt, tried)
    assert rows_of(gw, key) == 2
    # The ledger settled both: the budget left is $1 minus both rows.
    raw = gpt(gw, key).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=HI, max_tokens=5)
    after = usage_row(gw, raw.headers["x-request-id"])
    left = float(raw.headers["x-afr-budget-remaining-usd"])
    spent = attempt["cost_nanos"] + final["cost_nanos"] + after["cost_nanos"]
    assert abs((1.0 - left) - spent / 1e9) < 2e-6, (left, spent)


# --- 5. long-context prices -----------------------------------------------------------


def test_a_route_s_long_context_tier_bills_the_whole_request_above_its_threshold(gw):
    key = new_key(gw)
    c = claude(gw, key)
    short = c.messages.with_raw_response.create(model="claude-long", max_tokens=20, messages=HI)
    long_msgs = [{"role": "user", "content": "the lighthouse keeper counts the waves " * 40}]
    long = c.messages.with_raw_response.create(model="claude-long", max_tokens=20, messages=long_msgs)
    for raw, price in ((short, CLAUDE_PRICE), (long, LONG_PRICE)):
        rid = raw.headers["x-request-id"]
        b = mock_billed(gw, gw.anth, rid)
        assert (b["input"] > 100) == (price is LONG_PRICE), b
        assert_row_is_what_was_billed(usage_row(gw, rid), b, price)


def test_a_budgeted_key_is_not_served_long_context_prices_a_route_does_not_have(gw):
    """Anthropic's context-1m beta bills a prompt above 200 000 tokens at its long-context
    prices: a budgeted key is refused on a route that declares none (fail closed), served on
    one that does, and a key without a budget is served either way."""
    prompt = [{"role": "user", "content": "灯" * 205_000}]  # ≥ 205 000 tokens, 615 KB
    budgeted = new_key(gw, "--budget-usd", "5", "--budget-per", "day")
    with pytest.raises(anthropic.BadRequestError) as e:
        claude(gw, budgeted).messages.create(model=CLAUDE, max_tokens=10, messages=prompt, extra_headers=CONTEXT_1M)
    assert "long_context" in str(e.value.body) or "long-context" in e.value.message, e.value
    assert gw.mock_requests(gw.anth) == [], "refused before any provider"
    # Without the beta the provider refuses a prompt that long itself: nothing to price.
    # A route with a long-context price serves it, and the worst case is priced at it.
    ok = claude(gw, budgeted).messages.with_raw_response.create(
        model="claude-long", max_tokens=10, messages=prompt, extra_headers=CONTEXT_1M
    )
    b = mock_billed(gw, gw.anth, ok.headers["x-request-id"])
    # (The mock counts the input by words: one long word is billed as a short prompt.)
    assert_row_is_what_was_billed(usage_row(gw, ok.headers["x-request-id"]), b, LONG_PRICE if b["input"] > 100 else CLAUDE_PRICE)
    unbudgeted = new_key(gw)
    claude(gw, unbudgeted).messages.create(model=CLAUDE, max_tokens=10, messages=prompt, extra_headers=CONTEXT_1M)


# --- 6. count_tokens is free ----------------------------------------------------------


def test_count_tokens_is_neither_reserved_nor_billed(gw):
    # A tpm far below count_tokens' old reservation (prompt + 4096).
    key = new_key(gw, "--tpm", "300", "--budget-usd", "0.01", "--budget-per", "day")
    c = claude(gw, key)
    for _ in range(5):
        raw = c.messages.with_raw_response.count_tokens(model=CLAUDE, messages=HI)
        assert raw.parse().input_tokens > 0
    r = usage_row(gw, raw.headers["x-request-id"])
    assert (r["total_tokens"], r["cost_nanos"]) == (0, 0), r
    # The window is untouched: a request worth nearly the whole tpm still fits.
    c.messages.create(model=CLAUDE, max_tokens=280, messages=HI)


# --- 2. the prompt estimate counts what providers bill as input -------------------------


def test_an_image_is_counted_by_its_published_size_not_its_base64(gw):
    # ~200 KB of base64: as text it was ~50 000 tokens, a permanent 429 on this key.
    key = new_key(gw, "--tpm", "5000")
    image = "data:image/png;base64," + "iVBORw0KGgoAAAANSUhEUgAA" * 8_000
    content = [{"type": "text", "text": "What is in this image?"}, {"type": "image_url", "image_url": {"url": image}}]
    c = gpt(gw, key)
    r = c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": content}], max_tokens=100)
    assert r.choices[0].message.content
    source = {"type": "base64", "media_type": "image/png", "data": image.split(",", 1)[1]}
    claude(gw, key).messages.create(
        model=CLAUDE, max_tokens=100,
        messages=[{"role": "user", "content": [{"type": "image", "source": source}, {"type": "text", "text": "Describe it."}]}],
    )


def test_cjk_text_and_tool_schemas_are_counted(gw):
    # 600 CJK characters are ~600 tokens: more than a 500 tpm, whatever the output.
    key = new_key(gw, "--tpm", "500")
    with pytest.raises(openai.RateLimitError) as e:
        gpt(gw, key).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "你好世界。" * 120}], max_tokens=10
        )
    assert e.value.response.headers["x-should-retry"] == "false"
    # A tool schema is input too: a large one cannot hide behind a short message.
    schema = {"type": "object", "properties": {f"field_{i}": {"type": "string", "description": "a field of the form " * 3} for i in range(40)}}
    tools = [{"type": "function", "function": {"name": "fill_form", "description": "Fills the form", "parameters": schema}}]
    with pytest.raises(openai.RateLimitError):
        gpt(gw, key).chat.completions.create(model="gpt-4o-mini", messages=HI, tools=tools, max_tokens=10)
    assert gw.mock_requests() == []


# --- 6. /v1/messages speaks Anthropic for limits too -----------------------------------


def test_a_spent_budget_on_messages_is_anthropics_credit_refusal(gw):
    recorded = json.loads((REPO / "tests/fixtures/anthropic-error-credit-balance.json").read_text())
    # $0.0006: one answer (~40 tokens at $5/M out) fits, its worst case (100 out) twice not.
    key = new_key(gw, "--budget-usd", "0.0006", "--budget-per", "day")
    c = claude(gw, key, max_retries=2)
    with pytest.raises(anthropic.BadRequestError) as e:
        for _ in range(10):
            c.messages.create(model=CLAUDE, max_tokens=100, messages=HI)
    h, body = e.value.response.headers, e.value.response.json()
    assert h["x-should-retry"] == "false" and "retry-after" not in h, dict(h)
    assert body["type"] == recorded["type"]
    assert body["error"]["type"] == recorded["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"].startswith("Your credit balance is too low"), body


def test_an_overloaded_provider_is_529_on_messages_and_503_on_chat(gw):
    key = new_key(gw)
    gw.mock_config(gw.anth, status=529)
    with pytest.raises(anthropic.APIStatusError) as e:
        claude(gw, key).messages.create(model=CLAUDE, max_tokens=10, messages=HI)
    assert e.value.status_code == 529
    assert e.value.response.json()["error"]["type"] == "overloaded_error"
    with pytest.raises(openai.InternalServerError) as e:
        gpt(gw, key).chat.completions.create(model=CLAUDE, messages=HI, max_tokens=10)
    assert e.value.status_code == 503


def test_messages_carry_anthropics_token_rate_limit_headers(gw):
    import datetime

    key = new_key(gw, "--tpm", "9000")
    raw = claude(gw, key).messages.with_raw_response.create(model=CLAUDE, max_tokens=100, messages=HI)
    h = raw.headers
    assert h["anthropic-ratelimit-tokens-limit"] == "9000"
    assert int(h["anthropic-ratelimit-tokens-remaining"]) == int(h["x-ratelimit-remaining-tokens"]) < 9000
    reset = datetime.datetime.fromisoformat(h["anthropic-ratelimit-tokens-reset"].replace("Z", "+00:00"))
    assert 0 < reset.timestamp() - time.time() <= 121, h["anthropic-ratelimit-tokens-reset"]
    # The requests window (nginx's rpm) in Anthropic's names too, reset as RFC 3339.
    assert h["anthropic-ratelimit-requests-limit"] == h["x-ratelimit-limit"] == "10000", dict(h)
    assert h["anthropic-ratelimit-requests-remaining"] == h["x-ratelimit-remaining"], dict(h)
    reset = datetime.datetime.fromisoformat(h["anthropic-ratelimit-requests-reset"].replace("Z", "+00:00"))
    assert int(reset.timestamp()) == int(h["x-ratelimit-reset"]), dict(h)
    assert h["anthropic-ratelimit-requests-reset"].endswith("Z"), dict(h)
    # OpenAI's API keeps OpenAI's names only.
    chat = gpt(gw, key).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=HI, max_tokens=10)
    assert "anthropic-ratelimit-tokens-limit" not in chat.headers
    assert "anthropic-ratelimit-requests-limit" not in chat.headers
    # A refusal by nginx itself (rpm) on /v1/messages carries them as well.
    tight = gw.new_key(f"cost-rpm-{time.time_ns() % 10**9}", "--rpm", "1")
    with pytest.raises(anthropic.RateLimitError) as e:  # new_key's probe took the one request
        for _ in range(2):
            claude(gw, tight).messages.create(model=CLAUDE, max_tokens=10, messages=HI)
    h = e.value.response.headers
    assert (h["anthropic-ratelimit-requests-limit"], h["anthropic-ratelimit-requests-remaining"]) == ("1", "0"), dict(h)
    reset = datetime.datetime.fromisoformat(h["anthropic-ratelimit-requests-reset"].replace("Z", "+00:00"))
    assert int(reset.timestamp()) == int(h["x-ratelimit-reset"]), dict(h)


def test_a_responses_follow_up_reserves_the_conversation_it_continues(gw):
    # The provider bills the stored conversation (the earlier input and output) as input
    # again: the follow-up's reservation includes it, so a long conversation cannot slip
    # past the tpm as a string of short follow-ups.
    key = new_key(gw, "--tpm", "20000")
    c = gpt(gw, key)
    first = c.responses.with_raw_response.create(model="gpt-4o-mini", input="word " * 1500, max_output_tokens=50)
    b = mock_billed(gw, gw.mock_url(), first.headers["x-request-id"])
    history = b["input"] + b["output"]
    assert history > 1500
    with c.responses.with_streaming_response.create(
        model="gpt-4o-mini", input="next", max_output_tokens=50, previous_response_id=first.parse().id, stream=True
    ) as s:
        remaining = int(s.headers["x-ratelimit-remaining-tokens"])
        s.read()
    # Window: the first request settled at `history`; this one reserved history + its own
    # input (9, the estimate of "next") + 50 of output. A window roll in between only frees
    # a few tokens of the first.
    expected = 20000 - history - (history + 9 + 50)
    assert expected <= remaining <= expected + 40, (remaining, expected, history)
