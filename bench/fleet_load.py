"""Fleet reservations under load: three real exporters sharing budgets through a real
redis-server on loopback, 48 connections spread over them (16 each), every request a
reservation with a new id (decided by the fleet's script in Redis, then journalled and
fsynced by its exporter). Beside it, the same 48 connections against one exporter
alone, for what the fleet costs.

    python bench/fleet_load.py
    python bench/fleet_load.py --seconds 10 --json fleet.json

Needs redis-server on PATH (make tools installs it). bench/run.py calls ``run``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.web_load import ROOT, checks, free_port, percentile

EXPORTERS = 3
CONNECTIONS = 48


def start_redis(workdir: Path, port: int) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (make tools installs it)")
    cmd = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", ""]
    cmd += ["--appendonly", "no", "--dir", str(workdir)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_exporter(folder: Path, port: int, redis_url: str) -> subprocess.Popen[bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "logs": {"paths": [str(folder / "logs" / "*.jsonl")], "poll_interval": "100ms"},
        "state": {"path": str(folder / "bench.state")},  # holds journalled and fsynced
        "budgets": [
            {"name": "team", "project": "p7", "period": "monthly", "limit_credits": 10**9},
            {"name": "all", "period": "daily", "limit_usd": 10**9},
        ],
    }
    if redis_url:
        config["fleet"] = {"redis_url": redis_url, "instance": folder.name}
    (folder / "bench.yml").write_text(json.dumps(config))
    cmd = [sys.executable, "-m", "kling_exporter", "serve", "--config.file", "bench.yml"]
    cmd += ["--web.listen-address", f"127.0.0.1:{port}", "--log.level", "warn"]
    return subprocess.Popen(
        cmd,
        cwd=folder,
        env={**os.environ, "PYTHONPATH": str(ROOT / "exporter")},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def settled(bases: list[str], fleet: bool, limit: float = 30) -> None:
    """Until every exporter is ready and, in a fleet, sees all of them."""
    deadline = time.monotonic() + limit
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                done = 0
                for base in bases:
                    async with session.get(base + "/api/v1/budgets") as r:
                        answer = await r.json() if r.status == 200 else {}
                    seen = answer.get("fleet", {})
                    if answer and (not fleet or (seen.get("settled") and seen.get("up"))):
                        done += seen.get("instances", 0) == len(bases) or not fleet
                if done == len(bases):
                    return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError("the exporters did not settle")


async def load(bases: list[str], seconds: float) -> dict[str, float]:
    """Reservations per second over all ``bases`` and their latency percentiles."""
    latencies: list[float] = []
    per = CONNECTIONS // len(bases)
    parts = await asyncio.gather(
        *(
            checks(base, per, seconds, "/api/v1/reservations", f"x{i}", latencies)
            for i, base in enumerate(bases)
        )
    )
    return {
        "per_s": sum(p["per_s"] for p in parts),
        "p50_ms": percentile(latencies, 0.5),
        "p99_ms": percentile(latencies, 0.99),
        "refused": sum(p["refused"] for p in parts),
    }


def measure(workdir: Path, exporters: int, fleet: bool, seconds: float) -> dict[str, float]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        redis_url = ""
        if fleet:
            port = free_port()
            procs.append(start_redis(workdir, port))
            redis_url = f"redis://127.0.0.1:{port}/0"
        bases = []
        for i in range(exporters):
            port = free_port()
            procs.append(start_exporter(workdir / f"exporter-{i}", port, redis_url))
            bases.append(f"http://127.0.0.1:{port}")
        asyncio.run(settled(bases, fleet))
        return asyncio.run(load(bases, seconds))
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(30)


def run(seconds: float = 5.0) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="kling-bench-fleet-") as tmp:
        workdir = Path(tmp)
        return {
            "fleet": measure(workdir / "fleet", EXPORTERS, True, seconds),
            "alone": measure(workdir / "alone", 1, False, seconds),
        }


def table(r: dict[str, Any]) -> str:
    out = []
    for key, label in (
        ("fleet", f"fleet reservations, {EXPORTERS} exporters + Redis, {CONNECTIONS} conn."),
        ("alone", f"reservations, 1 exporter alone, {CONNECTIONS} connections"),
    ):
        v = r[key]
        out.append(
            f"{label:<56} {v['per_s']:,.0f}/s, p50 {v['p50_ms']:.1f} ms, p99 {v['p99_ms']:.1f} ms"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="of load per setup")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    result = run(args.seconds)
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
