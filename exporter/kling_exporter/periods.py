"""Budget periods (daily, weekly from Monday, monthly) in a configured time zone."""

from __future__ import annotations

import datetime as dt
import zoneinfo

PERIOD_KINDS = ("daily", "weekly", "monthly")


def _local_midnight(day: dt.date, tz: zoneinfo.ZoneInfo) -> float:
    return dt.datetime(day.year, day.month, day.day, tzinfo=tz).timestamp()


def period_bounds(kind: str, ts: float, tz: zoneinfo.ZoneInfo) -> tuple[float, float]:
    """The [start, end) Unix times of the period of ``kind`` that holds ``ts``."""
    day = dt.datetime.fromtimestamp(ts, tz).date()
    if kind == "daily":
        start, end = day, day + dt.timedelta(days=1)
    elif kind == "weekly":
        start = day - dt.timedelta(days=day.weekday())
        end = start + dt.timedelta(days=7)
    elif kind == "monthly":
        start = day.replace(day=1)
        end = (start + dt.timedelta(days=32)).replace(day=1)
    else:
        raise ValueError(f"unknown period {kind!r}")
    return _local_midnight(start, tz), _local_midnight(end, tz)


class PeriodClock:
    """Finds period starts fast: most events fall in the period of the event before."""

    def __init__(self, tz: zoneinfo.ZoneInfo) -> None:
        self.tz = tz
        self._last: dict[str, tuple[float, float]] = {k: (1.0, 0.0) for k in PERIOD_KINDS}

    def bounds(self, kind: str, ts: float) -> tuple[float, float]:
        lo, hi = self._last[kind]
        if lo <= ts < hi:
            return lo, hi
        found = period_bounds(kind, ts, self.tz)
        self._last[kind] = found
        return found
