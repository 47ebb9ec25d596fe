"""Data handed between the reader and those who show what it read."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import msgspec

from kling_exporter.budgets import Budgets, DayUsage, Usage


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


class ReaderUnavailable(RuntimeError):
    """The reader did not answer: it has ended, or did not answer in time."""


class View(NamedTuple):
    """What pre-flight answers read: the budgets, daily usage and tasks in flight."""

    budgets: Budgets
    usage: Usage
    flight: DayUsage


# Told the reader's counts of tasks per reservation id, and whether this is its first
# word since it started.
Consumed = Callable[[Mapping[str, int], bool], None]
