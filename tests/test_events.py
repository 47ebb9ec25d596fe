from __future__ import annotations

import datetime as dt
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kling_exporter import events
from kling_exporter.events import Event, decode_line, explain_invalid


def decode(**fields: object) -> Event | str:
    return decode_line(json.dumps(fields).encode())


def test_submitted_event_is_decoded_with_kling_aliases() -> None:
    e = decode(
        event="task_submitted",
        timestamp="2026-11-22T10:00:00Z",
        task_id="t1",
        project_id="marketing",
        user_id="ann",
        model="kling-v2-6",
        duration=10,
        mode="pro",
        audio=True,
        kind="video",
        prompt_len=120,
    )
    assert isinstance(e, Event)
    assert e.type == events.SUBMITTED
    assert (e.project, e.user, e.model, e.mode, e.duration, e.audio) == (
        "marketing",
        "ann",
        "kling-v2-6",
        "professional",
        10,
        True,
    )
    assert e.ts == dt.datetime(2026, 11, 22, 10, tzinfo=dt.UTC).timestamp()


def test_std_is_standard() -> None:
    e = decode(event="task_submitted", task_id="t", mode="std")
    assert isinstance(e, Event) and e.mode == "standard"


def test_naive_timestamp_is_utc() -> None:
    e = decode(event="task_error", task_id="t", timestamp="2026-11-22T10:00:00")
    assert isinstance(e, Event)
    assert e.ts == dt.datetime(2026, 11, 22, 10, tzinfo=dt.UTC).timestamp()


def test_offset_timestamp_is_converted() -> None:
    e = decode(event="task_error", task_id="t", timestamp="2026-11-22T12:00:00+02:00")
    assert isinstance(e, Event)
    assert e.ts == dt.datetime(2026, 11, 22, 10, tzinfo=dt.UTC).timestamp()


def test_missing_timestamp_is_left_for_the_time_of_reading() -> None:
    e = decode(event="task_error", task_id="t")
    assert isinstance(e, Event) and e.ts is None


def test_missing_project_is_default() -> None:
    e = decode(event="task_submitted", task_id="t")
    assert isinstance(e, Event) and e.project == "default"


def test_duration_as_string_is_accepted() -> None:
    e = decode(event="task_submitted", task_id="t", duration="5")
    assert isinstance(e, Event) and e.duration == 5


def test_usage_line_without_event() -> None:
    e = decode(task_id="u1", credits=35, project="p")
    assert isinstance(e, Event)
    assert e.type == events.USAGE and e.credits == 35


def test_completed_event() -> None:
    e = decode(
        event="task_completed", task_id="t", status="failed", elapsed_sec=3.5, credits_used=0
    )
    assert isinstance(e, Event)
    assert (e.type, e.status, e.elapsed_sec, e.credits_used) == (events.COMPLETED, "failed", 3.5, 0)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"not json", "invalid_json"),
        (b'{"event": "task_submitted", "task_id": "t"', "invalid_json"),
        (b'{"event": "task_submitted", "task_id": "\xff\xfe"}', "invalid_utf8"),
        (b"[1, 2]", "not_object"),
        (b"42", "not_object"),
        (b'{"event": "task_submitted", "task_id": "t", "duration": "long"}', "wrong_type"),
        (b'{"event": "task_submitted", "task_id": ["t"]}', "wrong_type"),
        (b'{"event": "task_completed", "task_id": "t", "elapsed_sec": "x"}', "wrong_type"),
        (b'{"event": "task_submitted", "task_id": "t", "timestamp": "yesterday"}', "wrong_type"),
        (b'{"event": "task_submitted"}', "missing_field"),
        (b'{"project": "p"}', "missing_field"),
        (b'{"event": "task_cancelled", "task_id": "t"}', "unknown_event"),
        (b'{"task_id": "t"}', "unknown_event"),
        (b'{"event": "task_submitted", "task_id": "t", "mode": "turbo"}', "bad_value"),
        (b'{"event": "task_completed", "task_id": "t", "status": "maybe"}', "bad_value"),
        (b'{"event": "task_completed", "task_id": "t", "credits_used": -1}', "bad_value"),
        (b'{"event": "task_submitted", "task_id": "t", "project": ""}', "bad_value"),
    ],
)
def test_bad_lines_are_classified(raw: bytes, reason: str) -> None:
    assert decode_line(raw) == reason


def test_message_and_prompt_are_never_read() -> None:
    e = decode(
        event="task_error",
        task_id="t",
        error_type="quota",
        message={"not": "a string"},
        prompt=["whatever"],
    )
    assert isinstance(e, Event) and e.error_type == "quota"


def test_overlong_label_values_are_refused() -> None:
    assert decode(event="task_submitted", task_id="t", project="p" * 500) == "bad_value"


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    result = decode_line(data)
    assert isinstance(result, Event) or result in events.INVALID_REASONS


LABEL_FIELDS = {"project", "project_id", "user", "user_id", "model", "error_type"}


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "event",
                "task_id",
                "message",
                "prompt",
                "status",
                "mode",
                "model",
                "project",
                "error_type",
                "credits",
                "note",
                "kind",
            ]
        ),
        st.one_of(st.text(max_size=40), st.integers(), st.none(), st.booleans()),
    )
)
def test_free_text_never_becomes_a_label(fields: dict[str, object]) -> None:
    result = decode_line(json.dumps(fields).encode())
    if not isinstance(result, Event):
        return
    labels = {result.project, result.model, result.error_type, result.user}
    given = [fields.get(k) for k in LABEL_FIELDS]
    # Numeric names are their decimal strings (SPEC section 2).
    numbers = {str(v) for v in given if isinstance(v, int) and not isinstance(v, bool)}
    assert labels <= {*given, *numbers, "default", None}


def test_json_nested_too_deep_is_its_own_reason() -> None:
    deep = b'{"event": "task_completed", "task_id": "y", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    assert decode_line(deep) == "too_deep"


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"user_id": 42}, ("default", "42")),
        ({"project": 7, "user": 9}, ("7", "9")),
        ({"project_id": 12}, ("12", None)),
    ],
)
def test_numeric_names_are_their_decimal_strings(
    fields: dict[str, object], expected: tuple[str, str | None]
) -> None:
    e = decode(event="task_submitted", task_id=1, **fields)
    assert isinstance(e, Event)
    assert (e.project, e.user, e.task_id) == (*expected, "1")


def test_unix_seconds_and_milliseconds() -> None:
    at = dt.datetime(2026, 11, 22, 10, tzinfo=dt.UTC).timestamp()
    for stamp in (at, int(at * 1000), str(int(at))):
        e = decode(event="task_error", task_id="t", timestamp=stamp)
        assert isinstance(e, Event) and e.ts == at, stamp


def test_a_not_finite_timestamp_is_a_bad_value() -> None:
    assert decode_line(b'{"event": "task_error", "task_id": "t", "timestamp": "nan"}') == (
        "bad_value"
    )


def test_byte_order_mark_is_ignored() -> None:
    e = decode_line(b'\xef\xbb\xbf{"event": "task_submitted", "task_id": "t"}')
    assert isinstance(e, Event) and e.task_id == "t"


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("video", "video"),
        ("images", "image"),
        ("Image", "image"),
        ("virtual_try_on", "try_on"),
        ("try-on", "try_on"),
        ("3d_scene", "other"),
    ],
)
def test_kind_spellings(kind: str, expected: str) -> None:
    e = decode(event="task_submitted", task_id="t", kind=kind)
    assert isinstance(e, Event) and e.kind == expected


@pytest.mark.parametrize("field", ["task_id", "reservation_id"])
def test_an_identifier_over_128_characters_makes_the_line_invalid(field: str) -> None:
    fields = {"event": "task_submitted", "task_id": "t", field: "r" * 128}
    assert isinstance(decode_line(json.dumps(fields).encode()), Event)
    fields[field] = "r" * 129
    assert decode_line(json.dumps(fields).encode()) == "id_too_long"
    field_named, detail = explain_invalid(json.dumps(fields).encode())
    assert field_named == field and "128" in detail
