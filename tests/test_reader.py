"""The reader in a process of its own: the HTTP face answers without waiting for it, it
sees what the reader published, and the two processes end together."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.helpers import (
    MK_CONFIG,
    DaemonProcess,
    completed,
    half_used,
    submitted,
    wait_until,
    write_lines,
)

Factory = Callable[..., DaemonProcess]


def reader_pid(d: DaemonProcess) -> int:
    assert d.proc is not None
    children = Path(f"/proc/{d.proc.pid}/task/{d.proc.pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too; its parent has not reaped it yet.
    return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"


def check(d: DaemonProcess, **body: Any) -> dict[str, Any]:
    status, answer = d.post("/api/v1/check", json.dumps(body).encode())
    assert status == 200, answer
    result: dict[str, Any] = json.loads(answer)
    return result


def test_pre_flight_answers_while_the_reader_is_stalled_with_what_it_last_showed(
    tmp_path: Path, daemon_factory: Factory
) -> None:
    d = half_used(tmp_path, daemon_factory)
    write_lines(
        tmp_path / "logs" / "kling-2026-11-22.jsonl",
        [submitted("b"), completed("b", credits_used=30)],
    )
    # The scrape shows 80 used: a check made right after it counts them too.
    d.wait_metric("kling_budget_used_credits", 80, budget="mk", period="monthly")
    assert check(d, project="marketing", count=1)["budgets"][0]["credits_remaining"] == 20

    reader = reader_pid(d)
    os.kill(reader, signal.SIGSTOP)
    try:
        start = time.monotonic()
        answer = check(d, project="marketing", model="kling-v2-6", mode="std", count=2)
        assert answer["allowed"] is True and answer["credits_needed"] == 20
        answer = check(d, project="marketing", model="kling-v2-6", mode="std", count=3)
        assert answer["allowed"] is False and "20 credits left" in answer["reason"]
        status, body = d.get("/api/v1/budgets")
        assert status == 200 and json.loads(body)["budgets"][0]["used_credits"] == 80
        assert d.get("/-/healthy")[0] == 200
        assert time.monotonic() - start < 8  # none of them waited for the stalled reader
    finally:
        os.kill(reader, signal.SIGCONT)
    assert d.metrics()  # and scrapes go on once it runs again


def test_a_reload_reaches_pre_flight_answers(tmp_path: Path, daemon_factory: Factory) -> None:
    d = half_used(tmp_path, daemon_factory)
    assert check(d, project="marketing", count=6)["allowed"] is False  # 60 of 50 left
    d.config_path.write_text(MK_CONFIG.replace("limit_credits: 100", "limit_credits: 200"))
    d.send(signal.SIGHUP)
    d.wait_metric("kling_budget_limit_credits", 200, budget="mk", period="monthly")
    wait_until(lambda: check(d, project="marketing", count=6)["allowed"])
    d.config_path.write_text(MK_CONFIG.replace("period: monthly", "period: montly"))
    assert d.post("/-/reload")[0] == 500
    answer = check(d, project="marketing", count=15)
    assert answer["budgets"][0]["credits_remaining"] == 150 and answer["allowed"] is True


def test_the_exporter_ends_when_its_reader_is_killed(
    tmp_path: Path, daemon_factory: Factory
) -> None:
    d = half_used(tmp_path, daemon_factory)
    os.kill(reader_pid(d), signal.SIGKILL)
    assert d.proc is not None
    # Ended with an error, so that a supervisor starts it again, rather than answering
    # from usage that no longer grows.
    assert d.proc.wait(timeout=30) == 1
    assert "the reader process ended unasked" in d.output()


def test_the_reader_ends_with_a_killed_exporter(tmp_path: Path, daemon_factory: Factory) -> None:
    d = half_used(tmp_path, daemon_factory)
    reader = reader_pid(d)
    assert alive(reader)
    d.stop(signal.SIGKILL)
    wait_until(lambda: not alive(reader), timeout=10)


def test_a_stopped_exporter_leaves_no_reader_behind(
    tmp_path: Path, daemon_factory: Factory
) -> None:
    d = half_used(tmp_path, daemon_factory)
    reader = reader_pid(d)
    assert d.stop() == 0
    assert not alive(reader)
