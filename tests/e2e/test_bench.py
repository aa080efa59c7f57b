"""Smoke check of the benchmark suite: `scripts/bench --quick` runs every lane against
every target and writes its results file and plots. Numbers are not checked (they are
noise at this length and on a shared machine); only that each lane produced them.
"""

from __future__ import annotations

import json
import re
import subprocess

from conftest import REPO

LANES = ["c1", "max", "sweep", "ttft", "chunk", "streams", "governed-max", "governed-1000", "reject", "soak"]
HEADINGS = [
    "## Added latency at concurrency 1",
    "## Throughput and the highest rate held",
    "## Fixed rate, open loop",
    "## Streaming: time to first content token and per-chunk delay",
    "## Concurrent streams sustained, with RSS",
    "## Governed lane: keys, limits and usage on vs off",
    "## Rejection throughput",
    "## Where the CPU goes: µs per request, by process",
    "## RSS over a soak",
    "## Plots",
]


def test_quick_bench_writes_every_lane_and_the_plots(tmp_path):
    run = subprocess.run([str(REPO / "scripts/bench"), "--quick", "--no-litellm", "--out", str(tmp_path),
                          "--name", "smoke"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    md = (tmp_path / "smoke.md").read_text()
    for heading in HEADINGS:
        assert heading in md, heading
    assert "Smoke run" in md
    assert "lanes run:" not in md, "every lane ran"
    # The thread count the sidecar itself reported at start, not one computed beside it.
    assert re.search(r"sidecar threads: \d+ \(afr serve's default", md), md
    data = json.loads((tmp_path / "smoke.json").read_text())
    assert data["targets"] == ["direct", "nginx", "gateway"]
    for lane in LANES:
        assert data["data"].get(lane), f"lane {lane} is empty"
    for target in data["targets"]:
        assert data["data"]["c1"][target][0]["n"] > 0, f"{target} answered nothing at concurrency 1"
    # The gateway answered with its key, and the bare diagnostic without one.
    assert data["data"]["governed-1000"]["gateway-bare"][0]["n"] > 0
    # Each rejection lane measured the answer it names.
    statuses = {k: v[0]["status"] for k, v in data["data"]["reject"].items()}
    assert statuses == {"nginx return 401": 401, "gateway 401 (unknown key)": 401,
                        "gateway 429 (rpm exhausted)": 429}, statuses
    # The open loop's sends were paced on time (tokio's 1 ms timer made them up to 1 ms
    # late, and every fixed-rate figure carried it): each says how late they were.
    for key, runs in data["data"]["sweep"].items():
        assert "late_p99" in runs[0], key
    # Where the time goes: every process behind the gateway spent CPU on the max lane's
    # requests, and the rejections cost the sidecar nothing (nginx answers them).
    cpu = data["data"]["max"]["gateway"][0]["cpu_us"]
    assert set(cpu) == {"nginx", "sidecar", "mock", "load generator"}, cpu
    assert cpu["nginx"] > 0 and cpu["sidecar"] > 0 and cpu["mock"] > 0, cpu
    assert data["data"]["max"]["direct"][0]["cpu_us"].keys() == {"mock", "load generator"}
    rejected = data["data"]["reject"]["gateway 401 (unknown key)"][0]["cpu_us"]
    assert rejected["sidecar"] < rejected["nginx"], rejected
    for plot in ("latency-cdf", "added-latency-vs-rate", "streams-rss"):
        png = tmp_path / f"smoke-{plot}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plot
        assert f"]({png.name})" in md


def load_bench():
    """bench/run.py as a module (it is a script, not a package)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("bench_run", REPO / "bench/run.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = bench  # its dataclasses look themselves up there
    spec.loader.exec_module(bench)
    return bench


def fake_gateway(answer, metrics):
    """A stand-in for the gateway on loopback: a POST gets the status `answer(its
    Authorization header)` returns, a GET (its sidecar's /metrics) the text `metrics()`."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["content-length"]))
            self.send_response(answer(self.headers.get("authorization")))
            self.send_header("content-length", "0")
            self.end_headers()

        def do_GET(self):
            body = metrics().encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def stack_of(server, **more):
    from types import SimpleNamespace

    base = f"http://127.0.0.1:{server.server_port}"
    return SimpleNamespace(urls={"gateway": f"{base}/v1/chat/completions"},
                           auth=lambda t: ["Authorization:Bearer afr_x"], admin={"gateway": f"{base}/metrics"},
                           **more)


def test_a_lane_with_failed_answers_records_what_a_request_after_it_gets():
    """Run 1 of 2026-12-01 had a governed lane whose every answer failed, and the report
    could not say why: now a failing lane notes the status one request right after gets."""
    from types import SimpleNamespace

    bench = load_bench()
    seen: list = []

    def answer(auth):
        seen.append(auth)
        return 503

    server = fake_gateway(answer, lambda: 'afr_breaker_state{provider="mock"} 2\n'
                                          'afr_breaker_state{provider="other"} 0\n'
                                          "afr_local_exhausted_total 7\n# EOF\n")
    try:
        st = stack_of(server)
        res = SimpleNamespace(notes=[])
        bench.note_failures(st, res, 0, "governed lane, gateway, max req/s", "gateway", 0)
        assert res.notes == [], "nothing failed, nothing noted"
        bench.note_failures(st, res, 0, "governed lane, gateway, max req/s", "gateway", 323861)
        # ...and what the gateway's sidecar says of itself: the breaker the 10 000-stream
        # lane's descriptor exhaustion used to open, and the refusals counted since.
        assert res.notes == ["run 1: governed lane, gateway, max req/s: 323861 failed answers; one request right "
                             "after got 503; the sidecar's breaker open for mock; the sidecar has answered 7 "
                             "requests 503 for want of descriptors"]
        assert seen == ["Bearer afr_x"]
    finally:
        server.shutdown()


def test_a_lane_starts_only_once_the_breakers_a_lane_before_opened_have_closed(tmp_path):
    """Run 3 of 2026-12-01's third run: the 10 000-stream lane made the mock fail, the
    sidecar's breaker for it opened for 30 s, and the governed lane right after measured
    nothing but 503s. Now the next lane waits for the breaker (probing it; half-open is not
    closed yet) and the report says so, with the failures the sidecar logged during that
    lane only."""
    from types import SimpleNamespace

    bench = load_bench()
    probes: list = []
    closes_after = [2]  # the probe count at which the breaker closes

    def answer(auth):
        probes.append(auth)
        return 200 if len(probes) >= closes_after[0] else 503

    def state():  # open, then half-open at the first probe, closed at `closes_after`
        n = len(probes)
        return 0 if n >= closes_after[0] else (1 if n else 2)

    server = fake_gateway(answer, lambda: f'afr_breaker_state{{provider="mock"}} {state()}\n# EOF\n')
    (tmp_path / "logs").mkdir()
    log = tmp_path / "logs" / "sidecar.log"
    line = ('2026-12-01T11:10:00Z  WARN afr::serve::chat: provider failed; trying the next route '
            'request_id=req_{n} provider=mock error={why}')
    log.write_text("\n".join(line.format(n=n, why="cannot connect to the provider: connection timed out")
                             for n in range(3)) + "\n")
    try:
        st = stack_of(server, home=tmp_path)
        res = SimpleNamespace(notes=[])
        bench.settle(st, res, 2, "concurrent streams", wait_secs=20)
        assert probes == ["Bearer afr_x", "Bearer afr_x"]
        assert len(res.notes) == 1, res.notes
        note = res.notes[0]
        assert note.startswith("run 3: after the concurrent streams lane the gateway sidecar's breaker was not "
                               "closed for mock; closed after "), note
        assert note.endswith("(the provider failures it logged: 3× cannot connect to the provider: connection "
                             "timed out)"), note
        # A healthy gateway: nothing waited for, nothing noted.
        bench.settle(st, res, 2, "governed lane")
        assert len(res.notes) == 1
        # The next lane's failures are its own: the earlier lines are not counted again.
        with open(log, "a") as f:
            f.write(line.format(n=9, why="timeout (first_byte)") + "\n")
        closes_after[0] = len(probes) + 2
        bench.settle(st, res, 2, "rejections", wait_secs=20)
        assert len(res.notes) == 2, res.notes
        assert "before the first lane" not in res.notes[1]
        assert res.notes[1].endswith("(the provider failures it logged: 1× timeout (first_byte))"), res.notes[1]
    finally:
        server.shutdown()


def test_lanes_can_be_chosen_and_an_unknown_one_is_refused_naming_the_lanes():
    run = subprocess.run(["python3", str(REPO / "bench/run.py"), "--lanes", "ttft,governd"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "--lanes: unknown lane(s) governd; the lanes are c1, max, sweep, ttft, streams, governed, reject, " \
           "soak" in run.stderr, run.stderr


def test_a_subset_with_the_soak_says_which_lanes_ran(tmp_path):
    """The note naming the lanes run was written only when the soak was not among them."""
    run = subprocess.run([str(REPO / "scripts/bench"), "--quick", "--no-litellm", "--lanes", "reject,soak",
                          "--out", str(tmp_path), "--name", "subset"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    md = (tmp_path / "subset.md").read_text()
    assert "lanes run: reject, soak (--lanes)" in md, md


def test_stream_memory_holds_streams_over_http1_and_http2_and_reads_massif_sites(tmp_path):
    """bench/stream_memory.py: every stream is held on both provider transports, and the
    massif reader attributes each top-level site to the frames that name its owner."""
    import importlib.util

    for provider in ("http1", "http2"):
        run = subprocess.run([str(REPO / "bench/stream_memory.py"), "--streams", "40", "--provider", provider],
                             capture_output=True, text=True, timeout=180)
        assert run.returncode == 0, run.stdout + run.stderr
        assert re.search(rf"^{provider}: 40/40 streams held; .* KiB per stream$", run.stdout, re.M), run.stdout

    spec = importlib.util.spec_from_file_location("stream_memory", REPO / "bench/stream_memory.py")
    sm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sm)
    snapshot = tmp_path / "massif.hold"
    snapshot.write_text(
        "snapshot=0\nmem_heap_B=24576\nheap_tree=detailed\n"
        "n2: 24576 (heap allocation functions) malloc/new/new[], --alloc-fns, etc.\n"
        " n1: 16384 0x1: alloc (alloc.rs:95)\n"
        "  n0: 16384 0x2: hyper::proto::h1::io::Buffered<T,B>::new (src/proto/h1/io.rs:65)\n"
        " n1: 8192 0x3: alloc (alloc.rs:95)\n"
        "  n0: 8192 0x4: afr::serve::relay::respond (relay.rs:219)\n")
    sites = sm.sites(snapshot, 2)
    assert [size for size, _ in sites] == [16384, 8192], sites
    assert "hyper::proto::h1::io::Buffered" in sites[0][1] and "afr::serve::relay::respond" in sites[1][1], sites


def test_callgrind_nginx_counts_what_the_module_adds_to_a_request():
    """bench/callgrind_nginx.py: instructions per request of nginx with `afr off` and with
    `afr on` (the same static request, a key checked), and the module's own share."""
    run = subprocess.run([str(REPO / "bench/callgrind_nginx.py"), "--requests", "50"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    off = re.search(r"^nginx, afr off: ([\d,]+) instructions per request$", run.stdout, re.M)
    on = re.search(r"^nginx, afr on:  ([\d,]+) instructions per request \(([\d.]+)x; "
                   r"the module's own: ([\d,]+)\)$", run.stdout, re.M)
    assert off and on, run.stdout
    off_n, on_n, own = (int(x.replace(",", "")) for x in (off.group(1), on.group(1), on.group(3)))
    # a plain static request is some thousands of instructions; the module adds its own
    assert 1_000 < off_n < on_n and abs(own - (on_n - off_n)) <= 1, run.stdout  # each rounded


def test_callgrind_counts_a_claude_code_turn_on_an_anthropic_route_and_a_translated_one():
    """bench/callgrind.py --endpoint: the agent body in Anthropic's shape to /v1/messages,
    forwarded to the mock's Anthropic API, and translated to an OpenAI route; the
    translated request costs more (a second wire's body is built both ways)."""
    counts = {}
    for endpoint in ("messages", "messages-to-chat"):
        run = subprocess.run([str(REPO / "bench/callgrind.py"), "--requests", "20", "--body", "agent",
                              "--endpoint", endpoint], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "/v1/messages body agent" in run.stdout, run.stdout
        found = re.search(r"^sidecar instructions per non-streamed message: ([\d,]+)$", run.stdout, re.M)
        assert found, run.stdout
        counts[endpoint] = int(found.group(1).replace(",", ""))
    assert 10_000 < counts["messages"] < counts["messages-to-chat"], counts
