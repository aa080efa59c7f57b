"""OpenTelemetry through the whole stack: the sidecar exports GenAI spans and metrics over
OTLP/HTTP protobuf to a real receiver this test starts, decoded with the official
`opentelemetry-proto` definitions (PyPI `opentelemetry-proto`, generated from
open-telemetry/opentelemetry-proto).

Requests: a plain chat completion with the client's own W3C `traceparent`, a stream, a
failover (the first route answers 503), and a 429 the sidecar decides (a request that can
never fit its key's tpm). Then the receiver goes away: requests are served as before and
`afr_otel_dropped_total` rises."""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
import tomllib
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from conftest import free_port, http, runtime_dir, start_gateway
from test_faults import write_config

SPAN_KIND_CLIENT = 3
STATUS_ERROR = 2


class Receiver:
    """An OTLP/HTTP receiver: keeps every span and metric data point it is sent."""

    def __init__(self, port: int):
        self.spans: list = []
        self.points: list[tuple[str, str, object]] = []  # (metric name, unit, data point)
        self.tenants: set[tuple[str, str]] = set()  # (path, X-Tenant header) of each export
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    receiver.tenants.add((self.path, self.headers.get("X-Tenant", "")))
                if self.path == "/v1/traces":
                    request = ExportTraceServiceRequest.FromString(body)
                    with receiver.lock:
                        for rs in request.resource_spans:
                            for ss in rs.scope_spans:
                                receiver.spans.extend((rs.resource, s) for s in ss.spans)
                    answer = ExportTraceServiceResponse().SerializeToString()
                elif self.path == "/v1/metrics":
                    request = ExportMetricsServiceRequest.FromString(body)
                    with receiver.lock:
                        for rm in request.resource_metrics:
                            for sm in rm.scope_metrics:
                                for m in sm.metrics:
                                    for p in m.histogram.data_points:
                                        receiver.points.append((m.name, m.unit, p))
                    answer = ExportMetricsServiceResponse().SerializeToString()
                else:
                    self.send_error(404)
                    return
                assert self.headers["Content-Type"] == "application/x-protobuf"
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def trace(self, trace_id: str, at_least: int, timeout: float = 10) -> list:
        """The spans of `trace_id` (hex), once `at_least` of them arrived."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                found = [s for _, s in self.spans if s.trace_id.hex() == trace_id]
            if len(found) >= at_least or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def span_with(self, key: str, value: str, timeout: float = 10):
        """The first span whose attribute `key` is `value`."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                found = [s for _, s in self.spans if attrs(s).get(key) == value]
            if found or time.monotonic() > deadline:
                assert found, f"no span with {key}={value!r}"
                return found[0]
            time.sleep(0.05)


def value(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    return getattr(v, kind)


def attrs(item) -> dict:
    return {kv.key: value(kv.value) for kv in item.attributes}


@pytest.fixture(scope="module")
def stack():
    port = free_port()
    receiver = Receiver(port)
    home = runtime_dir("otel")
    gw, _ = start_gateway(home, {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_SEMCONV_STABILITY_OPT_IN": "gen_ai_latest_experimental",
        "OTEL_SERVICE_NAME": "afr-test",
        # Message contents: off by default, opted in here.
        "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "true",
        # Export within a fraction of a second, and give up on a gone collector fast.
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_METRIC_EXPORT_INTERVAL": "300",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "1000",
        # The specification's header list, its values URL-encoded.
        "OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=team%20a",
    })
    gw.original_config = (home / "sidecar.toml").read_text()
    gw.admin = tomllib.loads(gw.original_config)["admin"]["listen"]
    primary = gw.start_mock("--threads", "1", "--fail-status", "503", "--fail-first", "1000")

    def mutate(cfg):
        cfg["providers"]["broken"] = {"kind": "openai", "base_url": primary + "/v1"}
        mock = next(n for n, p in cfg["providers"].items() if n != "broken")
        cfg["models"]["fo-chat"] = {
            "tier": "Fast",
            "description": "failover",
            "routes": [{"provider": "broken", "model": "gpt-primary"}, {"provider": mock, "model": "gpt-backup"}],
        }

    write_config(gw, mutate)
    gw.key = gw.new_key("otel", "--rpm", "100000")
    deadline = time.monotonic() + 5
    while b"fo-chat" not in http("GET", gw.base + "/v1/models", headers={"Authorization": f"Bearer {gw.key}"})[2]:
        assert time.monotonic() < deadline, "the sidecar did not load the failover model"
        time.sleep(0.1)
    gw.receiver, gw.primary = receiver, primary
    yield gw
    receiver.stop()
    gw.stop()
    shutil.rmtree(home, ignore_errors=True)


def children(spans: list, parent) -> list:
    return sorted((s for s in spans if s.parent_span_id == parent.span_id), key=lambda s: s.start_time_unix_nano)


def test_plain_request_continues_the_clients_trace_to_the_provider(stack):
    trace_id, parent_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    client = stack.client(stack.key)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "hello there"}],
        temperature=0.25,
        max_tokens=64,
        extra_headers={"traceparent": f"00-{trace_id}-{parent_id}-01"},
    )
    answer = raw.parse()
    spans = stack.receiver.trace(trace_id, 2)
    (request,) = [s for s in spans if s.parent_span_id.hex() == parent_id]
    assert request.name == "chat gpt-4o-mini"
    assert request.kind == SPAN_KIND_CLIENT
    a = attrs(request)
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.provider.name"] == "openai"
    assert "gen_ai.system" not in a, "opted in to the latest conventions: the old name is not emitted"
    assert a["gen_ai.request.model"] == "gpt-4o-mini"
    assert a["gen_ai.request.temperature"] == 0.25
    assert a["gen_ai.request.max_tokens"] == 64
    assert a["gen_ai.response.id"] == answer.id
    assert a["gen_ai.response.model"] == answer.model
    assert a["gen_ai.response.finish_reasons"] == ["stop"]
    assert a["gen_ai.usage.input_tokens"] == answer.usage.prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == answer.usage.completion_tokens
    assert a["afr.key.id"] == "otel"
    assert a["afr.request.id"] == raw.headers["x-request-id"]
    assert a["afr.limits.decision"] == "none"
    assert "error.type" not in a
    assert not any(stack.key in str(v) for v in a.values()), "the key's secret is never recorded"
    # Opted in: the conventions' message attributes, as JSON.
    assert json.loads(a["gen_ai.input.messages"]) == [
        {"role": "user", "parts": [{"type": "text", "content": "hello there"}]}
    ]
    assert json.loads(a["gen_ai.output.messages"]) == [
        {"role": "assistant", "parts": [{"type": "text", "content": answer.choices[0].message.content}],
         "finish_reason": "stop"}
    ]
    (attempt,) = children(spans, request)
    assert attempt.kind == SPAN_KIND_CLIENT
    assert attrs(attempt)["server.address"] == "127.0.0.1"
    # The provider got the attempt's span as its parent.
    sent = [r for r in stack.mock_requests() if r["headers"].get("x-request-id") == raw.headers["x-request-id"]]
    assert sent and sent[0]["headers"]["traceparent"] == f"00-{trace_id}-{attempt.span_id.hex()}-01"
    resource = next(res for res, s in stack.receiver.spans if s.span_id == request.span_id)
    assert {kv.key: value(kv.value) for kv in resource.attributes}["service.name"] == "afr-test"
    assert ("/v1/traces", "team a") in stack.receiver.tenants, "OTEL_EXPORTER_OTLP_HEADERS is sent"
    assert all(tenant == "team a" for _, tenant in stack.receiver.tenants), stack.receiver.tenants


def test_messages_translated_from_a_chat_provider_report_the_client_s_answer(stack):
    """/v1/messages to an OpenAI-format provider: the span's response id and stop reason are
    those of the Anthropic answer the client got, not of the chat completion under it."""
    trace_id = uuid.uuid4().hex
    status, headers, body = http(
        "POST", stack.base + "/v1/messages",
        json.dumps({"model": "gpt-4o-mini", "max_tokens": 32,
                    "messages": [{"role": "user", "content": "hi"}]}).encode(),
        {"x-api-key": stack.key, "anthropic-version": "2023-06-01", "Content-Type": "application/json",
         "traceparent": f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"},
    )
    assert status == 200, body
    answer = json.loads(body)
    span = stack.receiver.span_with("afr.request.id", headers["x-request-id"])
    a = attrs(span)
    assert a["gen_ai.response.id"] == answer["id"] and answer["id"].startswith("msg_"), (a, answer)
    assert a["gen_ai.response.finish_reasons"] == [answer["stop_reason"]], (a, answer)


def test_without_a_traceparent_the_modules_trace_id_is_the_trace_id(stack):
    marker = f"trace-{uuid.uuid4().hex[:8]}"
    status, headers, _ = http(
        "POST", stack.base + "/v1/chat/completions",
        json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": marker}]}).encode(),
        {"Authorization": f"Bearer {stack.key}", "Content-Type": "application/json"},
    )
    assert status == 200
    span = stack.receiver.span_with("afr.request.id", headers["x-request-id"])
    deadline = time.monotonic() + 5
    while True:
        lines = (stack.home / "logs" / "nginx-access.log").read_text().splitlines()
        ids = [re.search(r" trace=([0-9a-f]{32})$", l) for l in lines if "key=otel " in l]
        if span.trace_id.hex() in [m.group(1) for m in ids if m] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert span.trace_id.hex() in [m.group(1) for m in ids if m], "the span's trace id is the access log's"


def test_a_trace_the_client_did_not_sample_is_not_recorded_but_still_propagated(stack):
    trace_id, parent_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    raw = stack.client(stack.key).chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "not sampled"}],
        extra_headers={"traceparent": f"00-{trace_id}-{parent_id}-00"},
    )
    raw.parse()
    sent = [r for r in stack.mock_requests() if r["headers"].get("x-request-id") == raw.headers["x-request-id"]]
    assert sent and re.fullmatch(rf"00-{trace_id}-[0-9a-f]{{16}}-00", sent[0]["headers"]["traceparent"])
    # A sampled request sent after it is exported; the unsampled one never is.
    after = uuid.uuid4().hex
    stack.client(stack.key).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "sampled"}],
        extra_headers={"traceparent": f"00-{after}-{parent_id}-01"},
    )
    assert stack.receiver.trace(after, 2)
    assert stack.receiver.trace(trace_id, 1, timeout=0.5) == []


def test_stream_records_time_to_first_chunk_and_its_usage(stack):
    trace_id = uuid.uuid4().hex
    stream = stack.client(stack.key).chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "tell me a short story about a lighthouse keeper"}],
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"traceparent": f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"},
    )
    chunks = list(stream)
    usage = chunks[-1].usage
    spans = stack.receiver.trace(trace_id, 2)
    (request,) = [s for s in spans if attrs(s).get("afr.stream") is True]
    a = attrs(request)
    assert a["gen_ai.usage.output_tokens"] == usage.completion_tokens
    assert a["gen_ai.response.finish_reasons"] == ["stop"]
    assert a["gen_ai.response.id"] == chunks[0].id
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    (message,) = json.loads(a["gen_ai.output.messages"])
    assert message["parts"] == [{"type": "text", "content": text}] and message["finish_reason"] == "stop"
    names = {}
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with stack.receiver.lock:
            names = {(n, u) for n, u, _ in stack.receiver.points}
        if ("gen_ai.client.operation.time_per_output_chunk", "s") in names:
            break
        time.sleep(0.1)
    assert ("gen_ai.client.operation.time_to_first_chunk", "s") in names
    assert ("gen_ai.client.operation.time_per_output_chunk", "s") in names
    with stack.receiver.lock:
        ttfc = [p for n, _, p in stack.receiver.points if n == "gen_ai.client.operation.time_to_first_chunk"]
    assert ttfc[-1].count >= 1
    assert list(ttfc[-1].explicit_bounds)[:3] == [0.01, 0.02, 0.04], "the conventions' bucket advice"


def test_failover_reads_as_two_attempts(stack):
    trace_id = uuid.uuid4().hex
    answer = stack.client(stack.key).chat.completions.create(
        model="fo-chat",
        messages=[{"role": "user", "content": "fail over please"}],
        extra_headers={"traceparent": f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"},
    )
    assert answer.choices[0].message.content
    spans = stack.receiver.trace(trace_id, 3)
    (request,) = [s for s in spans if attrs(s).get("afr.attempts") is not None]
    assert request.name == "chat fo-chat"
    assert attrs(request)["afr.attempts"] == 2
    first, second = children(spans, request)
    assert (first.name, second.name) == ("chat gpt-primary", "chat gpt-backup")
    assert attrs(first)["error.type"] == "503" and first.status.code == STATUS_ERROR
    assert attrs(first)["afr.provider"] == "broken"
    assert "error.type" not in attrs(second)
    assert first.end_time_unix_nano <= second.start_time_unix_nano


def test_a_429_from_the_sidecar_is_an_error_span_with_its_limits_decision(stack):
    key = stack.new_key("otel-tpm", "--rpm", "1000", "--tpm", "50")
    trace_id = uuid.uuid4().hex
    with pytest.raises(openai.RateLimitError):
        stack.client(key).chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=4000,
            extra_headers={"traceparent": f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"},
        )
    (request,) = stack.receiver.trace(trace_id, 1)
    a = attrs(request)
    assert a["error.type"] == "429" and request.status.code == STATUS_ERROR
    assert a["afr.limits.decision"] == "never_fits_tpm"
    assert a["afr.key.id"] == "otel-tpm"
    assert a["afr.attempts"] == 0
    # Metrics carry the same error.type.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with stack.receiver.lock:
            errors = [attrs(p).get("error.type") for n, _, p in stack.receiver.points if n == "gen_ai.client.operation.duration"]
        if "429" in errors:
            break
        time.sleep(0.1)
    assert "429" in errors
    with stack.receiver.lock:
        tokens = [attrs(p) for n, u, p in stack.receiver.points if n == "gen_ai.client.token.usage" and u == "{token}"]
    assert {"input", "output"} <= {t["gen_ai.token.type"] for t in tokens}


def dropped(stack) -> int:
    body = http("GET", f"http://{stack.admin}/metrics")[2].decode()
    return sum(int(float(m)) for m in re.findall(r'^afr_otel_dropped_total\{[^}]*signal="traces"[^}]*\} (\S+)', body, re.M))


def test_with_the_collector_gone_requests_are_served_and_drops_counted(stack):
    # Let what is queued go out first, then take the receiver away.
    time.sleep(0.5)
    before = dropped(stack)
    stack.receiver.stop()
    client = stack.client(stack.key)
    started = time.monotonic()
    for i in range(5):
        r = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": f"still there {i}"}])
        assert r.choices[0].message.content
    assert time.monotonic() - started < 10, "no request waits on the collector"
    deadline = time.monotonic() + 10
    while dropped(stack) < before + 5 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert dropped(stack) >= before + 5
