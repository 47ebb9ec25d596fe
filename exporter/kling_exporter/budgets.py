"""Budgets: what each one has used in its current period, and pre-flight answers.

Pure functions of daily usage and the configured budgets, with no I/O and no clock
of their own. The ledger keeps the daily usage as it reads; the HTTP process keeps a
copy of it, published by the reader after every chunk, and answers from that copy
with the same code.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import msgspec

from kling_exporter.config import BudgetConfig, Config
from kling_exporter.periods import PeriodClock
from kling_exporter.pricing import Pricing, Request


def sum_into(table: dict[Any, list[float]], key: Any, credits: float, usd: float) -> None:
    acc = table.get(key)
    if acc is None:
        table[key] = [credits, usd]
    else:
        acc[0] += credits
        acc[1] += usd


DaySums = tuple[dict[str, list[float]], dict[str | None, list[float]], list[float]]
Pair = tuple[str, str | None]


class DayUsage:
    """Credits and dollars of one local day by (project, user). The sums by project, by
    user and in all are made when a budget first asks after a change, so that a budget
    reads one sum a day, and an event pays only for its own pair."""

    __slots__ = ("by_pair", "sums", "version")

    def __init__(self, by_pair: dict[Pair, list[float]] | None = None) -> None:
        self.by_pair: dict[Pair, list[float]] = {} if by_pair is None else by_pair
        # Counts changes; the sums (by project, by user, total) hold the version they
        # were made from, so sums made while the reader changed the day are made again.
        self.version = 0
        self.sums: tuple[int, DaySums] = (-1, ({}, {}, [0.0, 0.0]))

    def add(self, project: str, user: str | None, credits: float, usd: float) -> None:
        sum_into(self.by_pair, (project, user), credits, usd)
        self.version += 1

    def _sum(self) -> DaySums:
        by_project: dict[str, list[float]] = {}
        by_user: dict[str | None, list[float]] = {}
        total = [0.0, 0.0]
        for (project, user), (c, u) in self.by_pair.items():
            sum_into(by_project, project, c, u)
            sum_into(by_user, user, c, u)
            total[0] += c
            total[1] += u
        return by_project, by_user, total

    def used(self, b: BudgetConfig) -> list[float] | None:
        """What the budget ``b`` matches of this day."""
        if b.project is not None and b.user is not None:
            return self.by_pair.get((b.project, b.user))
        version, sums = self.sums
        if version != self.version:
            version = self.version
            sums = self._sum()
            self.sums = (version, sums)
        if b.project is not None:
            return sums[0].get(b.project)
        if b.user is not None:
            return sums[1].get(b.user)
        return sums[2]


Usage = Mapping[float, DayUsage]  # local day start -> that day's usage


class Ask(NamedTuple):
    """What a pre-flight check or a reservation asks about: ``tasks`` tasks like
    ``req`` for this project and user."""

    req: Request
    tasks: int
    project: str
    user: str | None


class CheckBudget(msgspec.Struct, frozen=True):
    name: str
    period: str
    # What is left after what is used, in flight and reserved; negative once over.
    credits_remaining: float | None
    usd_remaining: float | None
    utilization_after: float
    # How far past its limits the budget already is (0 within them; None: no such limit).
    over_by_credits: float | None = None
    over_by_usd: float | None = None
    in_flight_credits: float = 0.0
    reserved_credits: float = 0.0


class CheckResult(msgspec.Struct, frozen=True):
    """The answer to a pre-flight check (``POST /api/v1/check``)."""

    allowed: bool
    credits_needed: float
    usd_needed: float
    reason: str
    budgets: list[CheckBudget]
    refused_by: str | None = None  # the first budget that refused


class Reserved(NamedTuple):
    """What live reservations hold of a budget in its current period."""

    name: str
    period: str
    reserved_credits: float
    reserved_usd: float


class BudgetStatus(msgspec.Struct, frozen=True):
    """One budget in its current period."""

    name: str
    period: str
    project: str | None
    user: str | None
    limit_credits: float | None
    limit_usd: float | None
    alert_threshold: float
    used_credits: float
    used_usd: float
    remaining_credits: float | None
    remaining_usd: float | None
    utilization: float
    period_start: float
    period_end: float
    # Remaining is limit minus used, negative once over (as cost trackers report it);
    # these say the same overage as a positive amount, 0 within the limits.
    over_by_credits: float | None = None
    over_by_usd: float | None = None
    # Estimated cost of tasks submitted and not finished, and of live reservations:
    # what pre-flight answers count beside what is used.
    in_flight_credits: float = 0.0
    in_flight_usd: float = 0.0
    reserved_credits: float = 0.0
    reserved_usd: float = 0.0


NOTHING = DayUsage()  # no tasks in flight, no reservations


class Share(NamedTuple):
    """What other exporters of a fleet say a budget has used, has in flight and holds
    in its current period (``kling_exporter.guard.fleet``)."""

    used_credits: float = 0.0
    used_usd: float = 0.0
    in_flight_credits: float = 0.0
    in_flight_usd: float = 0.0
    reserved_credits: float = 0.0
    reserved_usd: float = 0.0


ALONE: Mapping[str, Share] = {}  # no other exporters: budget name -> their share


def _part(table: DayUsage, b: BudgetConfig) -> tuple[float, float]:
    found = table.used(b) if table.by_pair else None
    return (0.0, 0.0) if found is None else (found[0], found[1])


def _utilization(used: float, limit: float | None) -> float:
    return used / limit if limit else 0.0


def over_by(used: float, limit: float | None) -> float | None:
    """How far ``used`` is past ``limit``: 0 within it, None for no limit."""
    return None if limit is None else max(used - limit, 0.0)


def _remaining(used: float, limit: float | None) -> float | None:
    """Limit minus used: negative once over, so an overage shows where people look."""
    return None if limit is None else limit - used


def _percent(ratio: float) -> str:
    """``112%``; a ratio past the limit is never rounded down to ``100%`` (``100.5%``)."""
    for digits in (0, 1, 2):
        shown = f"{ratio:.{digits}%}"
        if ratio <= 1 or float(shown[:-1]) > 100:
            break
    return shown


def _left(credits: float | None, usd: float | None) -> str:
    """What a refusal says is left: ``5 credits left``, or ``already 40 credits over``."""
    if credits is not None:
        amount, unit = credits, "{:g} credits"
    else:
        amount, unit = usd or 0.0, "${:.2f}"
    if amount < 0:
        return "already " + unit.format(-amount) + " over"
    return unit.format(amount) + " left"


Amount = tuple[float, float]  # (credits, usd)


def _parts(
    b: BudgetConfig, used: Amount, flight: DayUsage, held: DayUsage, elsewhere: Mapping[str, Share]
) -> tuple[Amount, Amount, Amount]:
    """What budget ``b`` has used, has in flight and holds, here and elsewhere."""
    fly, kept = _part(flight, b), _part(held, b)
    other = elsewhere.get(b.name)
    if other is None:
        return used, fly, kept
    return (
        (used[0] + other.used_credits, used[1] + other.used_usd),
        (fly[0] + other.in_flight_credits, fly[1] + other.in_flight_usd),
        (kept[0] + other.reserved_credits, kept[1] + other.reserved_usd),
    )


def budget_status(
    b: BudgetConfig,
    used: Amount,
    flight: Amount,
    held: Amount,
    bounds: Amount,
) -> BudgetStatus:
    credits, usd = used
    util = max(_utilization(credits, b.limit_credits), _utilization(usd, b.limit_usd))
    return BudgetStatus(
        name=b.name,
        period=b.period,
        project=b.project,
        user=b.user,
        limit_credits=b.limit_credits,
        limit_usd=b.limit_usd,
        alert_threshold=b.alert_threshold,
        used_credits=credits,
        used_usd=usd,
        remaining_credits=_remaining(credits, b.limit_credits),
        remaining_usd=_remaining(usd, b.limit_usd),
        utilization=util,
        period_start=bounds[0],
        period_end=bounds[1],
        over_by_credits=over_by(credits, b.limit_credits),
        over_by_usd=over_by(usd, b.limit_usd),
        in_flight_credits=flight[0],
        in_flight_usd=flight[1],
        reserved_credits=held[0],
        reserved_usd=held[1],
    )


# How many (project, user) pairs keep their matching budgets found (then all are
# found again: the set of pairs a fleet of producers uses is small).
MATCHED_KEPT = 10_000


class Budgets:
    """The configured budgets, indexed by what they match (project and user, either
    left out), so that a pre-flight check reads only the budgets that match it, however
    many there are; with the pricing that says what a request needs."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.pricing = Pricing(config.pricing)
        self.tz = config.tz
        self.clock = PeriodClock(config.tz)  # the current periods, found once
        self._by_match: dict[tuple[str | None, str | None], list[BudgetConfig]] = {}
        for b in config.budgets:  # in config order within each list
            self._by_match.setdefault((b.project, b.user), []).append(b)
        self._order = {id(b): i for i, b in enumerate(config.budgets)}
        self._matched: dict[tuple[str, str | None], tuple[BudgetConfig, ...]] = {}

    def matching(self, project: str, user: str | None) -> tuple[BudgetConfig, ...]:
        """The budgets a task of this project and user counts against, in config order:
        those of the project, of the user and of neither."""
        found = self._matched.get((project, user))
        if found is None:
            keys = dict.fromkeys(((project, user), (project, None), (None, user), (None, None)))
            every = [b for key in keys for b in self._by_match.get(key, ())]
            if len(every) > 1:
                every.sort(key=lambda b: self._order[id(b)])
            if len(self._matched) >= MATCHED_KEPT:
                self._matched.clear()
            found = self._matched[project, user] = tuple(every)
        return found

    def usage(
        self, budgets: Iterable[BudgetConfig], usage: Usage, now: float
    ) -> list[tuple[tuple[float, float], tuple[float, float]]]:
        """Each budget's (credits, usd) in its current period, and the period's bounds:
        one lookup per day of the period, whatever else is in the ledger."""
        periods: dict[str, tuple[tuple[float, float], list[DayUsage]]] = {}
        out = []
        for b in budgets:
            found = periods.get(b.period)
            if found is None:
                bounds = self.clock.bounds(b.period, now)
                days = [d for start, d in usage.items() if bounds[0] <= start < bounds[1]]
                found = periods[b.period] = (bounds, days)
            bounds, days = found
            credits = usd = 0.0
            for day in days:
                acc = day.used(b)
                if acc is not None:
                    credits += acc[0]
                    usd += acc[1]
            out.append(((credits, usd), bounds))
        return out

    def statuses(
        self,
        usage: Usage,
        now: float,
        flight: DayUsage = NOTHING,
        held: DayUsage = NOTHING,
        elsewhere: Mapping[str, Share] = ALONE,
    ) -> list[BudgetStatus]:
        """Every budget in its current period; with ``elsewhere``, what other exporters
        say is added to this one's own."""
        budgets = self.config.budgets
        out = []
        for b, (used, bounds) in zip(budgets, self.usage(budgets, usage, now), strict=True):
            out.append(budget_status(b, *_parts(b, used, flight, held, elsewhere), bounds))
        return out

    def reserved(self, held: DayUsage) -> list[Reserved]:
        """What ``held`` holds of every budget: a status's reserved figures alone,
        without summing what each budget used."""
        return [Reserved(b.name, b.period, *_part(held, b)) for b in self.config.budgets]

    def shares(
        self,
        budgets: Sequence[BudgetConfig],
        usage: Usage,
        now: float,
        flight: DayUsage = NOTHING,
        held: DayUsage = NOTHING,
    ) -> list[tuple[Share, tuple[float, float]]]:
        """This exporter's own share of each budget, and the bounds of its period."""
        return [
            (Share(c, u, *_part(flight, b), *_part(held, b)), bounds)
            for b, ((c, u), bounds) in zip(budgets, self.usage(budgets, usage, now), strict=True)
        ]

    def check(
        self,
        usage: Usage,
        ask: Ask,
        now: float,
        flight: DayUsage = NOTHING,
        held: DayUsage = NOTHING,
        elsewhere: Mapping[str, Share] = ALONE,
    ) -> CheckResult:
        """May the tasks ``ask`` names be generated for its project and user now? Each
        matching budget counts what is used, the estimated cost of tasks in flight and
        live reservations (``held``), and what other exporters of a fleet say of the
        three (``elsewhere``); refused when any would go over its limit, exactly at it
        is allowed."""
        req, count, project, user = ask
        credits = self.pricing.credits(req) * count
        usd = credits * self.pricing.usd_per_credit
        matching = self.matching(project, user)
        rows, reasons, refused_by = [], [], None
        used = self.usage(matching, usage, now)
        for b, (spent, _) in zip(matching, used, strict=True):
            (spent_c, spent_u), (fly_c, fly_u), (held_c, held_u) = _parts(
                b, spent, flight, held, elsewhere
            )
            used_c, used_u = spent_c + fly_c + held_c, spent_u + fly_u + held_u
            after = max(
                _utilization(used_c + credits, b.limit_credits),
                _utilization(used_u + usd, b.limit_usd),
            )
            remaining_c = _remaining(used_c, b.limit_credits)
            remaining_u = _remaining(used_u, b.limit_usd)
            over = (b.limit_credits is not None and used_c + credits > b.limit_credits + 1e-9) or (
                b.limit_usd is not None and used_u + usd > b.limit_usd + 1e-9
            )
            if over:
                left = _left(remaining_c, remaining_u)
                reasons.append(
                    f"budget {b.name!r} ({b.period}) would reach {_percent(after)}: "
                    f"needs {credits:g} credits (${usd:.2f}), {left}"
                )
                refused_by = refused_by or b.name
            rows.append(
                CheckBudget(
                    name=b.name,
                    period=b.period,
                    credits_remaining=remaining_c,
                    usd_remaining=remaining_u,
                    utilization_after=after,
                    over_by_credits=over_by(spent_c, b.limit_credits),
                    over_by_usd=over_by(spent_u, b.limit_usd),
                    in_flight_credits=fly_c,
                    reserved_credits=held_c,
                )
            )
        return CheckResult(
            allowed=not reasons,
            credits_needed=credits,
            usd_needed=usd,
            reason="; ".join(reasons) if reasons else "within every matching budget",
            budgets=rows,
            refused_by=refused_by,
        )
