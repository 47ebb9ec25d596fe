"""A task whose outcome is never seen is charged its estimate when it is forgotten, once:
a completion that comes later charges only what it says beyond that."""

from __future__ import annotations

import csv
import datetime as dt
import io
from pathlib import Path

import pytest
from kling_exporter.accounting.ledger import Ledger
from kling_exporter.config import Config, TasksConfig
from kling_exporter.configfile import parse_config
from kling_exporter.export import export_csv
from kling_exporter.reports import daily_report, read_records

from tests.helpers import NOW, feed, iso, line, saved_and_restored, write_lines

DAY = 86400.0
MONTHLY_20 = {"budgets": [{"name": "p", "project": "p", "period": "monthly", "limit_credits": 20}]}


# A later event of another project: tasks expire by event time, a TTL before the newest.
LATER = line(event="task_submitted", task_id="other", project="q", timestamp=iso(NOW))


def submission(task_id: str, ts: float, **more: object) -> str:
    """A task of 10 credits by the default pricing (5 s, standard)."""
    fields = {"project": "p", "user": "ann", "model": "kling-v2-6", "mode": "std", "duration": 5}
    return line(event="task_submitted", task_id=task_id, timestamp=iso(ts), **fields | more)


def test_six_unfinished_tasks_count_against_a_monthly_budget_after_the_ttl() -> None:
    """Issue 39: 6 tasks (60 credits) on a 20-credit budget used to show 0 used."""
    ledger = Ledger(parse_config(MONTHLY_20))
    feed(ledger, *(submission(f"t{i}", NOW - 2 * DAY + i) for i in range(6)), LATER)
    ledger.expire(NOW)
    assert ledger.in_flight == {"p": 0, "q": 1}
    assert ledger.expired == {"p": 6}
    assert ledger.expired_credits == {"p": 60}
    assert ledger.credits == {("p", "kling-v2-6"): 60}
    assert ledger.usd == {("p", "kling-v2-6"): pytest.approx(60 * 0.14)}
    budget = ledger.budget_statuses(NOW)[0]
    assert budget.used_credits == 60 and budget.utilization == 3
    assert budget.in_flight_credits == 0


def test_the_estimate_lands_in_the_period_of_the_submission() -> None:
    ledger = Ledger(parse_config(MONTHLY_20 | {"tasks": {"ttl": "1h"}}))
    october = dt.datetime(2026, 10, 31, 23, tzinfo=dt.UTC).timestamp()
    feed(ledger, submission("late", october), now=october)
    november = october + 3 * 3600
    feed(ledger, submission("next", november), now=november)
    ledger.expire(november)
    assert ledger.budget_statuses(october)[0].used_credits == 10
    assert ledger.budget_statuses(november)[0].used_credits == 0


def test_a_usage_lines_credits_are_the_estimate_of_its_task() -> None:
    ledger = Ledger(Config())
    feed(ledger, submission("t", NOW - 2 * DAY), line(task_id="t", credits=12), LATER)
    ledger.expire(NOW)
    assert ledger.credits == {("p", "kling-v2-6"): 12}
    assert ledger.completed == {} and ledger.expired == {"p": 1}


@pytest.mark.parametrize(
    ("outcome", "charged"),
    [
        ({"event": "task_completed", "status": "succeed", "credits_used": 15}, 15),
        ({"event": "task_completed", "status": "succeed", "credits_used": 4}, 10),
        ({"event": "task_completed", "status": "succeed"}, 10),
        ({"event": "task_completed", "status": "failed"}, 10),
        ({"event": "task_error", "error_type": "timeout"}, 10),
    ],
)
@pytest.mark.parametrize("restart", [False, True])
def test_a_completion_after_the_estimate_is_counted_once_and_charged_what_is_beyond(
    outcome: dict[str, object], charged: float, restart: bool
) -> None:
    ledger = Ledger(Config())
    feed(ledger, submission("t", NOW - 2 * DAY), LATER)
    ledger.expire(NOW)
    assert ledger.credits == {("p", "kling-v2-6"): 10}
    if restart:
        ledger = saved_and_restored(ledger)
    late = line(task_id="t", timestamp=iso(NOW), **outcome)
    feed(ledger, late)
    assert ledger.credits == {("p", "kling-v2-6"): charged}
    if outcome["event"] == "task_completed":
        assert ledger.completed == {("p", "kling-v2-6", str(outcome["status"])): 1}
    else:
        assert ledger.errors == {("p", "timeout"): 1}
    assert ledger.orphaned == 0 and ledger.duplicates == 0
    assert ledger.in_flight == {"p": 0, "q": 1}
    feed(ledger, late)  # a repeat after that is a duplicate
    assert ledger.duplicates == 1
    assert ledger.credits == {("p", "kling-v2-6"): charged}


def test_a_task_forgotten_past_the_size_cap_is_charged_too() -> None:
    ledger = Ledger(Config(tasks=TasksConfig(max_tasks=2)))
    feed(ledger, *(submission(f"t{i}", NOW - 60 + i) for i in range(5)))
    ledger.expire(NOW)
    assert len(ledger.tasks) == 2
    assert ledger.expired == {"p": 3} and ledger.expired_credits == {"p": 30}
    assert ledger.credits == {("p", "kling-v2-6"): 30}
    assert ledger.in_flight == {"p": 2}


def test_a_task_finished_within_the_ttl_is_never_charged_an_estimate() -> None:
    ledger = Ledger(Config())
    feed(
        ledger,
        submission("t", NOW - 3600),
        line(event="task_completed", task_id="t", status="failed", timestamp=iso(NOW)),
    )
    ledger.expire(NOW + 2 * DAY)
    assert ledger.credits == {} and ledger.expired == {}


def test_reports_charge_what_is_unfinished_at_the_end_and_older_than_the_ttl(
    tmp_path: Path,
) -> None:
    """A one-off read charges an estimate only to a task unfinished at the end of every
    file and older than the TTL before the newest event: not one that completes later in
    the files (even after more than a TTL), nor one that may still be running."""
    newest = NOW
    write_lines(
        tmp_path / "kling-a.jsonl",
        [
            submission("never", newest - 3 * DAY),
            submission("late", newest - 3 * DAY),
            submission("running", newest - 3600),
        ],
    )
    write_lines(
        tmp_path / "kling-b.jsonl",
        [
            line(
                event="task_completed",
                task_id="late",
                status="succeed",
                credits_used=15,
                timestamp=iso(newest),
            )
        ],
    )
    config = parse_config({"logs": {"paths": [str(tmp_path / "kling-*.jsonl")]}})
    records = read_records(config)
    expired = [r for r in records if r.event == "expired"]
    assert [(r.task_id, r.credits, r.ts) for r in expired] == [("never", 10, newest - 3 * DAY)]
    assert sum(r.credits for r in records) == 25
    day = dt.datetime.fromtimestamp(newest - 3 * DAY, dt.UTC).date()
    report = daily_report(records, day, config)
    assert report.total_credits == 10 and report.total_submitted == 2 and report.errors == 0
    out = io.StringIO()
    rows = export_csv(records, out, config)
    assert rows == 4  # three submissions and a completion: no row of its own
    table = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert sum(float(r["credits"] or 0) for r in table) == 25
    assert [r["credits"] for r in table if r["task_id"] == "never"] == ["10"]


def test_what_ages_out_at_once_is_charged_a_bounded_part_a_call() -> None:
    """Event time jumping days ahead (a restart after a long stop) ages out every open
    task at once: the daemon charges them a part at a time, so the lines it reads
    meanwhile are not held up; the cap is never held back."""
    ledger = Ledger(Config(tasks=TasksConfig(max_tasks=4000)))
    feed(ledger, *(submission(f"t{i}", NOW - 2 * DAY + i) for i in range(3000)), LATER)
    parts = []
    while ledger.in_flight["p"]:
        ledger.expire(NOW, aged=1000)
        parts.append(ledger.in_flight["p"])
    assert parts == [2000, 1000, 0]
    assert ledger.expired_credits == {"p": 30000}
    capped = Ledger(Config(tasks=TasksConfig(max_tasks=10)))
    feed(capped, *(submission(f"t{i}", NOW - 60 + i) for i in range(50)))
    capped.expire(NOW, aged=1)
    assert len(capped.tasks) == 10
