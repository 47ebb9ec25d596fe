"""Kling's task callbacks: parsed as Kling sends them, journalled among the logs and
fsynced before the 200, counted once however often they come, across kill -9."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from kling_exporter.config import LogsConfig
from kling_exporter.events import Event, decode_line
from kling_exporter.journals.tasklog import EventJournal, journal_for, open_journal
from kling_exporter.kling.tasks import CallbackError, completion

from tests.helpers import DaemonProcess, half_then_full, line, value, write_lines

Factory = Callable[..., DaemonProcess]
TOKEN = "callback-token-0123456789"  # noqa: S105 - a test's own token
CONFIG = f"""
state: {{path: {{state}}}}
logs: {{poll_interval: 100ms}}
kling: {{callback_token: {TOKEN}}}
"""


@pytest.mark.parametrize(
    ("paths", "journal"),
    [
        (["logs/kling-*.jsonl"], "logs/kling-callbacks.jsonl"),
        (["/var/log/kling/*.jsonl"], "/var/log/kling/callbacks.jsonl"),
        (["a/b/x.log", "logs/*"], "logs/callbacks"),
        (["logs/*/kling-*.jsonl"], None),  # no folder without wildcards
        (["logs/kling-[ab].jsonl"], None),
    ],
)
def test_the_journal_is_a_file_the_log_globs_match(paths: list[str], journal: str | None) -> None:
    found = journal_for(LogsConfig(paths=paths))
    assert (None if found is None else str(found)) == journal


def body(status: str = "succeed", **more: Any) -> dict[str, Any]:
    return {
        "task_id": "CjhkN2Zg",
        "task_status": status,
        "task_status_msg": "",
        "created_at": 1795000000000,
        "updated_at": 1795000090000,
        **more,
    }


@pytest.mark.parametrize(
    ("deduction", "credits"), [("10", 10.0), ("7.5", 7.5), (35, 35.0), (None, None), ("", None)]
)
def test_a_final_callback_is_a_completion_the_log_reads(
    deduction: object, credits: float | None
) -> None:
    event = completion(
        body(final_unit_deduction=deduction, task_info={"external_task_id": "mine-7"})
    )
    assert event is not None
    assert event["task_id"] == "mine-7" and event.get("credits_used") == credits
    decoded = decode_line(json.dumps(event).encode())
    assert isinstance(decoded, Event)
    assert (decoded.task_id, decoded.status, decoded.ts) == ("mine-7", "succeed", 1795000090.0)
    assert completion(body("failed"))["task_id"] == "CjhkN2Zg"  # type: ignore[index]
    assert completion(body("submitted")) is None and completion(body("processing")) is None


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ([1, 2], "body"),
        ({"task_status": "succeed"}, "task_id"),
        (body("done"), "task_status"),
        (body(final_unit_deduction="ten"), "final_unit_deduction"),
        (body(final_unit_deduction=-1), "final_unit_deduction"),
        (body(final_unit_deduction=True), "final_unit_deduction"),
        (body(task_info="x"), "task_info"),
        (body(task_info={"external_task_id": 5}), "task_info.external_task_id"),
        (body(updated_at="soon"), "updated_at"),
    ],
)
def test_what_is_not_a_callback_is_refused_naming_the_field(raw: Any, field: str) -> None:
    with pytest.raises(CallbackError) as refused:
        completion(raw)
    assert str(refused.value).startswith(field + ":")


def start(tmp_path: Path, daemon_factory: Factory) -> DaemonProcess:
    return daemon_factory(CONFIG.replace("{state}", str(tmp_path / "k.state")))


def post(d: DaemonProcess, payload: object, token: str | None = TOKEN) -> tuple[int, Any]:
    query = "" if token is None else f"?token={token}"
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    status, answer = d.post(f"/api/v1/kling/callback{query}", raw)
    return status, json.loads(answer) if answer.startswith(b"{") else answer


def submissions(tmp_path: Path, n: int) -> None:
    write_lines(
        tmp_path / "logs" / "kling-2026-11-22.jsonl",
        [
            line(
                event="task_submitted",
                task_id=f"mine-{i}",
                project="p",
                model="kling-v2-6",
                mode="std",
                duration=5,
            )
            for i in range(n)
        ],
    )


def done(i: int, **more: Any) -> dict[str, Any]:
    return body(
        task_id=f"kling-{i}",
        final_unit_deduction=str(10 + i),
        task_info={"external_task_id": f"mine-{i}"},
        **more,
    )


def test_callbacks_are_counted_once_across_repeats_and_kill_9(
    tmp_path: Path, daemon_factory: Factory
) -> None:
    submissions(tmp_path, 40)
    d = start(tmp_path, daemon_factory)
    with ThreadPoolExecutor(16) as pool:  # concurrent, each sent twice, out of order
        answers = list(pool.map(lambda i: post(d, done(i % 40)), reversed(range(80))))
    assert all(status == 200 for status, _ in answers)
    assert post(d, body("processing", task_id="kling-99"))[0] == 200
    expected = sum(10 + i for i in range(40))
    d.wait_metric("kling_credits_used_total", expected, project="p", model="kling-v2-6")
    d.stop(signal.SIGKILL)

    d = start(tmp_path, daemon_factory)
    for i in range(5):  # Kling calls again: it never saw the 200s of these
        assert post(d, done(i))[0] == 200
    series = d.wait_metric("kling_credits_used_total", expected, project="p", model="kling-v2-6")
    labels = {"project": "p", "model": "kling-v2-6", "status": "succeed"}
    assert value(series, "kling_tasks_completed_total", **labels) == 40
    assert value(series, "kling_tasks_in_flight", project="p") == 0
    assert value(series, "kling_callbacks_total", outcome="recorded") == 5


def test_callbacks_refused_as_they_should_be(tmp_path: Path, daemon_factory: Factory) -> None:
    d = start(tmp_path, daemon_factory)
    assert post(d, done(1), token=None)[0] == 401
    assert post(d, done(1), token=TOKEN[:-1] + "x")[0] == 401
    status, answer = post(d, body(final_unit_deduction="lots"))
    assert status == 400 and answer["field"] == "final_unit_deduction"
    assert post(d, b"not json")[0] == 400
    assert post(d, json.dumps(body(pad="x" * 70_000)).encode())[0] == 413
    series = d.metrics()
    assert value(series, "kling_callbacks_total", outcome="unauthorized") == 2
    assert value(series, "kling_callbacks_total", outcome="invalid") == 3
    assert not (tmp_path / "logs" / "kling-callbacks.jsonl").exists()


def test_no_200_for_a_callback_that_is_not_on_disk(tmp_path: Path, daemon_factory: Factory) -> None:
    (tmp_path / "logs" / "kling-callbacks.jsonl").mkdir(parents=True)  # cannot be written
    d = start(tmp_path, daemon_factory)
    assert post(d, done(1))[0] == 503
    assert value(d.metrics(), "kling_callbacks_total", outcome="unavailable") == 1


def test_without_a_token_there_is_no_endpoint(tmp_path: Path, daemon_factory: Factory) -> None:
    d = daemon_factory("state: {path: ''}\n")
    assert post(d, done(1))[0] == 404


@pytest.mark.parametrize("planted", ["symlink", "fifo"])
def test_the_journal_is_never_written_through_a_planted_file(
    tmp_path: Path, daemon_factory: Factory, planted: str
) -> None:
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("")
    journal = tmp_path / "logs" / "kling-callbacks.jsonl"
    journal.parent.mkdir(parents=True)
    if planted == "symlink":
        journal.symlink_to(outside)
    else:
        os.mkfifo(journal)
    d = start(tmp_path, daemon_factory)
    status, answer = post(d, done(1))
    assert status == 503, answer
    assert answer == {
        "error": "journal: cannot be written (see the exporter's log)",
        "field": "journal",
    }
    assert outside.read_text() == ""
    assert "cannot write the callback journal" in d.output()


def test_the_journal_refuses_a_file_owned_by_another_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "kling-callbacks.jsonl"
    path.write_text("")
    monkeypatch.setattr(os, "geteuid", lambda: os.stat(path).st_uid + 1)
    with pytest.raises(OSError, match="owned by another user"):
        open_journal(path)
    monkeypatch.undo()
    os.close(open_journal(path))


def test_the_open_journal_follows_its_path_through_rotation_and_refuses_a_plant(
    tmp_path: Path,
) -> None:
    """The journal's file stays open between writes, but each write goes where the
    path names now: a new file after a rename or a removal, and no file at all where a
    symlink was planted."""
    path = tmp_path / "logs" / "kling-callbacks.jsonl"
    journal = EventJournal(path)
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("")

    def lines(p: Path) -> list[Any]:
        return [json.loads(t)["n"] for t in p.read_text().splitlines()]

    async def story() -> None:
        await journal.append({"n": 1})
        await journal.append({"n": 2})
        path.rename(path.with_suffix(".1"))  # logrotate's rename
        await journal.append({"n": 3})
        path.unlink()
        await journal.append({"n": 4})
        path.unlink()
        path.symlink_to(outside)
        with pytest.raises(OSError, match="symbolic link"):
            await journal.append({"n": 5})
        path.unlink()
        await journal.append({"n": 6})
        await journal.close()

    asyncio.run(story())
    assert lines(path.with_suffix(".1")) == [1, 2]
    assert lines(path) == [6]
    assert outside.read_text() == ""


def read_back(path: Path) -> list[Event | str]:
    """Each line of ``path`` as the reader decodes it: an event, or why it is not one."""
    return [decode_line(raw) for raw in path.read_bytes().split(b"\n")[:-1]]


def test_a_line_the_disk_took_half_of_is_one_bad_line_not_two(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk mid-line leaves half a line; the next line written starts on a line
    of its own, so the reader skips the torn part and counts the next task (glued to
    the torn part, the next line was bad too, and its task lost)."""
    path = tmp_path / "kling-callbacks.jsonl"
    journal = EventJournal(path)

    async def story() -> None:
        await journal.append({"event": "task_completed", "task_id": "t1"})
        half_then_full(monkeypatch)
        with pytest.raises(OSError):
            await journal.append({"event": "task_completed", "task_id": "torn"})
        await journal.append({"event": "task_completed", "task_id": "t3"})
        await journal.append({"event": "task_completed", "task_id": "t4"})
        await journal.close()

    asyncio.run(story())
    read = read_back(path)
    assert [e.task_id for e in read if isinstance(e, Event)] == ["t1", "t3", "t4"]
    assert len(read) == 4  # the torn part is one line, read and skipped


def test_a_journal_left_mid_line_by_a_crash_ends_that_line_before_its_first(
    tmp_path: Path,
) -> None:
    """The exporter died halfway through a line (or the disk filled, before a restart):
    the journal opened again starts its first line on a line of its own."""
    path = tmp_path / "kling-callbacks.jsonl"
    path.write_bytes(b'{"event":"task_completed","task_id":"t1"}\n{"event":"task_comp')
    journal = EventJournal(path)

    async def story() -> None:
        await journal.append({"event": "task_completed", "task_id": "t2"})
        await journal.close()

    asyncio.run(story())
    read = read_back(path)
    assert [e.task_id for e in read if isinstance(e, Event)] == ["t1", "t2"]
