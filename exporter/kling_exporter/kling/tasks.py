"""What Kling says of a task, as a log event: a callback's (or a query answer's) body
read into a ``task_completed`` line, each field checked and named when it is wrong,
and the journal's ids of the tasks one create made."""

from __future__ import annotations

import math
from typing import Any

from kling_exporter.events import MAX_ID

STATUSES = ("submitted", "processing", "succeed", "failed")


class CallbackError(ValueError):
    """A body that is not a Kling callback; the message names the field."""


def part_ids(task_id: str, tasks: int) -> list[str]:
    """The journal's ids for the ``tasks`` tasks one create made (``n`` images): Kling's
    id for the first, ``<id>#2``... for the others."""
    stem = task_id[: MAX_ID - 4]
    return [task_id] + [f"{stem}#{k}" for k in range(2, tasks + 1)]


def completion(body: Any, by_kling_id: bool = False) -> dict[str, Any] | None:
    """The log event a callback body stands for (None for a status that changes no
    count); CallbackError naming the field when it is not a callback. Its task id is
    the producer's ``external_task_id`` when present, else Kling's; Kling's alone
    ``by_kling_id`` (the gateway's tasks, journalled by Kling's id)."""
    if not isinstance(body, dict):
        raise CallbackError("body: expected a JSON object")
    task_id = body.get("task_id")
    if not isinstance(task_id, str) or not 0 < len(task_id) <= MAX_ID:
        raise CallbackError(f"task_id: expected 1 to {MAX_ID} characters")
    status = body.get("task_status")
    if status not in STATUSES:
        raise CallbackError(f"task_status: expected one of {', '.join(STATUSES)}")
    info = body.get("task_info")
    if info is not None and not isinstance(info, dict):
        raise CallbackError("task_info: expected an object")
    external = (info or {}).get("external_task_id")
    if external is not None and (not isinstance(external, str) or not 0 < len(external) <= MAX_ID):
        raise CallbackError(f"task_info.external_task_id: expected 1 to {MAX_ID} characters")
    credits = _number(body.get("final_unit_deduction"), "final_unit_deduction", 1e12)
    updated = _number(body.get("updated_at"), "updated_at", 1e15)
    if status in ("submitted", "processing"):
        return None
    event: dict[str, Any] = {
        "event": "task_completed",
        "task_id": task_id if by_kling_id else external or task_id,
        "status": status,
        "source": "kling_callback",
        "kling_task_id": task_id,
    }
    if updated is not None:
        event["timestamp"] = updated  # Unix milliseconds, which the log reads as such
    if credits is not None:
        event["credits_used"] = credits
    if by_kling_id and external is not None:
        event["external_task_id"] = external
    return event


def _number(value: Any, field: str, below: float) -> float | None:
    """A number Kling may send as a string ("10" or "10.5"), or None when absent."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise CallbackError(f"{field}: expected a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise CallbackError(f"{field}: expected a number, got {value!r}") from None
    if not math.isfinite(number) or not 0 <= number < below:
        raise CallbackError(f"{field}: out of range: {value!r}")
    return number
