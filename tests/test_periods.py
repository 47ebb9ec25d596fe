from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kling_exporter.periods import PERIOD_KINDS, PeriodClock, period_bounds

UTC = ZoneInfo("UTC")
NY = ZoneInfo("America/New_York")


def ts(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, tz: ZoneInfo = UTC
) -> float:
    return dt.datetime(year, month, day, hour, minute, tzinfo=tz).timestamp()


def test_daily_in_utc() -> None:
    assert period_bounds("daily", ts(2026, 11, 22, 23, 59), UTC) == (
        ts(2026, 11, 22),
        ts(2026, 11, 23),
    )


def test_weekly_starts_on_monday() -> None:
    # 2026-11-22 is a Sunday: its week began Monday 2026-11-16.
    assert period_bounds("weekly", ts(2026, 11, 22, 12), UTC) == (
        ts(2026, 11, 16),
        ts(2026, 11, 23),
    )


def test_monthly_across_year_end() -> None:
    assert period_bounds("monthly", ts(2026, 12, 31, 23), UTC) == (ts(2026, 12, 1), ts(2027, 1, 1))


def test_daily_in_a_timezone_is_local_midnight() -> None:
    # 03:00 UTC on the 22nd is still the 21st in New York.
    lo, hi = period_bounds("daily", ts(2026, 11, 22, 3), NY)
    assert (lo, hi) == (ts(2026, 11, 21, tz=NY), ts(2026, 11, 22, tz=NY))


def test_day_of_a_dst_change_is_23_hours() -> None:
    lo, hi = period_bounds("daily", ts(2026, 3, 8, 12, tz=NY), NY)
    assert hi - lo == 23 * 3600


def test_month_holding_a_dst_change() -> None:
    lo, hi = period_bounds("monthly", ts(2026, 11, 15, tz=NY), NY)
    assert (lo, hi) == (ts(2026, 11, 1, tz=NY), ts(2026, 12, 1, tz=NY))
    assert hi - lo == 30 * 86400 + 3600


@pytest.mark.parametrize("tz", [UTC, NY, ZoneInfo("Asia/Kolkata"), ZoneInfo("Pacific/Chatham")])
@given(moment=st.floats(min_value=0, max_value=4e9), kind=st.sampled_from(PERIOD_KINDS))
def test_period_holds_its_time_and_starts_at_local_midnight(
    tz: ZoneInfo, moment: float, kind: str
) -> None:
    lo, hi = period_bounds(kind, moment, tz)
    assert lo <= moment < hi
    start = dt.datetime.fromtimestamp(lo, tz)
    assert (start.hour, start.minute) == (0, 0) or start.dst() != dt.datetime.fromtimestamp(
        lo - 1, tz
    ).dst()
    if kind == "weekly":
        assert start.weekday() == 0
    if kind == "monthly":
        assert start.day == 1
    assert period_bounds(kind, hi, tz)[0] == hi


def test_clock_cache_agrees_with_direct_computation() -> None:
    clock = PeriodClock(NY)
    for t in (ts(2026, 11, 1), ts(2026, 11, 1, 4, 59), ts(2026, 11, 1, 5), ts(2026, 10, 31)):
        for kind in PERIOD_KINDS:
            assert clock.bounds(kind, t) == period_bounds(kind, t, NY)
