"""Ingest under hostile input: no line stops it, no clock skews others, nothing doubles."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kling_exporter.accounting.ledger import Ledger
from kling_exporter.config import Config, TasksConfig
from kling_exporter.configfile import parse_config
from kling_exporter.events import INVALID_REASONS
from kling_exporter.model import ReadStats
from kling_exporter.reading.ingest import ingest

from tests.helpers import NOW, feed, iso, line, random_tasks, saved_and_restored, task_lines

BUDGET = {"budgets": [{"name": "all", "period": "monthly", "limit_credits": 100000}]}


def ingest_lines(
    ledger: Ledger, *lines: str | bytes, now: float = NOW, stats: ReadStats | None = None
) -> list[str]:
    """Ingest raw lines; the reasons of those skipped."""
    skipped: list[str] = []
    raw = [x.encode() if isinstance(x, str) else x for x in lines]
    ingest(ledger, raw, now, lambda i, reason: skipped.append(reason), stats)
    return skipped


def credits_total(ledger: Ledger) -> float:
    return sum(ledger.credits.values())


POISON = [
    b'{"event": "task_completed", "task_id": "d", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    b'{"event":"task_completed","task_id":"y","credits_used":1,"timestamp":"9999-12-31T23:59:59Z"}',
    b'{"event":"task_completed","task_id":"z","credits_used":1,"timestamp":"0001-01-01T00:00:00+01:00"}',
]


@pytest.mark.parametrize("poison", POISON, ids=["deep", "year-9999", "year-1"])
def test_a_poison_line_is_counted_or_skipped_and_the_lines_after_it_are_read(
    poison: bytes,
) -> None:
    ledger = Ledger(parse_config(BUDGET))
    skipped = ingest_lines(
        ledger,
        line(event="task_completed", task_id="a", project="p", credits_used=5),
        poison,
        line(event="task_completed", task_id="b", project="p", credits_used=7),
    )
    ledger.settle_waiting()
    counted = 1 if poison is not POISON[0] else 0
    assert skipped == ([] if counted else ["too_deep"])
    assert credits_total(ledger) == 12 + counted
    assert ledger.budget_statuses(NOW)[0].used_credits == 12 + counted


def test_an_error_inside_the_ledger_skips_that_line_only(monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = Ledger(Config())
    real_apply = ledger.apply

    def apply(event, now):
        if event.task_id == "boom":
            raise RuntimeError("a defect")
        real_apply(event, now)

    monkeypatch.setattr(ledger, "apply", apply)
    stats = ReadStats()
    skipped = ingest_lines(
        ledger,
        line(event="task_submitted", task_id="a", project="p"),
        line(event="task_submitted", task_id="boom", project="p"),
        line(event="task_submitted", task_id="c", project="p"),
        stats=stats,
    )
    assert skipped == ["internal_error"]
    assert stats.invalid["internal_error"] == 1 and stats.lines == 3
    assert sum(ledger.submitted.values()) == 2


def open_tasks(ledger: Ledger, n: int, project: str, at: float) -> list[str]:
    return [
        line(event="task_submitted", task_id=f"{project}{i}", project=project, timestamp=iso(at))
        for i in range(n)
    ]


@pytest.mark.parametrize(
    "stamp",
    ["2100-01-01T00:00:00Z", iso(NOW + 25 * 3600), 4102444800000],
    ids=["year-2100", "a-day-ahead", "millis-2100"],
)
def test_one_producers_clock_ahead_does_not_expire_other_tasks(stamp: object) -> None:
    ledger = Ledger(Config(tasks=TasksConfig(ttl="1h")))
    feed(ledger, *open_tasks(ledger, 5, "good", NOW - 60))
    feed(ledger, line(event="task_submitted", task_id="skewed", project="bad", timestamp=stamp))
    ledger.expire(NOW)
    feed(
        ledger,
        *(
            line(event="task_completed", task_id=f"good{i}", credits_used=10, timestamp=iso(NOW))
            for i in range(5)
        ),
    )
    assert ledger.credits == {("good", "unknown"): 50}
    assert ledger.expired == {}
    assert ledger.clamped["ahead"] == 1
    assert ledger.last_event_ts <= NOW


def test_a_saved_newest_time_in_the_future_is_mended() -> None:
    ledger = Ledger(Config(tasks=TasksConfig(ttl="1h")))
    ledger.last_event_ts = 4102444800.0  # saved by a version that trusted every clock
    feed(ledger, *open_tasks(ledger, 3, "p", NOW - 60))
    ledger.expire(NOW)
    assert ledger.in_flight == {"p": 3}


def test_an_event_before_2000_is_placed_at_the_time_of_reading() -> None:
    ledger = Ledger(parse_config(BUDGET))
    feed(
        ledger, line(event="task_completed", task_id="t", project="p", credits_used=9, timestamp=0)
    )
    assert ledger.clamped["too_old"] == 1
    assert ledger.budget_statuses(NOW)[0].used_credits == 9


@pytest.mark.parametrize(
    ("first", "second"),
    [("task_completed", "task_error"), ("task_error", "task_completed")],
)
def test_the_first_terminal_event_wins(first: str, second: str) -> None:
    ledger = Ledger(Config())
    feed(
        ledger,
        line(event="task_submitted", task_id="t", project="p", model="m"),
        line(event=first, task_id="t", status="succeed", credits_used=10, error_type="x"),
        line(event=second, task_id="t", status="succeed", credits_used=10, error_type="x"),
    )
    finished = sum(ledger.completed.values()) + sum(ledger.errors.values())
    assert finished == 1
    assert ledger.duplicates == 1
    assert credits_total(ledger) == 10


def test_a_completion_read_before_its_submission_waits_and_joins() -> None:
    ledger = Ledger(Config(tasks=TasksConfig(orphan_wait="5m")))
    feed(ledger, line(event="task_completed", task_id="t", status="succeed"), settle=False)
    assert ledger.credits == {} and len(ledger.waiting) == 1
    ledger.expire(NOW + 60)  # a minute of reading later: still waiting
    assert len(ledger.waiting) == 1
    submission = line(
        event="task_submitted", task_id="t", project="p", model="kling-v2-6", mode="pro"
    )
    feed(ledger, submission, now=NOW + 120, settle=False)
    assert ledger.credits == {("p", "kling-v2-6"): 35}
    assert ledger.completed == {("p", "kling-v2-6", "succeed"): 1}
    assert ledger.in_flight == {"p": 0}
    assert ledger.orphaned == 0 and not ledger.waiting


def test_a_completion_whose_submission_never_comes_is_counted_after_the_wait() -> None:
    ledger = Ledger(Config(tasks=TasksConfig(orphan_wait="5m")))
    feed(ledger, line(event="task_completed", task_id="t", credits_used=12), settle=False)
    ledger.expire(NOW + 299)
    assert ledger.credits == {}
    ledger.expire(NOW + 301)
    assert ledger.credits == {("default", "unknown"): 12}
    assert ledger.orphaned == 1
    feed(ledger, line(event="task_completed", task_id="t", credits_used=12), now=NOW + 400)
    assert ledger.duplicates == 1


def test_waiting_events_survive_a_restart() -> None:
    config = Config(tasks=TasksConfig(orphan_wait="5m"))
    ledger = Ledger(config)
    feed(ledger, line(event="task_error", task_id="t", error_type="quota"), settle=False)
    restored = saved_and_restored(ledger)
    feed(restored, line(event="task_submitted", task_id="t", project="p"), settle=False)
    assert restored.errors == {("p", "quota"): 1}


def test_unknown_kind_is_priced_by_the_fallback() -> None:
    ledger = Ledger(Config())
    feed(
        ledger,
        line(event="task_submitted", task_id="t", project="p", kind="3d_scene", duration=7),
        line(event="task_completed", task_id="t", status="succeed"),
    )
    assert ledger.credits == {("p", "unknown"): 14}  # 2 credits a second


def test_user_as_a_number_matches_its_budget() -> None:
    ledger = Ledger(parse_config({"budgets": [{"name": "u", "user": "42", "limit_credits": 100}]}))
    feed(
        ledger,
        line(event="task_submitted", task_id="t", user_id=42),
        line(event="task_completed", task_id="t", credits_used=30),
    )
    assert ledger.budget_statuses(NOW)[0].used_credits == 30


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)
FIELD = st.sampled_from(
    [
        "event",
        "task_id",
        "timestamp",
        "project",
        "project_id",
        "user",
        "user_id",
        "model",
        "duration",
        "mode",
        "audio",
        "kind",
        "status",
        "elapsed_sec",
        "credits_used",
        "credits",
        "error_type",
    ]
)
VALUE = (
    JSON
    | st.sampled_from(["task_submitted", "task_completed", "task_error", "succeed", "std"])
    | st.sampled_from(["9999-12-31T23:59:59Z", "0001-01-01T00:00:00+01:00", "t1", "t2"])
    | st.integers(min_value=-(2**63), max_value=2**64)
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=80),
            st.dictionaries(FIELD, VALUE, max_size=8).map(lambda d: json.dumps(d).encode()),
        ),
        max_size=30,
    )
)
def test_arbitrary_lines_never_raise_and_totals_stay_consistent(lines: list[bytes]) -> None:
    ledger, stats = Ledger(parse_config(BUDGET)), ReadStats()
    skipped = ingest_lines(ledger, *lines, stats=stats)
    ledger.expire(NOW + 3600)
    ledger.settle_waiting()
    assert set(skipped) <= set(INVALID_REASONS) - {"internal_error"}
    assert sum(stats.invalid.values()) == len(skipped)
    snap = ledger.snapshot(NOW)
    finished = sum(snap.completed.values()) + sum(snap.errors.values())
    assert finished + ledger.duplicates <= len(lines)
    assert all(v >= 0 for v in snap.in_flight.values())
    used = sum(b.used_credits for b in snap.budgets)
    assert used <= credits_total(ledger) + 1e-6


def test_a_replay_in_shuffled_file_order_joins_exactly() -> None:
    """Two writers, two files: completions in one file, submissions in the other, read
    completions first. Every task lands in its own project as if read in order."""
    rng = random.Random(5)
    config = Config(tasks=TasksConfig(orphan_wait="5m"))
    lines = task_lines(random_tasks(rng, 300, NOW - 3600, 3000), rng)
    ordered = Ledger(config)
    feed(ordered, *lines)
    submissions = [x for x in lines if "task_submitted" in x]
    others = [x for x in lines if "task_submitted" not in x]
    swapped = Ledger(config)
    feed(swapped, *others, settle=False)
    feed(swapped, *submissions, now=NOW + 1)
    assert swapped.orphaned == 0
    got, want = swapped.snapshot(NOW), ordered.snapshot(NOW)
    assert got.usd == pytest.approx(want.usd)  # sums in another order
    got.usd = want.usd
    assert got == want
