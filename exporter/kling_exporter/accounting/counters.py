"""The ledger's counters: label limits, the generation-time histogram, and the small
lists that hold the counts per (project label, model label) and per project label,
with the dict views collector and state read them through."""

from __future__ import annotations

import bisect

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
