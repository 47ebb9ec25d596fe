"""The accounting core: events in, counters and budget usage out.

Plain Python with no I/O and no clock of its own: every call that needs the
time is given it. The whole state can be exported with ``to_state`` and
rebuilt with ``from_state``, so the daemon can save it beside file offsets.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from sys import intern
from typing import Any

from kling_exporter.budgets import Budgets, BudgetStatus, CheckResult, DayUsage
from kling_exporter.config import Config
from kling_exporter.counters import (
    CREDITS,
    EXPIRED,
    IN_FLIGHT,
    MODE_SLOT,
    OTHER,
    STATUS_SLOT,
    SUCCEEDED,
    TOUCHED,
    USD,
    VIDEO_SECONDS,
    Counters,
    Histogram,
    LabelLimiter,
    Route,
)
from kling_exporter.events import (
    COMPLETED,
    ERROR,
    SUBMITTED,
    UNKNOWN_ERROR,
    UNKNOWN_MODEL,
    Event,
)
from kling_exporter.model import ReadStats, Record, Snapshot, Task
from kling_exporter.periods import PeriodClock, period_bounds
from kling_exporter.pricing import DEFAULT_DURATION, DEFAULT_KIND, DEFAULT_MODE, Request
from kling_exporter.state import LedgerState, ledger_state, restore

# Task flags.
_SUB = 1
_DONE = 2
_ERR = 4
_FINISHED = _DONE | _ERR

# What reservations used is kept this long after their last task (a reservation lives a
# day at most).
CONSUMED_KEPT = 2 * 86400.0
# 2000-01-01T00:00:00Z: an earlier event time is a broken clock (Kling did not exist).
OLDEST_TS = 946684800.0
# How an implausible event time was replaced by the time of reading.
CLAMP_REASONS = ("ahead", "too_old")


Observer = Callable[[Record], None]


def _record(event: str, task_id: str, t: Task, ts: float, **more: Any) -> Record:
    return Record(
        event, ts, task_id, t.project, t.user, t.model, t.mode, t.duration, t.audio, t.kind, **more
    )


def _flags(known: Task | int) -> int:
    return known.flags if isinstance(known, Task) else known


class Ledger(Counters):
    """Counters live in small lists per label pair (``series``) and per project
    (``projects``), reached through ``_route`` in one lookup per event; the dict views
    (``submitted``, ``completed``, ...) are built from them when asked."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self._routes: dict[tuple[str, str], Route] = {}
        self.duplicates = 0
        self.last_event_ts = 0.0
        self.clamped: dict[str, int] = dict.fromkeys(CLAMP_REASONS, 0)
        # Terminal events read before their submission: task_id -> (event, event time,
        # time of reading), in the order read. They wait ``orphan_wait`` of reading time.
        self.waiting: dict[str, tuple[Event, float, float]] = {}
        self.orphaned = 0
        # task_id -> Task while open, or its flags (a small int) once finished,
        # kept only to join late events and to drop repeats.
        self.tasks: dict[str, Task | int] = {}
        self._expiry: deque[tuple[float, str]] = deque()
        # Usage per local day (weeks and months are whole days, so they are sums of
        # these): day start -> (project, user) -> [credits, usd]
        self.usage: dict[float, DayUsage] = {}
        self._day: tuple[float, float, DayUsage] = (1.0, 0.0, DayUsage())
        # Tasks in flight (submitted, not finished) by (project, user): their estimated
        # credits and dollars, and how many (so a pair back at none is exactly 0).
        # (project, user) -> [tasks, credits]; ``flight`` shows it as budgets read usage.
        self.flight_tasks: dict[tuple[str, str | None], list[float]] = {}
        # Tasks submitted under each reservation id: id -> [tasks, newest event time].
        # Absolute counts, so whoever holds the reservations may read them any number
        # of times; ``consumed_changed`` names the ids changed since it last looked.
        self.consumed: dict[str, list[float]] = {}
        self.consumed_changed: set[str] = set()
        # Told of every counted event (reports); None in the daemon.
        self.observer: Observer | None = None
        self.configure(config)

    # -- configuration ---------------------------------------------------------------

    def configure(self, config: Config) -> None:
        """Apply a (new) config. Totals are kept; usage is per project and user, so a
        budget added or changed here is exact at once for the current period."""
        old = getattr(self, "config", None)
        if old is not None and old.timezone != config.timezone:
            raise ValueError("timezone: changing the time zone needs a restart")
        self.config = config
        self.budgets = Budgets(config)
        self.pricing = self.budgets.pricing
        if old is not None and old.pricing != config.pricing:
            self._estimate_flight()  # estimates of tasks in flight follow the new prices
        self.clock = PeriodClock(config.tz)
        self._forget_day()
        self.ttl = config.tasks.ttl_seconds
        self.max_tasks = config.tasks.max_tasks
        self.orphan_wait = config.tasks.orphan_wait_seconds
        self.max_ahead = config.logs.max_clock_ahead_seconds
        if old is None:
            self.project_labels = LabelLimiter(config.labels.max_projects)
            self.model_labels = LabelLimiter(config.labels.max_models)
            self.error_labels = LabelLimiter(config.labels.max_error_types)
        else:
            self.project_labels.limit = config.labels.max_projects
            self.model_labels.limit = config.labels.max_models
            self.error_labels.limit = config.labels.max_error_types

    # -- events ----------------------------------------------------------------------

    def apply(self, event: Event, now: float) -> None:
        """Account one valid event; ``now`` is the time of reading. It stands in for a
        missing timestamp and for an implausible one (more than ``max_clock_ahead`` in the
        future, or before 2000), so one producer's broken clock cannot move the time by
        which other producers' tasks expire or are placed in periods."""
        ts = event.ts
        if ts is None:
            ts = now
        elif ts > now + self.max_ahead:
            ts = now
            self.clamped["ahead"] += 1
        elif ts < OLDEST_TS:
            ts = now
            self.clamped["too_old"] += 1
        if ts > self.last_event_ts:
            self.last_event_ts = ts
        kind = event.type
        task_id: str = event.task_id  # type: ignore[assignment]  # decode_line made it a str
        if kind == SUBMITTED:
            self._submitted(event, task_id, ts)
        elif kind == COMPLETED:
            self._finished(event, task_id, ts, _DONE, now)
        elif kind == ERROR:
            if task_id is None:
                self._error_without_task(event, ts)
            else:
                self._finished(event, task_id, ts, _ERR, now)
        else:
            self._usage_line(event, task_id, ts)

    def _error_without_task(self, e: Event, ts: float) -> None:
        """A task_error with ``"task_id": null``: the submission itself failed (rate
        limit, auth) before there was a task. Counted under its own project and error
        type; there is nothing to join or to deduplicate."""
        task = self._new_task(e, ts, 0)
        counts, _, project, _ = self._route(task.project, task.model)
        error = self.error_labels.get(e.error_type or UNKNOWN_ERROR)
        self.errors[(project, error)] = self.errors.get((project, error), 0) + 1
        credits = e.credits_used or 0.0
        if credits:
            self._charge(counts, task.project, task.user, ts, credits)
        if self.observer is not None:
            usd = credits * self.pricing.usd_per_credit
            self.observer(
                _record("error", "", task, ts, error_type=error, credits=credits, usd=usd)
            )

    def _new_task(self, e: Event, ts: float, flags: int) -> Task:
        # Interned: each decoded line brings its own copies of the same few names, and
        # the index holds a task for a day.
        user = e.user
        return Task(
            intern(e.project),  # type: ignore[arg-type]  # decode_line set it
            None if user is None else intern(user),  # type: ignore[arg-type]
            intern(e.model or UNKNOWN_MODEL),
            e.mode or DEFAULT_MODE,
            e.duration if e.duration is not None else DEFAULT_DURATION,
            bool(e.audio),
            intern(e.kind or DEFAULT_KIND),
            ts,
            flags,
        )

    def _remember(self, task_id: str, value: Task | int, ts: float) -> None:
        self.tasks[task_id] = value
        self._expiry.append((ts, task_id))

    def _route(self, project: str, model: str, count: bool = True) -> Route:
        """The accumulators and labels of a task's real project and model."""
        route = self._routes.get((project, model))
        if route is not None:
            return route
        plabel = self.project_labels.get(project, count)
        mlabel = self.model_labels.get(model, count)
        counts = self.series_of(plabel, mlabel)
        project_counts = self.projects.get(plabel)
        if project_counts is None:
            project_counts = self.projects[plabel] = [0, 0, 0]
        route = (counts, project_counts, plabel, mlabel)
        # A folded pair is looked up every time, so each event counts its fold.
        if OTHER not in (plabel, mlabel) and len(self._routes) < 100_000:
            self._routes[(project, model)] = route
        return route

    def _count_submission(self, t: Task) -> Route:
        route = self._route(t.project, t.model)
        route[0][MODE_SLOT[t.mode]] += 1
        return route

    def _submitted(self, e: Event, task_id: str, ts: float) -> None:
        tasks = self.tasks
        known = tasks.get(task_id)
        task = self._new_task(e, ts, _SUB)
        if known is not None:
            flags = _flags(known)
            if flags & _SUB:
                self.duplicates += 1
                return
            # The task finished before its submission was read: count it, not in flight.
            self._count_submission(task)
            tasks[task_id] = flags | _SUB
        else:  # the common case, inlined: it runs for every submission
            key = (task.project, task.model)
            counts, project_counts, _, _ = self._routes.get(key) or self._route(*key)
            counts[MODE_SLOT[task.mode]] += 1
            project_counts[IN_FLIGHT] += 1
            project_counts[TOUCHED] = 1
            tasks[task_id] = task
            self._expiry.append((ts, task_id))
            # In flight: _fly(task, 1), inlined.
            price = self.pricing.cache.get(
                (task.model, task.mode, task.duration, task.audio, task.kind)
            )
            if price is None:
                price = self._estimate(task)
            pair = (task.project, task.user)
            flying = self.flight_tasks.get(pair)
            if flying is None:
                self.flight_tasks[pair] = [1, price]
            else:
                flying[0] += 1
                flying[1] += price
        if e.reservation_id is not None:
            self._consume(str(e.reservation_id), ts)
        if self.observer is not None:
            self.observer(_record("submitted", task_id, task, ts))
        if self.waiting:
            parked = self.waiting.pop(task_id, None)
            if parked is not None:
                self._finish_parked(task_id, *parked, orphan=False)

    def _finish_parked(
        self, task_id: str, e: Event, ts: float, read_at: float, orphan: bool
    ) -> None:
        how = _DONE if e.type == COMPLETED else _ERR
        self._finished(e, task_id, ts, how, read_at, orphan=orphan)

    def _finished(
        self, e: Event, task_id: str, ts: float, how: int, now: float, orphan: bool = False
    ) -> None:
        """A completion or an error. One read before its submission waits (``waiting``)
        until the submission comes or ``orphan_wait`` of reading time has passed; then
        (``orphan``) it is counted with what the line itself says."""
        tasks = self.tasks
        known = tasks.get(task_id)
        if type(known) is Task:
            task, flags = known, known.flags
            key = (task.project, task.model)
            counts, project_counts, project, model = self._routes.get(key) or self._route(*key)
            if not flags & _FINISHED:
                project_counts[IN_FLIGHT] -= 1
                project_counts[TOUCHED] = 1
                # Out of flight: _fly(task, -1), inlined.
                price_key = (task.model, task.mode, task.duration, task.audio, task.kind)
                price = self.pricing.cache.get(price_key)
                if price is None:
                    price = self._estimate(task)
                pair = (task.project, task.user)
                flying = self.flight_tasks.get(pair)
                if flying is None:
                    pass  # cannot be: every open task entered flight
                elif flying[0] == 1:
                    del self.flight_tasks[pair]
                else:
                    flying[0] -= 1
                    flying[1] -= price
        else:
            flags = known or 0  # type: ignore[assignment]
            # The first terminal event wins; a later one, even of the other kind, repeats it.
            if flags & _FINISHED or (self.waiting and task_id in self.waiting):
                self.duplicates += 1
                return
            if not orphan and self.orphan_wait > 0 and not e.own_project:
                # Its submission may still come (another file, another host) and say
                # whose it is; a line that names its project is counted at once.
                self.waiting[task_id] = (e, ts, now)
                return
            self.orphaned += 1
            # No open submission: take what the line itself says.
            task = self._new_task(e, ts, 0)
            counts, _, project, model = self._route(task.project, task.model)
        if how == _DONE:
            status = e.status or "succeed"
            counts[STATUS_SLOT[status]] += 1
            credits = e.credits_used
            if credits is None:
                if status == "failed":
                    credits = 0.0
                else:
                    price_key = (task.model, task.mode, task.duration, task.audio, task.kind)
                    credits = self.pricing.cache.get(price_key)
                    if credits is None:
                        credits = self.pricing.credits(Request(*price_key))
            # Seconds of video made: succeeded videos whose length is known (from the
            # submission, or from the line itself), never a guessed default.
            if (
                status == "succeed"
                and task.kind == "video"
                and (type(known) is Task or e.duration is not None)
            ):
                counts[VIDEO_SECONDS] += task.duration
            if status == "succeed" and e.elapsed_sec is not None:
                hist = self.generation.get(model)
                if hist is None:
                    hist = self.generation[model] = Histogram()
                hist.observe(e.elapsed_sec)
        else:
            error = self.error_labels.get(e.error_type or UNKNOWN_ERROR)
            errors, ekey = self.errors, (project, error)
            errors[ekey] = errors.get(ekey, 0) + 1
            credits = e.credits_used or 0.0
        if credits:
            self._charge(counts, task.project, task.user, ts, credits)
        if known is None:
            self._remember(task_id, flags | how, ts)
        else:
            tasks[task_id] = flags | how
        if self.observer is not None:
            usd = credits * self.pricing.usd_per_credit
            if how == _DONE:
                rec = _record(
                    "completed",
                    task_id,
                    task,
                    ts,
                    status=status,
                    elapsed=e.elapsed_sec,
                    credits=credits,
                    usd=usd,
                )
            else:
                rec = _record(
                    "error",
                    task_id,
                    task,
                    ts,
                    error_type=e.error_type or UNKNOWN_ERROR,
                    credits=credits,
                    usd=usd,
                )
            self.observer(rec)

    def _usage_line(self, e: Event, task_id: str, ts: float) -> None:
        """A simple tracker's line: one submitted and succeeded task with its credits."""
        known = self.tasks.get(task_id)
        flags = 0 if known is None else _flags(known)
        if flags & _FINISHED or (self.waiting and task_id in self.waiting):
            self.duplicates += 1
            return
        task = known if isinstance(known, Task) else self._new_task(e, ts, 0)
        counted = not flags & _SUB
        if counted:
            counts, project_counts, _, _ = self._count_submission(task)
        else:
            counts, project_counts, _, _ = self._route(task.project, task.model)
            if not flags & _FINISHED:
                project_counts[IN_FLIGHT] -= 1
                project_counts[TOUCHED] = 1
                if type(known) is Task:
                    self._fly(known, -1)
        counts[SUCCEEDED] += 1
        # A usage line names no clip length unless it says so (or its submission did).
        if task.kind == "video" and (type(known) is Task or e.duration is not None):
            counts[VIDEO_SECONDS] += task.duration
        if e.credits:
            self._charge(counts, task.project, task.user, ts, e.credits)
        if known is None:
            self._remember(task_id, _SUB | _DONE, ts)
        else:
            self.tasks[task_id] = flags | _SUB | _DONE
        if self.observer is not None:
            if counted:
                self.observer(_record("submitted", task_id, task, ts))
            credits = e.credits or 0.0
            self.observer(
                _record(
                    "completed",
                    task_id,
                    task,
                    ts,
                    status="succeed",
                    elapsed=e.elapsed_sec,
                    credits=credits,
                    usd=credits * self.pricing.usd_per_credit,
                )
            )

    def _charge(
        self, counts: list[float], real_project: str, user: str | None, ts: float, credits: float
    ) -> None:
        usd = credits * self.pricing.usd_per_credit
        counts[CREDITS] += credits
        counts[USD] += usd
        lo, hi, bucket = self._day
        if not lo <= ts < hi:
            bucket = self._day_bucket(ts)
        pair = (real_project, user)  # DayUsage.add, inlined: it runs for every charge
        used = bucket.by_pair.get(pair)
        if used is None:
            bucket.by_pair[pair] = [credits, usd]
        else:
            used[0] += credits
            used[1] += usd
        bucket.version += 1

    def _fly(self, t: Task, sign: int) -> None:
        """A task enters (1) or leaves (-1) flight: its estimated price, by its pair.
        (Inlined where a submission is counted and where it finishes.)"""
        credits = self.pricing.cache.get((t.model, t.mode, t.duration, t.audio, t.kind))
        if credits is None:
            credits = self._estimate(t)
        pair = (t.project, t.user)
        counts = self.flight_tasks.get(pair)
        if counts is None:
            self.flight_tasks[pair] = [sign, sign * credits]
        elif counts[0] == -sign:  # none left: exactly 0, whatever rounding gathered
            del self.flight_tasks[pair]
        else:
            counts[0] += sign
            counts[1] += sign * credits

    def _estimate(self, t: Task) -> float:
        return self.pricing.credits(Request(t.model, t.mode, t.duration, t.audio, t.kind))

    @property
    def flight(self) -> DayUsage:
        """Credits and dollars of tasks in flight by (project, user), as budgets read."""
        rate = self.pricing.usd_per_credit
        return DayUsage({pair: [c, c * rate] for pair, (_, c) in self.flight_tasks.items()})

    def _estimate_flight(self) -> None:
        """Price every task in flight again (at start from a saved state, on new prices)."""
        self.flight_tasks.clear()
        for value in self.tasks.values():
            if type(value) is Task and value.flags == _SUB:
                self._fly(value, 1)

    def _consume(self, reservation_id: str, ts: float) -> None:
        used = self.consumed.get(reservation_id)
        if used is None:
            self.consumed[reservation_id] = [1, ts]
        else:
            used[0] += 1
            used[1] = max(used[1], ts)
        self.consumed_changed.add(reservation_id)

    def take_consumed(self, every: bool = False) -> dict[str, int]:
        """Tasks counted per reservation id: those changed since the last call, or
        ``every`` one (a first word after a start); either way, nothing is then changed."""
        used = self.consumed
        ids = used if every else self.consumed_changed
        counts = {rid: int(used[rid][0]) for rid in ids if rid in used}
        self.consumed_changed.clear()
        return counts

    def _day_bucket(self, ts: float) -> DayUsage:
        """The usage of the local day holding ``ts``, remembered for the next event."""
        lo, hi = self.clock.bounds("daily", ts)
        bucket = self.usage.get(lo)
        if bucket is None:
            bucket = self.usage[lo] = DayUsage()
        self._day = (lo, hi, bucket)
        return bucket

    # -- housekeeping ----------------------------------------------------------------

    def expire(self, now: float) -> int:
        """Count the terminal events that waited long enough for their submission, forget
        old tasks (``expire_tasks``) and usage of periods that have ended."""
        self.settle_waiting(now - self.orphan_wait)
        dropped = self.expire_tasks(now)
        self._prune_usage(now)
        self._prune_consumed(now)
        return dropped

    def _prune_consumed(self, now: float) -> None:
        """Forget what reservations used once none can be live (they last a day at most)."""
        cutoff = min(now, self.last_event_ts) - CONSUMED_KEPT
        stale = [rid for rid, (_, ts) in self.consumed.items() if ts < cutoff]
        for rid in stale:
            del self.consumed[rid]

    def settle_waiting(self, read_before: float = float("inf")) -> None:
        """Count as orphans the waiting terminal events read before ``read_before`` (all of
        them by default: the end of a one-off read of the logs)."""
        waiting = self.waiting
        while waiting:
            task_id = next(iter(waiting))
            e, ts, read_at = waiting[task_id]
            if read_at >= read_before and len(waiting) <= self.max_tasks:
                break
            del waiting[task_id]
            self._finish_parked(task_id, e, ts, read_at, orphan=True)

    def expire_tasks(self, now: float) -> int:
        """Forget tasks older than the TTL (by event time) or past the size cap.
        An unfinished task forgotten here leaves the in-flight gauge. The newest event
        time may not run ahead of the time of reading (a state saved by a version that
        let a broken clock move it is mended here)."""
        if self.last_event_ts > now + self.max_ahead:
            self.last_event_ts = now
        if len(self.waiting) > self.max_tasks:
            self.settle_waiting(float("-inf"))
        cutoff = max(self.last_event_ts, 0.0) - self.ttl
        expiry, tasks = self._expiry, self.tasks
        dropped = 0
        while expiry and (expiry[0][0] < cutoff or len(tasks) > self.max_tasks):
            ts, task_id = expiry.popleft()
            value = tasks.get(task_id)
            if value is None:
                continue
            if isinstance(value, Task):
                if value.ts != ts:
                    continue
                if value.flags == _SUB:
                    project_counts = self._route(value.project, value.model, count=False)[1]
                    project_counts[IN_FLIGHT] -= 1
                    project_counts[EXPIRED] += 1
                    project_counts[TOUCHED] = 1
                    self._fly(value, -1)
            del tasks[task_id]
            dropped += 1
        return dropped

    def _prune_usage(self, now: float) -> None:
        """Keep the days of the current week and month; earlier ones no budget reads."""
        tz = self.clock.tz
        keep_from = min(period_bounds(k, now, tz)[0] for k in ("weekly", "monthly"))
        stale = [day for day in self.usage if day < keep_from]
        for day in stale:
            del self.usage[day]
        if stale:
            self._forget_day()

    def _forget_day(self) -> None:
        self._day = (1.0, 0.0, DayUsage())

    # -- reading ---------------------------------------------------------------------

    def budget_statuses(self, now: float) -> list[BudgetStatus]:
        return self.budgets.statuses(self.usage, now, self.flight)

    def check(
        self, req: Request, count: int, project: str, user: str | None, now: float
    ) -> CheckResult:
        """May ``count`` tasks like ``req`` be generated for this project and user now?
        Counts tasks in flight too (reservations are the HTTP side's: see
        ``kling_exporter.reservations``)."""
        return self.budgets.check(self.usage, req, count, project, user, now, self.flight)

    def snapshot(self, now: float, reading: ReadStats | None = None) -> Snapshot:
        """Everything a scrape shows of the ledger, with the reader's counts."""
        reading = reading or ReadStats()
        return Snapshot(
            lines_read=reading.lines,
            bytes_read=reading.bytes,
            invalid=reading.invalid.copy(),
            submitted=self.submitted,
            completed=self.completed,
            errors=self.errors.copy(),
            credits=self.credits,
            usd=self.usd,
            video_seconds=self.video_seconds,
            generation={m: (h.cumulative(), h.sum) for m, h in self.generation.items()},
            in_flight=self.in_flight,
            expired=self.expired,
            budgets=self.budget_statuses(now),
            duplicates=self.duplicates,
            last_event_ts=self.last_event_ts,
            label_overflow={
                "project": self.project_labels.overflow,
                "model": self.model_labels.overflow,
                "error_type": self.error_labels.overflow,
            },
            tasks_tracked=len(self.tasks),
            timestamps_clamped=self.clamped.copy(),
            awaiting_submission=len(self.waiting),
            orphaned=self.orphaned,
        )

    # -- persistence -----------------------------------------------------------------

    def to_state(self) -> LedgerState:
        """The whole ledger as data msgspec encodes (``state.ledger_state``)."""
        return ledger_state(self)

    @classmethod
    def from_state(cls, config: Config, saved: LedgerState | Any) -> Ledger:
        """Rebuild a ledger saved by ``to_state`` (or its decoded data); raises ValueError,
        naming what does not fit, if it does not."""
        led = cls(config)
        restore(led, saved)
        return led
