"""Reservations: pre-flight answers that hold when many workers ask at once.

A check answers a question; a reservation holds what it was granted. Granting is one
step on the event loop (check every matching budget against used + in flight + live
holds, then hold), so two workers can never both take the last credits. A hold is
written to the journal and fsynced before its answer is sent (grants that arrive
together share one fsync), so a restart, ``kill -9`` included, neither loses nor
repeats one. The gateway's holds are written as they are granted and not fsynced
(``Terms``): its task line is what is fsynced before its producer is answered.

A hold shrinks by one task for every ``task_submitted`` line that names it: the
reader counts those per reservation id (absolute counts, part of its own saved state)
and this side takes what it is told, so a line read twice after a restart is still one
task. What is left of a hold is released by DELETE or at its expiry.

A hold has an owner: the budget API's are listed and released through it; the
gateway's are its own (they stand for creates waiting on Kling), and the API neither
lists nor releases them. Every table kept beside the holds (what they keep by pair,
their number per project, the counts told, the ids ended) is kept up to date as holds
come and go, so that no call costs more than what it changes.

One job, and long for it: the live holds and the tables kept beside them. Each method
changes the holds or reads them within the one step of the event loop that makes a
grant atomic, so the tables are never seen half updated; their journal is
``journals.holds``.
"""

from __future__ import annotations

import asyncio
import bisect
import datetime as dt
import hashlib
import heapq
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec

from kling_exporter.budgets import (
    ALONE,
    Ask,
    BudgetStatus,
    CheckResult,
    DayUsage,
    Reserved,
    Share,
    sum_into,
)
from kling_exporter.events import MAX_ID
from kling_exporter.journals.holds import (
    API,
    GATEWAY,
    Ended,
    Granted,
    Hold,
    HoldJournal,
    Record,
    log_unwritten,
    unwritten,
)
from kling_exporter.views import View
from kling_exporter.wording import amount_for_people

if TYPE_CHECKING:
    from kling_exporter.config import ReservationsConfig

log = logging.getLogger(__name__)

DEFAULT_TTL = 900.0
MAX_TTL = 86400.0
OUTCOMES = ("granted", "refused", "released", "expired", "consumed", "unknown")
# The journal is rewritten with the live holds alone once it has this many records more.
COMPACT_AFTER = 10_000
# Rows of a listing made between two turns of the event loop (about a millisecond).
PAGE_SLICE = 250
# How long the reader's count for a reservation id is remembered after it was told
# (longer while its hold is live): holds last a day at most.
TOLD_FOR = 86400.0


# A fleet's decision on (ask, id, ttl), made on a view it reads itself once its turn
# has come: the check's result, or why the id is taken.
Decide = Callable[[Ask, str | None, float], Awaitable[CheckResult | str]]


class Terms(NamedTuple):
    """How a reservation is granted. ``decide`` (a fleet's) answers in place of this
    exporter's own check; it is called under ``Reservations.deciding``, held until the
    hold is counted here. Past ``max_live`` live holds in all, or
    ``max_live_per_project`` of the ask's project, a new one is 429. A grant is on disk
    before it is answered, unless ``durable`` is False: then its record is written at
    once without an fsync (queued behind writes under way, if any) and nobody waits for
    it: the gateway's case, which makes its own task line durable before anyone is told
    of the task. The hold is ``owner``'s: only its owner releases it."""

    decide: Decide | None = None
    max_live: int = 20_000
    durable: bool = True
    owner: str = API
    max_live_per_project: int = 2_000

    @classmethod
    def for_api(cls, settings: ReservationsConfig, decide: Decide | None = None) -> Terms:
        """The budget API's: on disk before the answer, listed and released by it."""
        return cls(decide, settings.max_live, True, API, settings.max_live_per_project)

    @classmethod
    def for_gateway(cls, settings: ReservationsConfig, decide: Decide | None = None) -> Terms:
        """The gateway's: not waited for (its task line is), and its own: the budget
        API can neither list nor release them while their creates wait on Kling."""
        return cls(decide, settings.max_live, False, GATEWAY, settings.max_live_per_project)


OWN = Terms()  # this exporter decides alone, and every grant is on disk first


def rfc3339(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat().replace("+00:00", "Z")


def valid_id(value: str) -> bool:
    return 0 < len(value) <= MAX_ID and all("\x21" <= c <= "\x7e" for c in value)


class Reservations:
    """Live holds, the journal that keeps them, and the pre-flight answers that count
    them. Used on the event loop only."""

    def __init__(self, journal: HoldJournal | None = None, clock: Callable[[], float] = time.time):
        self.journal = journal
        self.clock = clock
        self.holds: dict[str, Hold] = {}
        # The ids of the API's holds in self.holds in order, for paged listing.
        self._ids: list[str] = []
        self._expiry: list[tuple[float, str]] = []  # a heap of (expires_at, id)
        self.ended: dict[str, float] = {}  # id -> until when it may not be used again
        self._ended_expiry: list[tuple[float, str]] = []  # a heap of (until, id)
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        self.held = DayUsage()  # what the live holds keep, by (project, user)
        self._pairs: dict[tuple[str, str | None], int] = {}  # live holds of each pair
        self.projects: dict[str, int] = {}  # live holds of each project
        # Tasks the reader counted per reservation id, as it last said, and when, in
        # the order told (oldest first); kept for TOLD_FOR, and longer while the id's
        # hold is live (then in ``_told_kept``, until it ends), so that a count told
        # again is not counted again.
        self.told: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._told_kept: dict[str, tuple[int, float]] = {}
        self.deciding = asyncio.Lock()  # a fleet's decisions, one at a time
        self._compaction: asyncio.Task[None] | None = None
        if journal is not None:
            self._restore(journal)

    # -- the journal ---------------------------------------------------------------

    def _restore(self, journal: HoldJournal) -> None:
        now = self.clock()
        for record in journal.load():
            if isinstance(record, Granted):
                self.holds[record.hold.id] = record.hold
            else:
                self.holds.pop(record.id, None)
                self.ended[record.id] = record.expires_at
        for rid, hold in list(self.holds.items()):
            if hold.expires_at <= now:
                del self.holds[rid]
                self.ended[rid] = hold.expires_at
        self.ended = {rid: until for rid, until in self.ended.items() if until > now}
        journal.rewrite(self._live_records())
        self._expiry = [(h.expires_at, h.id) for h in self.holds.values()]
        heapq.heapify(self._expiry)
        self._ended_expiry = [(until, rid) for rid, until in self.ended.items()]
        heapq.heapify(self._ended_expiry)
        self._ids = sorted(rid for rid, h in self.holds.items() if h.owner == API)
        self._rebuild()
        if self.holds:
            log.info("reservations restored", extra={"live": len(self.holds)})

    async def close(self) -> None:
        """Finish the compaction and the writes under way, then close the journal."""
        if self.journal is None:
            return
        if self._compaction is not None:
            await self._compaction
        await self.journal.settle()
        self.journal.close()

    async def sync(self) -> None:
        """Return once every grant so far is on disk, those made without waiting for it
        too (a failure is logged)."""
        if self.journal is not None:
            try:
                await self.journal.sync()
            except OSError as e:
                unwritten(e)

    def _live_records(self) -> list[Record]:
        return [Granted(h) for h in self.holds.values()] + [
            Ended(rid, until) for rid, until in self.ended.items()
        ]

    async def _record(self, record: Record) -> None:
        """Return once ``record`` is on disk; raises OSError if it cannot be."""
        if self.journal is None:
            return
        written = self.journal.append(record)
        self._compact_when_due(self.journal)
        await written

    def _record_later(self, record: Record) -> None:
        """Write ``record`` without waiting for an fsync (``HoldJournal.append_now``);
        a failure is logged, and the hold counts until a restart."""
        if self.journal is None:
            return
        try:
            written = self.journal.append_now(record)
        except OSError as e:
            unwritten(e)
        else:
            if written is not None:
                written.add_done_callback(log_unwritten)
        self._compact_when_due(self.journal)

    def _compact_when_due(self, journal: HoldJournal) -> None:
        """Rewrite the journal once it holds far more records than the live holds need,
        in a task of its own: the request whose record crossed the line does not wait
        for the rewrite (it used to, for tens of milliseconds past everyone's p99)."""
        due = COMPACT_AFTER + 2 * len(self.holds) + len(self.ended)
        if journal.records > due and self._compaction is None:
            self._compaction = asyncio.ensure_future(self._compact(journal))

    async def _compact(self, journal: HoldJournal) -> None:
        try:
            await journal.compact(self._live_records)
        except OSError as e:
            log.error("cannot compact the reservation journal", extra={"err": str(e)})
        finally:
            self._compaction = None

    def _rebuild(self) -> None:
        """What the live holds keep, by (project, user), and how many each project has,
        from the holds themselves."""
        self.held = DayUsage()
        self._pairs = {}
        self.projects = {}
        for h in self.holds.values():
            self._change(h, h.left, 1)

    def _change(self, h: Hold, tasks: int, holds: int = 0) -> None:
        """``tasks`` of hold ``h`` were held (or, below 0, no longer are); ``holds`` says
        whether the hold itself came or went. A pair without holds is exactly 0."""
        pair = (h.project, h.user)
        left = self._pairs.get(pair, 0) + holds
        table = self.held
        if left > 0:
            self._pairs[pair] = left
            sum_into(table.by_pair, pair, tasks * h.credits, tasks * h.usd)
        else:
            self._pairs.pop(pair, None)
            table.by_pair.pop(pair, None)
        table.version += 1
        if holds:
            mine = self.projects.get(h.project, 0) + holds
            if mine > 0:
                self.projects[h.project] = mine
            else:
                self.projects.pop(h.project, None)

    def _end(self, rid: str, until: float) -> None:
        """The id may not be used again before ``until``."""
        self.ended[rid] = until
        heapq.heappush(self._ended_expiry, (until, rid))

    # -- what time and the reader change -------------------------------------------

    def sweep(self) -> None:
        """Release what is left of holds past their expiry."""
        now = self.clock()
        expired = []
        while self._expiry and self._expiry[0][0] <= now:
            _, rid = heapq.heappop(self._expiry)
            hold = self.holds.get(rid)
            if hold is not None and hold.expires_at <= now:
                expired.append(hold)
        for h in expired:
            self._drop(h.id)
            self._change(h, -h.left, -1)
            self._end(h.id, h.expires_at)
            self.outcomes["expired"] += 1
            # Not journalled: a restart finds the expiry in the grant.
        ends = self._ended_expiry
        while ends and ends[0][0] <= now:
            until, rid = heapq.heappop(ends)
            if self.ended.get(rid) == until:  # (not ended again since, for longer)
                del self.ended[rid]

    def consumed(self, counts: Mapping[str, int], baseline: bool = False) -> None:
        """The reader's counts of tasks submitted per reservation id (absolute, so a
        count told again changes nothing). A hold takes what is new, up to what it has
        left; the rest named no live reservation (``unknown``). With ``baseline`` (the
        reader's first word after a start) counts of ids without a live hold are taken
        as known already. Costs what it is told: the counts past TOLD_FOR are
        forgotten oldest first (``_forget_told``)."""
        now = self.clock()
        told = self.told
        for rid, count in counts.items():
            last = told.get(rid)
            if last is None:
                last = self._told_kept.pop(rid, (0, 0.0))
            else:
                told.move_to_end(rid)
            told[rid] = (count, now)
            new = max(count - last[0], 0)
            hold = self.holds.get(rid)
            if hold is None:
                if not baseline:
                    self.outcomes["unknown"] += new
                continue
            take = min(new, hold.left)
            self._change(hold, -take)
            hold.used += take
            self.outcomes["consumed"] += take
            self.outcomes["unknown"] += new - take
            if hold.left == 0:
                self._drop(rid)
                self._change(hold, 0, -1)
                self._end(rid, hold.expires_at)
        self._forget_told(now - TOLD_FOR)

    def _forget_told(self, cutoff: float) -> None:
        """Forget the counts told at ``cutoff`` or before, but those of live holds (kept
        until the hold ends: ``_drop`` puts them first in line again). The same as
        keeping ``{r: v for r, v in told.items() if v[1] > cutoff or r in self.holds}``
        at the cost of what is forgotten: that rebuild, made on every call once 100,000
        ids were told, took a median 65 ms a call at 300,000 ids told in a day
        (bench/reservations.py), and every request waited meanwhile."""
        told, holds = self.told, self.holds
        while told:
            rid = next(iter(told))
            last = told[rid]
            if last[1] > cutoff:
                break
            del told[rid]
            if rid in holds:
                self._told_kept[rid] = last

    # -- answers -------------------------------------------------------------------

    def check(self, view: View, ask: Ask, elsewhere: Mapping[str, Share] = ALONE) -> CheckResult:
        """A pre-flight answer that counts the live holds (and, in a fleet, what the
        other exporters say)."""
        self.sweep()
        return view.budgets.check(view.usage, ask, self.clock(), view.flight, self.held, elsewhere)

    def statuses(self, view: View, elsewhere: Mapping[str, Share] = ALONE) -> list[BudgetStatus]:
        self.sweep()
        return view.budgets.statuses(view.usage, self.clock(), view.flight, self.held, elsewhere)

    def reserved(self, view: View) -> list[Reserved]:
        """What the live holds hold of each budget (the HTTP process's families)."""
        self.sweep()
        return view.budgets.reserved(self.held)

    def max_expiry(self) -> float:
        """When the last live hold expires (0 with none)."""
        return max((h.expires_at for h in self.holds.values()), default=0.0)

    async def reserve(
        self,
        view: View,
        ask: Ask,
        rid: str | None,
        ttl: float,
        fingerprint: str,
        terms: Terms = OWN,
    ) -> tuple[int, dict[str, Any]]:
        """Grant (201) or refuse (200) atomically; the same id and body again is the
        same reservation (200), another body under a used id is 409. See ``Terms``
        for who decides, the 429 past ``max_live`` and when a grant is on disk."""
        decide, durable = terms.decide, terms.durable
        self.sweep()
        known = self._known(rid, fingerprint, terms.owner)
        if known is not None:
            return known
        full = self._full(ask.project, terms)
        if full is not None:
            return full
        if decide is None:
            result = self.check(view, ask)
            hold = self._hold(ask, rid, ttl, fingerprint, result, terms.owner)
        else:
            async with self.deciding:
                known = self._known(rid, fingerprint, terms.owner)  # asked twice at once
                if known is not None:
                    return known
                full = self._full(ask.project, terms)
                if full is not None:
                    return full
                decided = await decide(ask, rid, ttl)
                if isinstance(decided, str):
                    return 409, _conflict(rid or "", decided)
                result = decided
                hold = self._hold(ask, rid, ttl, fingerprint, result, terms.owner)
        if hold is None:
            return 200, msgspec.to_builtins(result)
        if self.holds.get(hold.id) is not hold:  # nothing to hold: not kept nor journalled
            self.outcomes["granted"] += 1
            return 201, {**self._granted(hold), "reason": result.reason}
        try:
            if durable:
                await self._record(Granted(hold))
            else:
                self._record_later(Granted(hold))
        except OSError as e:
            if self.holds.get(hold.id) is hold:
                self._drop(hold.id)
                self._change(hold, -hold.left, -1)
            log.error("cannot write the reservation journal", extra={"err": e.strerror})
            raise
        self.outcomes["granted"] += 1
        answer = self._granted(hold)
        answer["reason"] = result.reason
        return 201, answer

    def _full(self, project: str, terms: Terms) -> tuple[int, dict[str, Any]] | None:
        """The 429 for a new hold past ``max_live`` or ``max_live_per_project``, or None."""
        if len(self.holds) >= terms.max_live:
            return 429, {
                "error": f"reservations.max_live: {terms.max_live} holds are live already; "
                "release some, let them expire, or raise the setting",
                "field": "reservations.max_live",
            }
        cap = terms.max_live_per_project
        if self.projects.get(project, 0) >= cap:
            return 429, {
                "error": f"reservations.max_live_per_project: {cap} holds are live already "
                "for this project; release some, let them expire, or raise the setting",
                "field": "reservations.max_live_per_project",
            }
        return None

    def _known(
        self, rid: str | None, fingerprint: str, owner: str
    ) -> tuple[int, dict[str, Any]] | None:
        """The answer for an id already used, or None. Another owner's hold is answered
        as one for another request: nothing of it is told."""
        if rid is None:
            return None
        hold = self.holds.get(rid)
        if hold is not None:
            if hold.fingerprint != fingerprint or hold.owner != owner:
                return 409, _conflict(rid, "is held for another request")
            return 200, self._granted(hold)
        if rid in self.ended:
            return 409, _conflict(rid, "has ended (released, expired or used up)")
        return None

    def _hold(
        self,
        ask: Ask,
        rid: str | None,
        ttl: float,
        fingerprint: str,
        result: CheckResult,
        owner: str,
    ) -> Hold | None:
        """The hold ``result`` allows, counted at once; None (a refusal, counted) else.
        An ask that no budget matches and that costs nothing holds nothing: its hold is
        answered but not kept (it could never count against any budget, and thousands
        of them took the room of every hold that could)."""
        if not result.allowed:
            self.outcomes["refused"] += 1
            return None
        now = self.clock()
        hold = Hold(
            id=rid or str(uuid.uuid4()),
            fingerprint=fingerprint,
            project=ask.project,
            user=ask.user,
            count=ask.tasks,
            credits=result.credits_needed / ask.tasks,
            usd=result.usd_needed / ask.tasks,
            budgets=tuple(b.name for b in result.budgets),
            expires_at=now + ttl,
            owner=owner,
        )
        if not hold.budgets and result.credits_needed == 0 and result.usd_needed == 0:
            return hold
        self.holds[hold.id] = hold
        if owner == API:
            bisect.insort(self._ids, hold.id)
        heapq.heappush(self._expiry, (hold.expires_at, hold.id))
        self._change(hold, hold.left, 1)
        return hold

    def _granted(self, hold: Hold) -> dict[str, Any]:
        return {
            "allowed": True,
            "id": hold.id,
            "expires_at": rfc3339(hold.expires_at),
            "credits": hold.credits * hold.count,
            "usd": hold.usd * hold.count,
            "count": hold.count,
            "count_left": hold.left,
            "budgets": list(hold.budgets),
        }

    async def release(self, rid: str, owner: str | None = None) -> bool:
        """Release what is left; False when no such hold is live, or it is not
        ``owner``'s (None: whoever's; the gateway releases its own by the id only it
        knows, the budget API passes API)."""
        self.sweep()
        hold = self.holds.get(rid)
        if hold is None or (owner is not None and hold.owner != owner):
            return False
        self._drop(rid)
        self._change(hold, -hold.left, -1)
        self._end(rid, hold.expires_at)
        try:
            await self._record(Ended(rid, hold.expires_at))
        except OSError:
            log.error("cannot write the reservation journal; the release holds until restart")
        self.outcomes["released"] += 1
        return True

    def _drop(self, rid: str) -> None:
        del self.holds[rid]
        i = bisect.bisect_left(self._ids, rid)
        if i < len(self._ids) and self._ids[i] == rid:
            del self._ids[i]
        last = self._told_kept.pop(rid, None)
        if last is not None:  # kept for the hold alone: forgotten at the next call,
            self.told[rid] = last  # unless held again by then
            self.told.move_to_end(rid, last=False)

    async def page(self, after: str | None, limit: int) -> tuple[bytes, str | None]:
        """The API's live holds (the gateway's are its own, not listed) in order of id,
        the first ``limit`` after ``after``, as a JSON
        array, and the id to ask after for the next page (None on the last). Rows are
        encoded a slice at a time with the loop free between slices, so a long page
        delays no other request by more than a slice's worth (about a millisecond)."""
        self.sweep()
        start = 0 if after is None else bisect.bisect_right(self._ids, after)
        ids = self._ids[start : start + limit]
        more = start + limit < len(self._ids)
        parts: list[bytes] = []
        for i in range(0, len(ids), PAGE_SLICE):
            if i:
                await asyncio.sleep(0)
            rows = [_listed(h) for rid in ids[i : i + PAGE_SLICE] if (h := self.holds.get(rid))]
            if rows:  # (a hold may be released meanwhile)
                parts.append(_encode_rows(rows)[1:-1])
        return b"[" + b",".join(parts) + b"]", (ids[-1] if more and ids else None)


class Listed(msgspec.Struct, gc=False):
    """A live hold as ``GET /api/v1/reservations`` lists it."""

    id: str
    count: int
    count_left: int
    credits_left: float
    usd_left: float
    budgets: tuple[str, ...]
    expires_at: str


_encode_rows = msgspec.json.Encoder().encode


def _listed(h: Hold) -> Listed:
    left = h.left
    return Listed(
        h.id,
        h.count,
        left,
        amount_for_people("credits_left", left * h.credits),
        amount_for_people("usd_left", left * h.usd),
        h.budgets,
        rfc3339(h.expires_at),
    )


def _conflict(rid: str, what: str) -> dict[str, Any]:
    return {"error": f"id: reservation {rid!r} {what}", "field": "id"}


def fingerprint(body: Mapping[str, Any]) -> str:
    """The request a reservation was made for, without its id."""
    canonical = msgspec.json.encode({k: v for k, v in sorted(body.items()) if k != "id"})
    return hashlib.sha256(canonical).hexdigest()
