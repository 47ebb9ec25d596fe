"""What the exporter costs as the work grows: the real daemon on a log of many tasks,
projects and users, with few or many budgets, measured side by side in one run.

    .venv/bin/python bench/scale.py                       # 10 and 10,000 budgets
    .venv/bin/python bench/scale.py --tasks 1000000 --users 100000 --budgets 10 1000 10000
    .venv/bin/python bench/scale.py --old ../old-checkout  # the same, alternated with it
    .venv/bin/python bench/scale.py --yaml                # the config as YAML, not JSON

For each budget count: start (process start to /-/ready, the log read), restart (the
same from the saved state), reload (SIGHUP to the reload's timestamp moving), check
p50/p99 over sequential pre-flight checks on one connection (of random projects, each
matching the budgets spread on it; and of a probe project, which matches one budget
whatever the count), scrape time and size, the resident memory of both processes after
the scrapes (and against before them), and the state's size. Budgets are spread over
the projects (monthly, one per project in turn, a tenth of them per user), and one more
is the probe project's. Absolute times move with the machine: read the ratios between
the rows of one run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.web_load import free_port, percentile, reader_pid  # noqa: E402


def write_log(
    path: Path, tasks: int, projects: int, users: int, models: int, seed: int = 1
) -> None:
    rng = random.Random(seed)
    now = time.time() - 3600
    with open(path, "w") as f:
        for i in range(tasks):
            project, user = f"p{rng.randrange(projects)}", f"u{rng.randrange(users)}"
            ts = now + i * 3600 / tasks
            submitted = {
                "event": "task_submitted",
                "timestamp": ts,
                "task_id": f"t{i}",
                "project": project,
                "user": user,
                "model": f"kling-m{rng.randrange(models)}" if models > 1 else "kling-v2-6",
                "mode": "std",
                "duration": 5,
            }
            completed = {"event": "task_completed", "timestamp": ts + 60, "task_id": f"t{i}"}
            f.write(json.dumps(submitted) + "\n" + json.dumps(completed) + "\n")


PROBE = "probe"


def config(workdir: Path, budgets: int, projects: int, users: int) -> dict[str, Any]:
    rows = []
    for i in range(budgets):
        row: dict[str, Any] = {"name": f"b{i}", "period": "monthly", "limit_credits": 10**9}
        if i % 10 == 9:
            row["user"] = f"u{i % users}"
        else:
            row["project"] = f"p{i % projects}"
        rows.append(row)
    # One budget more, on a project of its own that the probe checks ask for: whatever
    # the budget count, a probe check matches exactly one budget.
    rows.append({"name": "probe", "period": "monthly", "limit_credits": 10**9, "project": PROBE})
    return {
        "logs": {"paths": [str(workdir / "logs" / "*.jsonl")], "poll_interval": "100ms"},
        "state": {"path": str(workdir / "state" / "scale.state")},
        # Users keep the default labels.max_users, which bounds what they cost.
        "labels": {"max_projects": projects + 10},
        "budgets": rows,
    }


class Daemon:
    def __init__(self, root: Path, workdir: Path) -> None:
        self.root, self.workdir = root, workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Seconds from process start to ready (the log read)."""
        cmd = [sys.executable, "-m", "kling_exporter", "serve", "--config.file", "scale.yml"]
        cmd += ["--web.listen-address", f"127.0.0.1:{self.port}", "--log.level", "warn"]
        env = {**os.environ, "PYTHONPATH": str(self.root / "exporter")}
        began = time.perf_counter()
        self.proc = subprocess.Popen(
            cmd, cwd=self.workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        while self.get("/-/ready")[0] != 200:
            if self.proc.poll() is not None:
                raise RuntimeError("the exporter exited")
            if time.perf_counter() - began > 600:
                raise RuntimeError("not ready in 10 minutes")
            time.sleep(0.02)
        return time.perf_counter() - began

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)

    def get(self, path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request("GET", path)
            answer = conn.getresponse()
            return answer.status, answer.read()
        except OSError:
            return 0, b""
        finally:
            conn.close()

    def metric(self, name: str) -> float | None:
        for text in self.get("/metrics")[1].decode().splitlines():
            if text.startswith(name + " "):
                return float(text.split()[1])
        return None

    def reload(self) -> float:
        assert self.proc is not None
        name = "kling_config_last_reload_success_timestamp_seconds"
        before = self.metric(name)
        began = time.perf_counter()
        self.proc.send_signal(signal.SIGHUP)
        while self.metric(name) == before:
            if time.perf_counter() - began > 120:
                raise RuntimeError("the reload did not happen in 2 minutes")
            time.sleep(0.01)
        return time.perf_counter() - began

    def checks(self, n: int, projects: int, probe: bool = False) -> list[float]:
        """Sequential checks on one connection: of random projects (which match as many
        budgets as the config spreads on each), or of the probe project (one)."""
        rng = random.Random(2)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        out = []
        try:
            for _ in range(n):
                project = PROBE if probe else f"p{rng.randrange(projects)}"
                body = json.dumps({"project": project, "duration": 5})
                began = time.perf_counter()
                conn.request("POST", "/api/v1/check", body, {"Content-Type": "application/json"})
                conn.getresponse().read()
                out.append((time.perf_counter() - began) * 1000)
        finally:
            conn.close()
        return out

    def scrapes(self, n: int = 5) -> tuple[float, int]:
        times, size = [], 0
        for _ in range(n):
            began = time.perf_counter()
            size = len(self.get("/metrics")[1])
            times.append((time.perf_counter() - began) * 1000)
        return statistics.median(times), size

    def rss_mib(self) -> tuple[float, float]:
        assert self.proc is not None

        def rss(pid: int) -> float:
            for text in Path(f"/proc/{pid}/status").read_text().splitlines():
                if text.startswith("VmRSS:"):
                    return int(text.split()[1]) / 1024
            return float("nan")

        return rss(self.proc.pid), rss(reader_pid(self.proc.pid))


def measure(root: Path, args: argparse.Namespace, budgets: int, log: Path) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="kling-scale-") as tmp:
        workdir = Path(tmp)
        (workdir / "logs").mkdir()
        (workdir / "state").mkdir()
        os.link(log, workdir / "logs" / "kling-scale.jsonl")
        cfg = config(workdir, budgets, args.projects, args.users)
        text = yaml.safe_dump(cfg, sort_keys=False) if args.yaml else json.dumps(cfg)
        (workdir / "scale.yml").write_text(text)
        daemon = Daemon(root, workdir)
        start = daemon.start()
        try:
            before = sum(daemon.rss_mib())
            scrape_ms, scrape_bytes = daemon.scrapes()
            http_mib, reader_mib = daemon.rss_mib()
            checks = daemon.checks(args.checks, args.projects)
            probes = daemon.checks(args.checks, args.projects, probe=True)
            reload = daemon.reload()
        finally:
            daemon.stop()
        state = (workdir / "state" / "scale.state").stat().st_size / 2**20
        restart = daemon.start()
        daemon.stop()
    return {
        "start_s": start,
        "restart_s": restart,
        "reload_s": reload,
        "check_p50_ms": percentile(checks, 0.5),
        "check_p99_ms": percentile(checks, 0.99),
        "probe_p50_ms": percentile(probes, 0.5),
        "probe_p99_ms": percentile(probes, 0.99),
        "scrape_ms": scrape_ms,
        "scrape_kib": scrape_bytes / 1024,
        "http_rss_mib": http_mib,
        "reader_rss_mib": reader_mib,
        "scrape_rss_ratio": (http_mib + reader_mib) / before,
        "state_mib": state,
    }


COLUMNS = [
    ("start_s", "start s", "{:.2f}"),
    ("restart_s", "restart s", "{:.2f}"),
    ("reload_s", "reload s", "{:.2f}"),
    ("check_p50_ms", "check p50 ms", "{:.2f}"),
    ("check_p99_ms", "check p99 ms", "{:.2f}"),
    ("probe_p50_ms", "1-budget check p50 ms", "{:.2f}"),
    ("probe_p99_ms", "1-budget check p99 ms", "{:.2f}"),
    ("scrape_ms", "scrape ms", "{:.1f}"),
    ("scrape_kib", "scrape KiB", "{:,.0f}"),
    ("http_rss_mib", "HTTP RSS MiB", "{:.0f}"),
    ("reader_rss_mib", "reader RSS MiB", "{:.0f}"),
    ("scrape_rss_ratio", "RSS after scrapes / before", "{:.2f}"),
    ("state_mib", "state MiB", "{:.1f}"),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--projects", type=int, default=1000)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--models", type=int, default=1, help="models the tasks spread over")
    parser.add_argument("--budgets", type=int, nargs="+", default=[10, 10_000])
    parser.add_argument("--checks", type=int, default=2000)
    parser.add_argument(
        "--yaml", action="store_true", help="write the config as YAML (default: as JSON)"
    )
    parser.add_argument("--old", type=Path, help="another checkout, measured alternately")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    builds = [("this", ROOT)] + ([("old", args.old.resolve())] if args.old else [])
    rows: list[tuple[str, int, dict[str, float]]] = []
    with tempfile.TemporaryDirectory(prefix="kling-scale-log-") as tmp:
        log = Path(tmp) / "kling-scale.jsonl"
        write_log(log, args.tasks, args.projects, args.users, args.models)
        for budgets in args.budgets:
            for name, root in builds:
                print(f"measuring {name}, {budgets:,} budgets ...", file=sys.stderr)
                rows.append((name, budgets, measure(root, args, budgets, log)))
    print(
        f"{args.tasks:,} tasks, {args.projects:,} projects, {args.models} models, "
        f"{args.users:,} users; "
        f"{args.checks:,} checks; the config as {'YAML' if args.yaml else 'JSON'}\n"
    )
    print("| build | budgets | " + " | ".join(label for _, label, _ in COLUMNS) + " |")
    print("|---|---:|" + "---:|" * len(COLUMNS))
    for name, budgets, r in rows:
        cells = " | ".join(fmt.format(r[key]) for key, _, fmt in COLUMNS)
        print(f"| {name} | {budgets:,} | {cells} |")
    first = {name: r for name, b, r in rows if b == args.budgets[0]}
    print(f"\nratios to {args.budgets[0]:,} budgets of the same build:")
    for name, budgets, r in rows:
        if budgets == args.budgets[0]:
            continue
        base = first[name]
        ratios = ", ".join(
            f"{label} {r[key] / base[key]:.2f}x" for key, label, _ in COLUMNS if base[key]
        )
        print(f"  {name}, {budgets:,}: {ratios}")
    if args.json:
        args.json.write_text(json.dumps([[n, b, r] for n, b, r in rows], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
