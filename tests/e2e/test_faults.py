"""Provider faults through the whole stack: nginx -> module -> sidecar -> afr-mock.

Every scenario has its own primary provider (an afr-mock instance with the fault set,
or a dead/blackholed port) and its own catalogue model `fault-<name>` routed to
[primary, backup]; the backup is one healthy mock shared by all, reached under a
per-scenario upstream model name so its request log says which scenario it served.
Each call checks what the client got (failover before the first content; an error
event after it, never a silent truncation, never two providers' text spliced; the
right 500/503/429), the primary's breaker gauge afterwards and exactly one usage row
(found by the response's x-request-id).

Timeouts are short (connect 300 ms, first byte 700 ms, first content 1 s, idle 700 ms,
total 2 s; breaker: 2 failures, 1 s cooldown) so the matrix runs in seconds. The README
"Reliability" section's table is this file's expectations.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import re
import shutil
import socket
import time
import tomllib
from dataclasses import dataclass, field

import pytest

from conftest import REPO, free_port, runtime_dir, start_gateway
from conftest import http as http_call
from conftest import usage_rows as conftest_usage_rows

_spec = importlib.util.spec_from_file_location("sidecar_config", REPO / "scripts" / "sidecar-config.py")
sidecar_config = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sidecar_config)

MESSAGES = [{"role": "user", "content": "tell me about failover"}]
REPLY = "Mock reply to: tell me about failover"
ANTHROPIC_ENV = "AFR_FAULTS_ANTHROPIC_KEY"
FAST = {"connect": "300ms", "first_byte": "700ms", "first_content": "1s", "idle": "700ms", "total": "2s"}


@dataclass
class Scenario:
    name: str
    # Instance knobs of the primary's mock; None: the primary is not a mock.
    knobs: dict | None = None
    # "openai" or "anthropic" for a mock primary; "refused" / "blackhole" otherwise.
    kind: str = "openai"
    # Expected client outcome per mode: "failover", "error_event", or an HTTP status.
    non_stream: str | int | None = "failover"
    stream: str | int | None = "failover"
    # Expected primary breaker gauge afterwards: 0 closed, 2 open.
    breaker: int = 2
    # Status of the usage row when the client got an error.
    row_status: dict = field(default_factory=dict)


SCENARIOS = [
    Scenario("refused", kind="refused"),
    Scenario("connect-timeout", kind="blackhole"),
    Scenario("never-answers", {"latency_ms": 60000}),
    # The provider answered (status and headers): a stream is not failed over (design §4,
    # a slow first content is not a provider failure); it commits after stream_hold and
    # ends with an error event at first_content, no verdict on the breaker. The
    # non-streaming answer is bounded by `total` and fails over.
    Scenario("headers-then-stall", {"stall_after_headers": True}, stream="error_event", breaker=0,
             row_status={"stream": 504}),
    Scenario("503", {"status": 503}),
    Scenario("429-retry-after", {"status": 429, "retry_after": "7"}),
    Scenario("reset-before-first-byte", {"reset_before_response": True}),
    Scenario("reset-mid-stream", {"reset_after_chunks": 2, "chunks": 6}, non_stream=None, stream="error_event",
             breaker=0, row_status={"stream": 502}),
    Scenario("reset-before-content", {"reset_after_chunks": 0}, non_stream=None),
    Scenario("no-done", {"end_after_chunks": 2, "chunks": 6}, non_stream=None, stream="error_event", breaker=0,
             row_status={"stream": 502}),
    Scenario("no-done-before-content", {"end_after_chunks": 0}, non_stream=None),
    # An event whose JSON is cut is a broken provider, never content: after the first
    # content it ends the stream with an error event (not passed on, row 502); before it,
    # failover (chunks=0: the cut event comes before the finish chunk).
    Scenario("malformed-sse", {"malformed_sse": True}, non_stream=None, stream="error_event", breaker=0,
             row_status={"stream": 502}),
    Scenario("malformed-sse-before-content", {"malformed_sse": True, "chunks": 0}, non_stream=None),
    # A drip never completes an event within the route's event_idle (300 ms here, under
    # the 400 ms stream_hold): the stream fails over before anything reached the client.
    # Non-streaming, the body is bounded by `total`.
    Scenario("drip-1-byte-per-s", {"drip_ms": 1000}),
    Scenario("50mb-body", {"body_bytes": 50_000_000}),
    Scenario("non-json-200", {"non_json": True}),
    Scenario("error-event-before-content", {"error_after_chunks": 0}, non_stream=None),
    Scenario("error-event-mid-stream", {"error_after_chunks": 2, "chunks": 6}, non_stream=None,
             stream="error_event", breaker=0, row_status={"stream": 502}),
    Scenario("anthropic-529", {"status": 529}, kind="anthropic"),
    Scenario("anthropic-non-json-200", {"non_json": True}, kind="anthropic"),
    Scenario("anthropic-overloaded-mid-stream", {"error_after_chunks": 2, "chunks": 6}, kind="anthropic",
             non_stream=None, stream="error_event", breaker=0, row_status={"stream": 502}),
]


class Matrix:
    def __init__(self, gw, key: str, backup: str, primaries: dict[str, str | None], admin: str, blackhole):
        self.gw, self.key, self.backup, self.primaries, self.admin = gw, key, backup, primaries, admin
        self.blackhole = blackhole


def write_config(gw, mutate) -> None:
    """Rewrites the running sidecar's config (hot-reloaded within 2 s)."""
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


def blackhole_port() -> tuple[int, list[socket.socket]]:
    """A port whose SYNs are dropped: a listener with a backlog of 0, filled by one
    connection that is never accepted. Connecting to it times out, like a firewall
    that drops packets."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(0)
    port = lst.getsockname()[1]
    filler = socket.socket()
    filler.connect(("127.0.0.1", port))
    return port, [lst, filler]


@pytest.fixture(scope="module")
def matrix():
    home = runtime_dir("faults")
    gw, _ = start_gateway(home, {ANTHROPIC_ENV: "sk-ant-faults-" + "k" * 24})
    gw.original_config = (home / "sidecar.toml").read_text()
    hole_port, hole_socks = blackhole_port()
    backup = gw.start_mock("--threads", "1")
    primaries: dict[str, str | None] = {}
    for s in SCENARIOS:
        if s.kind == "refused":
            primaries[s.name] = f"http://127.0.0.1:{free_port()}"
        elif s.kind == "blackhole":
            primaries[s.name] = f"http://127.0.0.1:{hole_port}"
        else:
            url = gw.start_mock("--threads", "1")
            gw.mock_config(url, **s.knobs)
            primaries[s.name] = url
    for extra in ("storm-a", "storm-b", "rl-a", "rl-b", "flap"):
        primaries[extra] = gw.start_mock("--threads", "1")

    def mutate(cfg):
        cfg["breaker"] = {"failures": 2, "cooldown": "1s"}
        cfg["server"]["stream_hold"] = "400ms"
        cfg["providers"]["backup"] = {"kind": "openai", "base_url": backup + "/v1"}
        kinds = {s.name: s.kind for s in SCENARIOS}
        for name, url in primaries.items():
            kind = "anthropic" if kinds.get(name) == "anthropic" else "openai"
            p = {"kind": kind, "base_url": url + "/v1", "timeouts": dict(FAST)}
            if kind == "anthropic":
                p["api_key_env"] = ANTHROPIC_ENV
            cfg["providers"][f"p-{name}"] = p
        for s in SCENARIOS:
            upstream = "claude-haiku-4-5" if s.kind == "anthropic" else "gpt-4o-mini"
            cfg["models"][f"fault-{s.name}"] = {
                "tier": "Smart",
                "description": f"fault scenario {s.name}",
                "routes": [
                    {"provider": f"p-{s.name}", "model": upstream, "event_idle": "300ms"},
                    {"provider": "backup", "model": f"backup-{s.name}"},
                ],
            }
        for model, routes in (("fault-storm", ["storm-a", "storm-b"]), ("fault-ratelimited", ["rl-a", "rl-b"])):
            cfg["models"][model] = {
                "tier": "Smart",
                "description": model,
                "routes": [{"provider": f"p-{r}", "model": "gpt-4o-mini"} for r in routes],
            }
        cfg["models"]["fault-flap"] = {
            "tier": "Smart",
            "description": "flapping primary",
            "routes": [{"provider": "p-flap", "model": "gpt-4o-mini"}, {"provider": "backup", "model": "backup-flap"}],
        }

    write_config(gw, mutate)
    key = gw.new_key("faults", "--rpm", "100000")
    admin = tomllib.loads(gw.original_config)["admin"]["listen"]
    # The reload has landed once the catalogue lists the scenario models.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        _, _, body = http_call("GET", gw.base + "/v1/models", headers={"Authorization": f"Bearer {key}"})
        if b"fault-flap" in body:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the sidecar did not load the fault matrix config")
    yield Matrix(gw, key, backup, primaries, admin, hole_socks)
    for s in hole_socks:
        s.close()
    gw.stop()
    shutil.rmtree(home, ignore_errors=True)


@dataclass
class Outcome:
    status: int
    headers: dict
    body: bytes
    # Set when the connection broke before the response ended (chunked body cut).
    broken: str | None = None

    @property
    def request_id(self) -> str:
        return self.headers.get("x-request-id", "")

    def events(self) -> list[str]:
        """The data of each SSE event (comments skipped)."""
        out = []
        for block in self.body.decode("utf-8", "replace").split("\n\n"):
            data = [ln[5:].lstrip() for ln in block.split("\n") if ln.startswith("data:")]
            if data:
                out.append("\n".join(data))
        return out


def call(m: Matrix, model: str, stream: bool, timeout: float = 20) -> Outcome:
    conn = http.client.HTTPConnection("127.0.0.1", m.gw.port, timeout=timeout)
    body = json.dumps({"model": model, "messages": MESSAGES, "stream": stream})
    conn.request("POST", "/v1/chat/completions", body,
                 {"Authorization": f"Bearer {m.key}", "Content-Type": "application/json"})
    r = conn.getresponse()
    headers = {k.lower(): v for k, v in r.getheaders()}
    broken = None
    try:
        data = r.read()
    except (http.client.IncompleteRead, ConnectionError) as e:
        data = getattr(e, "partial", b"")
        broken = repr(e)
    conn.close()
    return Outcome(r.status, headers, data, broken)


def backup_calls(m: Matrix, scenario: str) -> int:
    return sum(1 for r in m.gw.mock_requests(m.backup) if isinstance(r["body"], dict)
               and r["body"].get("model") == f"backup-{scenario}")


def breaker_state(m: Matrix, provider: str) -> int | None:
    _, _, body = http_call("GET", f"http://{m.admin}/metrics")
    found = re.search(rf'^afr_breaker_state\{{provider="{re.escape(provider)}"\}} (\d+)', body.decode(), re.M)
    return int(found.group(1)) if found else None


def usage_rows(m: Matrix, request_id: str, timeout: float = 5) -> list[dict]:
    """The usage rows of one request, once the batch writer has written them."""
    return conftest_usage_rows(m.gw, request_id, timeout)


def _parses(e: str) -> bool:
    try:
        json.loads(e)
        return True
    except ValueError:
        return False


def text_of(events: list[str]) -> str:
    out = []
    for e in events:
        try:
            v = json.loads(e)
        except ValueError:
            continue
        for c in v.get("choices") or []:
            out.append((c.get("delta") or {}).get("content") or "")
    return "".join(out)


def check_failover(m: Matrix, s: Scenario, stream: bool, o: Outcome, backups_before: int) -> None:
    assert o.status == 200, (o.status, o.body[:300])
    assert o.broken is None, o.broken
    if stream:
        ev = o.events()
        assert ev[-1] == "[DONE]", ev[-3:]
        assert not any(e.startswith('{"error"') for e in ev)
        assert text_of(ev) == REPLY
    else:
        assert json.loads(o.body)["choices"][0]["message"]["content"] == REPLY
    assert backup_calls(m, s.name) == backups_before + 1, "the backup served it, once"
    rows = usage_rows(m, o.request_id)
    assert len(rows) == 1, rows
    assert (rows[0]["provider"], rows[0]["status"], rows[0]["stream"]) == ("backup", 200, int(stream)), rows[0]


def check_error_event(m: Matrix, s: Scenario, o: Outcome, backups_before: int) -> None:
    """A committed stream that broke: its content so far, then an OpenAI error event as
    the last event, no [DONE], no byte from another provider, and a clean HTTP end."""
    assert o.status == 200, (o.status, o.body[:300])
    assert o.broken is None, f"the stream must end with an error event, not a broken connection: {o.broken}"
    ev = o.events()
    assert ev, "no event at all"
    last = json.loads(ev[-1])
    assert set(last["error"]) >= {"message", "type"}, last
    assert "[DONE]" not in ev
    assert all(_parses(e) for e in ev), "nothing but JSON events reach the client"
    text = text_of(ev[:-1])
    assert REPLY.startswith(text) or text.startswith("Mock reply to:") and text.count("Mock reply") == 1, text
    assert backup_calls(m, s.name) == backups_before, "never failed over after content"
    rows = usage_rows(m, o.request_id)
    assert len(rows) == 1, rows
    assert rows[0]["provider"] == f"p-{s.name}" and rows[0]["status"] == s.row_status["stream"], rows[0]
    assert rows[0]["truncated"] == 1


@pytest.mark.parametrize("s", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_provider_fault(matrix, s: Scenario):
    m = matrix
    modes = [(stream, e) for stream, e in ((False, s.non_stream), (True, s.stream)) if e is not None]
    # Two calls per scenario: two provider failures open the breaker (failures = 2).
    for stream, expected in modes * (3 - len(modes)):
        before = backup_calls(m, s.name)
        o = call(m, f"fault-{s.name}", stream)
        if expected == "failover":
            check_failover(m, s, stream, o, before)
        elif expected == "error_event":
            check_error_event(m, s, o, before)
        else:
            assert o.status == expected, (o.status, o.body[:300])
    assert breaker_state(m, f"p-{s.name}") == s.breaker


def test_5xx_storm_opens_the_breakers_503_then_they_recover(matrix):
    m = matrix
    a, b = m.primaries["storm-a"], m.primaries["storm-b"]
    m.gw.mock_config(a, status=500)
    m.gw.mock_config(b, status=502)
    statuses = []
    for stream in (False, True, False):
        o = call(m, "fault-storm", stream)
        statuses.append(o.status)
        body = json.loads(o.body)
        assert set(body["error"]) >= {"message", "type", "code"}
        assert len(usage_rows(m, o.request_id)) == 1
    # Two failures each open both breakers; then the model answers 503 at once.
    assert statuses == [500, 500, 503], statuses
    assert 1 <= int(o.headers["retry-after"]) <= 1
    assert (breaker_state(m, "p-storm-a"), breaker_state(m, "p-storm-b")) == (2, 2)
    seen = len(m.gw.mock_requests(a))
    assert call(m, "fault-storm", True).status == 503
    assert len(m.gw.mock_requests(a)) == seen, "an open breaker sends nothing"
    # Healthy again: after the cooldown one probe closes each breaker it reaches.
    m.gw.mock_config(a)
    m.gw.mock_config(b)
    time.sleep(1.1)
    o = call(m, "fault-storm", False)
    assert o.status == 200 and json.loads(o.body)["choices"][0]["message"]["content"] == REPLY
    assert breaker_state(m, "p-storm-a") == 0


def test_every_route_429_is_429_with_the_shortest_retry_after(matrix):
    m = matrix
    m.gw.mock_config(m.primaries["rl-a"], status=429, retry_after="7")
    m.gw.mock_config(m.primaries["rl-b"], status=429, retry_after="3")
    for stream in (False, True):
        o = call(m, "fault-ratelimited", stream)
        assert o.status == 429, (o.status, o.body)
        assert o.headers["retry-after"] == "3"
        assert json.loads(o.body)["error"]["type"]
        rows = usage_rows(m, o.request_id)
        assert len(rows) == 1 and rows[0]["status"] == 429


def test_flapping_primary_every_request_answered_breaker_stays_closed(matrix):
    m = matrix
    m.gw.mock_config(m.primaries["flap"], fail_every=2, fail_status=502)
    for i in range(6):
        o = call(m, "fault-flap", i % 2 == 1)
        assert o.status == 200 and o.broken is None
        rows = usage_rows(m, o.request_id)
        assert len(rows) == 1
        # Requests 1, 3, 5 reach a failing primary and go to the backup.
        assert rows[0]["provider"] == ("backup" if i % 2 == 0 else "p-flap"), (i, rows[0])
    assert backup_calls(m, "flap") == 3
    assert breaker_state(m, "p-flap") == 0
