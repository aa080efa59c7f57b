"""Whole-stack behaviour beyond the SDK basics: failover and breakers through nginx,
the sidecar going away and coming back, reloads under load, exact usage accounting.

These tests reshape the stack (sidecar config, stopped processes), so they run on a
gateway of their own rather than the shared one."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import time
import tomllib

import openai
import pytest

from conftest import AFR, REPO, http, mock_tokens, runtime_dir, start_gateway

_spec = importlib.util.spec_from_file_location("sidecar_config", REPO / "scripts" / "sidecar-config.py")
sidecar_config = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sidecar_config)

MESSAGES = [{"role": "user", "content": "ping the gateway"}]


@pytest.fixture(scope="module")
def gw():
    home = runtime_dir("stack")
    g, _ = start_gateway(home)
    g.original_config = (g.home / "sidecar.toml").read_text()
    yield g
    g.stop()
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def key(gw):
    return gw.new_key(f"st-{time.time_ns() % 10**10}", "--rpm", "1000")


def write_config(gw, mutate) -> None:
    """Rewrites the running sidecar's config (it hot-reloads within 2 s)."""
    cfg = tomllib.loads(gw.original_config)
    mutate(cfg)
    out = []
    for section in ("server", "admin", "breaker", "usage"):
        sidecar_config.table(out, section, cfg[section])
    for name, p in cfg["providers"].items():
        sidecar_config.table(out, f"providers.{name}", p)
    for name, m in cfg["models"].items():
        sidecar_config.table(out, f"models.{name}", m)
    path = gw.home / "sidecar.toml"
    path.with_suffix(".tmp").write_text("\n".join(out) + "\n")
    path.with_suffix(".tmp").replace(path)


def route_smart_model(gw, client, providers: dict[str, str], failures: int = 5, cooldown: str = "30s") -> None:
    """Routes gpt-4o-mini through the given providers (name -> mock URL) in order and
    returns once a request has reached the first of them: the sidecar's config reload
    has landed (until then the default mock answers)."""

    def mutate(cfg):
        cfg["breaker"] = {"failures": failures, "cooldown": cooldown}
        for name, url in providers.items():
            cfg["providers"][name] = {"kind": "openai", "base_url": url + "/v1", "timeouts": {"connect": "1s", "first_byte": "5s", "idle": "5s", "total": "30s"}}
        cfg["models"]["gpt-4o-mini"]["routes"] = [{"provider": n, "model": "gpt-4o-mini"} for n in providers]

    write_config(gw, mutate)
    first = next(iter(providers.values()))

    def reached_first():
        try:
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        except openai.APIError:
            pass
        return bool(gw.mock_requests(first))

    assert wait_until(reached_first, timeout=4), "the sidecar did not pick up its new config"


def wait_until(pred, timeout=3.0, step=0.05):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return True
        time.sleep(step)
    return False


@pytest.fixture
def two_mocks(gw):
    primary = gw.start_mock()
    secondary = gw.start_mock()
    yield primary, secondary
    write_config(gw, lambda cfg: None)  # back to the shipped routes


def test_failover_primary_down_client_never_notices(gw, two_mocks):
    primary, secondary = two_mocks
    kid = f"st-fo-{time.time_ns() % 10**10}"
    key = gw.new_key(kid, "--rpm", "1000")
    gw.mock_config(primary, status=503)
    client = gw.client(key)
    route_smart_model(gw, client, {"primary": primary, "secondary": secondary})
    gw.clear_mock_requests(primary)
    gw.clear_mock_requests(secondary)

    resp = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert resp.choices[0].message.content == "Mock reply to: ping the gateway"
    stream = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "Mock reply to: ping the gateway"
    assert len(gw.mock_requests(primary)) == 2 and len(gw.mock_requests(secondary)) == 2

    # Usage attributes the provider that served.
    def by_provider():
        out = subprocess.run(
            [str(AFR), "usage", "--config", str(gw.home / "sidecar.toml"), "--key", kid, "--by", "provider", "--json"],
            capture_output=True, text=True, check=True,
        )
        return json.loads(out.stdout)["data"]
    assert wait_until(lambda: {r["provider"]: r["requests"] for r in by_provider()}.get("secondary", 0) >= 2)


def test_all_providers_failed_is_500_without_secrets(gw, key, two_mocks):
    primary, secondary = two_mocks
    gw.mock_config(primary, status=500)
    gw.mock_config(secondary, status=502)
    client = gw.client(key)
    route_smart_model(gw, client, {"primary": primary, "secondary": secondary}, failures=100)
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert e.value.status_code == 500
    secret = (gw.home / "upstream-secret").read_text().strip()
    body = e.value.response.text
    assert secret not in body and key not in body
    assert e.value.response.headers["x-ratelimit-limit"] == "1000"


def test_all_breakers_open_is_503_with_retry_after(gw, key, two_mocks):
    primary, secondary = two_mocks
    gw.mock_config(primary, status=503)
    gw.mock_config(secondary, status=503)
    client = gw.client(key)
    route_smart_model(gw, client, {"primary": primary, "secondary": secondary}, failures=2, cooldown="30s")
    seen = []
    for _ in range(6):
        try:
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        except openai.APIStatusError as e:
            seen.append(e)
    last = seen[-1]
    assert isinstance(last, openai.InternalServerError) and last.status_code == 503, [s.status_code for s in seen]
    assert 1 <= int(last.response.headers["retry-after"]) <= 30
    # Open breakers are skipped: the providers saw no more than the failures that opened them.
    assert len(gw.mock_requests(primary)) <= 3 and len(gw.mock_requests(secondary)) <= 3


def test_sidecar_down_is_openai_503_and_recovers_within_1s(gw, key):
    pid = gw.pids()["sidecar"]
    subprocess.run(["kill", "-TERM", str(pid)], check=True)
    assert wait_until(lambda: subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode != 0, timeout=10)
    status, headers, body = http(
        "POST", gw.base + "/v1/chat/completions", json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES}).encode(),
        {"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    assert status == 503, body
    assert headers["Content-Type"].startswith("application/json")
    assert json.loads(body)["error"]["code"] == "service_unavailable"
    assert headers["Retry-After"] == "30"
    assert headers["X-RateLimit-Limit"] == "1000"
    with pytest.raises(openai.InternalServerError):
        gw.client(key).models.list()

    log = open(gw.home / "logs" / "sidecar.log", "ab")
    p = subprocess.Popen(
        [str(AFR), "serve", "--config", str(gw.home / "sidecar.toml")],
        stdout=log, stderr=log, start_new_session=True,
    )
    with open(gw.home / "pids", "a") as f:
        f.write(f"sidecar {p.pid}\n")
    admin = tomllib.loads((gw.home / "sidecar.toml").read_text())["admin"]["listen"]
    assert wait_until(lambda: _healthy(f"http://{admin}/healthz"), timeout=10, step=0.01)
    # From the moment the sidecar serves again, nginx must use it within 1 s: no
    # upstream left marked down (max_fails=0), no stale keepalive connection.
    t0 = time.monotonic()
    client = gw.client(key)

    def up():
        try:
            return client.chat.completions.create(model="gpt-5-mini", messages=MESSAGES).choices[0].message.content
        except openai.APIError:
            return None

    assert wait_until(up, timeout=5, step=0.02)
    took = time.monotonic() - t0
    assert took < 1.0, f"service back {took:.2f}s after the sidecar was ready"


def _healthy(url: str) -> bool:
    try:
        return http("GET", url, timeout=1)[0] == 200
    except OSError:
        return False


def test_nginx_reload_does_not_cut_a_running_stream(gw, key):
    gw.mock_config(chunks=20, chunk_interval_ms=100)
    try:
        client = gw.client(key)
        stream = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
        got = []
        for i, chunk in enumerate(stream):
            if chunk.choices and chunk.choices[0].delta.content:
                got.append(chunk.choices[0].delta.content)
            if len(got) == 3 and i < 10:
                r = gw.nginx("-s", "reload")
                assert r.returncode == 0, r.stderr
        assert len(got) == 20
        # And the reloaded nginx serves new requests.
        assert client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=50).choices
    finally:
        gw.mock_config()


def test_key_added_with_afr_key_new_works_within_2s(gw):
    t0 = time.monotonic()
    key = gw.new_key(f"st-new-{time.time_ns() % 10**10}", wait=False)
    status, took = gw.wait_key_state(key, lambda s: s == 200, timeout=2.5)
    assert status == 200, f"new key answered {status} after {time.monotonic() - t0:.2f}s"


def test_usage_reports_exactly_the_mock_token_counts(gw):
    kid = f"st-usage-{time.time_ns() % 10**10}"
    key = gw.new_key(kid, "--rpm", "1000")
    client = gw.client(key)
    expected: dict[str, list[int]] = {}

    def add(model, messages):
        p, c = mock_tokens(messages)
        e = expected.setdefault(model, [0, 0, 0])
        e[0] += 1
        e[1] += p
        e[2] += c

    m1 = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "count these five words"}]
    m2 = [{"role": "user", "content": "stream me something"}]
    m3 = [{"role": "user", "content": "and stream with usage please"}]
    client.chat.completions.create(model="gpt-4o-mini", messages=m1); add("gpt-4o-mini", m1)
    client.chat.completions.create(model="gpt-5-mini", messages=m1); add("gpt-5-mini", m1)
    list(client.chat.completions.create(model="gpt-4o-mini", messages=m2, stream=True)); add("gpt-4o-mini", m2)
    list(client.chat.completions.create(model="gpt-5-chat", messages=m3, stream=True, stream_options={"include_usage": True})); add("gpt-5-chat", m3)

    def cli_rows():
        out = subprocess.run(
            [str(AFR), "usage", "--config", str(gw.home / "sidecar.toml"), "--key", kid, "--by", "model", "--json"],
            capture_output=True, text=True, check=True,
        )
        return {r["model"]: [r["requests"], r["prompt_tokens"], r["completion_tokens"]] for r in json.loads(out.stdout)["data"]}

    assert wait_until(lambda: cli_rows() == expected, timeout=3), (cli_rows(), expected)
    status, _, body = http("GET", gw.base + "/v1/usage", headers={"Authorization": f"Bearer {key}"})
    assert status == 200, body
    http_rows: dict[str, list[int]] = {}
    for r in json.loads(body)["data"]:
        e = http_rows.setdefault(r["model"], [0, 0, 0])
        e[0] += r["requests"]; e[1] += r["prompt_tokens"]; e[2] += r["completion_tokens"]
    assert http_rows == expected


def test_readme_operator_commands(gw):
    """The key and usage commands exactly as README.md shows them."""
    kid = f"team-a-{time.time_ns() % 10**8}"
    keys = str(gw.keys_file)
    key = gw.new_key(kid, "--rpm", "120", "--models", "gpt-5-mini,gpt-4o-mini")
    gw.client(key).chat.completions.create(model="gpt-5-mini", messages=MESSAGES)
    listing = gw.afr("key", "list", "--file", keys).stdout
    assert kid in listing and "120" in listing and key not in listing
    conf = str(gw.home / "sidecar.toml")

    def usage_rows():
        out = gw.afr("usage", "--config", conf, "--key", kid, "--by", "day", "--json").stdout
        return json.loads(out)["data"]

    assert wait_until(lambda: usage_rows() and usage_rows()[0]["requests"] == 1)
    table = gw.afr("usage", "--config", conf, "--since", "24h", "--by", "key,model").stdout
    assert kid in table and "gpt-5-mini" in table
    status, _, body = http("GET", gw.base + "/v1/usage?since=24h&by=model,day", headers={"Authorization": f"Bearer {key}"})
    assert status == 200 and json.loads(body)["data"][0]["model"] == "gpt-5-mini"

    gw.afr("key", "disable", kid, "--file", keys)
    status, _ = gw.wait_key_state(key, lambda s: s == 403)
    assert status == 403
