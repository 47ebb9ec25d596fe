"""Data handed between the ledger, the reader and those who show what they read: a
scrape's snapshot, the records reports are made of, the daemon's health and what
pre-flight answers read."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import msgspec

from kling_exporter.budgets import Budgets, BudgetStatus, DayUsage, Usage
from kling_exporter.events import INVALID_REASONS

# The states of a resource pack of Kling's account, as Kling names them.
PACK_STATES = ("toBeOnline", "online", "expired", "runOut")


class Task(msgspec.Struct, gc=False, array_like=True):
    """What the index remembers of a task that has been submitted but not finished."""

    project: str
    user: str | None
    model: str
    mode: str
    duration: int
    audio: bool
    kind: str
    ts: float
    flags: int


class Status(msgspec.Struct):
    """How the daemon itself is doing, for the collector."""

    files_watched: int
    ready: bool
    reload_successful: bool
    reload_success_ts: float
    state_save_ts: float
    state_save_interval: float = 0.0
    reader_up: bool = True
    last_poll_ts: float = 0.0
    unread_bytes: int = 0
    open_files: int = 0
    glob_files: dict[str, int] = {}


class ReaderUnavailable(Exception):
    """The reader did not answer: it has ended, or did not answer in time."""


class View(NamedTuple):
    """What pre-flight answers read: the budgets, daily usage and tasks in flight."""

    budgets: Budgets
    usage: Usage
    flight: DayUsage


# Told the reader's counts of tasks per reservation id, and whether this is its first
# word since it started.
Consumed = Callable[[Mapping[str, int], bool], None]


def _no_invalid() -> dict[str, int]:
    return dict.fromkeys(INVALID_REASONS, 0)


class ReadStats(msgspec.Struct):
    """The reader's own counts, not the ledger's: lines and bytes read, and lines
    skipped as invalid by reason. Saved with the state beside the ledger."""

    lines: int = 0
    bytes: int = 0
    invalid: dict[str, int] = msgspec.field(default_factory=_no_invalid)


class Record(msgspec.Struct, frozen=True):
    """One counted event with what the join knows of its task, for reports and exports."""

    event: str  # submitted | completed | error | expired (charged its estimate)
    ts: float
    task_id: str
    project: str
    user: str | None
    model: str
    mode: str
    duration: int
    audio: bool
    kind: str
    status: str | None = None
    elapsed: float | None = None
    error_type: str | None = None
    credits: float = 0.0
    usd: float = 0.0


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
    invalid: dict[str, int] = msgspec.field(default_factory=_no_invalid)
