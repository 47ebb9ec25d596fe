"""Data the ledger keeps and hands on, needing nothing of the budgets: a task the index
remembers, the records reports are made of, the reader's own counts, the daemon's
health, and the states of Kling's resource packs. What the ledger shows of budgets (a
scrape's snapshot, the view checks read) is ``views``."""

from __future__ import annotations

import msgspec

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


def no_invalid() -> dict[str, int]:
    return dict.fromkeys(INVALID_REASONS, 0)


class ReadStats(msgspec.Struct):
    """The reader's own counts, not the ledger's: lines and bytes read, and lines
    skipped as invalid by reason. Saved with the state beside the ledger."""

    lines: int = 0
    bytes: int = 0
    invalid: dict[str, int] = msgspec.field(default_factory=no_invalid)


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
