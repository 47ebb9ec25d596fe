"""The pre-flight API and the log read a task's fields alike: one vocabulary, so a body
the API accepts is a line the log accepts, with the same meaning, and the reverse."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from kling_exporter.events import Event, decode_line
from kling_exporter.serving.api import CheckRequest

FIELDS: list[dict[str, Any]] = [
    {"user_id": 42},
    {"user": "ann"},
    {"project_id": 7},
    {"project": 7},
    {"project": "marketing", "project_id": "ignored"},
    {"duration": "10"},
    {"duration": 0},
    {"duration": 3600},
    {"mode": "std"},
    {"mode": "pro"},
    {"mode": "professional"},
    {"kind": "Videos"},
    {"kind": "try-on"},
    {"kind": "audio"},  # no kind of ours: counted and priced as "other"
    {"audio": True},
    {"audio": "true"},
    {"model": "kling-v2-6"},
]
REFUSED: list[dict[str, Any]] = [
    {"duration": -1},
    {"duration": 3601},
    {"duration": "long"},
    {"mode": "PRO"},
    {"mode": "turbo"},
    {"project": ""},
    {"user": "x" * 129},
    {"project": True},
    {"kind": ""},
    {"audio": "yes"},
    {"model": ""},
]


def as_line(fields: dict[str, Any]) -> Event | str:
    line = {"event": "task_submitted", "task_id": "t", **fields}
    return decode_line(json.dumps(line).encode())


def as_body(fields: dict[str, Any]) -> CheckRequest:
    return msgspec.json.decode(json.dumps(fields), type=CheckRequest, strict=False)


@pytest.mark.parametrize("fields", FIELDS, ids=json.dumps)
def test_what_the_log_accepts_the_api_accepts_alike(fields: dict[str, Any]) -> None:
    event, body = as_line(fields), as_body(fields)
    assert isinstance(event, Event), event
    project = event.project if event.own_project else None
    assert (body.project, body.user) == (project, event.user)
    assert (body.model, body.mode, body.duration, body.kind) == (
        event.model,
        event.mode,
        event.duration,
        event.kind,
    )
    assert bool(body.audio) == bool(event.audio)


@pytest.mark.parametrize("fields", REFUSED, ids=json.dumps)
def test_what_the_log_refuses_the_api_refuses(fields: dict[str, Any]) -> None:
    assert isinstance(as_line(fields), str)
    with pytest.raises(msgspec.ValidationError):
        as_body(fields)
