"""The accounting rules, each checked against totals computed here from the task list."""

from __future__ import annotations

import datetime as dt
import random
from collections import Counter, defaultdict
from zoneinfo import ZoneInfo

import pytest
from kling_exporter.accounting.book import EST, FLAG_BITS, SUB
from kling_exporter.accounting.counters import OTHER
from kling_exporter.accounting.ledger import Ledger
from kling_exporter.budgets import DayUsage
from kling_exporter.config import BudgetConfig, Config, LabelsConfig, TasksConfig
from kling_exporter.configfile import parse_config
from kling_exporter.pricing import Request

from tests.helpers import (
    NOW,
    Task,
    check,
    feed,
    iso,
    line,
    random_tasks,
    saved_and_restored,
    task_lines,
)

UTC = dt.UTC
PRICE = {  # the default rules, by hand: (mode, duration, audio) -> credits
    ("standard", 5, False): 10,
    ("professional", 5, False): 35,
    ("standard", 10, False): 20,
    ("professional", 10, False): 70,
    ("standard", 5, True): 50,
    ("professional", 10, True): 200,
    ("standard", 10, True): 100,
    ("professional", 5, True): 175,
}


def charged(t: Task) -> float:
    if t.outcome != "succeed":
        return 0.0
    if t.credits_used is not None:
        return t.credits_used
    return PRICE[(t.mode, t.duration, t.audio)]


def test_counters_match_independent_totals() -> None:
    rng = random.Random(7)
    tasks = random_tasks(rng, 400, NOW - 86400 * 3, 86400 * 3)
    ledger = Ledger(Config())
    feed(ledger, *task_lines(tasks, rng, duplicates=25))

    submitted = Counter((t.project, t.model, t.mode) for t in tasks)
    completed = Counter(
        (t.project, t.model, t.outcome) for t in tasks if t.outcome in ("succeed", "failed")
    )
    errors = Counter((t.project, "quota") for t in tasks if t.outcome == "error")
    credits: dict[tuple[str, str], float] = defaultdict(float)
    seconds: Counter[tuple[str, str]] = Counter()
    for t in tasks:
        if t.outcome == "succeed":  # seconds of video made, not requested
            seconds[(t.project, t.model)] += t.duration
        if charged(t):
            credits[(t.project, t.model)] += charged(t)
    in_flight = Counter(t.project for t in tasks if t.outcome == "open")

    assert ledger.submitted == dict(submitted)
    assert ledger.completed == dict(completed)
    assert ledger.errors == dict(errors)
    assert ledger.credits == pytest.approx(dict(credits))
    assert ledger.usd == pytest.approx({k: v * 0.14 for k, v in credits.items()})
    assert ledger.video_seconds == dict(seconds)
    assert {k: v for k, v in ledger.in_flight.items() if v} == dict(in_flight)
    assert ledger.duplicates == 25
    hist_count = sum(h.counts[-1] for h in ledger.generation.values())
    assert sum(sum(h.counts) for h in ledger.generation.values()) == sum(
        1 for t in tasks if t.outcome == "succeed"
    )
    assert hist_count == sum(1 for t in tasks if t.outcome == "succeed" and t.elapsed > 3600)


@pytest.mark.parametrize("tz", ["UTC", "America/New_York", "Asia/Kolkata"])
@pytest.mark.parametrize("period", ["daily", "weekly", "monthly"])
def test_budget_usage_per_period_and_timezone(tz: str, period: str) -> None:
    rng = random.Random(period + tz)
    tasks = random_tasks(rng, 300, NOW - 86400 * 40, 86400 * 40)
    config = parse_config(
        {
            "timezone": tz,
            "budgets": [
                {"name": "mk", "project": "marketing", "period": period, "limit_credits": 1000},
                {
                    "name": "ann",
                    "user": "ann",
                    "period": period,
                    "limit_credits": 500,
                    "limit_usd": 20,
                },
                {
                    "name": "mk-bob",
                    "project": "marketing",
                    "user": "bob",
                    "period": period,
                    "limit_credits": 300,
                },
                {"name": "all", "period": period, "limit_credits": 5000, "alert_threshold": 0.5},
            ],
        }
    )
    ledger = Ledger(config)
    feed(ledger, *task_lines(tasks, rng))

    zone = ZoneInfo(tz)
    local_now = dt.datetime.fromtimestamp(NOW, zone)
    day = local_now.date()
    start_day = {
        "daily": day,
        "weekly": day - dt.timedelta(days=day.weekday()),
        "monthly": day.replace(day=1),
    }[period]
    start = dt.datetime(start_day.year, start_day.month, start_day.day, tzinfo=zone).timestamp()

    def used(match: dict[str, str]) -> float:
        return sum(
            charged(t)
            for t in tasks
            if start <= t.ts + t.elapsed <= NOW
            and all(getattr(t, k) == v for k, v in match.items())
        )

    statuses = {b.name: b for b in ledger.budget_statuses(NOW)}
    expected = {
        "mk": used({"project": "marketing"}),
        "ann": used({"user": "ann"}),
        "mk-bob": used({"project": "marketing", "user": "bob"}),
        "all": used({}),
    }
    for name, credits in expected.items():
        assert statuses[name].used_credits == pytest.approx(credits), name
        assert statuses[name].period_start == start
    ann = statuses["ann"]
    assert ann.used_usd == pytest.approx(expected["ann"] * 0.14)
    assert ann.utilization == pytest.approx(max(expected["ann"] / 500, expected["ann"] * 0.14 / 20))
    assert statuses["mk"].remaining_credits == pytest.approx(1000 - expected["mk"])
    assert statuses["all"].alert_threshold == 0.5


def test_usage_goes_back_to_zero_at_the_period_boundary_by_the_clock() -> None:
    config = parse_config({"budgets": [{"name": "d", "period": "daily", "limit_credits": 100}]})
    ledger = Ledger(config)
    feed(
        ledger, line(event="task_completed", task_id="a", timestamp=iso(NOW - 60), credits_used=40)
    )
    assert ledger.budget_statuses(NOW)[0].used_credits == 40
    midnight = dt.datetime(2026, 11, 23, tzinfo=UTC).timestamp()
    after = ledger.budget_statuses(midnight)[0]
    assert after.used_credits == 0
    assert after.utilization == 0
    assert after.remaining_credits == 100
    assert after.period_start == midnight


def test_a_late_line_lands_in_its_own_period() -> None:
    config = parse_config({"budgets": [{"name": "d", "period": "daily", "limit_credits": 100}]})
    ledger = Ledger(config)
    yesterday = NOW - 86400
    feed(
        ledger,
        line(event="task_completed", task_id="late", timestamp=iso(yesterday), credits_used=30),
    )
    assert ledger.budget_statuses(NOW)[0].used_credits == 0
    assert ledger.budget_statuses(yesterday)[0].used_credits == 30
    assert ledger.credits == {("default", "unknown"): 30}


def test_completion_joins_its_submission() -> None:
    ledger = Ledger(Config())
    feed(
        ledger,
        line(
            event="task_submitted",
            task_id="t",
            project="p",
            user="u",
            model="kling-v2-6",
            mode="pro",
            duration=10,
            audio=True,
        ),
        line(event="task_completed", task_id="t", status="succeed", elapsed_sec=100),
    )
    assert ledger.completed == {("p", "kling-v2-6", "succeed"): 1}
    assert ledger.credits == {("p", "kling-v2-6"): 200}
    assert ledger.in_flight == {"p": 0}


def test_failed_task_costs_nothing_unless_logged() -> None:
    ledger = Ledger(Config())
    feed(
        ledger,
        line(event="task_submitted", task_id="a", project="p", model="m"),
        line(event="task_completed", task_id="a", status="failed"),
        line(event="task_submitted", task_id="b", project="p", model="m"),
        line(event="task_completed", task_id="b", status="failed", credits_used=3),
    )
    assert ledger.credits == {("p", "m"): 3}


def test_error_joins_and_leaves_flight() -> None:
    ledger = Ledger(Config())
    feed(
        ledger,
        line(event="task_submitted", task_id="t", project="p", model="m"),
        line(event="task_error", task_id="t", error_type="content_policy", message="no"),
    )
    assert ledger.errors == {("p", "content_policy"): 1}
    assert ledger.in_flight == {"p": 0}


def test_a_task_completed_twice_is_counted_once() -> None:
    ledger = Ledger(Config())
    done = line(event="task_completed", task_id="t", status="succeed", credits_used=10)
    feed(ledger, line(event="task_submitted", task_id="t", project="p", model="m"), done, done)
    assert ledger.completed == {("p", "m", "succeed"): 1}
    assert ledger.credits == {("p", "m"): 10}
    assert ledger.duplicates == 1


def test_completion_read_before_its_submission() -> None:
    ledger = Ledger(Config())
    feed(
        ledger,
        line(event="task_completed", task_id="t", project="p", model="m", credits_used=5),
        line(event="task_submitted", task_id="t", project="p", model="m"),
    )
    assert ledger.submitted == {("p", "m", "standard"): 1}
    assert ledger.completed == {("p", "m", "succeed"): 1}
    assert ledger.in_flight.get("p", 0) == 0


def test_usage_line_is_a_submitted_and_succeeded_task() -> None:
    ledger = Ledger(Config())
    feed(ledger, line(task_id="u", credits=35, project="p"), line(task_id="u", credits=35))
    assert ledger.submitted == {("p", "unknown", "standard"): 1}
    assert ledger.completed == {("p", "unknown", "succeed"): 1}
    assert ledger.credits == {("p", "unknown"): 35}
    assert ledger.duplicates == 1


def test_projects_past_the_limit_fold_into_other() -> None:
    ledger = Ledger(Config(labels=LabelsConfig(max_projects=2)))
    feed(
        ledger,
        *(
            line(event="task_submitted", task_id=f"t{i}", project=f"p{i}", model="m")
            for i in range(5)
        ),
    )
    assert ledger.submitted == {
        ("p0", "m", "standard"): 1,
        ("p1", "m", "standard"): 1,
        (OTHER, "m", "standard"): 3,
    }
    assert ledger.project_labels.overflow == 3


def test_budgets_match_the_real_project_even_when_its_label_is_folded() -> None:
    config = Config(
        labels=LabelsConfig(max_projects=1),
        budgets=[BudgetConfig(name="b", project="late", period="monthly", limit_credits=100)],
    )
    ledger = Ledger(config)
    feed(
        ledger,
        line(event="task_completed", task_id="x", project="first", credits_used=1),
        line(
            event="task_completed", task_id="y", project="late", credits_used=9, timestamp=iso(NOW)
        ),
    )
    assert ledger.budget_statuses(NOW)[0].used_credits == 9
    assert (OTHER, "unknown") in ledger.credits


def test_unfinished_tasks_expire_after_the_ttl() -> None:
    ledger = Ledger(Config(tasks=TasksConfig(ttl="1h")))
    feed(
        ledger,
        line(event="task_submitted", task_id="old", project="p", timestamp=iso(NOW - 7200)),
        line(event="task_submitted", task_id="new", project="p", timestamp=iso(NOW)),
    )
    assert ledger.in_flight == {"p": 2}
    ledger.expire(NOW)
    assert ledger.in_flight == {"p": 1}
    assert ledger.expired == {"p": 1}
    assert ledger.credits == {("p", "unknown"): 10}  # charged its estimate
    assert ledger.expired_credits == {"p": 10}
    # Out of the index, and kept in brief as charged, for a completion that may still
    # come (not counted as pushed out by the cap).
    assert "old" not in ledger.tasks and "new" in ledger.tasks
    found = ledger.evicted.get("old")
    assert found is not None and found[1] & FLAG_BITS == SUB | EST
    assert found[0] == ("p", None, "unknown", "standard", 5, False, "video")
    assert ledger.evicted.total == 0
    feed(
        ledger, line(event="task_submitted", task_id="x", timestamp=iso(NOW + 7200)), now=NOW + 7200
    )
    ledger.expire(NOW + 7200)
    assert "new" not in ledger.tasks and ledger.expired == {"p": 2}


def test_task_index_is_capped() -> None:
    ledger = Ledger(Config(tasks=TasksConfig(max_tasks=100)))
    feed(
        ledger,
        *(line(event="task_submitted", task_id=f"t{i}", timestamp=iso(NOW)) for i in range(1000)),
    )
    ledger.expire(NOW)
    assert len(ledger.tasks) == 100
    assert ledger.in_flight == {"default": 100}


def test_reload_keeps_totals_and_new_budget_is_exact_at_once() -> None:
    ledger = Ledger(Config())
    feed(
        ledger,
        line(event="task_completed", task_id="a", project="p", credits_used=12, timestamp=iso(NOW)),
    )
    ledger.configure(
        parse_config({"budgets": [{"name": "p", "project": "p", "limit_credits": 24}]})
    )
    assert ledger.credits == {("p", "unknown"): 12}
    assert ledger.budget_statuses(NOW)[0].utilization == 0.5


def test_reload_refuses_a_timezone_change() -> None:
    ledger = Ledger(Config())
    with pytest.raises(ValueError, match="timezone"):
        ledger.configure(parse_config({"timezone": "Europe/Berlin"}))


def test_state_round_trip_is_exact() -> None:
    rng = random.Random(3)
    config = parse_config({"budgets": [{"name": "w", "period": "weekly", "limit_credits": 9}]})
    tasks = random_tasks(rng, 200, NOW - 86400 * 2, 86400 * 2)
    lines = task_lines(tasks, rng, duplicates=10)
    whole = Ledger(config)
    feed(whole, *lines)

    first = Ledger(config)
    feed(first, *lines[:150], settle=False)
    restored = saved_and_restored(first)
    feed(restored, *lines[150:])
    assert restored.snapshot(NOW) == whole.snapshot(NOW)


def test_a_check_reads_only_the_budgets_that_match_it(monkeypatch: pytest.MonkeyPatch) -> None:
    budgets = [
        {"name": f"b{i}", "project": f"p{i}", "period": "monthly", "limit_credits": 1000}
        for i in range(500)
    ]
    ledger = Ledger(parse_config({"budgets": budgets}))
    start = dt.datetime(2026, 11, 1, tzinfo=UTC).timestamp()
    feed(
        ledger,
        *(
            line(
                event="task_completed",
                task_id=f"t{i}",
                project=f"p{i % 1000}",
                user=f"u{i % 7}",
                credits_used=1,
                timestamp=iso(start + (i % 20) * 86400),
            )
            for i in range(5000)
        ),
    )
    calls = {"used": 0, "sum": 0}
    real_used, real_sum = DayUsage.used, DayUsage._sum

    def used(self: DayUsage, b: BudgetConfig) -> list[float] | None:
        calls["used"] += 1
        return real_used(self, b)

    def summed(self: DayUsage) -> object:
        calls["sum"] += 1
        return real_sum(self)

    monkeypatch.setattr(DayUsage, "used", used)
    monkeypatch.setattr(DayUsage, "_sum", summed)
    request = Request("kling-v2-6", "standard", 5)
    result = check(ledger, request, 1, "p3")
    assert [b.name for b in result.budgets] == ["b3"]
    assert calls["used"] == 20  # one per day of the month so far, for the one budget
    first_sums = calls["sum"]
    check(ledger, request, 1, "p4")
    assert calls["sum"] == first_sums  # the days' sums are kept until a day changes
    assert ledger.budget_statuses(NOW)[3].used_credits == 5
