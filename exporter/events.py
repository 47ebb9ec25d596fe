"""Decoding one JSONL line into a typed event, or into the reason it is not one.

Nothing here raises on bad input: ``decode_line`` returns either an ``Event``
or one of ``INVALID_REASONS``. Only the fields named in the spec are read;
free text such as prompts and error messages is never decoded at all.
"""

from __future__ import annotations

import datetime as dt
from typing import Final

import msgspec

from exporter.config import KINDS, normalize_mode

SUBMITTED: Final = 0
COMPLETED: Final = 1
ERROR: Final = 2
USAGE: Final = 3

EVENT_NAMES: Final = {
    "task_submitted": SUBMITTED,
    "task_completed": COMPLETED,
    "task_error": ERROR,
}

INVALID_REASONS: Final = (
    "invalid_json",
    "invalid_utf8",
    "not_object",
    "wrong_type",
    "missing_field",
    "unknown_event",
    "bad_value",
    "too_long",
)

MAX_LABEL_LEN: Final = 128
DEFAULT_PROJECT: Final = "default"
UNKNOWN_MODEL: Final = "unknown"
UNKNOWN_ERROR: Final = "unknown"
STATUSES: Final = ("succeed", "failed")

_UTC = dt.UTC


class _Raw(msgspec.Struct, gc=False):
    event: str | None = None
    timestamp: dt.datetime | None = None
    task_id: str | int | None = None
    project: str | None = None
    project_id: str | None = None
    user: str | None = None
    user_id: str | None = None
    model: str | None = None
    duration: int | None = None
    mode: str | None = None
    audio: bool | None = None
    kind: str | None = None
    status: str | None = None
    elapsed_sec: float | None = None
    credits_used: float | None = None
    credits: float | None = None
    error_type: str | None = None


class Event(msgspec.Struct, gc=False):
    """A validated event. ``ts`` is Unix seconds, or None when the line had no time."""

    type: int
    task_id: str
    ts: float | None
    project: str
    user: str | None
    model: str | None
    mode: str | None
    duration: int | None
    audio: bool | None
    kind: str | None
    status: str | None
    elapsed: float | None
    credits: float | None
    error_type: str | None


# strict=False accepts Kling's habits: durations as "5", times as Unix numbers.
_decoder = msgspec.json.Decoder(_Raw, strict=False)


def decode_line(line: bytes) -> Event | str:
    """Decode one line (without its newline) into an Event or an invalid reason."""
    try:
        raw = _decoder.decode(line)
    except msgspec.ValidationError as e:
        return "not_object" if str(e).startswith("Expected `object`") else "wrong_type"
    except UnicodeDecodeError:
        return "invalid_utf8"
    except msgspec.DecodeError:
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            return "invalid_utf8"
        return "invalid_json"
    return validate(raw)


def validate(raw: _Raw) -> Event | str:
    name = raw.event
    if name is None:
        if raw.credits is None:
            return "unknown_event" if raw.task_id is not None else "missing_field"
        etype = USAGE
    else:
        found = EVENT_NAMES.get(name)
        if found is None:
            return "unknown_event"
        etype = found
    task_id = raw.task_id
    if task_id is None:
        return "missing_field"
    if isinstance(task_id, int):
        task_id = str(task_id)
    if not task_id or len(task_id) > 256:
        return "bad_value"

    ts: float | None = None
    if raw.timestamp is not None:
        stamp = raw.timestamp
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=_UTC)
        ts = stamp.timestamp()

    project = raw.project if raw.project is not None else raw.project_id
    user = raw.user if raw.user is not None else raw.user_id
    for label in (project, user, raw.model, raw.error_type):
        # An empty or very long label value is garbage, not a name.
        if label is not None and (not label or len(label) > MAX_LABEL_LEN):
            return "bad_value"

    mode = raw.mode
    if mode is not None:
        mode = normalize_mode(mode)
        if mode is None:
            return "bad_value"
    kind = raw.kind
    if kind is not None and kind not in KINDS:
        return "bad_value"
    status = raw.status
    if status is not None and status not in STATUSES:
        return "bad_value"
    duration = raw.duration
    if duration is not None and not 0 <= duration <= 3600:
        return "bad_value"
    credits = raw.credits_used if etype != USAGE else raw.credits
    if credits is not None and not 0 <= credits < 1e12:  # also refuses NaN and inf
        return "bad_value"
    elapsed = raw.elapsed_sec
    if elapsed is not None and not 0 <= elapsed < 1e9:
        return "bad_value"

    return Event(
        type=etype,
        task_id=task_id,
        ts=ts,
        project=project or DEFAULT_PROJECT,
        user=user,
        model=raw.model,
        mode=mode,
        duration=duration,
        audio=raw.audio,
        kind=kind,
        status=status,
        elapsed=elapsed,
        credits=credits,
        error_type=raw.error_type,
    )
