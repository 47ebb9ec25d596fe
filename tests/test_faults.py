"""Fault injection against the real daemon process: after each fault, /metrics holds
exactly what was written, nothing lost and nothing counted twice.

Set FAULT_REPORT=path.json to get a table of lines written, counted, lost and doubled.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.helpers import DaemonProcess, Series, by_name, require_binary, value, wait_until

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
        # An event time (ISO 8601) for the lines written next; None writes none.
        self.timestamp: str | None = None
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
        if self.timestamp is not None:
            sub["timestamp"] = self.timestamp
        done = {
            "event": "task_completed",
            "task_id": tid,
            "status": "succeed",
            "elapsed_sec": 30,
            "credits_used": self.tasks % 7 + 1,
        }
        if self.timestamp is not None:
            done["timestamp"] = self.timestamp
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


def raise_own_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need <= hard or (hard == resource.RLIM_INFINITY and soft < need):
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < need:
        pytest.skip(f"this test needs {need} descriptors")


SMALL_INDEX = CONFIG + "tasks: {max_tasks: 1000, orphan_wait: 0s}\n"


def test_idle_clients_past_the_descriptor_limit_do_not_cause_a_reread(
    tmp_path: Path, daemon_factory: Factory
) -> None:
    """1,100 idle connections at the systemd default limit of 1,024 descriptors: every
    listing fails with EMFILE, and no file may be taken for gone and read again."""
    raise_own_fd_limit(1400)
    w = Writer(log_path(tmp_path))
    w.write(1500)
    # No connection cap here: the point is what happens when descriptors run out.
    d = daemon_factory(SMALL_INDEX, extra=["--web.max-connections", "5000"], nofile=1024)
    assert_exact(d, w)
    clients: list[socket.socket] = []
    try:
        while len(clients) < 1100:
            if len(clients) % 100 == 0 and "Too many open files" in d.output():
                break  # the limit is reached: more clients only fill the backlog
            s = socket.socket()
            s.settimeout(1)
            clients.append(s)
            with contextlib.suppress(OSError):  # past the limit the backlog fills up
                s.connect(("127.0.0.1", d.port))
        wait_until(lambda: "Too many open files" in d.output(), timeout=20)
        time.sleep(5)  # longer than rotate_wait, with every descriptor taken
        w.write(100)
        time.sleep(1)
    finally:
        for s in clients:
            s.close()
    assert_exact(d, w, "1,100 idle clients at a limit of 1,024 descriptors")


def test_more_log_files_than_descriptors(tmp_path: Path, daemon_factory: Factory) -> None:
    w = Writer(log_path(tmp_path))
    for day in range(1100):
        w.write(1, log_path(tmp_path, f"2023-{day:04d}"))
    d = daemon_factory(SMALL_INDEX, nofile=1024)
    series = assert_exact(d, w)
    assert value(series, "kling_log_files_watched") == 1100
    assert value(series, "kling_log_open_files") <= 128
    time.sleep(4)  # longer than rotate_wait: nothing may be taken for gone
    w.write(5, log_path(tmp_path, "2023-0007"))
    assert_exact(d, w)
    assert d.stop(signal.SIGTERM) == 0
    d2 = daemon_factory(SMALL_INDEX, nofile=1024)
    assert_exact(d2, w, "1,100 log files at a limit of 1,024 descriptors, restarted")


def test_log_directory_moved_away_and_back(tmp_path: Path, daemon_factory: Factory) -> None:
    w = Writer(log_path(tmp_path))
    w.write(500)
    d = daemon_factory(SMALL_INDEX)
    assert_exact(d, w)
    os.rename(tmp_path / "logs", tmp_path / "logs.moved")
    time.sleep(4)  # past rotate_wait: the files are let go
    os.rename(tmp_path / "logs.moved", tmp_path / "logs")
    w.write(20)
    assert_exact(d, w, "log directory moved away for 4 s and back")


LOGROTATE = """
{path} {{
    {mode}
    rotate {keep}
    missingok
    {compress}
    size 1
}}
"""


def logrotate(
    tmp_path: Path, active: Path, mode: str, keep: int = 100, compress: str = ""
) -> Callable[[], None]:
    """A real logrotate run on ``active`` with the given directives, each call one forced
    rotation."""
    binary = require_binary("logrotate")
    conf = tmp_path / "logrotate.conf"
    conf.write_text(
        LOGROTATE.format(path=active, mode=mode, keep=keep, compress=compress or "nocompress")
    )

    def rotate() -> None:
        subprocess.run(
            [binary, "-f", "-s", str(tmp_path / "logrotate.status"), str(conf)],
            check=True,
            capture_output=True,
        )

    return rotate


class Writers:
    """Writer threads appending task lines to one path at a steady rate, as a service's
    workers would; each reopens the path for every batch (so a `create` rotation is
    followed)."""

    def __init__(self, path: Path, count: int = 4, lines_per_second: int = 1500) -> None:
        self.path = path
        self.stop = threading.Event()
        self.batch = 10
        self.pause = count * self.batch / lines_per_second
        self.threads = [
            threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(count)
        ]
        self.written = [0] * count  # lines, by writer
        path.parent.mkdir(parents=True, exist_ok=True)

    def _run(self, n: int) -> None:
        i = 0
        while not self.stop.is_set():
            lines = []
            for _ in range(self.batch // 2):
                i += 1
                tid = f"w{n}-{i}"
                lines.append(
                    json.dumps(
                        {"event": "task_submitted", "task_id": tid, "project": "p", "model": "m"}
                    )
                )
                lines.append(
                    json.dumps({"event": "task_completed", "task_id": tid, "credits_used": 3})
                )
            with open(self.path, "ab") as f:
                f.write(("\n".join(lines) + "\n").encode())
            self.written[n] += len(lines)
            time.sleep(self.pause)

    def __enter__(self) -> Writers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def on_disk(folder: Path) -> tuple[int, int, int]:
    """Lines, submissions and credits in every file of the folder: the ground truth once
    a rotation has lost what it loses by itself."""
    lines = submissions = credits = 0
    for path in folder.iterdir():
        for raw in path.read_bytes().splitlines():
            lines += 1
            event = json.loads(raw)
            if event["event"] == "task_submitted":
                submissions += 1
            else:
                credits += event["credits_used"]
    return lines, submissions, credits


@pytest.mark.parametrize(
    ("mode", "pattern"),
    [
        ("copytruncate", "kling.jsonl"),
        ("copytruncate", "kling.jsonl*"),
        ("create", "kling.jsonl*"),
    ],
    ids=["copytruncate-active-only", "copytruncate-copies-too", "create"],
)
def test_logrotate_under_writers_and_kill_9(
    tmp_path: Path, daemon_factory: Factory, mode: str, pattern: str
) -> None:
    folder = tmp_path / "logs"
    active = folder / "kling.jsonl"
    # Few copies kept: the oldest is deleted and its inode freed for the next copy.
    rotate = logrotate(tmp_path, active, mode, keep=2 if mode == "copytruncate" else 100)
    config = (
        f"logs: {{paths: ['{folder / pattern}'], poll_interval: 100ms, rotate_wait: 3s}}\n"
        "state: {path: kling-exporter.state, interval: 200ms}\n"
        "tasks: {ttl: 1s, max_tasks: 1000, orphan_wait: 0s}\n"
    )

    d = daemon_factory(config)
    with Writers(active) as writers:
        for round_ in range(6):
            time.sleep(0.7)
            rotate()
            if round_ in (1, 4):
                d.stop(signal.SIGKILL)
                d = daemon_factory(config)
        time.sleep(0.5)
    lines, submissions, credits = on_disk(folder)
    written = sum(writers.written)
    series: Series = {}

    def caught_up() -> bool:
        nonlocal series
        series = d.metrics()
        return value(series, "kling_log_lines_read_total") >= lines and (
            value(series, "kling_log_unread_bytes") == 0
        )

    with contextlib.suppress(AssertionError):
        wait_until(caught_up, timeout=30)
    counted = (
        value(series, "kling_log_lines_read_total"),
        sum(by_name(series, "kling_tasks_submitted_total").values()),
        sum(by_name(series, "kling_credits_used_total").values()),
    )
    RESULTS.append(
        {
            "scenario": f"logrotate {mode}, glob {pattern}, 4 writers, 2 x kill -9",
            "lines_written": written,
            "lines_on_disk": lines,
            "lines_counted": counted[0],
            "lost": max(0, lines - counted[0]),
            "doubled": max(0, counted[0] - written),
        }
    )
    # copytruncate itself destroys what is written between its copy and its truncation;
    # of those lines, the ones read in time are counted. Every line still on disk is
    # counted once, and nothing beyond what was written (a re-read file would be).
    assert lines <= counted[0] <= written, d.output()[-3000:]
    assert submissions <= counted[1] <= written / 2
    assert credits <= counted[2] <= written / 2 * 3
    if mode == "create":
        assert counted == (lines, submissions, credits) and lines == written
    assert value(series, "kling_events_duplicate_total") == 0


def event_time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat()


def saved_after(d: DaemonProcess, moment: float) -> None:
    wait_until(lambda: value(d.metrics(), "kling_state_last_save_timestamp_seconds") > moment)


@pytest.mark.parametrize(
    "compress",
    ["", "compress\n    delaycompress", "compress"],
    ids=["nocompress", "delaycompress", "compress"],
)
def test_copies_under_the_globs_are_never_counted_again(
    tmp_path: Path, daemon_factory: Factory, compress: str
) -> None:
    """copytruncate, the globs matching the copies (kling.jsonl*), rotations in a row with
    a restart and a kill -9 between them; the task index forgets a task a second after
    its event time, so only the reader keeps a copy's lines from being counted again. The
    lines written after the last read exist only in the copy and are read from it (not
    with `compress` alone, which compresses the copy at once: none are written then)."""
    folder = tmp_path / "logs"
    w = Writer(folder / "kling.jsonl")
    rotate = logrotate(tmp_path, w.path, "copytruncate", keep=3, compress=compress)
    config = (
        f"logs: {{paths: ['{folder}/kling.jsonl*'], poll_interval: 100ms, rotate_wait: 1s}}\n"
        "state: {path: kling-exporter.state, interval: 100ms}\n"
        "tasks: {ttl: 1s, orphan_wait: 0s}\n"
    )
    only_in_copy = 0 if compress == "compress" else 5
    start = time.time() - 86400
    d = daemon_factory(config)
    for round_ in range(7):
        w.timestamp = event_time(start + 60 * round_)
        w.write(20)
        assert_exact(d, w)
        w.write(only_in_copy)
        if round_ == 2:
            d.stop()
        if round_ == 4:
            if compress:  # what a kill -9 loses is read again, unless it is compressed by then
                saved_after(d, time.time())
            d.stop(signal.SIGKILL)
        rotate()
        if round_ in (2, 4):
            w.timestamp = event_time(start + 60 * round_ + 30)
            w.write(3)
            d = daemon_factory(config)
    assert_exact(d, w, f"logrotate copytruncate {compress or 'nocompress'}, glob kling.jsonl*")
