"""Conservation of money (issue 21): a seeded random workload of 2 000 requests over every
endpoint — chat completions, completions, the Responses API, Messages (native and
translated), count_tokens, embeddings — streamed and not, complete and cut, with and without
usage, with failovers, over keys with `tpm` and budgets at once, through real nginx, module,
sidecar and seven afr-mock instances. Afterwards the gateway's books are checked against what
the mocks report they billed:

- every request left exactly one usage row, and every attempt a provider answered and
  that was then failed over one more;
- every row the provider counted costs exactly what the mock billed at the route's price;
- every estimated row (a cut stream, an answer without usage) bills at least what the mock
  billed and at most its output cap; a key's total is at least what the mocks billed;
- no budget is exceeded, and what the ledger says is left equals the budget minus the
  usage store's total (so no reservation stayed open), before and after a sidecar restart.

Behaviours are per mock instance (a cut after a few events, no usage, 30 % failures), so
the workload can run concurrently; `AFR_CONSERVATION_REQUESTS` changes its size."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import billed_nanos, extend_catalogue, http, runtime_dir, start_gateway

REQUESTS = int(os.environ.get("AFR_CONSERVATION_REQUESTS", "2000"))
SEED = 2126
PROVIDER_KEY = "sk-ant-provider-conservation-0123"
CLAUDE_PRICE = {"input": 1.0, "cached_input": 0.1, "output": 5.0}
GPT_PRICE = {"input": 0.15, "cached_input": 0.075, "output": 0.60}
EMBED_PRICE = {"input": 0.02, "cached_input": 0.02, "output": 0.0}
BUDGET_USD = 5.0
SMALL_BUDGET_USD = 0.002


@pytest.fixture(scope="module")
def stack():
    home = runtime_dir("conservation")
    g, _ = start_gateway(home, {"AFR_TEST_ANTHROPIC_KEY": PROVIDER_KEY})
    g.mocks = {
        "main": g.mock_url(),
        "anth": g.start_mock("--api-key", PROVIDER_KEY, "--cache-read", "2", "--cache-write-5m", "1", "--cache-write-1h", "1"),
        "anth_cut": g.start_mock("--api-key", PROVIDER_KEY, "--chunks", "20", "--cut-after-events", "9"),
        "oai_cut": g.start_mock("--chunks", "20", "--cut-after-events", "7"),
        "oai_nousage": g.start_mock("--omit-usage"),
        "oai_flaky": g.start_mock("--fail-percent", "30", "--fail-status", "500"),
        # Answers 200, then breaks every stream before its first content: the gateway
        # fails over, and the prompt it read was billed.
        "oai_broken": g.start_mock("--error-after-chunks", "0"),
    }
    g.mock_config(g.mocks["main"], cache_read=1, reasoning_tokens=2)
    timeouts = {"connect": "1s", "first_byte": "5s", "idle": "5s", "total": "30s"}

    def provider(kind: str, name: str) -> dict:
        p = {"kind": kind, "base_url": g.mocks[name] + "/v1", "timeouts": timeouts}
        if kind == "anthropic":
            p["api_key_env"] = "AFR_TEST_ANTHROPIC_KEY"
        return p

    def model(*routes: tuple[str, dict]) -> dict:
        return {"tier": "Fast", "description": "conservation", "routes": [
            {"provider": p, "model": "up", "price": price} for p, price in routes
        ]}

    providers = {
        "anth": provider("anthropic", "anth"),
        "anth_cut": provider("anthropic", "anth_cut"),
        "oai_cut": provider("openai", "oai_cut"),
        "oai_nousage": provider("openai", "oai_nousage"),
        "oai_flaky": provider("openai", "oai_flaky"),
        "oai_broken": provider("openai", "oai_broken"),
    }
    models = {
        "claude-c": model(("anth", CLAUDE_PRICE)),
        "claude-cut": model(("anth_cut", CLAUDE_PRICE)),
        "gpt-cut": model(("oai_cut", GPT_PRICE)),
        "gpt-nousage": model(("oai_nousage", GPT_PRICE)),
        "gpt-failover": model(("oai_flaky", GPT_PRICE), ("mock", GPT_PRICE)),
        "gpt-broken": model(("oai_broken", GPT_PRICE), ("mock", GPT_PRICE)),
    }
    extend_catalogue(g, providers, models)
    # The breaker would open on the flaky mock's failures and end the failovers.
    text = (home / "sidecar.toml").read_text()
    assert "\nfailures = 5\n" in text, text
    (home / "sidecar.toml").write_text(text.replace("\nfailures = 5\n", "\nfailures = 1000000\n"))
    time.sleep(2.5)  # the sidecar re-reads its config within 2 s
    for url in g.mocks.values():
        g.clear_mock_requests(url)
    yield g
    g.stop()
    shutil.rmtree(home, ignore_errors=True)


def plan(rng: random.Random) -> dict:
    """One request of the workload: endpoint, model, body and how to send it."""
    words = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "price", "token"]) for _ in range(rng.randint(3, 12)))
    msgs = [{"role": "user", "content": words}]
    stream = rng.random() < 0.5
    max_tokens = rng.choice([20, 40, 100])
    kind = rng.choices(
        ["chat", "completions", "responses", "messages", "messages_translated", "count_tokens", "embeddings"],
        weights=[30, 10, 15, 25, 8, 5, 7],
    )[0]
    if kind == "chat":
        model = rng.choice(["gpt-4o-mini", "gpt-cut", "gpt-nousage", "gpt-failover", "gpt-broken"])
        body = {"model": model, "messages": msgs, "max_tokens": max_tokens, "stream": stream}
        if rng.random() < 0.2:
            body["n"] = 2
        return {"path": "/v1/chat/completions", "body": body, "price": GPT_PRICE, "cap": max_tokens * body.get("n", 1)}
    if kind == "completions":
        model = rng.choice(["gpt-4o-mini", "gpt-failover", "gpt-cut"])
        body = {"model": model, "prompt": words, "max_tokens": max_tokens, "stream": stream}
        return {"path": "/v1/completions", "body": body, "price": GPT_PRICE, "cap": max_tokens}
    if kind == "responses":
        model = rng.choice(["gpt-4o-mini", "gpt-cut", "gpt-nousage", "gpt-broken"])
        body = {"model": model, "input": msgs, "max_output_tokens": max_tokens, "stream": stream}
        return {"path": "/v1/responses", "body": body, "price": GPT_PRICE, "cap": max_tokens}
    if kind == "messages":
        model = rng.choice(["claude-c", "claude-cut"])
        body = {"model": model, "messages": msgs, "max_tokens": max_tokens, "stream": stream}
        return {"path": "/v1/messages", "body": body, "price": CLAUDE_PRICE, "cap": max_tokens}
    if kind == "messages_translated":
        body = {"model": rng.choice(["gpt-4o-mini", "gpt-cut"]), "messages": msgs, "max_tokens": max_tokens, "stream": stream}
        return {"path": "/v1/messages", "body": body, "price": GPT_PRICE, "cap": max_tokens}
    if kind == "count_tokens":
        return {"path": "/v1/messages/count_tokens", "body": {"model": "claude-c", "messages": msgs}, "price": CLAUDE_PRICE, "cap": 0}
    return {"path": "/v1/embeddings", "body": {"model": "text-embedding-3-small", "input": words}, "price": EMBED_PRICE, "cap": 0}


def send(g, key: str, req: dict) -> dict:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json", "anthropic-version": "2023-06-01"}
    status, h, body = http("POST", g.base + req["path"], json.dumps(req["body"]).encode(), headers, timeout=30)
    return {**req, "status": status, "request_id": h.get("x-request-id"), "key": key, "answer": body[:200]}


def rows(g) -> dict[str, dict]:
    db = sqlite3.connect(f"file:{g.home / 'usage.db'}?mode=ro", uri=True, timeout=5)
    db.row_factory = sqlite3.Row
    try:
        return {r["request_id"]: dict(r) for r in db.execute("SELECT * FROM usage")}
    finally:
        db.close()


def billed_by_request(g) -> dict[str, dict[str, dict]]:
    """What the mocks billed, by the gateway's request id and then by provider name (a
    request failed over after a 500 has a null entry at the failing mock; one failed over
    after a broken stream was billed its prompt there)."""
    out: dict[str, dict[str, dict]] = {}
    for name, url in g.mocks.items():
        provider = "mock" if name == "main" else name
        for r in g.mock_requests(url):
            rid = r["headers"].get("x-request-id")
            if rid and r.get("billed"):
                assert provider not in out.get(rid, {}), f"{provider} billed {rid} twice"
                out.setdefault(rid, {})[provider] = r["billed"]
    return out


def budget_left(g, key: str) -> float:
    _, h, _ = http("POST", g.base + "/v1/messages/count_tokens",
                   json.dumps({"model": "claude-c", "messages": [{"role": "user", "content": "left?"}]}).encode(),
                   {"x-api-key": key, "Content-Type": "application/json", "anthropic-version": "2023-06-01"})
    return float(h["x-afr-budget-remaining-usd"])


def restart_sidecar(g) -> None:
    """SIGTERM the sidecar (its rows are flushed) and start it again the same way."""
    pids = g.pids()
    pid = pids["sidecar"]
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    env = dict(kv.split(b"=", 1) for kv in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in kv)
    os.kill(pid, signal.SIGTERM)
    while Path(f"/proc/{pid}").exists() and b"zombie" not in Path(f"/proc/{pid}/status").read_bytes():
        time.sleep(0.02)
    log = open(g.home / "logs" / "sidecar.log", "ab")
    p = subprocess.Popen(argv, env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    (g.home / "pids").write_text("".join(f"{n} {p.pid if n == 'sidecar' else q}\n" for n, q in pids.items()))
    status, _ = g.wait_key_state(g.demo_key, lambda s: s == 200, timeout=10)
    assert status == 200


def test_every_dollar_the_providers_billed_is_on_the_books_and_nothing_else(stack):
    g = stack
    stamp = time.time_ns() % 10**8
    keys = {
        "both": g.new_key(f"cons-both-{stamp}", "--rpm", "100000", "--tpm", "5000000", "--budget-usd", str(BUDGET_USD), "--budget-per", "day"),
        "budget": g.new_key(f"cons-budget-{stamp}", "--rpm", "100000", "--budget-usd", str(BUDGET_USD), "--budget-per", "day"),
        "tpm": g.new_key(f"cons-tpm-{stamp}", "--rpm", "100000", "--tpm", "5000000"),
        "small": g.new_key(f"cons-small-{stamp}", "--rpm", "100000", "--budget-usd", str(SMALL_BUDGET_USD), "--budget-per", "day"),
    }
    rng = random.Random(SEED)
    work = [(rng.choice(list(keys.values())), plan(rng)) for _ in range(REQUESTS)]
    t0 = time.monotonic()
    with ThreadPoolExecutor(6) as pool:
        done = list(pool.map(lambda kr: send(g, *kr), work))
    took = time.monotonic() - t0
    statuses = {s: sum(1 for d in done if d["status"] == s) for s in {d["status"] for d in done}}
    print(f"{len(done)} requests in {took:.1f} s: {statuses}")
    assert statuses.get(200, 0) >= REQUESTS * 0.6, statuses
    # A spent budget is 429 insufficient_quota, or on /v1/messages Anthropic's 400 credit refusal.
    refused = [d for d in done if d["status"] not in (200, 429) and not (d["status"] == 400 and d["path"] == "/v1/messages")]
    assert not refused, refused[:3]

    # Every request left exactly one row (the writer batches: wait for the last).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        books = rows(g)
        if all(d["request_id"] in books for d in done):
            break
        time.sleep(0.2)
    missing = [d for d in done if d["request_id"] not in books]
    assert not missing, missing[:3]
    bills = billed_by_request(g)

    exact = estimated = attempts = 0
    billed_total = {k: 0 for k in keys.values()}
    booked_total = {k: 0 for k in keys.values()}
    for d in done:
        r = books[d["request_id"]]
        billed_here = dict(bills.get(d["request_id"], {}))
        b = billed_here.pop(r["provider"], None)
        # Any other provider that billed was an attempt that answered, broke before its
        # first content and was failed over: it has its own row, billed at least that.
        for i, (provider, tried) in enumerate(sorted(billed_here.items()), 1):
            a = books.get(f"{d['request_id']}/attempt-{i}")
            assert a is not None and a["provider"] == provider, (d, provider, a)
            assert a["status"] == 502 and a["token_source"] == "estimated", a
            assert a["prompt_tokens"] >= tried["input"], (a, tried)
            assert a["cost_nanos"] >= billed_nanos(tried, d["price"]) > 0, (a, tried)
            booked_total[d["key"]] += a["cost_nanos"]
            billed_total[d["key"]] += billed_nanos(tried, d["price"])
            attempts += 1
        booked_total[d["key"]] += r["cost_nanos"] or 0
        if b is not None and d["path"] != "/v1/messages/count_tokens":
            billed_total[d["key"]] += billed_nanos(b, d["price"])
        if d["path"] == "/v1/messages/count_tokens":
            assert (r["total_tokens"], r["cost_nanos"]) == (0, 0), r
        elif b is None:
            # Refused before any provider, or every attempt failed: nothing billed.
            assert d["status"] != 200 and r["cost_nanos"] == 0, (d, r)
        elif r["token_source"] == "provider":
            exact += 1
            assert abs(r["cost_nanos"] - billed_nanos(b, d["price"])) <= 1, (d, r, b)
            assert (r["prompt_tokens"], r["completion_tokens"]) == (b["input"], b["output"]), (d, r, b)
        else:
            estimated += 1
            assert r["token_source"] == "estimated", r
            assert r["completion_tokens"] >= b["output"], (d, r, b)
            assert r["completion_tokens"] <= max(b["output"], d["cap"]), (d, r, b)
            assert r["cost_nanos"] >= billed_nanos(b, d["price"]), (d, r, b)
    print(f"exact rows {exact}, estimated rows {estimated}, failed-over attempts billed {attempts}")
    assert exact >= REQUESTS // 3 and estimated >= REQUESTS // 20, (exact, estimated)
    assert attempts >= REQUESTS // 100, attempts
    for key in keys.values():
        assert booked_total[key] >= billed_total[key], (key, booked_total[key], billed_total[key])

    # No budget exceeded; what the ledger has left is the budget minus the books (no
    # reservation stayed open), and a restart reseeds the same.
    small_spent = booked_total[keys["small"]]
    assert small_spent <= SMALL_BUDGET_USD * 1e9, small_spent
    assert any(d["status"] in (400, 429) and d["key"] == keys["small"] for d in done), "the small budget ran out"
    for name, budget in (("both", BUDGET_USD), ("budget", BUDGET_USD), ("small", SMALL_BUDGET_USD)):
        key = keys[name]
        expected = budget - booked_total[key] / 1e9
        assert budget_left(g, key) == pytest.approx(expected, abs=1.5e-6), name
    restart_sidecar(g)
    for name, budget in (("both", BUDGET_USD), ("budget", BUDGET_USD), ("small", SMALL_BUDGET_USD)):
        key = keys[name]
        expected = budget - booked_total[key] / 1e9
        assert budget_left(g, key) == pytest.approx(expected, abs=1.5e-6), name
