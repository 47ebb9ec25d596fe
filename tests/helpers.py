"""Shared test tools: log writing, a real daemon process, metric parsing, waiting."""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from kling_exporter.accounting.ledger import Ledger
from kling_exporter.accounting.metrics import declared, families
from kling_exporter.accounting.state import ledger_state, restore
from kling_exporter.budgets import Ask, CheckResult
from kling_exporter.collector import FamilyCollector
from kling_exporter.configfile import parse_config
from kling_exporter.events import Event, decode_line
from kling_exporter.model import ReadStats, Status
from kling_exporter.pricing import Request
from kling_exporter.views import Snapshot
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def line(**fields: Any) -> str:
    return json.dumps(fields)


def write_lines(path: Path, lines: Iterable[str | Mapping[str, Any]], mode: str = "a") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, mode, encoding="utf-8") as f:
        for item in lines:
            f.write((item if isinstance(item, str) else json.dumps(item)) + "\n")


def check(ledger: Ledger, req: Request, count: int, project: str) -> CheckResult:
    """A pre-flight answer from the ledger's own usage and tasks in flight, at NOW."""
    return ledger.budgets.check(ledger.usage, Ask(req, count, project, None), NOW, ledger.flight)


def collector_of(source: Callable[[], tuple[Snapshot, Status]]) -> FamilyCollector:
    """The reader's metrics as a prometheus_client collector, read from ``source``."""
    return FamilyCollector(lambda: families(*source()), declared)


def saved_and_restored(ledger: Ledger) -> Ledger:
    """A new ledger restored from ``ledger``'s saved form, through msgpack as on disk."""
    saved = msgspec.msgpack.decode(msgspec.msgpack.encode(ledger_state(ledger)))
    restored = Ledger(ledger.config)
    restore(restored, saved)
    return restored


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(check: Callable[[], Any], timeout: float = 15.0, interval: float = 0.05) -> Any:
    """Call ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (OSError, AssertionError, KeyError) as e:
            last = e
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last: {last!r})")


def parse_metrics(text: str) -> Series:
    out: Series = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(series: Series, name: str, **labels: str) -> float:
    return series.get((name, frozenset(labels.items())), 0.0)


def by_name(series: Series, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in series.items() if n == name}


def require_binary(name: str, *other_names: str) -> str:
    """The path of a tool the end-to-end tests need (under any of its names): a failure
    in CI, a skip elsewhere, listed at the end of the run."""
    for candidate in (name, *other_names):
        path = shutil.which(candidate) or shutil.which(candidate, path="/usr/sbin:/sbin")
        if path is not None:
            return path
    if os.environ.get("CI"):
        pytest.fail(f"{name} is not installed (make tools installs it)")
    pytest.skip(f"{name} is not installed; run `make tools`")


class DaemonProcess:
    """The real exporter as a subprocess on a loopback port chosen at run time."""

    def __init__(
        self,
        workdir: Path,
        config: str | None = None,
        extra: list[str] | None = None,
        command: str = "serve",
        nofile: int | None = None,
    ):
        self.workdir = workdir
        self.command = command
        self.port = free_port()
        self.config_path = workdir / "config.yml"
        if config is not None:
            self.config_path.write_text(config)
        self.extra = extra or []
        self.nofile = nofile  # a hard limit of open descriptors, as a small system has
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"daemon-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait_ready: bool = True) -> DaemonProcess:
        cmd = [
            sys.executable,
            "-m",
            "kling_exporter",
            self.command,
            "--web.listen-address",
            f"127.0.0.1:{self.port}",
            *self.extra,
        ]
        if self.config_path.exists() and self.command == "serve":
            cmd += ["--config.file", str(self.config_path)]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "exporter")}
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        limit = self.nofile

        def preexec() -> None:
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

        self.proc = subprocess.Popen(
            cmd,
            cwd=self.workdir,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=preexec,  # noqa: PLW1509 - only setrlimit, no threads touched
        )
        if wait_ready:
            wait_until(lambda: self.get("/-/ready")[0] == 200, timeout=30)
        return self

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        return request(self.url + path, headers=headers)

    def post(
        self, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        return request(self.url + path, data=body, headers=headers, method="POST")

    def metrics(self) -> Series:
        status, body = self.get("/metrics")
        assert status == 200, body
        return parse_metrics(body.decode())

    def wait_metric(
        self, name: str, expected: float, timeout: float = 15.0, **labels: str
    ) -> Series:
        def check() -> Series | None:
            series = self.metrics()
            return series if value(series, name, **labels) == expected else None

        try:
            result: Series = wait_until(check, timeout=timeout)
        except AssertionError:
            got = value(self.metrics(), name, **labels)
            raise AssertionError(f"{name}{labels} is {got}, expected {expected}") from None
        return result

    def send(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._log.close()
        return code

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


def request(
    url: str,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
    method: str = "GET",
    timeout: float = 10,
) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# -- logs, ledgers and exporters that several test modules share ------------------------

NOW = dt.datetime(2026, 11, 22, 12, tzinfo=dt.UTC).timestamp()


def feed(ledger: Ledger, *lines: str, now: float = NOW, settle: bool = True) -> None:
    """Apply the lines; ``settle`` ends like a whole read of the logs, counting what
    still waits for its submission."""
    for raw in lines:
        event = decode_line(raw.encode())
        assert isinstance(event, Event), (raw, event)
        ledger.apply(event, now)
    if settle:
        ledger.settle_waiting()


def iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat()


@dataclass
class Task:
    id: str
    project: str
    user: str
    model: str
    mode: str
    duration: int
    audio: bool
    ts: float
    outcome: str  # succeed, failed, error, open
    credits_used: float | None
    elapsed: float


def random_tasks(rng: random.Random, n: int, start: float, span: float) -> list[Task]:
    tasks = []
    for i in range(n):
        outcome = rng.choice(["succeed"] * 6 + ["failed", "error", "open"])
        tasks.append(
            Task(
                id=f"task-{i}",
                project=rng.choice(["marketing", "sales", "rnd"]),
                user=rng.choice(["ann", "bob"]),
                model=rng.choice(["kling-v1", "kling-v2-6"]),
                mode=rng.choice(["standard", "professional"]),
                duration=rng.choice([5, 10]),
                audio=rng.random() < 0.2,
                ts=start + rng.random() * span,
                outcome=outcome,
                credits_used=rng.choice([None, None, 7.0, 12.5]) if outcome == "succeed" else None,
                elapsed=rng.uniform(10, 400),
            )
        )
    return tasks


def task_lines(tasks: list[Task], rng: random.Random, duplicates: int = 0) -> list[str]:
    """Events in time order: submission, then completion a little later; some repeated."""
    events: list[tuple[float, str]] = []
    for t in tasks:
        events.append(
            (
                t.ts,
                line(
                    event="task_submitted",
                    timestamp=iso(t.ts),
                    task_id=t.id,
                    project=t.project,
                    user=t.user,
                    model=t.model,
                    mode=rng.choice(
                        {"standard": ["standard", "std"], "professional": ["pro"]}[t.mode]
                    ),
                    duration=t.duration,
                    audio=t.audio,
                    prompt_len=42,
                ),
            )
        )
        done = t.ts + t.elapsed
        if t.outcome in ("succeed", "failed"):
            fields: dict[str, object] = {
                "event": "task_completed",
                "timestamp": iso(done),
                "task_id": t.id,
                "status": t.outcome,
                "elapsed_sec": t.elapsed,
            }
            if t.credits_used is not None:
                fields["credits_used"] = t.credits_used
            events.append((done, line(**fields)))
        elif t.outcome == "error":
            events.append(
                (
                    done,
                    line(
                        event="task_error",
                        timestamp=iso(done),
                        task_id=t.id,
                        error_type="quota",
                        message="prompt was: a cat",
                    ),
                )
            )
    events.sort(key=lambda e: e[0])
    out = [raw for _, raw in events]
    for _ in range(duplicates):  # a repeat comes after the line it repeats
        i = rng.randrange(len(out))
        out.insert(rng.randrange(i + 1, len(out) + 1), out[i])
    return out


MK_CONFIG = """
state: {path: ""}
logs: {poll_interval: 200ms}
budgets:
  - {name: mk, project: marketing, period: monthly, limit_credits: 100}
"""


def submitted(task_id: str, project: str = "marketing", **kw: object) -> str:
    return line(
        event="task_submitted",
        task_id=task_id,
        project=project,
        model="kling-v2-6",
        mode="std",
        duration=5,
        **kw,
    )


def completed(task_id: str, **kw: object) -> str:
    return line(event="task_completed", task_id=task_id, status="succeed", elapsed_sec=60, **kw)


def half_used(tmp_path: Path, daemon_factory: Callable[..., DaemonProcess]) -> DaemonProcess:
    """A daemon whose budget mk has used 50 of its 100 credits."""
    write_lines(
        tmp_path / "logs" / "kling-2026-11-22.jsonl",
        [submitted("a"), completed("a", credits_used=50)],
    )
    d = daemon_factory(MK_CONFIG)
    d.wait_metric("kling_budget_utilization_ratio", 0.5, budget="mk", period="monthly")
    return d


FIXED_LOG_CONFIG = parse_config(
    {
        "timezone": "Europe/Berlin",
        "budgets": [
            {
                "name": "marketing",
                "project": "marketing",
                "period": "monthly",
                "limit_credits": 10000,
                "limit_usd": 600,
            },
            {
                "name": "bob-daily",
                "user": "bob",
                "period": "daily",
                "limit_credits": 100,
                "alert_threshold": 0.9,
            },
            {"name": "everything", "period": "weekly", "limit_usd": 50},
        ],
    }
)


def render_fixed_log() -> bytes:
    ledger, reading = Ledger(FIXED_LOG_CONFIG), ReadStats()
    for raw in (ROOT / "tests" / "data" / "fixed.jsonl").read_bytes().splitlines():
        reading.lines += 1
        reading.bytes += len(raw) + 1
        result = decode_line(raw)
        if isinstance(result, Event):
            ledger.apply(result, NOW)
        else:
            reading.invalid[result] += 1
    status = Status(
        files_watched=1,
        ready=True,
        reload_successful=True,
        reload_success_ts=NOW - 60,
        state_save_ts=NOW - 5,
    )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector_of(lambda: (ledger.snapshot(NOW, reading), status)))
    body: bytes = generate_latest(registry)
    return body


# The header their export_usage_csv writes, which readers of it depend on.
THEIR_CSV_COLUMNS = [
    "timestamp",
    "event",
    "task_id",
    "model",
    "status",
    "credits_used",
    "elapsed_sec",
]


def half_then_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk mid-write: the next ``os.write`` to a regular file takes half its
    bytes and the one after fails with ENOSPC; writes after that succeed (space was
    freed)."""
    real_write = os.write
    state = {"armed": True, "half": False}

    def write(fd: int, data: Any) -> int:
        if state["armed"] and stat.S_ISREG(os.fstat(fd).st_mode):
            if state["half"]:
                state["armed"] = False
                raise OSError(28, "No space left on device")
            state["half"] = True
            return real_write(fd, bytes(data[: len(data) // 2]))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
