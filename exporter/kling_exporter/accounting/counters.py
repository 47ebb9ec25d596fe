"""The ledger's counters: label limits, the generation-time histogram, and the small
lists that hold the counts per (project label, model label) and per project label,
with the dict views collector and state read them through."""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import Any

OTHER = "__other__"
GENERATION_BUCKETS = (
    15.0,
    30.0,
    60.0,
    90.0,
    120.0,
    180.0,
    240.0,
    300.0,
    450.0,
    600.0,
    900.0,
    1200.0,
    1800.0,
    3600.0,
)


class LabelLimiter:
    """Hands out label values up to a limit; later values fold into ``__other__``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.known: dict[str, str] = {}
        self.overflow = 0

    def get(self, value: str, count: bool = True) -> str:
        """The label for ``value``; ``count`` says this event is being counted here,
        so a fold is counted once per event however often its label is looked up."""
        known = self.known.get(value)
        if known is not None:
            return known
        if len(self.known) < self.limit:
            self.known[value] = value
            return value
        if count:
            self.overflow += 1
        return OTHER


class Histogram:
    """Counts of values by upper bound (``buckets``, ascending), and their sum."""

    __slots__ = ("buckets", "counts", "sum")

    def __init__(self, buckets: tuple[float, ...] = GENERATION_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, int]]:
        out, total = [], 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts, strict=True):
            total += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return out


# Slots of a series accumulator, one per (project label, model label).
SUB_STANDARD, SUB_PROFESSIONAL, VIDEO_SECONDS, SUCCEEDED, FAILED, CREDITS, USD = range(7)
MODE_SLOT = {"standard": SUB_STANDARD, "professional": SUB_PROFESSIONAL}
STATUS_SLOT = {"succeed": SUCCEEDED, "failed": FAILED}
# Slots of a project accumulator: in flight, expired, whether in flight was touched, and
# the credits expired tasks were charged at their estimate.
IN_FLIGHT, EXPIRED, TOUCHED, EXPIRED_CREDITS = range(4)
Route = tuple[list[float], list[float], str, str]


def project_slots() -> list[float]:
    """A new project accumulator."""
    return [0, 0, 0, 0.0]


class Counters:
    """Counts per label pair (``series``: a list of the slots above) and per project
    (``projects``), errors per (project, error type), generation histograms per model.
    The dict views (``submitted``, ``completed``, ...) are built from them when asked."""

    def __init__(self) -> None:
        self.series: dict[tuple[str, str], list[float]] = {}
        self.projects: dict[str, list[float]] = {}
        self.errors: dict[tuple[str, str], int] = {}
        self.generation: dict[str, Histogram] = {}

    def series_of(self, plabel: str, mlabel: str) -> list[float]:
        """The counts of a label pair, made when first asked for."""
        counts = self.series.get((plabel, mlabel))
        if counts is None:
            counts = self.series[(plabel, mlabel)] = [0, 0, 0, 0, 0, 0.0, 0.0]
        return counts

    def _split_view(self, slots: dict[str, int]) -> dict[tuple[str, str, str], int]:
        """Counts of several slots, keyed by (project, model, the slot's label)."""
        out = {}
        for (p, m), counts in self.series.items():
            for label, slot in slots.items():
                if counts[slot]:
                    out[(p, m, label)] = int(counts[slot])
        return out

    @property
    def submitted(self) -> dict[tuple[str, str, str], int]:
        return self._split_view(MODE_SLOT)

    @property
    def completed(self) -> dict[tuple[str, str, str], int]:
        return self._split_view(STATUS_SLOT)

    def _series_view(self, slot: int) -> dict[tuple[str, str], float]:
        return {key: counts[slot] for key, counts in self.series.items() if counts[slot]}

    @property
    def credits(self) -> dict[tuple[str, str], float]:
        return self._series_view(CREDITS)

    @property
    def usd(self) -> dict[tuple[str, str], float]:
        return self._series_view(USD)

    @property
    def video_seconds(self) -> dict[tuple[str, str], int]:
        return {k: int(v) for k, v in self._series_view(VIDEO_SECONDS).items()}

    @property
    def in_flight(self) -> dict[str, int]:
        return {p: int(c[IN_FLIGHT]) for p, c in self.projects.items() if c[TOUCHED]}

    @property
    def expired(self) -> dict[str, int]:
        return {p: int(c[EXPIRED]) for p, c in self.projects.items() if c[EXPIRED]}

    @property
    def expired_credits(self) -> dict[str, float]:
        return {p: c[EXPIRED_CREDITS] for p, c in self.projects.items() if c[EXPIRED]}


# The views a ``Tracker`` keeps, with their keys: (project, model, label) for the split
# counts, (project, model) for the sums, (project,) for the project accumulators.
SPLIT_VIEWS = (("submitted", MODE_SLOT), ("completed", STATUS_SLOT))
SUM_VIEWS = (
    ("credits", CREDITS, False),
    ("usd", USD, False),
    ("video_seconds", VIDEO_SECONDS, True),
)
TRACKED = (
    "submitted",
    "completed",
    "credits",
    "usd",
    "video_seconds",
    "in_flight",
    "expired",
    "expired_credits",
)
_NO_SERIES: list[float] = [0, 0, 0, 0, 0, 0.0, 0.0]
_NO_PROJECT: list[float] = project_slots()


class Tracker:
    """The dict views of a ``Counters`` (``submitted``, ``completed``, ... keyed by tuples
    of label values, as the metrics table reads them), kept from one scrape to the next
    and brought up to date by comparing each accumulator with a copy of it as last seen,
    with the keys of each view that changed since the last ``take``. A scrape then
    re-reads what the events changed, not every series: comparing a pair's seven slots
    with their copy costs a small part of building its five samples again. The counters
    are never told about it, so an event handler that changes a slot is seen without
    marking anything."""

    def __init__(self) -> None:
        self.views: dict[str, dict[tuple[str, ...], float]] = {}
        self.changed: dict[str, set[tuple[str, ...]]] = {}
        self._series_seen: dict[tuple[str, str], list[float]] = {}
        self._projects_seen: dict[str, list[float]] = {}
        self._of: tuple[object, object] | None = None
        self._slots: list[tuple[int, dict[Any, float], set[Any], str | None, bool]] = []
        self.reset()

    def reset(self) -> None:
        """Forget what was seen: the next ``update`` reads every accumulator, into new
        dicts (a renderer that kept the old ones then compares every sample)."""
        self.views = {name: {} for name in TRACKED}
        self.changed = {name: set() for name in TRACKED}
        self._series_seen, self._projects_seen, self._of = {}, {}, None
        # Each slot of a pair's counts: the view it is read into, under which label.
        self._slots = [
            (slot, self.views[name], self.changed[name], label, True)
            for name, slots in SPLIT_VIEWS
            for label, slot in slots.items()
        ] + [
            (slot, self.views[name], self.changed[name], None, whole)
            for name, slot, whole in SUM_VIEWS
        ]

    def take(self) -> None:
        """What changed has been read: the next changes are counted from here."""
        for keys in self.changed.values():
            keys.clear()

    def update(self, counters: Counters) -> None:
        of = (counters.series, counters.projects)
        if self._of is None or of[0] is not self._of[0] or of[1] is not self._of[1]:
            self.reset()
            self._of = of
        _compare(counters.series, self._series_seen, _NO_SERIES, self._series)
        _compare(counters.projects, self._projects_seen, _NO_PROJECT, self._project)

    def _series(self, pair: tuple[str, str], counts: list[float], old: list[float]) -> None:
        for slot, view, changed, label, whole in self._slots:
            value = counts[slot]
            if value != old[slot]:
                key = pair if label is None else (pair[0], pair[1], label)
                if not value:
                    view.pop(key, None)
                else:
                    view[key] = int(value) if whole else value
                changed.add(key)

    def _project(self, project: str, counts: list[float], old: list[float]) -> None:
        views, changed, key = self.views, self.changed, (project,)
        if counts[IN_FLIGHT] != old[IN_FLIGHT] or counts[TOUCHED] != old[TOUCHED]:
            _put(views["in_flight"], key, int(counts[IN_FLIGHT]) if counts[TOUCHED] else None)
            changed["in_flight"].add(key)
        if counts[EXPIRED] != old[EXPIRED] or counts[EXPIRED_CREDITS] != old[EXPIRED_CREDITS]:
            expired = counts[EXPIRED]
            _put(views["expired"], key, int(expired) if expired else None)
            _put(views["expired_credits"], key, counts[EXPIRED_CREDITS] if expired else None)
            changed["expired"].add(key)
            changed["expired_credits"].add(key)


def _compare(
    table: dict[Any, list[float]],
    seen: dict[Any, list[float]],
    zero: list[float],
    changed: Callable[[Any, list[float], list[float]], None],
) -> None:
    """Call ``changed(key, counts, old)`` for each key of ``table`` whose counts differ
    from their copy in ``seen`` (a key gone: with counts of zero), and bring ``seen`` up
    to date."""
    for key, counts in table.items():
        old = seen.get(key)
        if old != counts:
            changed(key, counts, zero if old is None else old)
            seen[key] = counts.copy()
    if len(seen) > len(table):
        for key in [key for key in seen if key not in table]:
            changed(key, zero, seen.pop(key))


def _put(view: dict[tuple[str, ...], float], key: tuple[str, ...], value: float | None) -> None:
    if value is None:
        view.pop(key, None)
    else:
        view[key] = value
