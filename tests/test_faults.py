"""Fault injection against the real daemon process: after each fault, /metrics holds
exactly what was written, nothing lost and nothing counted twice.

Set FAULT_REPORT=path.json to get a table of lines written, counted, lost and doubled.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import DaemonProcess, Series, by_name, value, wait_until

Factory = Callable[..., DaemonProcess]

CONFIG = """
logs: {poll_interval: 200ms, rotate_wait: 3s}
state: {path: kling-exporter.state, interval: 200ms}
"""

RESULTS: list[dict[str, object]] = []


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    yield
    target = os.environ.get("FAULT_REPORT")
    if target:
        Path(target).write_text(json.dumps(RESULTS, indent=1))


class Writer:
    """Writes tasks (a submission and a completion with credits each) and keeps the
    totals the daemon must show."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tasks = 0
        self.lines = 0
        self.credits = 0
        path.parent.mkdir(parents=True, exist_ok=True)

    def task_lines(self) -> bytes:
        self.tasks += 1
        self.lines += 2
        self.credits += self.tasks % 7 + 1
        tid = f"task-{self.tasks}"
        sub = {
            "event": "task_submitted",
            "task_id": tid,
            "project": "p",
            "model": "kling-v2-6",
            "mode": "std",
            "duration": 5,
        }
        done = {
            "event": "task_completed",
            "task_id": tid,
            "status": "succeed",
            "elapsed_sec": 30,
            "credits_used": self.tasks % 7 + 1,
        }
        return (json.dumps(sub) + "\n" + json.dumps(done) + "\n").encode()

    def write(self, n: int, path: Path | None = None) -> None:
        with open(path or self.path, "ab") as f:
            f.write(b"".join(self.task_lines() for _ in range(n)))


def totals(series: Series) -> tuple[float, float, float]:
    return (
        sum(by_name(series, "kling_tasks_submitted_total").values()),
        sum(by_name(series, "kling_credits_used_total").values()),
        value(series, "kling_log_lines_read_total"),
    )


def assert_exact(d: DaemonProcess, w: Writer, scenario: str | None = None) -> Series:
    """Wait for /metrics to hold exactly what ``w`` wrote; a named scenario also goes
    into the report."""
    expected = (w.tasks, w.credits, w.lines)
    series: Series = {}

    def caught_up() -> bool:
        nonlocal series
        series = d.metrics()
        return totals(series) == expected

    with contextlib.suppress(AssertionError):  # the assertions below say what differs
        wait_until(caught_up, timeout=20)
    submitted, credits, lines = totals(series)
    if scenario is not None:
        RESULTS.append(
            {
                "scenario": scenario,
                "lines_written": w.lines,
                "lines_counted": lines,
                "tasks_written": w.tasks,
                "tasks_counted": submitted,
                "lost": max(0, w.tasks - submitted),
                "doubled": max(0, submitted - w.tasks),
                "duplicates_seen": value(series, "kling_events_duplicate_total"),
            }
        )
    assert (submitted, credits, lines) == expected, d.output()[-3000:]
    assert value(series, "kling_events_duplicate_total") == 0
    assert sum(by_name(series, "kling_log_lines_invalid_total").values()) == 0
    return series


def log_path(tmp_path: Path, day: str = "2026-11-22") -> Path:
    return tmp_path / "logs" / f"kling-{day}.jsonl"


def test_kill_9_mid_stream_and_lines_written_while_down(
    tmp_path: Path, daemon_factory: Factory
) -> None:
    w = Writer(log_path(tmp_path))
    w.write(50)
    d = daemon_factory(CONFIG)
    stop = threading.Event()

    def stream() -> None:
        while not stop.is_set():
            w.write(5)
            time.sleep(0.005)

    writer = threading.Thread(target=stream)
    writer.start()
    time.sleep(1.5)
    d.stop(signal.SIGKILL)
    time.sleep(0.3)
    stop.set()
    writer.join()
    w.write(300)  # while the daemon is down
    d2 = daemon_factory(CONFIG)
    assert "state restored" in d2.output()
    assert_exact(d2, w, "kill -9 mid-stream, restart, lines written while down")


def test_sigterm_and_restart(tmp_path: Path, daemon_factory: Factory) -> None:
    w = Writer(log_path(tmp_path))
    w.write(100)
    d = daemon_factory(CONFIG)
    assert_exact(d, w)
    assert d.stop(signal.SIGTERM) == 0
    w.write(40)
    d2 = daemon_factory(CONFIG)
    assert_exact(d2, w, "SIGTERM and restart")


def test_rename_rotation_with_writer_on_the_old_handle(
    tmp_path: Path, daemon_factory: Factory
) -> None:
    path = log_path(tmp_path)
    w = Writer(path)
    w.write(20)
    d = daemon_factory(CONFIG)
    with open(path, "ab") as old:
        os.rename(path, path.with_name(path.name + ".1"))
        old.write(b"".join(w.task_lines() for _ in range(15)))
        old.flush()
        w.write(10)  # the new file, created by the writer's next open
        time.sleep(0.5)
        old.write(b"".join(w.task_lines() for _ in range(5)))
    assert_exact(d, w, "rename rotation, writer still on the old handle")


def test_copytruncate_then_more_bytes_than_the_file_held(
    tmp_path: Path, daemon_factory: Factory
) -> None:
    path = log_path(tmp_path)
    w = Writer(path)
    w.write(10)
    d = daemon_factory(CONFIG)
    assert_exact(d, w)
    shutil.copyfile(path, path.with_name(path.name + ".1"))
    with open(path, "r+b") as f:
        f.truncate(0)
    w.write(40)  # more than the file held before
    assert_exact(d, w, "copytruncate, then more bytes than before")


def test_new_daily_file_that_already_holds_lines(tmp_path: Path, daemon_factory: Factory) -> None:
    w = Writer(log_path(tmp_path))
    w.write(10)
    d = daemon_factory(CONFIG)
    staging = tmp_path / "staging.jsonl"
    w.write(25, staging)
    staging.rename(log_path(tmp_path, "2026-11-23"))
    assert_exact(d, w, "new daily file already holding lines")


def test_half_written_line_completed_seconds_later(tmp_path: Path, daemon_factory: Factory) -> None:
    path = log_path(tmp_path)
    w = Writer(path)
    w.write(5)
    d = daemon_factory(CONFIG)
    data = w.task_lines()
    with open(path, "ab") as f:
        f.write(data[:37])
        f.flush()
        time.sleep(1.5)
        f.write(data[37:])
    assert_exact(d, w, "half-written line completed 1.5 s later")


def test_inode_reused_by_a_new_file(tmp_path: Path, daemon_factory: Factory) -> None:
    path = log_path(tmp_path)
    w = Writer(path)
    w.write(10)
    d = daemon_factory(CONFIG)
    assert_exact(d, w)
    assert d.stop(signal.SIGTERM) == 0
    old_inode = path.stat().st_ino
    # The old file goes away with its lines already counted; a new one takes its name.
    path.unlink()
    w.write(30)  # longer than the old file, so only the fingerprint tells them apart
    reused = path.stat().st_ino == old_inode
    d2 = daemon_factory(CONFIG)
    assert_exact(d2, w, f"file replaced while down (inode reused: {'yes' if reused else 'no'})")


def test_corrupt_state_file_is_moved_aside_and_rebuilt(
    tmp_path: Path, daemon_factory: Factory
) -> None:
    w = Writer(log_path(tmp_path))
    w.write(30)
    d = daemon_factory(CONFIG)
    assert_exact(d, w)
    assert d.stop(signal.SIGTERM) == 0
    state = tmp_path / "kling-exporter.state"
    state.write_bytes(b"\x00garbage" * 10)
    w.write(5)
    d2 = daemon_factory(CONFIG)
    assert_exact(d2, w, "corrupt state file")
    assert (tmp_path / "kling-exporter.state.corrupt").exists()
    assert "state file unreadable, moved aside" in d2.output()
