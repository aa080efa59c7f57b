#!/usr/bin/env python3
"""Writes the quickstart's sidecar.toml from the shipped conf/sidecar.toml.

The catalogue (models, tiers, descriptions, parameter adaptations) is the shipped one.
What changes is where it listens and which providers serve it:
  - no provider key in the environment: every route goes to the local afr-mock;
  - OPENAI_API_KEY and/or ANTHROPIC_API_KEY (AZURE_OPENAI_API_KEY with
    AZURE_OPENAI_ENDPOINT): only those real providers, never the mock, so a real
    provider's failure is never "answered" by the mock.
Prints shell assignments (ADMIN_ADDR, MOCK_PORT, PROVIDERS_DESC) for scripts/run.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tomllib


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(type(v))


def toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else toml_value(k)


def table(out: list[str], header: str, d: dict) -> None:
    out.append(f"\n[{header}]")
    for k, v in d.items():
        if not (isinstance(v, dict) or (isinstance(v, list) and v and isinstance(v[0], dict))):
            out.append(f"{toml_key(k)} = {toml_value(v)}")
    for k, v in d.items():
        if isinstance(v, dict):
            table(out, f"{header}.{toml_key(k)}", v)
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for item in v:
                out.append(f"\n[[{header}.{toml_key(k)}]]")
                out.extend(f"{toml_key(ik)} = {toml_value(iv)}" for ik, iv in item.items())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shipped", required=True)
    ap.add_argument("--home", required=True)
    ap.add_argument("--secret", required=True)
    ap.add_argument("--admin-port", type=int, required=True)
    ap.add_argument("--mock-port", type=int, required=True)
    a = ap.parse_args()

    with open(a.shipped, "rb") as f:
        cfg = tomllib.load(f)

    cfg["server"].pop("secret_env", None)
    cfg["server"]["listen"] = f"unix:{a.home}/sidecar.sock"
    cfg["server"]["secret"] = a.secret
    if os.geteuid() == 0:
        # As root, nginx's workers run as an unprivileged user of another group.
        # Whoever can connect still needs the shared secret (the trust boundary,
        # as for a loopback TCP listener), so the socket may be world-connectable.
        cfg["server"]["socket_mode"] = "0666"
    cfg["admin"]["listen"] = f"127.0.0.1:{a.admin_port}"
    # The operator's dashboard page and chart library: this checkout's web/.
    cfg["admin"]["web"] = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "web")
    cfg["usage"]["path"] = f"{a.home}/usage.db"
    if os.environ.get("AFR_USAGE_POSTGRES_URL"):
        # scripts/run --fleet: every node writes the fleet's one PostgreSQL; the
        # sidecar reads the URL from that variable itself.
        cfg["usage"]["backend"] = "postgres"
        cfg["usage"]["postgres_url_env"] = "AFR_USAGE_POSTGRES_URL"

    if os.environ.get("AFR_FLEET_REDIS_URL"):
        # scripts/run --fleet: tpm and budgets held across the nodes through the
        # fleet's Redis; the sidecar reads the URL from that variable itself.
        cfg["fleet"] = {
            "redis_url_env": "AFR_FLEET_REDIS_URL",
            "nodes": int(os.environ.get("AFR_FLEET_NODES", "2")),
            "timeout": "200ms",
        }

    shipped = cfg["providers"]
    enabled = {}
    if os.environ.get("OPENAI_API_KEY"):
        enabled["openai"] = shipped["openai"]
    if os.environ.get("AZURE_OPENAI_API_KEY") and os.environ.get("AZURE_OPENAI_ENDPOINT"):
        enabled["azure"] = dict(shipped["azure"], base_url=os.environ["AZURE_OPENAI_ENDPOINT"])
    if os.environ.get("ANTHROPIC_API_KEY"):
        enabled["anthropic"] = shipped["anthropic"]

    mock_port = ""
    if enabled:
        served = {}
        for name, model in cfg["models"].items():
            routes = [r for r in model["routes"] if r["provider"] in enabled]
            if not routes and "anthropic" in enabled and model.get("kind", "chat") == "chat":
                routes = [{"provider": "anthropic", "model": "claude-haiku-4-5", "clamp": {"temperature": {"max": 1.0}}}]
            if not routes:
                print(f"scripts/run: no configured provider serves {name}; it is left out", file=sys.stderr)
                continue
            served[name] = dict(model, routes=routes)
        cfg["models"] = served
        cfg["providers"] = enabled
        desc = ", ".join(enabled)
    else:
        # The mock speaks OpenAI's wire format: keep each model's first OpenAI route
        # (with its parameter adaptations) and point it at the mock.
        mock_port = str(a.mock_port)
        cfg["providers"] = {
            "mock": {
                "kind": "openai",
                "base_url": f"http://127.0.0.1:{a.mock_port}/v1",
                "timeouts": {"connect": "1s", "first_byte": "30s", "idle": "30s", "total": "5m"},
            }
        }
        for model in cfg["models"].values():
            first = next(r for r in model["routes"] if shipped[r["provider"]]["kind"] == "openai")
            model["routes"] = [dict(first, provider="mock")]
        desc = f"local afr-mock on 127.0.0.1:{a.mock_port}"

    out = ["# Generated by scripts/run from conf/sidecar.toml; edits are hot-reloaded but", "# overwritten by the next scripts/run."]
    for section in ("server", "admin", "breaker", "usage", "fleet", "telemetry"):
        if section in cfg:
            table(out, section, cfg[section])
    for name, p in cfg["providers"].items():
        table(out, f"providers.{toml_key(name)}", p)
    for name, m in cfg["models"].items():
        table(out, f"models.{toml_key(name)}", m)
    path = os.path.join(a.home, "sidecar.toml")
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(out) + "\n")
    os.replace(path + ".tmp", path)

    print(f"ADMIN_ADDR=127.0.0.1:{a.admin_port}")
    print(f"MOCK_PORT={mock_port}")
    print(f"PROVIDERS_DESC='{desc}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
