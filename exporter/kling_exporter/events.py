"""Decoding one JSONL line into a typed event, or into the reason it is not one.

Nothing here raises on bad input: ``decode_line`` returns either an ``Event``
or one of ``INVALID_REASONS``. Only the fields named in the spec are read;
free text such as prompts and error messages is never decoded at all.

The types and bounds of every field are checked by msgspec while it decodes (in C);
what is left in Python is the little that ties fields together.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from typing import Annotated, Final, Literal

import msgspec

from kling_exporter.validation import describe_validation_error
from kling_exporter.vocabulary import KIND_ALIASES, KINDS, MODE_ALIASES, OTHER_KIND

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
    "too_deep",
    "id_too_long",
    "internal_error",
)

MAX_LABEL_LEN: Final = 128
# Identifiers (task_id, reservation_id, a reservation's id) are bounded wherever they
# arrive, so no outsider can make the saved state or a journal grow without bound.
MAX_ID: Final = 128
DEFAULT_PROJECT: Final = "default"
UNKNOWN_MODEL: Final = "unknown"
UNKNOWN_ERROR: Final = "unknown"

_UTC = dt.UTC
_KINDS = frozenset(KINDS)
_BOM = b"\xef\xbb\xbf"

# The vocabulary of a task, defined once: the log lines below and the pre-flight API
# (``serving.api.CheckRequest``) accept the same values, decoded with the same leniency
# (``strict=False``: ``"duration": "10"`` is 10).
# An empty or very long label value is garbage, not a name.
Label = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_LABEL_LEN)]
Identifier = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID)]
# Numeric names and ids are their decimal strings (``"user_id": 42`` is user "42").
LabelOrNumber = Label | int
Duration = Annotated[int, msgspec.Meta(ge=0, le=3600)]  # seconds of video
Mode = Literal["standard", "professional", "std", "pro"]
Credits = Annotated[float, msgspec.Meta(ge=0, lt=1e12)]
# A numeric timestamp above this is Unix milliseconds, below it Unix seconds.
MILLIS_FROM: Final = 1e11
# Fields the decoder fills in itself; decode_line always overwrites them, so a JSON key
# of the same name has no effect.
_DERIVED = "__derived_"


class Event(msgspec.Struct, gc=False):
    """One event line. After ``decode_line``: ``type`` is one of SUBMITTED, COMPLETED,
    ERROR, USAGE; ``ts`` is Unix seconds or None; ``project`` is set (``default`` when the
    line had none); ``user`` falls back to ``user_id``; ``mode`` is ``standard`` or
    ``professional``; ``task_id`` is a string."""

    event: Literal["task_submitted", "task_completed", "task_error"] | None = None
    timestamp: dt.datetime | float | None = None
    # UNSET when the line has no task_id at all; None when it says null (a task_error
    # logged when the submission itself failed, before Kling gave the task an id).
    task_id: Identifier | int | msgspec.UnsetType | None = msgspec.UNSET
    project: LabelOrNumber | None = None
    project_id: LabelOrNumber | None = None
    user: LabelOrNumber | None = None
    user_id: LabelOrNumber | None = None
    model: Label | None = None
    duration: Duration | None = None
    mode: Mode | None = None
    audio: bool | None = None
    kind: Label | None = None
    status: Literal["succeed", "failed"] | None = None
    elapsed_sec: Annotated[float, msgspec.Meta(ge=0, lt=1e9)] | None = None
    credits_used: Credits | None = None
    credits: Credits | None = None
    error_type: Label | None = None
    type: int = msgspec.field(default=-1, name=_DERIVED + "type")
    ts: float | None = msgspec.field(default=None, name=_DERIVED + "ts")
    # Whether the line named its project itself (rather than leaving it to the join).
    own_project: bool = msgspec.field(default=False, name=_DERIVED + "own_project")
    # The reservation a submission uses (POST /api/v1/reservations). Any string or number
    # is read: one that names no live reservation is counted as unknown, never refused.
    reservation_id: Identifier | int | None = None


# strict=False accepts Kling's habits: durations as "5", times as Unix numbers.
_decoder = msgspec.json.Decoder(Event, strict=False)
_BOUND = re.compile(r"Expected `\w+` (?:of length )?[<>]=?")
_ID_TOO_LONG = re.compile(r"Expected `str` of length <= \d+ - at `\$\.(task_id|reservation_id)`")


def _classify(error: msgspec.ValidationError) -> str:
    msg = str(error)
    if msg.startswith("Expected `object`"):
        return "not_object"
    if msg.endswith("`$.event`"):
        return "unknown_event"
    if _ID_TOO_LONG.match(msg):
        return "id_too_long"
    if "Invalid enum value" in msg or _BOUND.match(msg):
        return "bad_value"
    return "wrong_type"


def explain_invalid(line: bytes, limit: int = 80) -> tuple[str, str]:
    """For the log, not the hot path: the field a rejected line got wrong and what is
    wrong with it, in the words config errors use, with its value cut short (free-text
    fields are never decoded, so no prompt or message can appear here)."""
    line = line[3:] if line.startswith(_BOM) else line
    try:
        _decoder.decode(line)
    except msgspec.ValidationError as err:
        field, _, detail = describe_validation_error(err, Event).partition(": ")
        try:
            value = msgspec.json.decode(line).get(field)
            detail += f", value {value!r}"[: limit // 2]
        except (msgspec.DecodeError, AttributeError, RecursionError):
            pass
        return field, detail[:limit]
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as err:
        return "(line)", str(err)[:limit]
    return "task_id", "missing"


def decode_line(line: bytes) -> Event | str:  # noqa: C901, PLR0911, PLR0912, PLR0915
    """Decode one line (without its newline) into an Event or an invalid reason.

    One function on purpose: it runs for every line read, and split into four it cost
    9% more instructions a line (``bench/instructions.py``: 13,475 against 14,707)."""
    try:
        e = _decoder.decode(line)
    except RecursionError:
        return "too_deep"
    except msgspec.ValidationError as err:
        return _classify(err)
    except UnicodeDecodeError:
        return "invalid_utf8"
    except msgspec.DecodeError:
        if line.startswith(_BOM):  # a byte-order mark, as some editors write: looked
            return decode_line(line[3:])  # for only here, off the path of good lines
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            return "invalid_utf8"
        return "invalid_json"
    name = e.event
    task_id = e.task_id
    if name is None:
        if e.credits is None:
            return "unknown_event" if task_id else "missing_field"
        e.type = USAGE
    else:
        e.type = EVENT_NAMES[name]
    if type(task_id) is int:
        e.task_id = str(task_id)
    elif task_id is None:
        if e.type != ERROR:
            return "missing_field"
    elif task_id is msgspec.UNSET:
        return "missing_field"
    stamp = e.timestamp
    if stamp is None:
        e.ts = None
    elif type(stamp) is float:
        if not math.isfinite(stamp) or stamp < 0:
            return "bad_value"
        e.ts = stamp / 1000 if stamp > MILLIS_FROM else stamp
    else:
        e.ts = (stamp if stamp.tzinfo is not None else stamp.replace(tzinfo=_UTC)).timestamp()  # type: ignore[union-attr]
    # Numbers become their decimal strings; the common case (strings) costs one check.
    # (``name_of`` and ``kind_of`` below say the same for the API, off this hot path.)
    project = e.project
    if project is None:
        project = e.project_id
        if project is None:
            e.project = DEFAULT_PROJECT
        else:
            e.project = project if type(project) is str else str(project)
            e.own_project = True
    else:
        if type(project) is not str:
            e.project = str(project)
        e.own_project = True
    user = e.user
    if user is None:
        user = e.user_id
        if user is not None:
            e.user = user if type(user) is str else str(user)
    elif type(user) is not str:
        e.user = str(user)
    mode = e.mode
    if mode is not None:
        e.mode = MODE_ALIASES[mode]
    kind = e.kind
    if kind is not None and kind not in _KINDS:
        e.kind = KIND_ALIASES.get(kind.lower(), OTHER_KIND)
    return e


def name_of(value: str | int | None, fallback: str | int | None = None) -> str | None:
    """A project or user as the log reads it: the field, else its ``_id`` twin, numbers
    as their decimal strings."""
    found = value if value is not None else fallback
    return None if found is None else str(found)


def kind_of(kind: str | None) -> str | None:
    """A task kind as the log reads it: our name for a known spelling, else ``other``."""
    if kind is None or kind in _KINDS:
        return kind
    return KIND_ALIASES.get(kind.lower(), OTHER_KIND)
