"""The task index at its cap (``tasks.max_tasks``): a task pushed out before its TTL is
charged its estimate under its own project, a late completion of it charges only what it
says beyond that (still under its project and budgets), and a repeat of a task that had
finished is a duplicate, across a restart too."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from kling_exporter.accounting import evicted
from kling_exporter.accounting.evicted import Evicted
from kling_exporter.accounting.ledger import Ledger
from kling_exporter.configfile import parse_config

from tests.helpers import NOW, feed, iso, line, saved_and_restored

OWNER = ("p", None, "m", "standard", 5, False, "video")
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
        record.add(f"t{i}", OWNER, 1)
    assert len(record) == 3  # two generations of two; the newest has one
    assert record.get("t3") is None and record.get("t4") == (OWNER, 1)
    assert record.total == 7


def test_owners_no_entry_names_are_forgotten() -> None:
    record = Evicted(2)
    for i in range(500):
        record.add(f"t{i}", (f"p{i}", *OWNER[1:]), 1)
    assert len(record.owners) < 200
    assert record.get("t499") == (("p499", *OWNER[1:]), 1)


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


# -- what a review found: the record's bounds and the lines it must still join ----------

DAY = 86400.0


def aged(*lines: str, ttl: str = "1h") -> Ledger:
    """A ledger that read ``lines`` and then a line of another task a day later, so that
    what is still open ages out (charged its estimate) into the record."""
    labels = {"max_projects": 100_000}  # each project its own series, to be seen
    ledger = Ledger(parse_config(BUDGET | {"tasks": {"ttl": ttl}, "labels": labels}))
    feed(ledger, *lines)
    feed(ledger, submission("later", NOW + DAY, project="q"), now=NOW + DAY)
    ledger.expire(NOW + DAY)
    return ledger


def test_a_usage_line_of_a_task_aged_out_joins_it_and_a_completion_charges_the_rest() -> None:
    ledger = aged(submission("a", NOW))
    assert "a" not in ledger.tasks and ledger.credits == {("p", "kling-v2-6"): 10}
    usage = line(task_id="a", credits=10, timestamp=iso(NOW + DAY))
    feed(ledger, usage, completion("a", NOW + DAY, credits=12), now=NOW + DAY)
    assert ledger.credits == {("p", "kling-v2-6"): 12}  # not a second task, not default's
    assert sum(ledger.submitted.values()) == 2 and ledger.duplicates == 0


def test_a_late_completion_keeps_the_tasks_fields() -> None:
    pro10 = line(
        event="task_submitted",
        task_id="v",
        project="p",
        model="kling-v2-6",
        mode="pro",
        duration=10,
        timestamp=iso(NOW),
    )
    ledger = aged(pro10)
    feed(ledger, completion("v", NOW + DAY), now=NOW + DAY)
    assert ledger.video_seconds == {("p", "kling-v2-6"): 10}
    assert ledger.credits == {("p", "kling-v2-6"): 70}  # its price, charged once


def test_a_record_of_more_owners_than_16_bits_is_saved_and_restored() -> None:
    """Owners (project, user and the task's fields) are as many as the projects: the
    entry must still fit the 64 bits the state's msgpack holds."""
    ledger = aged(*(submission(f"t{i}", NOW, project=f"c{i}") for i in range(70_000)))
    assert len(ledger.evicted.owners) > 1 << 16
    restored = saved_and_restored(ledger)
    feed(restored, completion("t69999", NOW + DAY, credits=15), now=NOW + DAY)
    assert restored.credits[("c69999", "kling-v2-6")] == 15


def test_past_its_table_of_fields_a_task_is_still_charged_under_other(
    monkeypatch: Any,
) -> None:
    monkeypatch.setattr(evicted, "MAX_OWNERS", 4)
    ledger = aged(*(submission(f"t{i}", NOW, project=f"c{i}") for i in range(6)))
    feed(ledger, *(completion(f"t{i}", NOW + DAY, credits=15) for i in range(6)), now=NOW + DAY)
    # each was charged its 10 when it aged out; 5 more each now, three of them under
    # __other__ for want of room to keep whose they were
    total = sum(c for (p, _), c in ledger.credits.items() if p != "q")
    assert total == 6 * 15 and ledger.credits[("__other__", "unknown")] == 15
    assert ledger.duplicates == 0


def test_a_saved_record_out_of_range_is_refused_as_not_fitting() -> None:
    record = Evicted(10)
    for bad in ({1: -1}, {1: 1 << 64}, {-1: 0}, {1: 5 << 43}):
        try:
            record.restore([], bad, {}, 0)
        except ValueError as e:
            assert "state does not fit" in str(e)
        else:
            raise AssertionError(f"accepted {bad}")
