"""What the ledger shows to others, each copied out at one instant: the snapshot a
scrape renders, and the view of budgets, daily usage and tasks in flight that
pre-flight answers and holds read."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import msgspec

from kling_exporter.budgets import Budgets, BudgetStatus, DayUsage, Usage
from kling_exporter.model import no_invalid


class View(NamedTuple):
    """What pre-flight answers read: the budgets, daily usage and tasks in flight."""

    budgets: Budgets
    usage: Usage
    flight: DayUsage


# Told the reader's counts of tasks per reservation id, and whether this is its first
# word since it started.
Consumed = Callable[[Mapping[str, int], bool], None]


class Snapshot(msgspec.Struct):
    """Everything a scrape renders, copied out of the ledger at one instant."""

    submitted: dict[tuple[str, str, str], int]
    completed: dict[tuple[str, str, str], int]
    errors: dict[tuple[str, str], int]
    credits: dict[tuple[str, str], float]
    usd: dict[tuple[str, str], float]
    video_seconds: dict[tuple[str, str], int]
    generation: dict[str, tuple[list[tuple[str, int]], float]]
    in_flight: dict[str, int]
    expired: dict[str, int]
    budgets: list[BudgetStatus]
    duplicates: int
    last_event_ts: float
    label_overflow: dict[str, int]
    tasks_tracked: int
    timestamps_clamped: dict[str, int]
    awaiting_submission: int
    orphaned: int
    expired_credits: dict[str, float] = msgspec.field(default_factory=dict)
    tasks_limit: int = 0  # tasks.max_tasks
    tasks_evicted: int = 0  # pushed out by that cap, ever
    # The reader's counts (``ReadStats``), for the same scrape.
    lines_read: int = 0
    bytes_read: int = 0
    invalid: dict[str, int] = msgspec.field(default_factory=no_invalid)
