"""`scripts/run --fleet`: two whole nodes (nginx + module + sidecar + mock each), one
Redis, one PostgreSQL (issue 12). The demo key's limit (60/min) holds across both
nodes, and usage from both sidecars lands in the one database."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

from conftest import AFR, KEY_RE, REPO, free_port, http, runtime_dir

BODY = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}).encode()


def test_run_fleet_holds_one_limit_and_one_usage_store():
    home = runtime_dir("fleet")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY")}
    env.update(AFR_FLEET_HOME=str(home), AFR_PORT=str(port))
    try:
        out = subprocess.run([str(REPO / "scripts/run"), "--fleet"], env=env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stdout + out.stderr
        key = KEY_RE.search(out.stdout).group(0)
        pg_url = re.search(r"postgres://\S+/afr_usage", out.stdout).group(0)
        # Redis windows are wall-clock minutes: stay inside one.
        while 60 - time.time() % 60 < 20:
            time.sleep(0.5)
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

        def one(i):
            url = f"http://127.0.0.1:{port + i % 2}/v1/chat/completions"
            return http("POST", url, BODY, headers)[0]

        with ThreadPoolExecutor(16) as ex:
            statuses = list(ex.map(one, range(200)))
        assert set(statuses) <= {200, 429}, statuses
        assert statuses.count(200) == 60
        # Both sidecars write the one PostgreSQL: the fleet's usage, read from either node.
        deadline = time.monotonic() + 10
        while True:
            usage = subprocess.run(
                [str(AFR), "usage", "--config", str(home / "node2/sidecar.toml"), "--key", "demo", "--json"],
                env={**env, "AFR_USAGE_POSTGRES_URL": pg_url}, capture_output=True, text=True, check=True,
            )
            rows = json.loads(usage.stdout)["data"]
            if (rows and rows[0]["requests"] == 60) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert rows[0]["requests"] == 60, rows
    finally:
        subprocess.run([str(REPO / "scripts/run"), "--fleet", "--stop"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(home, ignore_errors=True)
