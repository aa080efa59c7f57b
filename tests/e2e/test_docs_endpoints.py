"""The docs' curl, JavaScript and Python examples for /v1/embeddings, /v1/completions and
/v1/responses, extracted from web/docs/index.html as a reader copies them (the JS and Python
ones after the page's client set-up) and run against the running gateway, so they cannot rot."""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
import time

import pytest

from conftest import REPO

DOCS = REPO / "web" / "docs" / "index.html"


def example(label: str, origin: str) -> str:
    """The text of the docs' block `aria-label=label`, with the page's base URL filled in."""
    m = re.search(r'<pre[^>]*aria-label="%s"[^>]*><code>(.*?)</code></pre>' % re.escape(label), DOCS.read_text(), re.S)
    assert m, f"no example {label!r} in the docs"
    code = m.group(1).replace("<span data-base-url>", "<span data-base-url>" + origin)
    return html.unescape(re.sub(r"<[^>]+>", "", code))


@pytest.fixture(scope="module")
def env(gateway):
    key = gateway.new_key(f"docs-ep-{int(time.time() * 1000) % 10**8}", "--rpm", "1000")
    return dict(gateway.env, AFR_API_KEY=key)


def run_curl(gateway, env, label: str) -> str:
    out = subprocess.run(["bash", "-c", example(label, gateway.base)], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


def run_python(gateway, env, label: str, tmp_path) -> str:
    script = tmp_path / "example.py"
    script.write_text(example("Python set-up", gateway.base) + "\n" + example(label, gateway.base) + "\n")
    out = subprocess.run([str(REPO / "build/venv/bin/python"), str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


def run_js(gateway, env, label: str) -> str:
    # Inside tests/ so the SDK resolves from tests/node_modules.
    js = REPO / "tests" / f".docs-example-{os.getpid()}-{label.split()[-1]}.mjs"
    js.write_text(example("JavaScript set-up", gateway.base) + "\n" + example(label, gateway.base) + "\n")
    try:
        out = subprocess.run(["node", str(js)], env=env, capture_output=True, text=True, timeout=30)
    finally:
        js.unlink()
    assert out.returncode == 0, out.stderr
    return out.stdout


def sse_data(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


def test_embeddings_examples_run(gateway, env, tmp_path):
    body = json.loads(run_curl(gateway, env, "curl embeddings"))
    assert len(body["data"][0]["embedding"]) == 1536
    assert run_js(gateway, env, "JavaScript embeddings") == "64\n"
    assert run_python(gateway, env, "Python embeddings", tmp_path) == "64\n"


def test_completions_examples_run(gateway, env, tmp_path):
    want = "Mock reply to: Tell me a joke"
    events = sse_data(run_curl(gateway, env, "curl completions"))
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == want
    assert run_js(gateway, env, "JavaScript completions") == want
    assert run_python(gateway, env, "Python completions", tmp_path) == want


def test_responses_examples_run(gateway, env, tmp_path):
    want = "Mock reply to: Say hi"
    events = sse_data(run_curl(gateway, env, "curl responses"))
    assert events[0]["type"] == "response.created" and events[-1]["type"] == "response.completed"
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == want
    assert run_js(gateway, env, "JavaScript responses") == want + "5 output tokens\n"
    assert run_python(gateway, env, "Python responses", tmp_path) == want + "5 output tokens\n"
