"""The task index at its cap (``tasks.max_tasks``): a task pushed out before its TTL is
charged its estimate under its own project, a late completion of it charges only what it
says beyond that (still under its project and budgets), and a repeat of a task that had
finished is a duplicate, across a restart too."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from kling_exporter.config import parse_config
from kling_exporter.evicted import Evicted
from kling_exporter.ledger import Ledger

from tests.helpers import NOW, feed, iso, line, saved_and_restored

BUDGET = {"budgets": [{"name": "p", "project": "p", "period": "monthly", "limit_credits": 1000}]}


def ledger_of(max_tasks: int) -> Ledger:
    return Ledger(parse_config(BUDGET | {"tasks": {"max_tasks": max_tasks}}))


def submission(task_id: str, ts: float, project: str = "p") -> str:
    """10 credits by the default pricing (5 s, standard)."""
    return line(
        event="task_submitted",
        task_id=task_id,
        timestamp=iso(ts),
        project=project,
        user="ann",
        model="kling-v2-6",
        mode="std",
        duration=5,
    )


def completion(task_id: str, ts: float, credits: float | None = None) -> str:
    fields: dict[str, Any] = {"credits_used": credits} if credits is not None else {}
    return line(
        event="task_completed", task_id=task_id, timestamp=iso(ts), status="succeed", **fields
    )


def test_a_late_completion_of_a_task_the_cap_pushed_out_is_charged_to_its_owner_once() -> None:
    """Issue 44: it used to land in project="default", model="unknown", its budget never
    charged, and its repeat was counted again."""
    ledger = ledger_of(4)
    feed(ledger, *(submission(f"t{i}", NOW - 100 + i) for i in range(8)))
    ledger.expire(NOW)
    assert len(ledger.tasks) == 4 and ledger.evicted.total == 4
    assert ledger.expired_credits == {"p": 40}  # four estimates of 10
    restored = saved_and_restored(ledger)
    for led in (ledger, restored):
        feed(led, completion("t0", NOW, credits=25), completion("t0", NOW + 1, credits=25))
        feed(led, completion("t1", NOW + 2))  # says no credits: its estimate stands
        assert led.credits == {("p", "kling-v2-6"): 40 + 15}
        assert led.duplicates == 1
        assert led.budget_statuses(NOW)[0].used_credits == 55
        assert sum(led.completed.values()) == 2
        assert ("default", "unknown") not in led.credits


def test_a_repeat_of_a_finished_task_the_cap_pushed_out_is_a_duplicate() -> None:
    ledger = ledger_of(4)
    feed(ledger, submission("a", NOW - 50), completion("a", NOW - 49, credits=10))
    feed(ledger, *(submission(f"t{i}", NOW - 40 + i) for i in range(4)))
    ledger.expire(NOW)
    assert "a" not in ledger.tasks
    restored = saved_and_restored(ledger)
    for led in (ledger, restored):
        feed(led, completion("a", NOW, credits=10))
        assert led.duplicates == 1
        assert led.credits[("p", "kling-v2-6")] == 10


def test_the_record_keeps_half_its_capacity_at_least_and_drops_the_oldest_whole() -> None:
    record = Evicted(4)
    for i in range(7):
        record.add(f"t{i}", ("p", None, "m"), 1)
    assert len(record) == 3  # two generations of two; the newest has one
    assert record.get("t3") is None and record.get("t4") == (("p", None, "m"), 1)
    assert record.total == 7


def test_owners_no_entry_names_are_forgotten() -> None:
    record = Evicted(2)
    for i in range(500):
        record.add(f"t{i}", (f"p{i}", None, "m"), 1)
    assert len(record.owners) < 200
    assert record.get("t499") == (("p499", None, "m"), 1)


# What a task is: its id, its project, whether and how it completes (credits or none),
# and whether the completion is repeated.
TASKS = st.lists(
    st.tuples(
        st.sampled_from(["p", "q"]),
        st.one_of(st.none(), st.just(-1.0), st.floats(0, 50).map(round)),
        st.booleans(),
    ),
    min_size=1,
    max_size=30,
)


@settings(max_examples=60, deadline=None)
@given(tasks=TASKS, cap=st.integers(1, 6), delay=st.integers(0, 40), restart=st.booleans())
def test_at_any_cap_each_task_is_counted_once_under_its_own_project(
    tasks: list[tuple[str, float | None, bool]], cap: int, delay: int, restart: bool
) -> None:
    """Every task submitted in turn, each completed ``delay`` submissions later (never
    for ``None``, without credits for -1), some twice: whatever the cap pushes out, the
    counts equal an uncapped ledger's, the repeats are duplicates, and each task is
    charged under its own project what it said, or (pushed out unfinished) the larger of
    that and its estimate of 10."""
    events: list[tuple[int, str]] = []
    for i, (project, _, _) in enumerate(tasks):
        events.append((i, submission(f"t{i}", NOW - 1000 + i, project)))
    for i, (_, credits, twice) in enumerate(tasks):
        if credits is not None:
            said = None if credits < 0 else credits
            for _ in range(2 if twice else 1):
                events.append((i + delay, completion(f"t{i}", NOW - 1000 + i, said)))
    events.sort(key=lambda e: e[0])  # stable: a submission before its completion
    pushed_out: set[str] = set()

    def watch(led: Ledger) -> Ledger:
        led.observer = lambda r: pushed_out.add(r.task_id) if r.event == "expired" else None
        return led

    capped, whole = watch(ledger_of(cap)), ledger_of(1_000_000)
    for n, (_, text) in enumerate(events):
        for led in (capped, whole):
            feed(led, text)
            led.expire(NOW)
        if restart and n == len(events) // 2:
            capped = watch(saved_and_restored(capped))
    assert capped.submitted == whole.submitted
    assert capped.completed == whole.completed
    assert capped.duplicates == whole.duplicates
    expected = {"p": 0.0, "q": 0.0}
    for i, (project, credits, _) in enumerate(tasks):
        said = None if credits is None else 10.0 if credits < 0 else credits
        if f"t{i}" in pushed_out:
            expected[project] += 10.0 if said is None else max(said, 10.0)
        elif said is not None:
            expected[project] += said
    got = {p: capped.credits.get((p, "kling-v2-6"), 0.0) for p in expected}
    assert got == expected
    assert set(capped.credits) <= {("p", "kling-v2-6"), ("q", "kling-v2-6")}
