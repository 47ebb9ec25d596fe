"""The saved state: one typed schema for the ledger's totals and the positions in the
log files, checked by msgspec as it is read, and written atomically.

A state that cannot be decoded is moved aside (``.corrupt``); one that decodes but does
not fit this schema is reported field by field; either way the daemon rebuilds from
the logs. Fields added since a version have defaults, so older states still load.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import msgspec

from kling_exporter.model import Task

log = logging.getLogger(__name__)

FORMAT = 1
LEDGER_VERSIONS = (3, 4)  # 3 lacks only what 4 added (clamped times, waiting events)
LEDGER_VERSION = 4

Keyed3 = tuple[str, str, str, int]  # project, model, mode or status, count


class LedgerState(msgspec.Struct):
    """The ledger's totals, its task index and daily usage (see ``Ledger.to_state``)."""

    version: int
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
    invalid: list[tuple[str, int]]
    lines_read: int
    bytes_read: int
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

    def __post_init__(self) -> None:
        if self.version not in LEDGER_VERSIONS:
            raise ValueError(f"version {self.version} is not one of {LEDGER_VERSIONS}")


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

    def __post_init__(self) -> None:
        if self.format != FORMAT:
            raise ValueError(f"format {self.format} is not {FORMAT}")


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


def write_state(path: Path, data: bytes) -> None:
    """Write atomically: a temporary file readable by the owner only, fsync, rename,
    fsync of the directory. A failed write (a full disk) leaves no temporary file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with open(fd, "wb") as f:
            os.fchmod(fd, 0o600)  # also when an older version left the file 0644
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
