"""The ledger's books: what it keeps between events (the task index and its expiry,
terminal events waiting for their submission, daily usage, tasks in flight, what
reservations used, label limits) and the small steps its event handlers are made of.
``Ledger`` extends it with the handlers themselves.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from sys import intern
from typing import Any

from kling_exporter.accounting.counters import (
    CREDITS,
    MODE_SLOT,
    OTHER,
    USD,
    Counters,
    LabelLimiter,
    Route,
    project_slots,
)
from kling_exporter.accounting.evicted import Evicted
from kling_exporter.budgets import Budgets, BudgetStatus, DayUsage
from kling_exporter.config import Config
from kling_exporter.events import UNKNOWN_MODEL, Event
from kling_exporter.model import Record, Task
from kling_exporter.periods import PERIOD_KINDS, PeriodClock, period_bounds
from kling_exporter.pricing import DEFAULT_DURATION, DEFAULT_KIND, DEFAULT_MODE, Request

# Task flags: what of a task has been counted.
SUB = 1
DONE = 2
ERR = 4
FINISHED = DONE | ERR
# Forgotten unfinished (``tasks.ttl``) and charged its estimate: a completion that still
# comes charges only what it says beyond that.
EST = 8
# A usage tracker's line for the task has been read (a second one is a repeat).
USE = 16
# No longer in flight.
CLOSED = FINISHED | EST
FLAG_BITS = 31
# Above the flag bits, a task's estimate in thousandths of a credit: what it was charged
# (EST), or while it is open, the credits of its usage line (USE). Kept in the flags so
# that the index holds nothing more per task, and the saved state needs no new field.
ESTIMATE_SHIFT = 5


# The most an estimate holds, in thousandths of a credit: with the flags, 43 bits, what
# the record of tasks taken out of the index keeps (``evicted``). 274 million credits:
# no task comes near it (a usage line may say more; its task's estimate stops there).
MAX_ESTIMATE = (1 << 38) - 1


def with_estimate(flags: int, credits: float) -> int:
    return (flags & FLAG_BITS) | min(round(credits * 1000), MAX_ESTIMATE) << ESTIMATE_SHIFT


def estimate_of(flags: int) -> float:
    return (flags >> ESTIMATE_SHIFT) / 1000


# What reservations used is kept this long after their last task (a reservation lives a
# day at most).
CONSUMED_KEPT = 2 * 86400.0
# How an implausible event time was replaced by the time of reading.
CLAMP_REASONS = ("ahead", "too_old")

Observer = Callable[[Record], None]


StatusKey = tuple[Budgets, list[tuple[float, DayUsage, int]], dict[Any, Any], list[Any]]


def _same_key(a: StatusKey, b: StatusKey) -> bool:
    """Whether two readings of what budget statuses depend on are the same: the same
    budgets and days (the objects, at the same version), equal flight and periods."""
    return (
        a[0] is b[0]
        and len(a[1]) == len(b[1])
        and all(
            x[0] == y[0] and x[1] is y[1] and x[2] == y[2] for x, y in zip(a[1], b[1], strict=True)
        )
        and a[2] == b[2]
        and a[3] == b[3]
    )


class KeptStatuses:
    """Budget statuses kept from one scrape to the next, made again only when what they
    read changed (the budgets, each day's usage, what is in flight, the periods at the
    time asked): a scrape between two polls reads the same ledger, and 500 statuses take
    2 ms. Kept beside the ledger, not on it: one attribute more on the ledger cost each
    line 800 instructions."""

    def __init__(self) -> None:
        self._last: tuple[StatusKey, list[BudgetStatus]] | None = None

    def of(self, book: Book, now: float) -> list[BudgetStatus]:
        key = (
            book.budgets,
            [(start, day, day.version) for start, day in book.usage.items()],
            {pair: (n, credits) for pair, (n, credits) in book.flight_tasks.items()},
            [book.budgets.clock.bounds(kind, now) for kind in PERIOD_KINDS],
        )
        last = self._last
        if last is None or not _same_key(last[0], key):
            last = self._last = (key, book.budget_statuses(now))
        return list(last[1])


class Book(Counters):
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
        # A usage line of a task not seen yet waits here too, for the logger's lines of
        # the task, which it then joins rather than counting the task again. (No new
        # attribute: past 29, instances lose CPython's shared-key dicts and every line
        # costs 800 instructions more.)
        self.waiting: dict[str, tuple[Event, float, float]] = {}
        self.orphaned = 0
        # task_id -> Task while open, or its flags (a small int) once finished,
        # kept only to join late events and to drop repeats.
        self.tasks: dict[str, Task | int] = {}
        self.expiry: deque[tuple[float, str]] = deque()
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
            self.estimate_flight()  # estimates of tasks in flight follow the new prices
        self.clock = PeriodClock(config.tz)
        self._forget_day()
        # Tasks the index's cap (config.tasks.max_tasks) pushed out, in brief: as many as
        # the cap, a third of the index's memory at most (at least 10,000: 1 MiB).
        remembered = max(config.tasks.max_tasks, 10_000)
        if old is None:
            self.evicted = Evicted(remembered)
        else:
            self.evicted.resize(remembered)
        self.orphan_wait = config.tasks.orphan_wait_seconds
        self.max_ahead = config.logs.max_clock_ahead_seconds
        if old is None:
            self.project_labels = LabelLimiter(config.labels.max_projects)
            self.model_labels = LabelLimiter(config.labels.max_models)
            self.error_labels = LabelLimiter(config.labels.max_error_types)
            self.user_labels = LabelLimiter(config.labels.max_users)
        else:
            self.project_labels.limit = config.labels.max_projects
            self.model_labels.limit = config.labels.max_models
            self.error_labels.limit = config.labels.max_error_types
            self.user_labels.limit = config.labels.max_users
        self.keep_budget_users()

    def keep_budget_users(self) -> None:
        """A user a budget names is kept whatever ``labels.max_users`` says, so that
        budget stays exact however many other users come first."""
        for b in self.config.budgets:
            if b.user is not None:
                self.user_labels.known.setdefault(b.user, b.user)

    def _new_task(self, e: Event, ts: float, flags: int) -> Task:
        # Interned: each decoded line brings its own copies of the same few names, and
        # the index holds a task for a day.
        user = e.user
        return Task(
            intern(e.project),  # type: ignore[arg-type]  # decode_line set it
            None if user is None else self.user_labels.get(intern(user)),  # type: ignore[arg-type]
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
        self.expiry.append((ts, task_id))

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
            project_counts = self.projects[plabel] = project_slots()
        route = (counts, project_counts, plabel, mlabel)
        # A folded pair is looked up every time, so each event counts its fold.
        if OTHER not in (plabel, mlabel) and len(self._routes) < 100_000:
            self._routes[(project, model)] = route
        return route

    def _count_submission(self, t: Task) -> Route:
        route = self._route(t.project, t.model)
        route[0][MODE_SLOT[t.mode]] += 1
        return route

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

    def _day_bucket(self, ts: float) -> DayUsage:
        """The usage of the local day holding ``ts``, remembered for the next event."""
        lo, hi = self.clock.bounds("daily", ts)
        bucket = self.usage.get(lo)
        if bucket is None:
            bucket = self.usage[lo] = DayUsage()
        self._day = (lo, hi, bucket)
        return bucket

    def _fly(self, t: Task, sign: int) -> None:
        """A task enters (1) or leaves (-1) flight: its estimated price, by its pair.
        (Inlined where a submission is counted and where it finishes.)"""
        credits = self._price(t)
        pair = (t.project, t.user)
        counts = self.flight_tasks.get(pair)
        if counts is None:
            self.flight_tasks[pair] = [sign, sign * credits]
        elif counts[0] == -sign:  # none left: exactly 0, whatever rounding gathered
            del self.flight_tasks[pair]
        else:
            counts[0] += sign
            counts[1] += sign * credits

    def _price(self, t: Task) -> float:
        """What a task costs by the pricing rules: its priced fields are the key of the
        pricing's cache (a Request is a tuple of the same fields)."""
        key = (t.model, t.mode, t.duration, t.audio, t.kind)
        credits = self.pricing.cache.get(key)
        if credits is None:
            credits = self.pricing.credits(Request(*key))
        return credits

    @property
    def flight(self) -> DayUsage:
        """Credits and dollars of tasks in flight by (project, user), as budgets read."""
        rate = self.pricing.usd_per_credit
        return DayUsage({pair: [c, c * rate] for pair, (_, c) in self.flight_tasks.items()})

    def estimate_flight(self) -> None:
        """Price every task in flight again (at start from a saved state, on new prices)."""
        self.flight_tasks.clear()
        for value in self.tasks.values():
            if type(value) is Task and not value.flags & CLOSED:
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

    def _prune_consumed(self, now: float) -> None:
        """Forget what reservations used once none can be live (they last a day at most)."""
        cutoff = min(now, self.last_event_ts) - CONSUMED_KEPT
        stale = [rid for rid, (_, ts) in self.consumed.items() if ts < cutoff]
        for rid in stale:
            del self.consumed[rid]

    def _prune_usage(self, now: float) -> None:
        """Keep the days of every current period (week, month...); earlier ones no budget
        reads."""
        tz = self.clock.tz
        keep_from = min(period_bounds(kind, now, tz)[0] for kind in PERIOD_KINDS)
        stale = [day for day in self.usage if day < keep_from]
        for day in stale:
            del self.usage[day]
        if stale:
            self._forget_day()

    def _forget_day(self) -> None:
        self._day = (1.0, 0.0, DayUsage())

    def budget_statuses(self, now: float) -> list[BudgetStatus]:
        return self.budgets.statuses(self.usage, now, self.flight)
