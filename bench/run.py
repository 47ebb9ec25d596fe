"""kling-exporter benchmark: ingest rate, latency, scrape cost and memory, beside mtail.

    python bench/run.py                    # 1,000,000 lines, 100,000 unfinished tasks
    python bench/run.py --lines 200000 --json bench-result.json

Measures, on one generated log (bench/generate.py, seeded):
  floor      a bare loop that decodes each line with msgspec typed structs (the exporter's
             own Event type) and adds it to a dict: what any Python reader pays
  pipeline   the exporter's decode + ledger in one process, no I/O
  cold       the real daemon from process start until kling_log_lines_read_total reaches N
  rss        the reader process's peak resident memory after that ingest (and the
             HTTP process's beside it)
  mtail      mtail --one_shot with bench/kling.mtail on the same file, if mtail is installed
  latency    append-to-visible percentiles while a writer appends at a steady rate
  render     /metrics render time with 1,000 projects x 5 models and 500 budgets
Prints a table, and JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "exporter"))  # the package, when not installed

import msgspec  # noqa: E402
from kling_exporter.accounting.ledger import Ledger  # noqa: E402
from kling_exporter.accounting.metrics import declared, families  # noqa: E402
from kling_exporter.collector import FamilyCollector, TextRenderer  # noqa: E402
from kling_exporter.configfile import parse_config  # noqa: E402
from kling_exporter.events import Event, decode_line  # noqa: E402
from kling_exporter.model import Status  # noqa: E402
from kling_exporter.reading.ingest import ingest  # noqa: E402
from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402

from bench import fleet_load, web_load  # noqa: E402
from bench.generate import write as generate  # noqa: E402
from bench.web_load import free_port  # noqa: E402


def scrape_value(url: str, name: str) -> float | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310
            for raw in resp.read().decode().splitlines():
                if raw.startswith(name + " "):
                    return float(raw.split()[1])
    except OSError:
        return None
    return None


def bench_floor(path: Path) -> float:
    decoder = msgspec.json.Decoder(Event, strict=False)
    counts: dict[tuple[str, str | None], int] = {}
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    start = time.perf_counter()
    for line in lines:
        e = decoder.decode(line)
        key = (str(e.project), e.model)
        counts[key] = counts.get(key, 0) + 1
    return len(lines) / (time.perf_counter() - start)


def bench_pipeline(path: Path) -> float:
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    ledger = Ledger(parse_config({}))
    now = time.time()
    start = time.perf_counter()
    for i in range(0, len(lines), 5000):  # blocks of about a megabyte, as the tailer reads
        ingest(ledger, lines[i : i + 5000], now)
    return len(lines) / (time.perf_counter() - start)


def start_daemon(
    workdir: Path, log_globs: list[str], port: int, state: str = "", interval: str = "10s"
) -> subprocess.Popen[bytes]:
    config = workdir / "bench.yml"
    config.write_text(
        json.dumps(
            {
                "logs": {"paths": log_globs, "poll_interval": "100ms"},
                "state": {"path": state, "interval": interval},
            }
        )
    )
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kling_exporter",
            "serve",
            "--config.file",
            str(config),
            "--web.listen-address",
            f"127.0.0.1:{port}",
            "--log.level",
            "warn",
        ],
        cwd=workdir,
        env={**os.environ, "PYTHONPATH": str(ROOT / "exporter")},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def peak_rss_mib(pid: int) -> float:
    for raw in Path(f"/proc/{pid}/status").read_text().splitlines():
        if raw.startswith("VmHWM:"):
            return int(raw.split()[1]) / 1024
    return float("nan")


def bench_cold(path: Path, lines: int, workdir: Path) -> dict[str, float]:
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    start = time.perf_counter()
    proc = start_daemon(workdir, [str(path)], port)
    try:
        while True:
            got = scrape_value(url, "kling_log_lines_read_total")
            if got is not None and got >= lines:
                break
            if proc.poll() is not None:
                raise RuntimeError("the daemon exited")
            if time.perf_counter() - start > 600:
                raise RuntimeError("the daemon did not finish in 10 minutes")
            time.sleep(0.05)
        seconds = time.perf_counter() - start
        tasks = scrape_value(url, "kling_tasks_tracked") or 0.0
        return {
            "seconds": seconds,
            "lines_per_s": lines / seconds,
            "peak_rss_mib": peak_rss_mib(web_load.reader_pid(proc.pid)),
            "http_rss_mib": peak_rss_mib(proc.pid),
            "tasks_tracked": tasks,
        }
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def bench_mtail(path: Path, lines: int, workdir: Path) -> dict[str, float] | None:
    mtail = shutil.which("mtail")
    if mtail is None:
        return None
    progs = workdir / "mtail-progs"
    progs.mkdir(exist_ok=True)
    shutil.copy(ROOT / "bench" / "kling.mtail", progs / "kling.mtail")
    start = time.perf_counter()
    subprocess.run(
        [
            mtail,
            "--progs",
            str(progs),
            "--logs",
            str(path),
            "--one_shot",
            "--one_shot_format",
            "prometheus",
        ],
        check=True,
        timeout=1800,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "lines_per_s": lines / seconds}


def wait_ready(url: str, limit: float = 120) -> None:
    """Until the daemon at ``url`` says it has read what was there at its start."""
    deadline = time.time() + limit
    while scrape_value(url, "kling_exporter_ready") != 1:
        if time.time() > deadline:
            raise RuntimeError("the daemon did not start")
        time.sleep(0.05)


def bench_latency(workdir: Path, rate: int, seconds: float, backlog: Path) -> dict[str, float]:
    """The daemon first reads the whole benchmark log (so its task index and saved state
    are full size) and saves its state every 2 s while the writer appends."""
    logs = workdir / "latency"
    logs.mkdir(exist_ok=True)
    log = logs / "kling-live.jsonl"
    log.write_text("")
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    proc = start_daemon(
        workdir,
        [str(backlog), str(logs / "kling-*.jsonl")],
        port,
        state=str(workdir / "latency.state"),
        interval="2s",
    )
    written: list[float] = []
    seen: list[tuple[float, float]] = []
    try:
        wait_ready(url)
        base = scrape_value(url, "kling_log_lines_read_total") or 0.0
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                got = scrape_value(url, "kling_log_lines_read_total")
                if got is not None:
                    seen.append((time.perf_counter(), got))
                time.sleep(0.005)

        watcher = threading.Thread(target=watch)
        watcher.start()
        total = int(rate * seconds)
        start = time.perf_counter()
        with open(log, "ab", buffering=0) as f:
            for i in range(total):
                due = start + i / rate
                pause = due - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
                f.write(
                    json.dumps(
                        {
                            "event": "task_submitted",
                            "task_id": f"live-{i}",
                            "project": "p",
                            "model": "kling-v2-6",
                            "mode": "std",
                            "duration": 5,
                        }
                    ).encode()
                    + b"\n"
                )
                written.append(time.perf_counter())
        time.sleep(1.0)
        stop.set()
        watcher.join()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    latencies = []
    j = 0
    for i, t in enumerate(written):
        while j < len(seen) and seen[j][1] - base < i + 1:
            j += 1
        if j == len(seen):
            break
        latencies.append((seen[j][0] - t) * 1000)
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))]

    return {
        "backlog_lines": base,
        "lines": len(written),
        "measured": len(latencies),
        "p50_ms": pct(0.5),
        "p90_ms": pct(0.9),
        "p99_ms": pct(0.99),
        "max_ms": latencies[-1],
    }


def bench_render(projects: int = 1000, models: int = 5, budgets: int = 500) -> dict[str, float]:
    config = parse_config(
        {
            "labels": {"max_projects": projects + 10},
            "budgets": [
                {
                    "name": f"b{i}",
                    "project": f"p{i % projects}",
                    "period": "monthly",
                    "limit_credits": 1000 + i,
                }
                for i in range(budgets)
            ],
        }
    )
    ledger = Ledger(config)
    now = time.time()
    n = 0
    for p in range(projects):
        for m in range(models):
            n += 1
            for raw in (
                {
                    "event": "task_submitted",
                    "task_id": f"t{n}",
                    "project": f"p{p}",
                    "model": f"kling-m{m}",
                    "mode": "pro",
                    "duration": 10,
                },
                {
                    "event": "task_completed",
                    "task_id": f"t{n}",
                    "status": "succeed",
                    "elapsed_sec": 90,
                    "credits_used": 70,
                },
                {
                    "event": "task_error",
                    "task_id": f"e{n}",
                    "project": f"p{p}",
                    "error_type": "timeout",
                },
            ):
                e = decode_line(json.dumps(raw).encode())
                assert isinstance(e, Event)
                ledger.apply(e, now)
    status = Status(
        files_watched=1,
        ready=True,
        reload_successful=True,
        reload_success_ts=now,
        state_save_ts=now,
    )
    collector = FamilyCollector(lambda: families(ledger.snapshot(time.time()), status), declared)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    renderer = TextRenderer()
    fast, library, size = [], [], 0
    for _ in range(10):
        start = time.perf_counter()
        size = len(renderer.render(collector.families()).encode())  # what /metrics serves
        fast.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        generate_latest(registry)  # prometheus_client's own path (OpenMetrics is alike)
        library.append((time.perf_counter() - start) * 1000)
    return {
        "series_bytes": size,
        "median_ms": statistics.median(fast),
        "max_ms": max(fast),
        "library_median_ms": statistics.median(library),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--open-tasks", type=int, default=100_000)
    parser.add_argument("--rate", type=int, default=2000, help="lines/s for the latency run")
    parser.add_argument("--latency-seconds", type=float, default=10)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=["floor", "pipeline", "cold", "mtail", "latency", "render", "web", "fleet"],
    )
    args = parser.parse_args()
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "lines": args.lines,
        "open_tasks": args.open_tasks,
    }
    with tempfile.TemporaryDirectory(prefix="kling-bench-") as tmp:
        workdir = Path(tmp)
        path = workdir / "kling-bench.jsonl"
        generate(path, args.lines, args.open_tasks)
        results["file_mib"] = path.stat().st_size / 2**20
        steps: dict[str, Callable[[], Any]] = {
            "floor": lambda: bench_floor(path),
            "pipeline": lambda: bench_pipeline(path),
            "cold": lambda: bench_cold(path, args.lines, workdir),
            "mtail": lambda: bench_mtail(path, args.lines, workdir),
            "latency": lambda: bench_latency(workdir, args.rate, args.latency_seconds, path),
            "render": bench_render,
            # Scrapes, pre-flight checks and an auth flood against the real daemon, idle
            # and while it reads a backlog of the same size (bench/web_load.py).
            "web": lambda: web_load.run(args.lines),
            # Reservations through three exporters sharing budgets in a real Redis
            # (bench/fleet_load.py), beside one exporter alone.
            "fleet": fleet_load.run,
        }
        for name, step in steps.items():
            if name not in args.skip:
                print(f"running {name} ...", file=sys.stderr)
                results[name] = step()
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def print_table(r: dict[str, Any]) -> None:
    rows: list[tuple[str, str, str]] = []
    floor = r.get("floor")
    if floor:
        rows.append(("decode floor (msgspec + dict)", f"{floor:,.0f} lines/s", ""))
    if r.get("pipeline"):
        share = f"{r['pipeline'] / floor:.0%} of floor" if floor else ""
        rows.append(
            ("pipeline in process (decode + ledger)", f"{r['pipeline']:,.0f} lines/s", share)
        )
    cold, mtail = r.get("cold"), r.get("mtail")
    if cold:
        extra = []
        if floor:
            extra.append(f"{cold['lines_per_s'] / floor:.0%} of floor")
        if mtail:
            extra.append(f"{cold['lines_per_s'] / mtail['lines_per_s']:.1f}x mtail")
        rows.append(
            ("cold ingest, real daemon", f"{cold['lines_per_s']:,.0f} lines/s", ", ".join(extra))
        )
        rows.append(
            (
                "peak RSS after ingest",
                f"{cold['peak_rss_mib']:.0f} MiB",
                f"{cold['tasks_tracked']:,.0f} tasks indexed; "
                f"HTTP process {cold.get('http_rss_mib', float('nan')):.0f} MiB",
            )
        )
    if mtail:
        rows.append(("mtail --one_shot, same file", f"{mtail['lines_per_s']:,.0f} lines/s", ""))
    lat = r.get("latency")
    if lat:
        rows.append(
            (
                "append-to-visible latency",
                f"p50 {lat['p50_ms']:.0f} ms",
                f"p90 {lat['p90_ms']:.0f} ms, p99 {lat['p99_ms']:.0f} ms, "
                f"max {lat['max_ms']:.0f} ms ({lat['measured']} lines)",
            )
        )
    ren = r.get("render")
    if ren:
        rows.append(
            (
                "/metrics render, 1000x5 series, 500 budgets",
                f"{ren['median_ms']:.0f} ms median",
                f"max {ren['max_ms']:.0f} ms, {ren['series_bytes'] / 1024:.0f} KiB; "
                f"prometheus_client's own rendering {ren['library_median_ms']:.0f} ms",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(3)] if rows else [0, 0, 0]
    print(
        f"\n{r['lines']:,} lines ({r['file_mib']:.0f} MiB), {r['open_tasks']:,} unfinished "
        f"tasks; {r['machine']['cpus']} CPUs, Python {r['machine']['python']}\n"
    )
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    if r.get("web"):
        print(web_load.table(r["web"]))
    if r.get("fleet"):
        print(fleet_load.table(r["fleet"]))


if __name__ == "__main__":
    raise SystemExit(main())
