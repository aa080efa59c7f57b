#!/usr/bin/env python3
"""Instructions per request in the sidecar, counted by valgrind's callgrind --
for the plain and the governed lane (plain/governed key, small or
~20 KB agent-like body) and for running any worktree's binaries.

The sidecar runs under callgrind (one runtime thread) in front of one afr-mock
from the same target dir; a client on its unix socket sends N and then 3N
non-streamed chat completions (keep-alive, the nginx -> sidecar headers a module
would add), and the difference of the two totals divided by 2N is the cost of
one request (start-up, the ledger-seed wait and shutdown cancel out).

    bench/callgrind.py [--repo WORKTREE] [--requests 1000] [--governed] [--body small|agent] [--keep DIR] [--floor] [--otlp]
                       [--endpoint chat|messages]

--endpoint messages sends the same bodies in Anthropic's shape to /v1/messages (what
Claude Code sends) for a model whose route is the mock's Anthropic API (the client's bytes
are forwarded); messages-to-chat sends them for gpt-4o-mini, whose first route is OpenAI's
(the gateway translates both ways).

--otlp exports traces and metrics (every request traced) to a loopback OTLP/HTTP sink in
this script that answers 200 to everything: what issue 26's telemetry costs (the SDK's
export thread is counted with the rest of the process).

--floor counts afr-bench-floor (bench/floor, the bare hyper hop) on the same
requests instead, so the sidecar's own instructions are its count minus that.

--repo (default: this checkout) gives conf/sidecar.toml, scripts/sidecar-config.py
and (unless --afr / --mock say otherwise) target/release/{afr,afr-mock} of that
worktree, so two commits can be compared from two `git worktree`s.
--governed adds `X-Afr-Limits: tpm=1000000000;budget=1000000000000/day`
(10^9 tokens a minute, $1000 a day: nothing is refused); the gpt-4o-mini route
keeps the shipped price (input 0.15, output 0.60), checked below.
"""

from __future__ import annotations

import argparse
import http.server
import threading
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

SECRET = "callgrind-secret-0123456789"
GOVERNED = "tpm=1000000000;budget=1000000000000/day"
MODEL = "gpt-4o-mini"
# A model of the bench's own whose one route is the mock's Anthropic API.
CLAUDE = "claude-bench"
CLAUDE_MODEL = """
[providers.mock-anthropic]
kind = "anthropic"
base_url = "http://127.0.0.1:{port}/v1"

[models.{model}]
tier = "Fast"
description = "bench/callgrind.py: the mock's Anthropic API"
[[models.{model}.routes]]
provider = "mock-anthropic"
model = "claude-haiku-4-5"
price = {{ input = 1.00, cached_input = 0.10, output = 5.00 }}
"""
SMALL = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello to the benchmark."}]}'


def agent_body() -> bytes:
    """A ~20 KB coding-agent turn: long system prompt, a tool with a JSON schema,
    an earlier tool call and its result, and a new user question. Deterministic."""
    rules = " ".join(
        f"Rule {i}: when editing file number {i}, read it first, keep the existing style, "
        f"explain the change in one sentence and never touch generated code."
        for i in range(1, 65)
    )
    system = "You are a careful software engineering agent working in a Rust repository. " + rules
    schema = {
        "type": "object",
        "properties": {
            "path": {"type": "string", "description": "Path of the file to read, relative to the repository root."},
            "start_line": {"type": "integer", "minimum": 1, "description": "First line to return (1-based)."},
            "end_line": {"type": "integer", "minimum": 1, "description": "Last line to return, inclusive."},
            "encoding": {"type": "string", "enum": ["utf-8", "latin-1"], "description": "Text encoding."},
            "options": {
                "type": "object",
                "properties": {
                    "follow_symlinks": {"type": "boolean", "description": "Resolve symbolic links."},
                    "max_bytes": {"type": "integer", "description": "Stop after this many bytes."},
                },
                "required": ["follow_symlinks"],
            },
        },
        "required": ["path"],
        "additionalProperties": False,
    }
    source = "\n".join(
        f"fn step_{i}(x: u64) -> u64 {{ x.wrapping_mul({i}).rotate_left({i % 17}) ^ 0x{i * 2654435761 % 2**32:08x} }}"
        for i in range(1, 119)
    )
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": "The build of the hashing module is slow. Look at src/hash.rs and tell me why."},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_0001", "type": "function",
            "function": {"name": "read_file", "arguments": json.dumps({"path": "src/hash.rs", "start_line": 1, "end_line": 200})},
        }]},
        {"role": "tool", "tool_call_id": "call_0001", "content": source},
        {"role": "assistant", "content": "The file defines 118 small step functions; each is generic-free, so the cost is elsewhere. "
                                         "Let me look at how they are combined."},
        {"role": "user", "content": "Please also check the callers in src/lib.rs and propose a faster combination."},
    ]
    tools = [{"type": "function", "function": {
        "name": "read_file",
        "description": "Read a range of lines of a text file in the repository and return them verbatim. " * 3,
        "parameters": schema,
    }}]
    body = {"model": MODEL, "messages": messages, "tools": tools, "max_tokens": 1024, "temperature": 0.2}
    return json.dumps(body, separators=(",", ":")).encode()


def to_messages(chat: bytes) -> bytes:
    """The chat body in Anthropic's Messages shape: the system prompt apart, tool calls
    and results as content blocks, tools with `input_schema`."""
    body = json.loads(chat)
    system, turns = None, []
    for m in body["messages"]:
        if m["role"] == "system":
            system = m["content"]
        elif m["role"] == "tool":
            turns.append({"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": m["tool_call_id"], "content": m["content"]}]})
        elif m.get("tool_calls"):
            turns.append({"role": "assistant", "content": [
                {"type": "tool_use", "id": c["id"], "name": c["function"]["name"],
                 "input": json.loads(c["function"]["arguments"])} for c in m["tool_calls"]]})
        else:
            turns.append({"role": m["role"], "content": m["content"]})
    out = {"model": body["model"], "max_tokens": body.get("max_tokens", 1024), "messages": turns}
    if system:
        out["system"] = system
    if body.get("tools"):
        out["tools"] = [{"name": t["function"]["name"], "description": t["function"]["description"],
                         "input_schema": t["function"]["parameters"]} for t in body["tools"]]
    return json.dumps(out, separators=(",", ":")).encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sidecar_home(repo: Path, home: Path, secret: str, mock_port: str) -> Path:
    """Writes the shipped sidecar.toml into `home` in front of the mock at `mock_port` (by
    scripts/sidecar-config.py, provider keys in the environment left out) and returns it;
    bench/stream_memory.py uses it too."""
    subprocess.run(
        [sys.executable, str(repo / "scripts/sidecar-config.py"), "--shipped",
         str(repo / "conf/sidecar.toml"), "--home", str(home), "--secret", secret,
         "--admin-port", str(free_port()), "--mock-port", mock_port],
        check=True, capture_output=True,
        env={k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")},
    )
    return home / "sidecar.toml"


def wait_for(path: Path, seconds: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if proc is not None and proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            raise SystemExit(f"cg.py: {proc.args[0]} exited ({proc.returncode}):\n{err[-2000:]}")
        if time.monotonic() > deadline:
            raise SystemExit(f"cg.py: {path} never appeared")
        time.sleep(0.1)


def exchange(s: socket.socket, f, request: bytes) -> bytes:
    s.sendall(request)
    status = f.readline()
    length, chunked = 0, False
    while (line := f.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
        elif name.lower() == b"transfer-encoding":
            chunked = True
    if chunked:
        while (size := int(f.readline(), 16)) != 0:
            f.read(size + 2)
        f.read(2)
    else:
        f.read(length)
    return status


def send(sock_path: Path, n: int, body: bytes, limits: str | None, path: str = "/v1/chat/completions") -> int:
    """One probe retried until 200 (a budgeted key waits for the ledger seed; at
    most 120 tries), then N keep-alive requests; any non-200 stops the run."""
    request = (
        b"POST " + path.encode() + b" HTTP/1.1\r\nHost: afr\r\nContent-Type: application/json\r\n"
        b"X-Afr-Key-Id: callgrind\r\nX-Afr-Secret: " + SECRET.encode() + b"\r\n"
        + (b"X-Afr-Limits: " + limits.encode() + b"\r\n" if limits else b"")
        + b"Content-Length: %d\r\n\r\n" % len(body)
    ) + body
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(60)
        s.connect(str(sock_path))
        f = s.makefile("rb")
        for tries in range(1, 121):
            if b" 200 " in (status := exchange(s, f, request)):
                break
            time.sleep(0.5)
        else:
            raise SystemExit(f"cg.py: the probe never got a 200 (last {status!r})")
        for _ in range(n):
            if b" 200 " not in (status := exchange(s, f, request)):
                raise SystemExit(f"cg.py: the sidecar answered {status!r}")
    return tries


class OtlpSink(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP collector that keeps nothing: 200 and an empty protobuf answer."""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_):
        pass


def otlp_sink() -> str:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), OtlpSink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


def run(command: list[str], sock: Path, n: int, out: Path, body: bytes, limits: str | None,
        env: dict[str, str], path: str = "/v1/chat/completions") -> tuple[int, int]:
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *command],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "AFR_UPSTREAM_SECRET": SECRET, **env},
    )
    try:
        wait_for(sock, 120, proc)
        tries = send(sock, n, body, limits, path)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    for line in err.splitlines():
        if "Collected :" in line:
            return int(line.split(":")[-1].replace(",", "").strip()), tries
    raise SystemExit(f"cg.py: no instruction count from valgrind:\n{err[-2000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent,
                    help="the worktree (config, scripts, binaries); default: this checkout")
    ap.add_argument("--requests", type=int, default=1000, help="N (the runs send N and 3N)")
    ap.add_argument("--afr", type=Path)
    ap.add_argument("--mock", type=Path)
    ap.add_argument("--governed", action="store_true", help=f"send X-Afr-Limits: {GOVERNED}")
    ap.add_argument("--body", choices=["small", "agent"], default="small")
    ap.add_argument("--endpoint", choices=["chat", "messages", "messages-to-chat"], default="chat",
                    help="messages: the body in Anthropic's shape to /v1/messages, to an "
                         "Anthropic route; messages-to-chat: to an OpenAI route (translated)")
    ap.add_argument("--keep", type=Path, help="keep the profiles in this directory")
    ap.add_argument("--floor", action="store_true",
                    help="count afr-bench-floor (the bare hyper hop, bench/floor) instead of the sidecar")
    ap.add_argument("--otlp", action="store_true",
                    help="export traces and metrics of every request to a loopback OTLP sink")
    args = ap.parse_args()
    repo = args.repo.resolve()
    afr = args.afr or repo / "target/release/afr"
    mock_bin = args.mock or afr.parent / "afr-mock"
    if not shutil.which("valgrind"):
        raise SystemExit("cg.py: needs valgrind (apt-get install valgrind)")
    body = SMALL if args.body == "small" else agent_body()
    path = "/v1/chat/completions"
    if args.endpoint != "chat":
        body, path = to_messages(body), "/v1/messages"
    if args.endpoint == "messages":
        body = body.replace(f'"model":"{MODEL}"'.encode(), f'"model":"{CLAUDE}"'.encode(), 1)
    limits = GOVERNED if args.governed else None
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_sink()} if args.otlp else {}

    with tempfile.TemporaryDirectory(prefix="afr-callgrind-") as tmp:
        tmp = Path(tmp)
        out_dir = args.keep or tmp
        out_dir.mkdir(parents=True, exist_ok=True)
        mock_port_file = tmp / "mock.port"
        mock = subprocess.Popen(
            [str(mock_bin), "--port-file", str(mock_port_file), "--log-capacity", "0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            wait_for(mock_port_file, 30)
            time.sleep(0.1)
            mock_port = mock_port_file.read_text().strip()
            totals, tries = {}, {}
            for n in (args.requests, 3 * args.requests):
                home = tmp / f"sidecar-{n}"
                home.mkdir()
                toml_path = sidecar_home(repo, home, SECRET, mock_port)
                if args.endpoint == "messages":
                    toml_path.write_text(toml_path.read_text()
                                         + CLAUDE_MODEL.format(port=mock_port, model=CLAUDE))
                cfg = tomllib.loads(toml_path.read_text())
                price = cfg["models"][MODEL]["routes"][0].get("price")
                if not price:
                    raise SystemExit(f"cg.py: the {MODEL} route has no price")
                if args.floor:
                    command = [str(afr.parent / "afr-bench-floor"), "--listen", str(home / "floor.sock"),
                               "--upstream", f"127.0.0.1:{mock_port}", "--threads", "1"]
                    sock = home / "floor.sock"
                else:
                    command = [str(afr), "serve", "--config", str(home / "sidecar.toml"), "--threads", "1"]
                    sock = home / "sidecar.sock"
                totals[n], tries[n] = run(command, sock, n, out_dir / f"{n}.out", body, limits, env, path)
        finally:
            mock.terminate()
            mock.wait(timeout=10)
        per_request = (totals[3 * args.requests] - totals[args.requests]) / (2 * args.requests)
        print(f"repo {repo} {path} body {args.body} ({len(body)} B) limits {limits or '-'} price {price}"
              f"{' telemetry: every request traced, to a loopback OTLP sink' if args.otlp else ''}")
        print(f"{'afr-bench-floor' if args.floor else 'sidecar'} instructions per non-streamed "
              f"{'chat completion' if args.endpoint == 'chat' else 'message'}: {per_request:,.0f}")
        print(f"totals: {args.requests} requests {totals[args.requests]:,}; "
              f"{3 * args.requests} requests {totals[3 * args.requests]:,}; probe tries {tries}")
        if args.keep:
            print(f"profiles: {out_dir}/{args.requests}.out, {out_dir}/{3 * args.requests}.out")


if __name__ == "__main__":
    main()
