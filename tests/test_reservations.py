"""Reservations in process: holds against the real ledger and budgets, the journal that
keeps them, and a state machine over reserve, consume, release, expire and restart."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import hypothesis.strategies as st
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from kling_exporter.accounting.ledger import Ledger
from kling_exporter.budgets import Ask
from kling_exporter.config import ReservationsConfig
from kling_exporter.configfile import ConfigError, parse_config
from kling_exporter.guard import reservations as reservations_module
from kling_exporter.guard.reservations import TOLD_FOR, Reservations, Terms, fingerprint
from kling_exporter.journals import holds as holds_module
from kling_exporter.journals.durable import write_all_and_sync
from kling_exporter.journals.holds import API, GATEWAY, Granted, Hold, HoldJournal, Record
from kling_exporter.pricing import Request
from kling_exporter.views import View

from tests.helpers import NOW, feed, half_then_full, saved_and_restored

CONFIG = parse_config(
    {
        "budgets": [
            {"name": "team", "project": "p", "period": "monthly", "limit_credits": 100},
            {"name": "ann", "user": "ann", "period": "daily", "limit_credits": 60},
        ]
    }
)
REQ = Request("kling-v2-6", "standard", 5)  # 10 credits a task


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def view(ledger: Ledger) -> View:
    return View(ledger.budgets, ledger.usage, ledger.flight)


def reserve(
    held: Reservations,
    ledger: Ledger,
    count: int,
    rid: str | None = None,
    ttl: float = 60,
    user: str | None = None,
    durable: bool = True,
) -> tuple[int, dict[str, Any]]:
    body = {"project": "p", "user": user, "count": count, "ttl": ttl}
    ask = Ask(REQ, count, "p", user)
    terms = Terms(durable=durable)
    return asyncio.run(held.reserve(view(ledger), ask, rid, ttl, fingerprint(body), terms))


def remaining(held: Reservations, ledger: Ledger, name: str = "team") -> float:
    result = held.check(view(ledger), Ask(REQ, 1, "p", "ann"))
    left = next(b.credits_remaining for b in result.budgets if b.name == name)
    assert left is not None
    return left


def submitted(task_id: str, rid: str | None, user: str | None = None) -> str:
    fields: dict[str, Any] = {
        "event": "task_submitted",
        "task_id": task_id,
        "project": "p",
        "model": "kling-v2-6",
        "mode": "std",
        "duration": 5,
    }
    if rid is not None:
        fields["reservation_id"] = rid
    if user is not None:
        fields["user"] = user
    return json.dumps(fields)


def completed(task_id: str, credits: float) -> str:
    return json.dumps({"event": "task_completed", "task_id": task_id, "credits_used": credits})


def tell(held: Reservations, ledger: Ledger) -> None:
    """What the reader publishes after a chunk: counts of the reservations it changed."""
    held.consumed(ledger.take_consumed())


def test_a_hold_counts_until_its_tasks_are_in_flight_and_then_as_them(tmp_path: Path) -> None:
    ledger, held = Ledger(CONFIG), Reservations(HoldJournal(tmp_path / "r"), Clock())
    status, answer = reserve(held, ledger, 3, rid="r1")
    assert status == 201 and answer["count"] == 3 and answer["credits"] == 30
    assert answer["budgets"] == ["team"]
    assert remaining(held, ledger) == 70

    feed(ledger, submitted("t1", "r1"))
    tell(held, ledger)
    assert remaining(held, ledger) == 70  # 20 held, 10 in flight
    (status_row,) = [b for b in held.statuses(view(ledger))][:1]
    assert (status_row.reserved_credits, status_row.in_flight_credits) == (20, 10)

    feed(ledger, completed("t1", 10))
    assert remaining(held, ledger) == 70  # 20 held, 10 used

    status, answer = reserve(held, ledger, 8)
    assert status == 200 and answer["allowed"] is False and answer["refused_by"] == "team"
    assert "70 credits left" in answer["reason"]
    assert reserve(held, ledger, 7)[0] == 201  # exactly at the limit
    assert held.outcomes["granted"] == 2 and held.outcomes["refused"] == 1
    assert held.outcomes["consumed"] == 1


def test_the_same_id_is_the_same_reservation_and_another_body_is_refused(
    tmp_path: Path,
) -> None:
    ledger, held = Ledger(CONFIG), Reservations(HoldJournal(tmp_path / "r"), Clock())
    first = reserve(held, ledger, 2, rid="job-7")
    again = reserve(held, ledger, 2, rid="job-7")
    assert (first[0], again[0]) == (201, 200)
    assert again[1]["expires_at"] == first[1]["expires_at"]
    assert remaining(held, ledger) == 80  # held once
    status, answer = reserve(held, ledger, 3, rid="job-7")
    assert status == 409 and answer["field"] == "id"
    assert asyncio.run(held.release("job-7"))
    assert reserve(held, ledger, 2, rid="job-7")[0] == 409  # ended: not used again


def test_release_and_expiry_give_back_what_is_left(tmp_path: Path) -> None:
    clock = Clock()
    ledger, held = Ledger(CONFIG), Reservations(HoldJournal(tmp_path / "r"), clock)
    reserve(held, ledger, 4, rid="a", ttl=30)
    reserve(held, ledger, 4, rid="b", ttl=90)
    feed(ledger, submitted("t1", "a"))
    tell(held, ledger)
    assert remaining(held, ledger) == 20
    assert not asyncio.run(held.release("nope"))
    assert asyncio.run(held.release("b"))
    assert remaining(held, ledger) == 60
    clock.now += 31
    assert remaining(held, ledger) == 90  # a's three left expired; its task is in flight
    assert asyncio.run(held.page(None, 10)) == (b"[]", None)
    assert held.outcomes == {
        "granted": 2,
        "refused": 0,
        "released": 1,
        "expired": 1,
        "consumed": 1,
        "unknown": 0,
    }


def test_a_submission_naming_no_live_reservation_counts_normally(tmp_path: Path) -> None:
    ledger, held = Ledger(CONFIG), Reservations(HoldJournal(tmp_path / "r"), Clock())
    reserve(held, ledger, 1, rid="one")
    feed(ledger, submitted("t1", "one"), submitted("t2", "one"), submitted("t3", "ghost"))
    tell(held, ledger)
    assert held.outcomes["consumed"] == 1 and held.outcomes["unknown"] == 2
    assert remaining(held, ledger) == 70  # three tasks in flight, nothing held
    feed(ledger, submitted("t1", "one"))  # a repeated line is one task still
    tell(held, ledger)
    assert held.outcomes["unknown"] == 2


def test_holds_outlive_a_restart_and_a_torn_last_record(tmp_path: Path) -> None:
    clock = Clock()
    ledger = Ledger(CONFIG)
    held = Reservations(HoldJournal(tmp_path / "r"), clock)
    reserve(held, ledger, 2, rid="kept")
    reserve(held, ledger, 1, rid="gone", ttl=10)
    asyncio.run(held.release("gone"))
    reserve(held, ledger, 3, rid="late", ttl=5)
    assert held.journal is not None
    held.journal.close()
    with open(tmp_path / "r", "ab") as f:
        f.write(b"\x00\x00\x01\x00half a record")  # a crash in the middle of a write
    clock.now += 6  # "late" expired meanwhile
    again = Reservations(HoldJournal(tmp_path / "r"), clock)
    assert [h["id"] for h in json.loads(asyncio.run(again.page(None, 10))[0])] == ["kept"]
    assert remaining(again, ledger) == 80
    assert reserve(again, ledger, 1, rid="gone")[0] == 409
    assert reserve(again, ledger, 2, rid="kept")[0] == 200
    assert (tmp_path / "r").stat().st_mode & 0o777 == 0o600


@settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
class ReservationMachine(RuleBasedStateMachine):
    """Any mix of reserve, submit, finish, release, time passing and restart, against a
    model kept by the rules themselves: committed never exceeds a limit, and the live
    holds are exactly what was granted less what was consumed, released and expired."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="kling-res-"))
        self.clock = Clock()
        self.ledger = Ledger(CONFIG)
        self.held = Reservations(HoldJournal(self.dir / "r"), self.clock)
        # The model: id -> [count, expires_at, used, released, user]
        self.model: dict[str, list[Any]] = {}
        self.gone = {"released": 0, "expired": 0}  # tasks left when a hold ended
        self.expired: set[str] = set()
        self.tasks = 0
        self.open: list[str] = []

    def _live(self) -> dict[str, int]:
        now = self.clock()
        for rid, (count, expires, used, released, _) in self.model.items():
            if not released and used < count and now >= expires and rid not in self.expired:
                self.expired.add(rid)
                self.gone["expired"] += count - used
        return {
            rid: count - used
            for rid, (count, expires, used, released, _) in self.model.items()
            if not released and used < count and now < expires
        }

    @rule(
        count=st.integers(1, 4),
        user=st.sampled_from([None, "ann"]),
        ttl=st.sampled_from([5, 60]),
        durable=st.booleans(),
    )
    def reserve(self, count: int, user: str | None, ttl: int, durable: bool) -> None:
        """A grant, awaited until fsynced or (as the gateway's) not: either way it is
        in the journal once granted, so an exporter killed then keeps it."""
        rid = f"r{len(self.model)}-{self.held.outcomes['refused']}"
        status, _ = reserve(self.held, self.ledger, count, rid, ttl, user, durable)
        if status == 201:
            self.model[rid] = [count, self.clock() + ttl, 0, False, user]

    @precondition(lambda self: bool(self._live()))
    @rule(data=st.data())
    def submit(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self._live())))
        self.tasks += 1
        task_id = f"t{self.tasks}"
        self.model[rid][2] += 1
        feed(self.ledger, submitted(task_id, rid, self.model[rid][4]), now=self.clock())
        self.open.append(task_id)
        tell(self.held, self.ledger)

    @precondition(lambda self: bool(self.open))
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        task_id = data.draw(st.sampled_from(self.open))
        self.open.remove(task_id)
        feed(self.ledger, completed(task_id, 10), now=self.clock())

    @precondition(lambda self: bool(self._live()))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        live = self._live()
        rid = data.draw(st.sampled_from(sorted(live)))
        assert asyncio.run(self.held.release(rid))
        self.model[rid][3] = True
        self.gone["released"] += live[rid]

    @rule(seconds=st.sampled_from([1, 6, 61]))
    def wait(self, seconds: int) -> None:
        self.clock.now += seconds

    @rule()
    def restart(self) -> None:
        """Both sides start again from what they saved: the ledger's state and the
        journal; the reader's first word is every count it has."""
        assert self.held.journal is not None
        self.held.journal.close()
        self.ledger = saved_and_restored(self.ledger)
        self.held = Reservations(HoldJournal(self.dir / "r"), self.clock)
        self.held.consumed(self.ledger.take_consumed(every=True), baseline=True)

    @invariant()
    def committed_within_every_limit(self) -> None:
        statuses = self.held.statuses(view(self.ledger))
        for b in statuses:
            committed = b.used_credits + b.in_flight_credits + b.reserved_credits
            assert b.limit_credits is not None
            assert committed <= b.limit_credits + 1e-6, b

    @invariant()
    def what_is_held_by_pair_is_the_live_holds(self) -> None:
        self.held.sweep()
        expected: dict[tuple[str, str | None], float] = {}
        for h in self.held.holds.values():
            pair = (h.project, h.user)
            expected[pair] = expected.get(pair, 0.0) + h.left * h.credits
        got = {pair: credits for pair, (credits, _) in self.held.held.by_pair.items()}
        assert got.keys() == expected.keys()
        assert all(abs(got[k] - expected[k]) < 1e-6 for k in got), (got, expected)

    @invariant()
    def the_listing_pages_through_every_live_hold_once_in_order(self) -> None:
        self.held.sweep()
        listed, after = [], None
        while True:
            rows, after = asyncio.run(self.held.page(after, 2))
            listed += [r["id"] for r in json.loads(rows)]
            if after is None:
                break
        assert listed == sorted(self.held.holds)

    @invariant()
    def holds_are_granted_less_consumed_released_and_expired(self) -> None:
        self.held.sweep()
        live = self._live()
        assert {rid: h.left for rid, h in self.held.holds.items()} == live
        granted = sum(m[0] for m in self.model.values())
        consumed = sum(min(m[2], m[0]) for m in self.model.values())
        assert sum(live.values()) == (
            granted - consumed - self.gone["released"] - self.gone["expired"]
        )

    def teardown(self) -> None:
        if self.held.journal is not None:
            self.held.journal.close()
        shutil.rmtree(self.dir, ignore_errors=True)


TestReservationMachine = ReservationMachine.TestCase


def test_past_max_live_a_new_hold_is_429_naming_the_setting(tmp_path: Path) -> None:
    ledger, held = Ledger(CONFIG), Reservations(HoldJournal(tmp_path / "r"), Clock())

    def hold(rid: str) -> tuple[int, dict[str, Any]]:
        body = {"project": "p", "user": None, "count": 1, "ttl": 60}
        ask = Ask(REQ, 1, "p", None)
        return asyncio.run(
            held.reserve(view(ledger), ask, rid, 60, fingerprint(body), Terms(max_live=2))
        )

    assert hold("a")[0] == 201 and hold("b")[0] == 201
    status, answer = hold("c")
    assert status == 429 and answer["field"] == "reservations.max_live"
    assert hold("a")[0] == 200  # the same reservation asked again is no new hold
    assert asyncio.run(held.release("a"))
    assert hold("c")[0] == 201


class Stalled(NamedTuple):
    held: Reservations
    ledger: Ledger
    writing: threading.Event  # set once a compaction waits
    unblock: threading.Event  # lets it go on


ELSEWHERE = Ask(Request(kind="image"), 1, "other", None)  # no budget matches: all granted


def stalled_compaction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Stalled:
    """Reservations whose journal's compactions wait, once their live records are
    taken, until ``unblock`` is set."""
    monkeypatch.setattr(reservations_module, "COMPACT_AFTER", 5)
    journal = HoldJournal(tmp_path / "r")
    writing, unblock = threading.Event(), threading.Event()
    write_aside = journal._write_aside

    def stalled(live: list[Record]) -> Path:
        writing.set()
        unblock.wait(10)  # a rewrite of tens of thousands of holds, on a slow disk
        return write_aside(live)

    monkeypatch.setattr(journal, "_write_aside", stalled)
    return Stalled(Reservations(journal, Clock()), Ledger(CONFIG), writing, unblock)


async def hold_on_disk(s: Stalled, rid: str, i: int) -> None:
    asked = s.held.reserve(view(s.ledger), ELSEWHERE, rid, 60, fingerprint({"i": i}))
    assert (await asyncio.wait_for(asked, 5))[0] == 201


async def hold_and_release_until_compacting(s: Stalled) -> None:
    """Grant and release holds until the journal's compaction waits."""
    for i in range(50):
        if await asyncio.to_thread(s.writing.wait, 0.01):
            return
        await hold_on_disk(s, f"h{i:02d}", i)
        assert await asyncio.wait_for(s.held.release(f"h{i:02d}"), 5)
    raise AssertionError("the journal was never compacted")


def compacting_meanwhile(
    s: Stalled, tmp_path: Path, meanwhile: Callable[[], Awaitable[None]]
) -> Reservations:
    """Grant and release until the journal's compaction waits, run ``meanwhile``, let
    the compaction end and close; then nothing is left aside, and the reservations come
    back from the journal as a restart reads them."""

    async def story() -> None:
        try:
            await hold_and_release_until_compacting(s)
            await meanwhile()
        finally:
            s.unblock.set()
            await s.held.close()

    asyncio.run(story())
    assert not list(tmp_path.glob(".*compacting"))
    return Reservations(HoldJournal(tmp_path / "r"), Clock())


def test_holds_are_granted_and_released_while_the_journal_is_compacted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = stalled_compaction(tmp_path, monkeypatch)

    async def churn() -> None:
        # The rewrite cannot end yet; grants and releases go on, each on disk.
        for j in range(100, 120):
            await hold_on_disk(s, f"h{j:02d}", j)
            if j % 2:
                assert await asyncio.wait_for(s.held.release(f"h{j:02d}"), 5)

    again = compacting_meanwhile(s, tmp_path, churn)
    assert sorted(again.holds) == sorted(s.held.holds) == [f"h{j}" for j in range(100, 120, 2)]
    assert sorted(again.ended) == sorted(s.held.ended)
    assert len(HoldJournal(tmp_path / "r").load()) < 60  # compacted: 20 + 60 written


@contextlib.contextmanager
def full_disk(name: str) -> Iterator[None]:
    """Meanwhile the journal's ``name`` (``write_all`` or ``write_all_and_sync``) fails
    as a full disk does, writing nothing."""

    def refuse(fd: int, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(holds_module, name, refuse)
        yield


def test_a_record_the_journal_refused_during_a_compaction_calls_it_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = stalled_compaction(tmp_path, monkeypatch)

    async def refused_then_kept() -> None:
        with full_disk("write_all_and_sync"), pytest.raises(OSError):
            await hold_on_disk(s, "lost", -1)
        await hold_on_disk(s, "kept", -2)

    again = compacting_meanwhile(s, tmp_path, refused_then_kept)
    assert sorted(again.holds) == sorted(s.held.holds) == ["kept"]


def test_compaction_runs_beside_appends_and_loses_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reservations_module, "COMPACT_AFTER", 5)
    ledger = Ledger(CONFIG)
    held = Reservations(HoldJournal(tmp_path / "r"), Clock())
    ask = ELSEWHERE

    async def grant_and_release() -> None:
        grants = [
            held.reserve(view(ledger), ask, f"h{i:03d}", 60, fingerprint({"i": i}))
            for i in range(300)
        ]
        assert {status for status, _ in await asyncio.gather(*grants)} == {201}
        gone = [held.release(f"h{i:03d}") for i in range(300) if i % 6]
        assert all(await asyncio.gather(*gone))
        await held.close()

    asyncio.run(grant_and_release())
    written = len(HoldJournal(tmp_path / "r").load())
    assert written < 550, "the journal was never compacted"  # 300 grants + 250 ends
    again = Reservations(HoldJournal(tmp_path / "r"), Clock())
    assert sorted(again.holds) == sorted(held.holds) == [f"h{i:03d}" for i in range(0, 300, 6)]
    assert set(again.ended) == {f"h{i:03d}" for i in range(300) if i % 6}


GATEWAYS = Terms(durable=False)  # as the gateway grants: nobody waits for the fsync


def granted_in(path: Path) -> list[str]:
    """The ids of the grants in the journal at ``path``, in the order written."""
    return [r.hold.id for r in HoldJournal(path).load() if isinstance(r, Granted)]


async def grant(held: Reservations, rid: str, terms: Terms = GATEWAYS) -> None:
    ledger = Ledger(CONFIG)
    asked = held.reserve(view(ledger), ELSEWHERE, rid, 60, fingerprint({"id": rid}), terms)
    assert (await asked)[0] == 201  # awaited directly: nothing else runs meanwhile


def test_a_grant_nobody_waits_for_is_in_the_journal_once_granted(tmp_path: Path) -> None:
    """Written at once on the event loop, not by a thread later: an exporter killed
    straight after the grant keeps it."""
    held = Reservations(HoldJournal(tmp_path / "r"), Clock())

    async def story() -> list[str]:
        await grant(held, "g1")
        # Nothing has run since the grant: the journal already has it.
        return granted_in(tmp_path / "r")

    assert asyncio.run(story()) == ["g1"]
    assert list(Reservations(HoldJournal(tmp_path / "r"), Clock()).holds) == ["g1"]


def test_grants_nobody_waits_for_outlive_a_compaction_they_were_written_during(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Written at once to the old journal while the live holds are written aside, they
    are carried into the new one too."""
    s = stalled_compaction(tmp_path, monkeypatch)

    async def inline_grants() -> None:
        for j in range(3):
            await grant(s.held, f"inline{j}")

    again = compacting_meanwhile(s, tmp_path, inline_grants)
    assert {"inline0", "inline1", "inline2"} <= set(again.holds)
    assert len(HoldJournal(tmp_path / "r").load()) < 20  # compacted


def test_a_sync_queued_as_a_compaction_ends_loses_no_grant_kept_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway's fsync of a hold (``sync``) queued just as the compaction takes what
    was written meanwhile: that grant still reaches the new journal (the sync's empty
    write, not kept aside, made the compaction leave the grant out as if still queued)."""
    s = stalled_compaction(tmp_path, monkeypatch)
    assert s.held.journal is not None
    lock = s.held.journal._commit._alone

    async def sync_as_the_compaction_ends() -> None:
        await grant(s.held, "inline")  # written at once, kept aside
        await lock.acquire()  # a write under way
        s.unblock.set()  # the rewrite ends, and waits for that write
        for _ in range(500):
            if lock._waiters:
                break
            await asyncio.sleep(0.01)
        assert lock._waiters
        lock.release()
        assert s.held.journal is not None
        await asyncio.wait_for(s.held.journal.sync(), 5)

    again = compacting_meanwhile(s, tmp_path, sync_as_the_compaction_ends)
    assert "inline" in again.holds


def test_a_grant_nobody_waits_for_goes_behind_one_queued_before_it(tmp_path: Path) -> None:
    """A grant queued, its write not begun: the next is queued behind it, not written
    past it."""
    held = Reservations(HoldJournal(tmp_path / "r"), Clock())

    async def story() -> None:
        first = asyncio.ensure_future(grant(held, "first", Terms()))
        await asyncio.sleep(0)  # the first grant is queued; its write has not begun
        assert held.journal is not None and held.journal._commit.queued == 1
        await grant(held, "second")
        await first
        await held.close()

    asyncio.run(story())
    assert granted_in(tmp_path / "r") == ["first", "second"]


def test_a_grant_nobody_waits_for_goes_behind_a_write_under_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a grant's fsync under way, the next grant is queued behind it, not written
    past it, and both are in the journal in the order they were granted."""
    writing, unblock = threading.Event(), threading.Event()

    def slow_disk(fd: int, data: bytes) -> None:
        writing.set()
        unblock.wait(10)
        write_all_and_sync(fd, data)

    monkeypatch.setattr(holds_module, "write_all_and_sync", slow_disk)
    held = Reservations(HoldJournal(tmp_path / "r"), Clock())

    async def story() -> None:
        first = asyncio.ensure_future(grant(held, "first", Terms()))
        assert await asyncio.to_thread(writing.wait, 5)
        await grant(held, "second")
        assert HoldJournal(tmp_path / "r").load() == []  # the first is not written yet
        unblock.set()
        await first
        await held.close()

    asyncio.run(story())
    assert granted_in(tmp_path / "r") == ["first", "second"]


def test_a_grant_the_journal_refuses_during_a_compaction_is_logged_and_not_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The grant stands until a restart (its caller went on), the error is logged, and
    the compaction under way carries no trace of it into the new journal."""
    s = stalled_compaction(tmp_path, monkeypatch)

    async def refused_then_kept() -> None:
        with full_disk("write_all"):
            await grant(s.held, "lost")
        assert "lost" in s.held.holds  # counts until a restart
        await grant(s.held, "kept")

    again = compacting_meanwhile(s, tmp_path, refused_then_kept)
    assert "cannot write the reservation journal" in caplog.text
    assert sorted(again.holds) == ["kept"]


def test_a_record_the_disk_took_half_of_loses_no_record_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk mid-record leaves half a frame; cut off again, the records written
    after it are read back at the next start (all were, at the restart, lost)."""
    held = Reservations(HoldJournal(tmp_path / "r"), Clock())

    async def story() -> None:
        await grant(held, "before", Terms())
        half_then_full(monkeypatch)
        with pytest.raises(OSError):
            await grant(held, "refused", Terms())
        await grant(held, "after", Terms())
        await grant(held, "inline")
        await held.close()

    asyncio.run(story())
    again = Reservations(HoldJournal(tmp_path / "r"), Clock())
    assert sorted(again.holds) == ["after", "before", "inline"]


def test_a_torn_record_that_cannot_be_cut_off_at_once_is_cut_before_the_next_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failing disk refuses the truncate too: the next write cuts the torn part off
    first, and fails while it cannot (no record is appended after a torn one)."""
    held = Reservations(HoldJournal(tmp_path / "r"), Clock())
    truncate = os.ftruncate
    refusals = {"left": 2}

    def failing_truncate(fd: int, length: int) -> None:
        if refusals["left"]:
            refusals["left"] -= 1
            raise OSError(5, "Input/output error")
        truncate(fd, length)

    async def story() -> None:
        await grant(held, "before", Terms())
        half_then_full(monkeypatch)
        monkeypatch.setattr(os, "ftruncate", failing_truncate)
        for rid in ("torn", "refused"):  # the second: the torn part still cannot be cut
            with pytest.raises(OSError):
                await grant(held, rid, Terms())
        await grant(held, "after", Terms())
        await held.close()

    asyncio.run(story())
    again = Reservations(HoldJournal(tmp_path / "r"), Clock())
    assert sorted(again.holds) == ["after", "before"]


GATEWAY_TERMS = Terms.for_gateway(ReservationsConfig())


def test_the_gateways_holds_are_its_own_and_stay_so_across_a_restart(tmp_path: Path) -> None:
    """The budget API neither lists, releases nor answers for a hold the gateway took
    while its create waits on Kling; the gateway releases it; the journal keeps whose
    it is."""
    held = Reservations(HoldJournal(tmp_path / "r"), Clock())
    asyncio.run(grant(held, "gw-1", GATEWAY_TERMS))
    asyncio.run(grant(held, "gw-2", GATEWAY_TERMS))
    asyncio.run(grant(held, "api-1", Terms()))
    assert held.holds["gw-1"].owner == GATEWAY and held.holds["api-1"].owner == API

    def listed(r: Reservations) -> list[str]:
        return [row["id"] for row in json.loads(asyncio.run(r.page(None, 10))[0])]

    assert listed(held) == ["api-1"]
    assert not asyncio.run(held.release("gw-1", owner=API))
    status, answer = asyncio.run(  # the same id and body through the API: not its hold
        held.reserve(view(Ledger(CONFIG)), ELSEWHERE, "gw-1", 60, fingerprint({"id": "gw-1"}))
    )
    assert status == 409 and answer["field"] == "id" and "expires_at" not in answer
    assert "gw-1" in held.holds
    assert held.journal is not None
    held.journal.close()

    again = Reservations(HoldJournal(tmp_path / "r"), Clock())
    assert listed(again) == ["api-1"]
    assert not asyncio.run(again.release("gw-1", owner=API))
    assert asyncio.run(again.release("api-1", owner=API))
    assert asyncio.run(again.release("gw-1"))  # as the gateway releases its own
    assert sorted(again.holds) == ["gw-2"]


class HoldBeforeOwners(msgspec.Struct, gc=False):
    """A hold as journals written before holds had owners keep it."""

    id: str
    fingerprint: str
    project: str
    user: str | None
    count: int
    credits: float
    usd: float
    budgets: tuple[str, ...]
    expires_at: float
    used: int = 0


class GrantedBeforeOwners(msgspec.Struct, tag="grant", array_like=True):
    hold: HoldBeforeOwners


def test_a_journal_written_before_holds_had_owners_still_loads(tmp_path: Path) -> None:
    old = HoldBeforeOwners("old-1", "f", "p", None, 2, 10.0, 1.4, ("team",), NOW + 60)
    body = msgspec.msgpack.encode(GrantedBeforeOwners(old))
    (tmp_path / "r").write_bytes(len(body).to_bytes(4, "big") + body)
    held = Reservations(HoldJournal(tmp_path / "r"), Clock())
    assert held.holds["old-1"] == Hold("old-1", "f", "p", None, 2, 10.0, 1.4, ("team",), NOW + 60)
    assert held.holds["old-1"].owner == API
    assert remaining(held, Ledger(CONFIG)) == 80
    assert asyncio.run(held.release("old-1", owner=API))


def test_past_max_live_per_project_a_new_hold_is_429_naming_the_setting(tmp_path: Path) -> None:
    """One project's flood of holds leaves the others their room; the cap counts the
    gateway's holds and the API's alike."""
    held = Reservations(HoldJournal(tmp_path / "r"), Clock())
    ledger = Ledger(CONFIG)
    terms = Terms(max_live=10, max_live_per_project=2)

    def hold(rid: str, project: str, owner: str = API) -> tuple[int, dict[str, Any]]:
        ask = Ask(Request(kind="image"), 1, project, None)  # 1 credit
        asked = held.reserve(
            view(ledger), ask, rid, 60, fingerprint({"p": project}), terms._replace(owner=owner)
        )
        return asyncio.run(asked)

    assert hold("a", "flood")[0] == 201 and hold("b", "flood", GATEWAY)[0] == 201
    status, answer = hold("c", "flood")
    assert status == 429 and answer["field"] == "reservations.max_live_per_project"
    assert "2 holds" in answer["error"] and "c" not in held.holds
    assert hold("d", "p")[0] == 201  # another project still has its room
    assert hold("a", "flood")[0] == 200  # the same reservation again is no new hold
    assert asyncio.run(held.release("a"))
    assert hold("c", "flood")[0] == 201
    assert held.projects == {"flood": 2, "p": 1}


@pytest.mark.parametrize("key", ["max_live", "max_live_per_project"])
def test_a_cap_on_live_holds_below_1_is_refused_naming_the_key(key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^reservations\.{key}: must be at least 1"):
        parse_config({"reservations": {key: 0}})
    assert (
        getattr(parse_config({}).reservations, key)
        == {
            "max_live": 20_000,
            "max_live_per_project": 2_000,
        }[key]
    )


FREE_IMAGES = parse_config(
    {
        "budgets": [{"name": "team", "project": "p", "period": "monthly", "limit_credits": 100}],
        "pricing": {"rules": [{"kind": "image", "credits": 0}]},
    }
)


def test_an_ask_no_budget_matches_that_costs_nothing_holds_nothing(tmp_path: Path) -> None:
    """Answered as granted, but neither kept, journalled nor counted against any cap:
    20,000 of them took every budgeted hold's room for a day."""
    held = Reservations(HoldJournal(tmp_path / "r"), Clock())
    ledger = Ledger(FREE_IMAGES)
    free = Ask(Request(kind="image"), 3, "unbudgeted", None)
    terms = Terms(max_live=2, max_live_per_project=1)
    for i in range(5):
        asked = held.reserve(view(ledger), free, f"free-{i}", 60, fingerprint({"i": i}), terms)
        status, answer = asyncio.run(asked)
        assert status == 201 and answer["id"] == f"free-{i}" and answer["credits"] == 0
        assert answer["budgets"] == []
    assert held.holds == {} and held.projects == {}
    assert held.outcomes["granted"] == 5
    assert HoldJournal(tmp_path / "r").load() == []
    # A budget's free ask, or an unbudgeted one that costs something, is still held.
    budgeted = Ask(Request(kind="image"), 1, "p", None)
    priced = Ask(Request("kling-v2-6", "standard", 5), 1, "unbudgeted", None)
    for rid, ask in (("budgeted", budgeted), ("priced", priced)):
        asked = held.reserve(view(ledger), ask, rid, 60, fingerprint({"r": rid}), terms)
        assert asyncio.run(asked)[0] == 201
    assert sorted(held.holds) == ["budgeted", "priced"]


# An operation on reservations: ("grant", id, ttl, project), ("tell", id, tasks),
# ("release", id, owner), ("wait", seconds) or ("sweep",).
IDS = st.sampled_from([f"r{i}" for i in range(8)])
OPERATIONS = st.lists(
    st.one_of(
        st.tuples(
            st.just("grant"),
            IDS,
            st.sampled_from([60, 3600, TOLD_FOR]),
            st.sampled_from(["p", "q"]),
        ),
        st.tuples(st.just("tell"), IDS, st.integers(0, 3)),
        st.tuples(st.just("release"), IDS, st.sampled_from([API, None])),
        st.tuples(st.just("wait"), st.sampled_from([1, 600, 3600, TOLD_FOR / 2, TOLD_FOR + 1])),
        st.tuples(st.just("sweep")),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(OPERATIONS)
def test_the_tables_kept_beside_the_holds_always_equal_a_full_rebuild(
    operations: list[tuple[Any, ...]],
) -> None:
    """What the holds keep by pair, how many each project has, the counts the reader
    told and the ids ended are kept up to date as holds are granted, consumed, released
    and expire, and equal, after any sequence, what a rebuild from scratch gives: the
    rebuild of the counts told being what every call of ``consumed`` once did."""
    clock = Clock()
    held = Reservations(None, clock)
    ledger = Ledger(CONFIG)
    counts: dict[str, int] = {}
    told: dict[str, tuple[int, float]] = {}
    ended: dict[str, float] = {}
    for op in operations:
        before = dict(held.holds)
        if op[0] == "grant":
            _, rid, ttl, project = op
            ask = Ask(Request(kind="image"), 2, project, None)
            terms = Terms(owner=GATEWAY if rid in ("r0", "r1") else API)
            asyncio.run(held.reserve(view(ledger), ask, rid, ttl, fingerprint({}), terms))
        elif op[0] == "tell":
            _, rid, tasks = op
            counts[rid] = counts.get(rid, 0) + tasks
            held.consumed({rid: counts[rid]})
            now = clock()
            told[rid] = (counts[rid], now)
            told = {r: v for r, v in told.items() if v[1] > now - TOLD_FOR or r in held.holds}
            assert {**held.told, **held._told_kept} == told
        elif op[0] == "release":
            asyncio.run(held.release(op[1], op[2]))
        elif op[0] == "wait":
            clock.now += op[1]
        else:
            held.sweep()
        for rid in before.keys() - held.holds.keys():
            ended[rid] = before[rid].expires_at

        rebuilt = Reservations(None, clock)
        rebuilt.holds = held.holds
        rebuilt._rebuild()
        assert held.held.by_pair.keys() == rebuilt.held.by_pair.keys()
        for pair, (credits, usd) in rebuilt.held.by_pair.items():
            assert held.held.by_pair[pair] == pytest.approx([credits, usd], abs=1e-9)
        assert held._pairs == rebuilt._pairs and held.projects == rebuilt.projects
        assert held._ids == sorted(r for r, h in held.holds.items() if h.owner == API)
        assert held._told_kept.keys() <= held.holds.keys() - held.told.keys()
        if op[0] in ("grant", "release", "sweep"):  # those sweep first
            assert held.ended == {r: until for r, until in ended.items() if until > clock()}
