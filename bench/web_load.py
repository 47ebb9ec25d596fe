"""The HTTP face under load, measured against the real daemon on loopback:

- scrape latency at 1,000 projects x 5 models and 500 budgets, idle, while the daemon
  ingests a backlog, and while it also answers the pre-flight floods below, in one run;
- pre-flight checks (POST /api/v1/check) per second and their p99 at 16 and 64
  connections, while the daemon ingests and is scraped every second;
- reservations (POST /api/v1/reservations, each a new id: a grant journalled and
  fsynced) per second and their p99 at 16 and 64 connections, likewise;
- an authenticated scrape while 300 concurrent requests send wrong passwords (bcrypt
  cost 10), plain HTTP.

    python bench/web_load.py                 # backlog of 1,000,000 lines
    python bench/web_load.py --backlog 200000 --json web.json

bench/run.py calls ``run`` for its HTTP rows.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt

ROOT = Path(__file__).resolve().parent.parent
PROJECTS, MODELS, BUDGETS = 1000, 5, 500
PASSWORD = "bench-password"  # noqa: S105 - a benchmark's own user


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def wide_log(path: Path) -> None:
    """One finished task per project and model: 5,000 series in every usage family."""
    with open(path, "w") as f:
        for p in range(PROJECTS):
            for m in range(MODELS):
                tid = f"w-{p}-{m}"
                f.write(
                    json.dumps(
                        {
                            "event": "task_submitted",
                            "task_id": tid,
                            "project": f"p{p}",
                            "model": f"kling-m{m}",
                            "mode": "std",
                            "duration": 5,
                        }
                    )
                    + "\n"
                )
                f.write(json.dumps({"event": "task_completed", "task_id": tid}) + "\n")


def start(workdir: Path, port: int, web_config: Path | None = None) -> subprocess.Popen[bytes]:
    config = {
        "logs": {"paths": [str(workdir / "logs" / "*.jsonl")], "poll_interval": "100ms"},
        # A state file, so that reservations are journalled and fsynced as in production.
        "state": {"path": str(workdir / "bench.state")},
        "labels": {"max_projects": PROJECTS + 100},
        "budgets": [
            {"name": f"b{i}", "project": f"p{i}", "period": "monthly", "limit_credits": 10**6}
            for i in range(BUDGETS)
        ],
    }
    path = workdir / "bench-http.yml"
    path.write_text(json.dumps(config))
    cmd = [sys.executable, "-m", "kling_exporter", "serve", "--config.file", str(path)]
    cmd += ["--web.listen-address", f"127.0.0.1:{port}", "--log.level", "warn"]
    if web_config is not None:
        cmd += ["--web.config.file", str(web_config)]
    return subprocess.Popen(
        cmd,
        cwd=workdir,
        env={**os.environ, "PYTHONPATH": str(ROOT / "exporter")},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def lines_read(session: aiohttp.ClientSession, base: str) -> float:
    async with session.get(base + "/metrics") as r:
        text = await r.text()
    for raw in text.splitlines():
        if raw.startswith("kling_log_lines_read_total "):
            return float(raw.split()[1])
    return 0.0


async def wait_for(session: aiohttp.ClientSession, base: str, lines: float, limit: float) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            if await lines_read(session, base) >= lines:
                return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"the daemon did not read {lines:.0f} lines in {limit:.0f} s")


async def timed_scrape(session: aiohttp.ClientSession, url: str, **kw: Any) -> float:
    start = time.perf_counter()
    async with session.get(url, **kw) as r:
        await r.read()
        if r.status != 200:
            raise RuntimeError(f"scrape answered {r.status}")
    return (time.perf_counter() - start) * 1000


async def checks(
    base: str,
    connections: int,
    seconds: float,
    path: str = "/api/v1/check",
    ids: str = "bench",
    latencies: list[float] | None = None,
) -> dict[str, float]:
    """Requests per second answered 200 (201 for reservations), and their latency (each
    also added to ``latencies``). A reservation names a new id each time (``ids`` and a
    number), so every one is a grant written to the journal and fsynced."""
    task = {"project": "p7", "model": "kling-v2-6", "mode": "std", "duration": 5}
    ok = 201 if path.endswith("reservations") else 200
    latencies = [] if latencies is None else latencies
    mine = len(latencies)
    refused = 0
    sent = 0
    deadline = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal refused, sent
            while time.monotonic() < deadline:
                sent += 1
                body = json.dumps(
                    {**task, "id": f"{ids}-{connections}-{sent}", "ttl": "1m"}
                    if ok == 201
                    else task
                )
                start = time.perf_counter()
                async with session.post(base + path, data=body) as r:
                    await r.read()
                    if r.status != ok:
                        refused += 1
                        continue
                latencies.append((time.perf_counter() - start) * 1000)

        await asyncio.gather(*(worker() for _ in range(connections)))
    answered = latencies[mine:]
    return {
        "per_s": len(answered) / seconds,
        "p50_ms": percentile(answered, 0.5),
        "p99_ms": percentile(answered, 0.99),
        "refused": refused,
    }


async def measure_load(workdir: Path, backlog: Path, backlog_lines: int) -> dict[str, Any]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start(workdir, port)
    out: dict[str, Any] = {}
    try:
        async with aiohttp.ClientSession() as session:
            wide = 2 * PROJECTS * MODELS
            await wait_for(session, base, wide, 120)
            idle = [await timed_scrape(session, base + "/metrics") for _ in range(60)]
            out["scrape_idle"] = {"p50_ms": percentile(idle, 0.5), "p99_ms": percentile(idle, 0.99)}
            for n in (16, 64):
                out[f"check_idle_{n}"] = await checks(base, n, 3)

            # The backlog appears under the globs: everything below runs while it is read.
            # First scrapes alone, every half second; then pre-flight floods, scraped
            # every second as by an impatient Prometheus.
            os.rename(backlog, workdir / "logs" / "backlog.jsonl")
            total = wide + backlog_lines
            done = asyncio.Event()

            async def watcher() -> None:
                while await lines_read(session, base) < total:
                    await asyncio.sleep(0.2)
                done.set()

            async def scraper(into: list[float], every: float, until: asyncio.Event) -> None:
                while not until.is_set() and not done.is_set():
                    into.append(await timed_scrape(session, base + "/metrics"))
                    await asyncio.sleep(every)

            watching = asyncio.create_task(watcher())
            alone: list[float] = []
            enough = asyncio.Event()
            scraping = asyncio.create_task(scraper(alone, 0.5, enough))
            await asyncio.sleep(3)
            out["scrape_loaded"] = {
                "p50_ms": percentile(alone, 0.5),
                "p99_ms": percentile(alone, 0.99),
                "samples": len(alone),
                "while_ingesting": not done.is_set(),
            }
            enough.set()
            await scraping
            busy: list[float] = []
            scraping = asyncio.create_task(scraper(busy, 1, done))
            for n in (16, 64):
                result = await checks(base, n, 3)
                result["while_ingesting"] = not done.is_set()
                out[f"check_loaded_{n}"] = result
            for n in (16, 64):
                result = await checks(base, n, 3, "/api/v1/reservations")
                result["while_ingesting"] = not done.is_set()
                out[f"reserve_loaded_{n}"] = result
            await asyncio.gather(watching, scraping)
            out["scrape_busy"] = {
                "p50_ms": percentile(busy, 0.5),
                "p99_ms": percentile(busy, 0.99),
                "samples": len(busy),
            }
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return out


async def measure_auth_flood(workdir: Path) -> dict[str, float]:
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(10)).decode()
    web = workdir / "web.yml"
    web.write_text(json.dumps({"basic_auth_users": {"bench": hashed}}))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    good = {"Authorization": "Basic " + base64.b64encode(f"bench:{PASSWORD}".encode()).decode()}
    bad = {"Authorization": "Basic " + base64.b64encode(b"bench:wrong").decode()}
    proc = start(workdir, port, web)
    try:
        async with aiohttp.ClientSession(headers=good) as session:
            deadline = time.monotonic() + 60
            while True:
                try:
                    await timed_scrape(session, base + "/metrics")
                    break
                except (aiohttp.ClientError, RuntimeError):
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
            connector = aiohttp.TCPConnector(limit=300)
            async with aiohttp.ClientSession(connector=connector, headers=bad) as attackers:

                async def attack() -> None:
                    async with attackers.get(base + "/metrics") as r:
                        await r.read()

                flood = asyncio.gather(*(attack() for _ in range(300)))
                await asyncio.sleep(0.1)
                during = [await timed_scrape(session, base + "/metrics") for _ in range(10)]
                await flood
        return {"p50_ms": percentile(during, 0.5), "max_ms": max(during)}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def run(backlog_lines: int = 1_000_000) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="kling-bench-http-") as tmp:
        workdir = Path(tmp)
        (workdir / "logs").mkdir()
        wide_log(workdir / "logs" / "wide.jsonl")
        backlog = workdir / "backlog.jsonl"
        generate = [sys.executable, str(ROOT / "bench" / "generate.py"), "--out", str(backlog)]
        subprocess.run(
            [*generate, "--lines", str(backlog_lines), "--open-tasks", str(backlog_lines // 10)],
            check=True,
            capture_output=True,
        )
        result = asyncio.run(measure_load(workdir, backlog, backlog_lines))
        result["auth_flood"] = asyncio.run(measure_auth_flood(workdir))
        return result


def table(r: dict[str, Any]) -> str:
    rows = [
        ("scrape, idle (5,000 series, 500 budgets)", r["scrape_idle"]),
        ("scrape, while ingesting", r["scrape_loaded"]),
        ("scrape, while ingesting and checked", r["scrape_busy"]),
    ]
    out = [f"{name:<44} p50 {v['p50_ms']:.0f} ms, p99 {v['p99_ms']:.0f} ms" for name, v in rows]
    if not r["scrape_loaded"].get("while_ingesting", True):
        out[1] += " (ingest ended)"
    for kind, state in (("check", "idle"), ("check", "loaded"), ("reserve", "loaded")):
        for n in (16, 64):
            v = r.get(f"{kind}_{state}_{n}")
            if v is None:
                continue
            what = "reservations" if kind == "reserve" else "pre-flight"
            label = f"{what}, {n} connections, {state}"
            if state == "loaded" and not v["while_ingesting"]:
                label += " (ingest ended)"
            out.append(
                f"{label:<44} {v['per_s']:,.0f}/s, p50 {v['p50_ms']:.1f} ms, "
                f"p99 {v['p99_ms']:.1f} ms"
            )
    v = r["auth_flood"]
    label = "verified scrape under 300 wrong passwords"
    out.append(f"{label:<44} p50 {v['p50_ms']:.0f} ms, max {v['max_ms']:.0f} ms")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backlog", type=int, default=1_000_000, help="lines read under load")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.backlog < 1000:
        parser.error("--backlog must be at least 1000")
    result = run(args.backlog)
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
