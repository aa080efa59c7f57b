"""Coding agents through the whole gateway (issue 23): the real CLIs, pinned in
tests/agents/package.json and installed by scripts/setup — Anthropic's Claude Code (the
Messages API) and OpenAI's Codex (the Responses API) — run non-interactively with a
throwaway home against nginx + module + sidecar + afr-mock in its `tools = "agent"` mode,
which calls the agent's shell tool with arguments that fit its schema and answers the
tool's result with text. Each session asks for a command, runs it, and finishes with text.

After each session: the CLI succeeded and saw the command's output; every request it sent
was admitted and answered 200 (nothing the provider would not have refused); each has one
usage row whose tokens and cost are what the mock says it billed; and nginx wrote no
request body to a temporary file. The figures (requests per session, bytes, the bill)
are printed as "AGENT …" lines for the closing notes.

Claude Code runs through an Anthropic-wire route (a catalogue entry named like Claude
Code's default model, so it sends what it sends to Anthropic: a `system` message inside
`messages`, beta headers, `?beta=true`) and through an OpenAI-wire route (translated).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, billed_nanos, extend_catalogue, mock_billed, runtime_dir, start_gateway, usage_select

BIN = REPO / "tests" / "agents" / "node_modules" / ".bin"
PROVIDER_KEY = "sk-ant-provider-agents-0123456789"
# Claude Code's default model (2.1.332): a catalogue entry with this name gets its
# requests as it sends them to Anthropic, mid-conversation system message included.
CLAUDE = "claude-opus-5-5"
CLAUDE_PRICE = {"input": 5.0, "cached_input": 0.5, "output": 25.0}
GPT = "gpt-4o-mini"
GPT_PRICE = {"input": 0.15, "cached_input": 0.075, "output": 0.60}



@pytest.fixture(scope="module")
def gw():
    for cli in ("claude", "codex"):
        assert (BIN / cli).exists(), f"{BIN / cli} is missing: scripts/setup installs tests/agents"
    home = runtime_dir("agents")
    g, _ = start_gateway(home, {"AFR_TEST_ANTHROPIC_KEY": PROVIDER_KEY})
    g.anth = g.start_mock("--api-key", PROVIDER_KEY, "--tools", "agent")
    timeouts = {"connect": "1s", "first_byte": "10s", "idle": "10s", "total": "60s"}
    providers = {"anth": {"kind": "anthropic", "base_url": g.anth + "/v1", "api_key_env": "AFR_TEST_ANTHROPIC_KEY", "timeouts": timeouts}}
    model = {
        "tier": "Smart",
        "description": "Claude Code's default model name, on the Anthropic-speaking mock",
        "routes": [{"provider": "anth", "model": "claude-opus-5-5-20261101", "price": CLAUDE_PRICE}],
    }
    extend_catalogue(g, providers, {CLAUDE: model})
    g.mock_config(tools="agent")  # the stack's OpenAI-speaking mock (gpt-4o-mini)
    yield g
    g.stop()
    shutil.rmtree(home, ignore_errors=True)


def session_home(gw, name: str) -> Path:
    # Inside the stack's runtime directory, removed with it. (Codex warns that it will not
    # put its helper binaries under a temporary directory; it needs none here.)
    d = Path(gw.home) / "agents" / name
    (d / "work").mkdir(parents=True)
    return d


def run(cmd: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    base = {"PATH": f"{BIN}:/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    # stdin closed: both CLIs read a piped stdin to its end before starting.
    return subprocess.run(cmd, env={**base, **env}, cwd=cwd, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=180)


def access_lines(gw, since: int) -> list[str]:
    lines = (gw.home / "logs" / "nginx-access.log").read_text(errors="replace").splitlines()
    return lines[since:]


def check_the_books(gw, name: str, key_id: str, since: int, mock_url: str, price: dict) -> None:
    """Every request admitted and answered 200; one row each, equal to the mock's bill."""
    lines = [l for l in access_lines(gw, since) if f"key={key_id} " in l]
    assert lines, "the CLI reached the gateway"
    statuses = [re.search(r'" (\d{3}) ', l).group(1) for l in lines]
    assert statuses == ["200"] * len(lines), lines
    assert all("afr=admitted" in l for l in lines), lines
    rows = usage_select(gw, "key_id = ?", (key_id,), len(lines))
    assert len(rows) == len(lines), (rows, lines)
    billed_total = 0
    for r in rows:
        b = mock_billed(gw, mock_url, r["request_id"])
        assert (r["prompt_tokens"], r["completion_tokens"], r["cached_tokens"]) == (b["input"], b["output"], b["cached_input"]), (r, b)
        assert r["token_source"] == "provider", r
        assert r["cost_nanos"] == billed_nanos(b, price), (r, b)
        billed_total += billed_nanos(b, price)
    sizes = [int(s) for s in re.findall(r'" \d{3} (\d+) ', "\n".join(lines))]
    print(f"\nAGENT {name}: {len(lines)} requests, all 200 and admitted; "
          f"tokens in/out {sum(r['prompt_tokens'] for r in rows)}/{sum(r['completion_tokens'] for r in rows)}; "
          f"billed ${billed_total / 1e9:.6f} = the gateway's ${sum(r['cost_nanos'] for r in rows) / 1e9:.6f}; "
          f"response bytes {sizes}")
    log = (gw.home / "logs" / "nginx-error.log").read_text(errors="replace")
    assert "buffered to a temporary file" not in log, log[-2000:]


def mock_request_bodies(gw, url: str, path: str, since: int) -> list[dict]:
    return [r for r in gw.mock_requests(url)[since:] if r["path"].startswith(path)]


@pytest.mark.parametrize("model", [CLAUDE, GPT])
def test_claude_code_runs_a_tool_and_answers(gw, model):
    key_id = f"claude-{'anth' if model == CLAUDE else 'oai'}-{time.time_ns() % 10**8}"
    key = gw.new_key(key_id, "--rpm", "600", "--tpm", "10000000", "--budget-usd", "5", "--budget-per", "day")
    home = session_home(gw, key_id)
    mock_url = gw.anth if model == CLAUDE else gw.mock_url()
    mocked_before = len(gw.mock_requests(mock_url))
    since = len(access_lines(gw, 0))
    env = {
        "HOME": str(home), "CLAUDE_CONFIG_DIR": str(home / "config"),
        "ANTHROPIC_BASE_URL": gw.base, "ANTHROPIC_API_KEY": key,
        # No telemetry, update check or other call but the gateway.
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    }
    cmd = [str(BIN / "claude"), "-p", "Run `echo afr-mock` with the Bash tool, then say what it printed.",
           "--allowedTools", "Bash", "--output-format", "json"]
    if model != CLAUDE:
        cmd += ["--model", model]
    out = run(cmd, env, home / "work")
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    result = json.loads(out.stdout)
    # Claude Code exits 0 after a refused tool or an API error: judge by what it says.
    assert result["is_error"] is False, result
    assert result["permission_denials"] == [], result
    assert result["num_turns"] == 2, result
    assert "afr-mock" in result["result"], result
    check_the_books(gw, f"Claude Code via {model}", key_id, since, mock_url,
                    CLAUDE_PRICE if model == CLAUDE else GPT_PRICE)
    if model == CLAUDE:
        # What Anthropic would have received: the system message inside `messages`
        # (refused by the gateway before issue 23), its betas, its query string.
        sent = mock_request_bodies(gw, gw.anth, "/v1/messages", mocked_before)
        assert any(m["role"] == "system" for m in sent[0]["body"]["messages"]), sent[0]["body"]["messages"][:3]
        assert "claude-code" in sent[0]["headers"].get("anthropic-beta", ""), sent[0]["headers"]
        print(f"AGENT Claude Code request bodies: {[len(json.dumps(r['body'])) for r in sent]} bytes")


def test_codex_runs_a_tool_and_answers(gw):
    key_id = f"codex-{time.time_ns() % 10**8}"
    key = gw.new_key(key_id, "--rpm", "600", "--tpm", "10000000", "--budget-usd", "5", "--budget-per", "day")
    home = session_home(gw, key_id)
    (home / "codex").mkdir()
    (home / "codex" / "config.toml").write_text(f"""model = "{GPT}"
model_provider = "afr"

[model_providers.afr]
name = "Aeferalow gateway"
base_url = "{gw.base}/v1"
env_key = "AFR_API_KEY"
wire_api = "responses"

[analytics]
enabled = false

[features]
plugins = false
""")
    mocked_before = len(gw.mock_requests())
    since = len(access_lines(gw, 0))
    env = {"HOME": str(home), "CODEX_HOME": str(home / "codex"), "AFR_API_KEY": key}
    out = run([str(BIN / "codex"), "exec", "--skip-git-repo-check", "-s", "workspace-write", "--json",
               "Run `echo afr-mock` and tell me what it printed."], env, home / "work")
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    events = [json.loads(l) for l in out.stdout.splitlines() if l.startswith("{")]
    commands = [e["item"] for e in events if e.get("type") == "item.completed" and e["item"]["type"] == "command_execution"]
    assert commands and commands[0]["exit_code"] == 0 and "afr-mock" in commands[0]["aggregated_output"], events
    answers = [e["item"]["text"] for e in events if e.get("type") == "item.completed" and e["item"]["type"] == "agent_message"]
    assert answers and "afr-mock" in answers[-1], events
    check_the_books(gw, "Codex via gpt-4o-mini (Responses)", key_id, since, gw.mock_url(), GPT_PRICE)
    sent = mock_request_bodies(gw, gw.mock_url(), "/v1/responses", mocked_before)
    assert sent and all(r["body"].get("stream") is True for r in sent), sent
    print(f"AGENT Codex request bodies: {[len(json.dumps(r['body'])) for r in sent]} bytes")
