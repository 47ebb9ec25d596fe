"""A task in both the logger's files and a usage tracker's file counts once, as the
logger's lines say, whatever the order the two are read in, live or from history older
than ``tasks.ttl``; and ``report`` and the daemon agree on the same files."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kling_exporter.accounting.ledger import Ledger
from kling_exporter.config import Config
from kling_exporter.configfile import parse_config
from kling_exporter.pricing import Request
from kling_exporter.reading.daemon import Daemon
from kling_exporter.reports import read_records

from tests.helpers import NOW, feed, iso, line, write_lines

DAY = 86400.0
WAITED = 301.0  # past the default orphan_wait (5 minutes of reading time)
BUDGET = {"budgets": [{"name": "all", "period": "monthly", "limit_credits": 10**6}]}
MODELS = ("kling-v2-6", "kling-v1")


class Spec:
    """One task: what the logger writes of it and what the usage tracker writes."""

    def __init__(self, i: int, rng: random.Random, start: float, span: float) -> None:
        self.id = f"task-{i}"
        self.ts = start + rng.random() * span
        self.model, self.mode = rng.choice(MODELS), rng.choice(["std", "pro"])
        self.duration = rng.choice([5, 10])
        self.outcome = rng.choice(["succeed"] * 4 + ["failed", "error", "open"])
        self.credits_used = rng.choice([None, 7.0, 40.0]) if self.outcome == "succeed" else None
        self.elapsed = rng.uniform(30, 600)
        self.logged = rng.random() < 0.85  # else known from its usage line alone
        self.tracked = not self.logged or rng.random() < 0.7

    def estimate(self) -> float:
        """The guard's estimate, which its usage line says: the price."""
        return Ledger(Config()).pricing.credits(
            Request(self.model, "professional" if self.mode == "pro" else "standard", self.duration)
        )

    def logger_lines(self) -> list[tuple[float, str]]:
        if not self.logged:
            return []
        sub = line(
            event="task_submitted",
            task_id=self.id,
            timestamp=iso(self.ts),
            model=self.model,
            mode=self.mode,
            duration=self.duration,
        )
        done = self.ts + self.elapsed
        out = [(self.ts, sub)]
        if self.outcome in ("succeed", "failed"):
            fields: dict[str, Any] = {"status": self.outcome, "elapsed_sec": self.elapsed}
            if self.credits_used is not None:
                fields["credits_used"] = self.credits_used
            out.append(
                (done, line(event="task_completed", task_id=self.id, timestamp=iso(done), **fields))
            )
        elif self.outcome == "error":
            out.append(
                (
                    done,
                    line(event="task_error", task_id=self.id, timestamp=iso(done), error_type="x"),
                )
            )
        return out

    def usage_lines(self) -> list[tuple[float, str]]:
        if not self.tracked:
            return []
        fields = {"model": self.model, "duration": self.duration, "mode": self.mode}
        usage = line(timestamp=iso(self.ts), task_id=self.id, credits=self.estimate(), **fields)
        return [(self.ts, usage)]


def tasks_of(seed: int, n: int, start: float, span: float) -> list[Spec]:
    rng = random.Random(seed)
    return [Spec(i, rng, start, span) for i in range(n)]


def expected_lines(tasks: list[Spec]) -> list[str]:
    """The logger's lines alone, in time order, and the usage lines of tasks it has not."""
    timed = [x for t in tasks for x in t.logger_lines()]
    timed += [x for t in tasks if not t.logged for x in t.usage_lines()]
    return [raw for _, raw in sorted(timed)]


def totals(ledger: Ledger, now: float) -> dict[str, Any]:
    budget = ledger.budget_statuses(now)[0]
    return {
        "submitted": ledger.submitted,
        "completed": ledger.completed,
        "errors": ledger.errors,
        "credits": {k: round(v, 6) for k, v in ledger.credits.items()},
        "video_seconds": ledger.video_seconds,
        "in_flight": {p: n for p, n in ledger.in_flight.items() if n},
        "expired": ledger.expired,
        "expired_credits": {k: round(v, 6) for k, v in ledger.expired_credits.items()},
        "duplicates": ledger.duplicates,
        "orphaned": ledger.orphaned,
        "used": round(budget.used_credits, 6),
        "in_flight_credits": round(budget.in_flight_credits, 6),
    }


def merged(a: list[str], b: list[str], picks: list[bool]) -> list[str]:
    """One interleaving of two files read side by side: each file's lines in order."""
    out, i, j = [], 0, 0
    for take_a in picks:
        if take_a and i < len(a):
            out.append(a[i])
            i += 1
        elif j < len(b):
            out.append(b[j])
            j += 1
    return out + a[i:] + b[j:]


def read_as_history(lines: list[str], expire_at: set[int]) -> Ledger:
    """Lines read in one go at NOW (a backlog), with the daemon's housekeeping between
    blocks (by the size cap only), then its first poll's and one past ``orphan_wait``."""
    ledger = Ledger(parse_config(BUDGET))
    for i, raw in enumerate(lines):
        feed(ledger, raw, settle=False)
        if i in expire_at:
            ledger.expire_tasks(NOW, by_ttl=False)
    ledger.expire(NOW)
    ledger.expire(NOW + WAITED)
    return ledger


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    picks=st.lists(st.booleans(), max_size=200),
    expire_at=st.sets(st.integers(0, 200)),
)
def test_any_interleaving_of_the_two_files_from_history_counts_the_logger_s_totals(
    seed: int, picks: list[bool], expire_at: set[int]
) -> None:
    """Files older than the TTL, read side by side in any interleaving (each file in its
    own order): the totals are the logger's alone, tasks that never finished charged
    their estimate once."""
    tasks = tasks_of(seed, 40, NOW - 20 * DAY, 10 * DAY)
    logger = [raw for _, raw in sorted(x for t in tasks for x in t.logger_lines())]
    tracker = [raw for _, raw in sorted(x for t in tasks for x in t.usage_lines())]
    got = read_as_history(merged(logger, tracker, picks), expire_at)
    want = read_as_history(expected_lines(tasks), set())
    assert totals(got, NOW) == totals(want, NOW)
    unfinished = sum(want.expired.values()) + sum(want.in_flight.values())
    assert unfinished == sum(t.logged and t.outcome == "open" for t in tasks)


def read_live(timed: list[tuple[float, str]], end: float) -> Ledger:
    """Lines read as they are written (``timed``: time of reading), the daemon's
    housekeeping after each, then up to ``end``."""
    ledger = Ledger(parse_config(BUDGET))
    for read_at, raw in sorted(timed):
        feed(ledger, raw, now=read_at, settle=False)
        ledger.expire(read_at)
    ledger.expire(end)
    ledger.expire(end + WAITED)
    return ledger


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), delays=st.lists(st.floats(0, 20), min_size=1))
def test_live_either_file_first_counts_the_logger_s_totals(seed: int, delays: list[float]) -> None:
    """Both files followed live, each line read a few seconds after it was written, in
    whichever order: the usage line before the submission, between it and the completion
    or after it. Tasks are charged at completion, or their estimate after the TTL."""
    tasks = tasks_of(seed, 40, NOW - 3 * DAY, 3 * DAY)
    timed = [x for t in tasks for x in (*t.logger_lines(), *t.usage_lines())]
    late = [(ts + delays[i % len(delays)], raw) for i, (ts, raw) in enumerate(timed)]
    alone = [x for t in tasks for x in (*t.logger_lines(), *([] if t.logged else t.usage_lines()))]
    got, want = read_live(late, NOW + 20), read_live(alone, NOW + 20)
    assert totals(got, NOW) == totals(want, NOW)


SUB = line(
    event="task_submitted", task_id="t", model="kling-v2-6", mode="std", duration=5, project="p"
)
USAGE = line(task_id="t", credits=10, model="kling-v2-6", mode="std", duration=5)


@pytest.mark.parametrize(
    "outcome",
    [
        line(event="task_completed", task_id="t", status="succeed", credits_used=7),
        line(event="task_completed", task_id="t", status="failed"),
        line(event="task_error", task_id="t", error_type="timeout"),
    ],
)
@pytest.mark.parametrize("order", ["usage first", "usage between", "usage last"])
def test_a_usage_line_is_replaced_by_the_completion_whatever_the_order(
    outcome: str, order: str
) -> None:
    """Issue 40: the usage line made the task succeeded with the guard's estimate, and
    Kling's own completion was then a duplicate: a failed task was charged."""
    lines = {
        "usage first": [USAGE, SUB, outcome],
        "usage between": [SUB, USAGE, outcome],
        "usage last": [SUB, outcome, USAGE],
    }[order]
    both, alone = Ledger(parse_config(BUDGET)), Ledger(parse_config(BUDGET))
    for i, raw in enumerate(lines):  # a second apart, as two files followed live
        feed(both, raw, now=NOW + i, settle=False)
        both.expire(NOW + i)
    feed(alone, SUB, outcome)
    assert totals(both, NOW) == totals(alone, NOW)
    assert both.duplicates == 0
    feed(both, USAGE)
    assert both.duplicates == 1  # a second usage line is a repeat


def test_a_task_known_only_from_its_usage_line_counts_as_before() -> None:
    ledger = Ledger(Config())
    feed(ledger, USAGE, now=NOW, settle=False)
    assert ledger.submitted == {} and ledger.snapshot(NOW).awaiting_submission == 1
    ledger.expire(NOW + WAITED)
    assert ledger.submitted == {("default", "kling-v2-6", "standard"): 1}
    assert ledger.completed == {("default", "kling-v2-6", "succeed"): 1}
    assert ledger.credits == {("default", "kling-v2-6"): 10}
    assert ledger.video_seconds == {("default", "kling-v2-6"): 5}


def history(tmp_path: Path, usage_first: bool) -> Config:
    """Two weeks of a logger's files and a usage tracker's file, ending 10 days ago."""
    tasks = tasks_of(5, 120, NOW - 24 * DAY, 14 * DAY)
    logs = tmp_path / "logs"
    for ts, raw in sorted(x for t in tasks for x in t.logger_lines()):
        write_lines(logs / f"kling-{iso(ts)[:10]}.jsonl", [raw])
    write_lines(
        logs / "usage.jsonl", [raw for _, raw in sorted(x for t in tasks for x in t.usage_lines())]
    )
    paths = [str(logs / "kling-*.jsonl"), str(logs / "usage.jsonl")]
    return parse_config(
        BUDGET | {"logs": {"paths": paths[::-1] if usage_first else paths}, "state": {"path": ""}}
    )


def report_totals(config: Config) -> dict[str, float]:
    records = read_records(config)
    return {
        "submitted": sum(r.event == "submitted" for r in records),
        "succeeded": sum(r.event == "completed" and r.status == "succeed" for r in records),
        "failed": sum(r.event == "completed" and r.status == "failed" for r in records),
        "errors": sum(r.event == "error" for r in records),
        "credits": round(sum(r.credits for r in records), 6),
    }


def daemon_totals(config: Config) -> dict[str, float]:
    clock = [NOW]
    daemon = Daemon(config, clock=lambda: clock[0])
    try:
        daemon.poll_once()  # the initial read, as the reader thread makes it
        daemon.ready.set()
        clock[0] += WAITED
        # Polls until what aged out by the TTL is all charged (a bounded part a poll).
        snap, last = daemon.snapshot()[0], None
        while snap.credits != last:
            last = snap.credits
            daemon.poll_once()
            snap, _ = daemon.snapshot()
    finally:
        daemon.watcher.stop()
        daemon.tailer.close()
    completed = snap.completed
    return {
        "submitted": sum(snap.submitted.values()),
        "succeeded": sum(v for k, v in completed.items() if k[2] == "succeed"),
        "failed": sum(v for k, v in completed.items() if k[2] == "failed"),
        "errors": sum(snap.errors.values()),
        "credits": round(sum(snap.credits.values()), 6),
    }


@pytest.mark.parametrize("usage_first", [False, True])
def test_report_and_the_daemon_agree_on_both_files_older_than_the_ttl(
    tmp_path: Path, usage_first: bool
) -> None:
    """Issue 40: started on these files, the daemon forgot tasks older than the TTL while
    reading them and counted their usage lines as new tasks (submitted 267 -> 507)."""
    config = history(tmp_path, usage_first)
    ours = daemon_totals(config)
    assert ours == report_totals(config)
    logger_only = parse_config(
        BUDGET | {"logs": {"paths": [str(tmp_path / "logs" / "kling-*.jsonl")]}}
    )
    alone = report_totals(logger_only)
    tracked_only = sum(not t.logged for t in tasks_of(5, 120, NOW - 24 * DAY, 14 * DAY))
    assert ours["submitted"] == alone["submitted"] + tracked_only
