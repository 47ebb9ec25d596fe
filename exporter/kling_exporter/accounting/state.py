"""The saved state: one typed schema for the ledger's totals and the positions in the
log files, checked by msgspec as it is read (the daemon writes it whole, atomically,
with ``journals.durable.write_atomically``).

A state that cannot be decoded is moved aside (``.corrupt``); one that decodes but does
not fit this schema is reported field by field; either way the daemon rebuilds from
the logs. Fields added since a version have defaults, so older states still load.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from kling_exporter.accounting.counters import (
    CREDITS,
    EXPIRED,
    EXPIRED_CREDITS,
    IN_FLIGHT,
    MODE_SLOT,
    STATUS_SLOT,
    TOUCHED,
    USD,
    VIDEO_SECONDS,
    Histogram,
    project_slots,
)
from kling_exporter.budgets import DayUsage
from kling_exporter.events import Event
from kling_exporter.model import ReadStats, Task

if TYPE_CHECKING:
    from kling_exporter.accounting.book import Book

log = logging.getLogger(__name__)

# The one version of the saved state. Format 1 carried a version of its own for the
# ledger (3 or 4: 3 lacks only what 4 added, clamped times and waiting events) and the
# reader's counts inside it; both are still read.
FORMAT = 2
FORMATS = (1, 2)
OLD_LEDGER_VERSIONS = (3, 4)

Keyed3 = tuple[str, str, str, int]  # project, model, mode or status, count


class LedgerState(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The ledger's totals, its task index and daily usage (see ``ledger_state``)."""

    timezone: str
    submitted: list[Keyed3]
    completed: list[Keyed3]
    errors: list[tuple[str, str, int]]
    credits: list[tuple[str, str, float]]
    usd: list[tuple[str, str, float]]
    video_seconds: list[tuple[str, str, int]]
    generation: list[tuple[str, list[int], float]]
    in_flight: list[tuple[str, int]]
    expired: list[tuple[str, int]]
    duplicates: int
    last_event_ts: float
    labels: list[tuple[list[str], int]]
    tasks: dict[str, Task | int]
    expiry: list[tuple[float, str]]
    usage: list[tuple[float, list[tuple[str, str | None, float, float]]]]
    clamped: list[tuple[str, int]] = []
    orphaned: int = 0
    # task id, event time, time of reading, the event's fields in order
    waiting: list[tuple[str, float, float, list[Any]]] = []
    consumed: list[tuple[str, int, float]] = []  # reservation id, tasks, newest time
    expired_credits: list[tuple[str, float]] = []  # project, credits charged at estimates
    # Tasks taken out of the index (``Evicted``): digest -> fields' index and flags, the
    # older generation and the newer, the fields (project, user, model, mode, duration,
    # audio, kind) by index from 1, and how many the cap ever pushed out.
    evicted_older: dict[int, int] = {}
    evicted_newer: dict[int, int] = {}
    evicted_owners: list[tuple[str, str | None, str, str, int, bool, str]] = []
    evicted_total: int = 0
    # Format 1 only: the ledger's own version, and the reader's counts (now ReadStats).
    version: int | None = None
    invalid: list[tuple[str, int]] = []
    lines_read: int = 0
    bytes_read: int = 0


class FilePosition(msgspec.Struct):
    """Where reading a log file got to, and how to know the file again."""

    path: str
    dev: int
    ino: int
    offset: int
    lineno: int
    fingerprint_len: int | None = None
    fingerprint_sha256: bytes | None = None
    fingerprint: bytes | None = None  # saved by an earlier version: the bytes themselves
    gone_for: float | None = None  # seconds the file had been gone when saved


class State(msgspec.Struct):
    format: int
    saved_at: float
    files: list[FilePosition]
    ledger: LedgerState
    reading: ReadStats | None = None  # format 2; format 1 kept it in the ledger

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format {self.format} is not one of {FORMATS}")
        version = self.ledger.version
        if self.format == 1 and version not in OLD_LEDGER_VERSIONS:
            raise ValueError(f"version {version} is not one of {OLD_LEDGER_VERSIONS}")
        if self.format > 1 and version is not None:
            raise ValueError(f"version: format {self.format} has none, got {version}")

    def read_stats(self) -> ReadStats:
        """The reader's counts, where this format keeps them; every reason known now is
        there, counted 0 when the state names it not (as the ledger's were)."""
        saved = self.reading
        if saved is None:
            saved = ReadStats(self.ledger.lines_read, self.ledger.bytes_read)
            invalid = dict(self.ledger.invalid)
        else:
            invalid = saved.invalid
        stats = ReadStats(saved.lines, saved.bytes)
        stats.invalid.update(invalid)
        return stats


def as_ledger_state(data: LedgerState | Any) -> LedgerState:
    """A ledger state, from itself or from decoded data; ValueError naming the field."""
    if isinstance(data, LedgerState):
        return data
    try:
        return msgspec.convert(data, LedgerState)
    except msgspec.ValidationError as e:
        raise ValueError(f"state does not fit this version: {e}") from None


def as_positions(data: Any) -> list[FilePosition]:
    if all(isinstance(p, FilePosition) for p in data):
        return list(data)
    try:
        return msgspec.convert(list(data), list[FilePosition])
    except msgspec.ValidationError as e:
        raise ValueError(f"file positions do not fit this version: {e}") from None


def read_state(path: Path) -> State | None:
    """The saved state, or None if there is none or it cannot be used. A state that
    cannot be read is moved aside (``.corrupt``) and reported, and the daemon starts
    from the logs instead."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        log.error(
            "cannot read state file, rebuilding from logs",
            extra={"path": str(path), "err": e.strerror},
        )
        return None
    try:
        return msgspec.msgpack.decode(data, type=State)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        aside = path.with_name(path.name + ".corrupt")
        with contextlib.suppress(OSError):
            os.replace(path, aside)
        log.error(
            "state file unreadable, moved aside; rebuilding from logs",
            extra={"path": str(path), "moved_to": str(aside), "err": str(e)},
        )
        return None


# -- the ledger, to and from its saved form -------------------------------------------


def event_fields(e: Event) -> list[Any]:
    """An event's fields as an array for the saved state; the parsed time is in ``ts``."""
    fields = list(msgspec.structs.astuple(e))
    fields[1] = None  # timestamp
    return fields


def ledger_state(led: Book) -> LedgerState:
    """The whole ledger as data msgspec encodes (open tasks as arrays, in C). Encode it
    before the ledger changes again: the task index is handed over, not copied."""
    return LedgerState(
        timezone=led.config.timezone,
        submitted=[(*k, v) for k, v in led.submitted.items()],
        completed=[(*k, v) for k, v in led.completed.items()],
        errors=[(*k, v) for k, v in led.errors.items()],
        credits=[(*k, v) for k, v in led.credits.items()],
        usd=[(*k, v) for k, v in led.usd.items()],
        video_seconds=[(*k, v) for k, v in led.video_seconds.items()],
        generation=[(m, h.counts, h.sum) for m, h in led.generation.items()],
        in_flight=list(led.in_flight.items()),
        expired=list(led.expired.items()),
        expired_credits=list(led.expired_credits.items()),
        duplicates=led.duplicates,
        last_event_ts=led.last_event_ts,
        clamped=list(led.clamped.items()),
        orphaned=led.orphaned,
        waiting=[
            (task_id, ts, read_at, event_fields(e))
            for task_id, (e, ts, read_at) in led.waiting.items()
        ],
        labels=[
            (list(lim.known), lim.overflow)
            for lim in (led.project_labels, led.model_labels, led.error_labels, led.user_labels)
        ],
        tasks=led.tasks,
        expiry=list(led.expiry),
        evicted_older=led.evicted.older,
        evicted_newer=led.evicted.newer,
        evicted_owners=led.evicted.owners[1:],  # type: ignore[arg-type]  # never None there
        evicted_total=led.evicted.total,
        usage=[
            (day, [(p, u, c, d) for (p, u), (c, d) in bucket.by_pair.items()])
            for day, bucket in led.usage.items()
        ],
        consumed=[(rid, int(n), ts) for rid, (n, ts) in led.consumed.items()],
    )


def restore(led: Book, saved: LedgerState | Any) -> None:
    """Fill a new ledger with what ``ledger_state`` saved (or its decoded data); raises
    ValueError, naming what does not fit, if it does not."""
    state = as_ledger_state(saved)
    if state.timezone != led.config.timezone:
        raise ValueError("state was saved with another timezone")
    _restore_counters(led, state)
    _restore_tasks(led, state)
    for day, pairs in state.usage:
        bucket = led.usage[day] = DayUsage()
        for p, u, c, d in pairs:
            bucket.add(p, u, c, d)
    led.consumed = {rid: [n, ts] for rid, n, ts in state.consumed}
    led.estimate_flight()


def _restore_counters(led: Book, state: LedgerState) -> None:
    """The totals of every series, the histograms and the label limits."""
    for p, m, mode, v in state.submitted:
        led.series_of(p, m)[MODE_SLOT[mode]] = v
    for p, m, status, v in state.completed:
        led.series_of(p, m)[STATUS_SLOT[status]] = v
    led.errors = {(p, e): v for p, e, v in state.errors}
    for slot, rows in ((CREDITS, state.credits), (USD, state.usd)):
        for p, m, amount in rows:
            led.series_of(p, m)[slot] = amount
    for p, m, seconds in state.video_seconds:
        led.series_of(p, m)[VIDEO_SECONDS] = seconds
    for model, counts, total in state.generation:
        hist = led.generation[model] = Histogram()
        if len(counts) != len(hist.counts):
            raise ValueError("state does not fit: the histogram buckets changed")
        hist.counts, hist.sum = list(counts), total
    _restore_projects(led, state)
    led.duplicates = state.duplicates
    led.last_event_ts = state.last_event_ts
    led.clamped.update(dict(state.clamped))
    led.orphaned = state.orphaned
    # Projects, models, error types; and users (saved since users are bounded too).
    limiters = (led.project_labels, led.model_labels, led.error_labels, led.user_labels)
    if len(state.labels) not in (3, 4):
        raise ValueError("state does not fit: labels: expected 3 or 4 limiters")
    for lim, (known, overflow) in zip(limiters, state.labels, strict=False):
        lim.known.clear()
        lim.known.update((k, k) for k in known)
        lim.overflow = overflow
    led.keep_budget_users()


def _restore_projects(led: Book, state: LedgerState) -> None:
    """Per project: tasks in flight, and tasks expired with what they were charged."""
    for p, n in state.in_flight:
        project_counts = led.projects.setdefault(p, project_slots())
        project_counts[IN_FLIGHT], project_counts[TOUCHED] = n, 1
    for p, n in state.expired:
        led.projects.setdefault(p, project_slots())[EXPIRED] = n
    for p, credits in state.expired_credits:
        led.projects.setdefault(p, project_slots())[EXPIRED_CREDITS] = credits


def _restore_tasks(led: Book, state: LedgerState) -> None:
    """The task index, its expiry and the events waiting for their submission."""
    try:
        led.waiting = {
            task_id: (Event(*fields), ts, read_at) for task_id, ts, read_at, fields in state.waiting
        }
    except TypeError as e:  # the event's fields are saved in order, untyped
        raise ValueError(f"state does not fit: waiting events: {e}") from None
    led.tasks = dict(state.tasks)
    led.expiry = deque(state.expiry)
    owners = state.evicted_owners
    led.evicted.restore(owners, state.evicted_older, state.evicted_newer, state.evicted_total)
