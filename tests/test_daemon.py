"""The real daemon as a process: live appends, partial lines, new files, bad lines, HTTP."""

from __future__ import annotations

import asyncio
import errno
import gc
import gzip
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from kling_exporter.collector import Part
from kling_exporter.config import Config
from kling_exporter.configfile import parse_config
from kling_exporter.journals.durable import write_atomically
from kling_exporter.reading import daemon as daemon_module
from kling_exporter.reading.daemon import Daemon
from kling_exporter.reading.ingest import ingest
from kling_exporter.serving.server import build_app

from tests.helpers import (
    MK_CONFIG,
    DaemonProcess,
    by_name,
    completed,
    half_used,
    line,
    submitted,
    value,
    write_lines,
)

Factory = Callable[..., DaemonProcess]


def test_counts_appends_partial_lines_and_new_files(
    tmp_path: Path, daemon_factory: Factory
) -> None:
    log1 = tmp_path / "logs" / "kling-2026-11-22.jsonl"
    write_lines(log1, [submitted("a"), completed("a")])
    d = daemon_factory(MK_CONFIG)
    series = d.metrics()
    assert (
        value(
            series,
            "kling_tasks_submitted_total",
            project="marketing",
            model="kling-v2-6",
            mode="standard",
        )
        == 1
    )
    assert value(series, "kling_budget_used_credits", budget="mk", period="monthly") == 10

    write_lines(log1, [submitted("b")])
    d.wait_metric("kling_tasks_in_flight", 1, project="marketing")

    raw = completed("b").encode() + b"\n"
    with open(log1, "ab") as f:
        f.write(raw[:20])
        f.flush()
        d.wait_metric("kling_log_lines_read_total", 3)
        f.write(raw[20:])
    series = d.wait_metric("kling_tasks_in_flight", 0, project="marketing")
    assert value(series, "kling_credits_used_total", project="marketing", model="kling-v2-6") == 20

    log2 = tmp_path / "logs" / "kling-2026-11-23.jsonl"
    tmp = tmp_path / "incoming.jsonl"
    write_lines(tmp, [submitted("c", project="sales"), completed("c", credits_used=33)])
    tmp.rename(log2)  # a new daily file that already holds lines when it appears
    series = d.wait_metric("kling_credits_used_total", 33, project="sales", model="kling-v2-6")
    assert value(series, "kling_log_files_watched") == 2
    assert value(series, "kling_log_lines_read_total") == 6
    assert value(series, "kling_log_lines_invalid_total", reason="invalid_json") == 0


def test_bad_lines_are_counted_and_good_ones_around_them_kept(
    tmp_path: Path, daemon_factory: Factory
) -> None:
    log = tmp_path / "logs" / "kling-2026-11-22.jsonl"
    d = daemon_factory(MK_CONFIG)
    good = [submitted(f"t{i}") for i in range(6)]
    log.parent.mkdir()  # the log folder appears after the daemon started
    with open(log, "wb") as f:
        f.write(good[0].encode() + b"\n")
        f.write(b"{not json\n")
        f.write(good[1].encode() + b"\n")
        f.write(b'{"event": "task_submitted", "task_id": "x", "duration": "long"}\n')
        f.write(good[2].encode() + b"\n")
        f.write(b'{"event": "task_exploded", "task_id": "y"}\n')
        f.write(b'{"event": "task_submitted", "project": "p"}\n')
        f.write(good[3].encode() + b"\n")
        f.write(b'{"event": "task_submitted", "task_id": "\xff\xfe\xfd"}\n')
        f.write(good[4].encode() + b"\n")
        f.write(
            b'{"event": "task_submitted", "task_id": "big", "x": "' + b"z" * 3_000_000 + b'"}\n'
        )
        f.write(b"[1, 2, 3]\n")
        f.write(good[5].encode() + b"\n")
    series = d.wait_metric(
        "kling_tasks_submitted_total", 6, project="marketing", model="kling-v2-6", mode="standard"
    )
    invalid = {
        dict(k)["reason"]: v for k, v in by_name(series, "kling_log_lines_invalid_total").items()
    }
    assert invalid == {
        "invalid_json": 1,
        "wrong_type": 1,
        "unknown_event": 1,
        "missing_field": 1,
        "invalid_utf8": 1,
        "too_long": 1,
        "not_object": 1,
        "bad_value": 0,
        "too_deep": 0,
        "id_too_long": 0,
        "internal_error": 0,
    }
    assert value(series, "kling_log_lines_read_total") == 13
    assert d.get("/-/healthy")[0] == 200
    out = d.output()
    assert "invalid log line skipped" in out and "line=2" in out and "reason=invalid_json" in out
    # A rejected value names its field and shows the value, cut short.
    assert "reason=wrong_type field=duration" in out and "long" in out


def test_http_endpoints(tmp_path: Path, daemon_factory: Factory) -> None:
    write_lines(tmp_path / "logs" / "kling-2026-11-22.jsonl", [submitted("a")])
    d = daemon_factory(MK_CONFIG)
    status, body = d.get("/")
    assert status == 200 and b'href="/metrics"' in body
    assert d.get("/-/healthy") == (200, b"Healthy.\n")
    assert d.get("/-/ready")[0] == 200
    status, body = d.get("/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"})
    assert status == 200 and body.endswith(b"# EOF\n") and body.count(b"# EOF") == 1
    assert b"kling_reservations_total" in body and b"kling_tasks_submitted_total" in body
    # name[] filters, as federation and some tools ask: those metrics and no others.
    status, body = d.get(
        "/metrics?name[]=kling_log_lines_read_total&name[]=kling_reservations_total"
    )
    names = {line.split()[2] for line in body.decode().splitlines() if line.startswith("# TYPE")}
    assert status == 200 and names == {"kling_log_lines_read_total", "kling_reservations_total"}
    status, body = d.get("/metrics", {"Accept-Encoding": "gzip"})
    assert status == 200 and b"kling_tasks_submitted_total" in gzip.decompress(body)
    status, body = d.get("/api/v1/budgets")
    assert status == 200
    budget = json.loads(body)["budgets"][0]
    assert budget["name"] == "mk" and budget["limit_credits"] == 100
    assert d.get("/nope")[0] == 404


def test_reload_applies_a_good_config_and_refuses_a_bad_one(
    tmp_path: Path, daemon_factory: Factory
) -> None:
    d = half_used(tmp_path, daemon_factory)

    d.config_path.write_text(MK_CONFIG.replace("limit_credits: 100", "limit_credits: 200"))
    assert d.post("/-/reload")[0] == 200
    d.wait_metric("kling_budget_utilization_ratio", 0.25, budget="mk", period="monthly")

    d.config_path.write_text(MK_CONFIG.replace("period: monthly", "period: montly"))
    status, body = d.post("/-/reload")
    assert status == 500 and b"budgets[0].period" in body
    series = d.wait_metric("kling_config_last_reload_successful", 0)
    assert value(series, "kling_budget_utilization_ratio", budget="mk", period="monthly") == 0.25

    d.config_path.write_text(MK_CONFIG.replace("limit_credits: 100", "limit_credits: 500"))
    d.send(signal.SIGHUP)
    series = d.wait_metric("kling_budget_utilization_ratio", 0.1, budget="mk", period="monthly")
    assert value(series, "kling_config_last_reload_successful") == 1
    assert value(series, "kling_credits_used_total", project="marketing", model="kling-v2-6") == 50


def test_reload_refuses_an_empty_file_and_keeps_the_budgets(
    tmp_path: Path, daemon_factory: Factory
) -> None:
    d = half_used(tmp_path, daemon_factory)
    for content in ("", "  \n\n", "# only a comment\n"):  # a deploy cut short
        d.config_path.write_text(MK_CONFIG)
        assert d.post("/-/reload")[0] == 200
        d.config_path.write_text(content)
        status, body = d.post("/-/reload")
        assert status == 500 and b"empty" in body, content
        series = d.wait_metric("kling_config_last_reload_successful", 0)
        utilization = value(series, "kling_budget_utilization_ratio", budget="mk", period="monthly")
        assert utilization == 0.5, content


def test_http_0_9_is_refused(tmp_path: Path, daemon_factory: Factory) -> None:
    d = daemon_factory(MK_CONFIG)
    with socket.create_connection(("127.0.0.1", d.port), timeout=5) as s:
        s.sendall(b"GET /metrics\r\n\r\n")
        answer = s.recv(200)
    assert b" 505 " in answer.split(b"\r\n", 1)[0]
    assert b"kling_" not in answer


def test_bare_command_serves_on_defaults_and_stops_cleanly(
    tmp_path: Path, daemon_factory: Factory
) -> None:
    write_lines(tmp_path / "logs" / "kling-2026-11-22.jsonl", [submitted("a")])
    d = daemon_factory()  # no config file: the built-in defaults, logs/kling-*.jsonl
    d.wait_metric("kling_tasks_in_flight", 1, project="marketing")
    assert d.stop(signal.SIGTERM) == 0
    assert (tmp_path / "kling-exporter.state").exists()
    assert "shutting down" in d.output()


def test_a_bad_config_file_refuses_to_start(tmp_path: Path, daemon_factory: Factory) -> None:
    d = daemon_factory("budgets: [{name: x, limit_credits: -1}]\n", wait_ready=False)
    assert d.proc is not None
    assert d.proc.wait(timeout=20) == 2
    assert "budgets[0].limit_credits: must be greater than 0" in d.output()


POISON = [
    b'{"event": "task_completed", "task_id": "deep", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    b'{"event":"task_completed","task_id":"y","credits_used":1,"timestamp":"9999-12-31T23:59:59Z"}',
    b'{"event":"task_completed","task_id":"z","credits_used":1,'
    b'"timestamp":"0001-01-01T00:00:00+01:00"}',
]


def test_poison_lines_neither_stop_the_reader_nor_double_after_a_restart(
    tmp_path: Path, daemon_factory: Factory
) -> None:
    config = MK_CONFIG.replace(
        'state: {path: ""}', "state: {path: k.state, interval: 100ms}\ntasks: {orphan_wait: 0s}"
    )
    log = tmp_path / "logs" / "kling-2026-11-22.jsonl"
    write_lines(log, [submitted("a"), completed("a", credits_used=10)])
    d = daemon_factory(config)
    with open(log, "ab") as f:
        f.write(b"\n".join(POISON) + b"\n")
    write_lines(log, [submitted("b"), completed("b", credits_used=20)])
    series = d.wait_metric("kling_log_lines_read_total", 7)
    assert sum(by_name(series, "kling_credits_used_total").values()) == 32
    assert value(series, "kling_budget_used_credits", budget="mk", period="monthly") == 30
    assert value(series, "kling_log_lines_invalid_total", reason="too_deep") == 1
    assert value(series, "kling_log_timestamps_clamped_total", reason="ahead") == 1
    assert value(series, "kling_log_timestamps_clamped_total", reason="too_old") == 1
    assert value(series, "kling_log_reader_up") == 1
    assert d.get("/-/healthy")[0] == 200
    assert d.stop(signal.SIGKILL) != 0
    d2 = daemon_factory(config)
    write_lines(log, [submitted("c")])
    series = d2.wait_metric("kling_log_lines_read_total", 8)
    assert sum(by_name(series, "kling_credits_used_total").values()) == 32


def local_config(tmp_path: Path, state: Path | None = None) -> Config:
    """Config for an in-process daemon reading tmp_path/logs, saving state if asked."""
    return parse_config(
        {
            "logs": {"paths": [str(tmp_path / "logs" / "*.jsonl")]},
            "state": {"path": str(state) if state else ""},
        }
    )


def test_a_dead_reader_fails_health_and_never_saves_a_half_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "logs" / "kling-a.jsonl"
    write_lines(log, [submitted("a"), completed("a", credits_used=10)])
    state = tmp_path / "k.state"
    config = local_config(tmp_path, state)
    daemon = Daemon(config)
    daemon.poll_once()
    daemon.save_state()
    saved = state.read_bytes()
    write_lines(log, [submitted("b"), completed("b", credits_used=5)])

    def expire_tasks(now: float, by_ttl: bool = True, cap: bool = True) -> int:
        raise MemoryError  # what no guard in ingest can catch

    monkeypatch.setattr(daemon.ledger, "expire_tasks", expire_tasks)
    daemon.start()
    assert daemon.failed.wait(10)
    _, status = daemon.snapshot()
    assert not status.reader_up
    daemon.stop()  # saves no state: the ledger holds a block its offsets do not
    assert state.read_bytes() == saved
    app = build_app(daemon)

    async def health() -> int:
        async with TestServer(app) as server:
            client: TestClient[web.Request, None] = TestClient(server)
            async with client:
                return (await client.get("/-/healthy")).status

    assert asyncio.run(health()) == 503


def test_state_file_is_private_and_holds_no_log_text(tmp_path: Path) -> None:
    prompt = "a prompt nobody else may read"
    log = tmp_path / "logs" / "kling-a.jsonl"
    write_lines(log, [line(event="task_submitted", task_id="a", note=prompt)])
    state = tmp_path / "k.state"
    config = local_config(tmp_path, state)
    daemon = Daemon(config)
    daemon.poll_once()
    daemon.save_state()
    assert state.stat().st_mode & 0o777 == 0o600
    assert prompt.encode() not in state.read_bytes()
    assert b"task_submitted" not in state.read_bytes()
    daemon.tailer.close()
    restored = Daemon(config)  # the digest still recognises the file
    write_lines(log, [line(event="task_submitted", task_id="b")])
    restored.poll_once()
    assert sum(restored.ledger.submitted.values()) == 2
    restored.tailer.close()


def test_an_unbounded_reservation_id_never_reaches_the_saved_state(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "kling-a.jsonl"
    huge = "r" * 1_000_000
    write_lines(
        log,
        [
            line(event="task_submitted", task_id="a", reservation_id=huge),
            line(event="task_submitted", task_id="b", reservation_id="r-1"),
        ],
    )
    state = tmp_path / "k.state"
    daemon = Daemon(local_config(tmp_path, state))
    daemon.poll_once()
    daemon.save_state()
    daemon.tailer.close()
    assert state.stat().st_size < 10_000
    assert daemon.reading.invalid["id_too_long"] == 1
    assert sum(daemon.ledger.submitted.values()) == 1


def test_a_failed_save_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_atomically(tmp_path / "k.state", b"x" * 1000)
    assert list(tmp_path.iterdir()) == []


def test_concurrent_scrapes_share_one_render(tmp_path: Path) -> None:
    config = local_config(tmp_path)
    daemon = Daemon(config)
    real_snapshot, renders = daemon.snapshot, []

    def slow_snapshot():
        renders.append(1)
        time.sleep(0.3)
        return real_snapshot()

    daemon.snapshot = slow_snapshot  # type: ignore[method-assign]
    app = build_app(daemon)

    async def scrape_together() -> list[int]:
        async with TestServer(app) as server:
            client: TestClient[web.Request, None] = TestClient(server)
            async with client:
                answers = await asyncio.gather(*(client.get("/metrics") for _ in range(50)))
                # The event loop answers other requests while a render is under way.
                health = await client.get("/-/healthy")
                assert health.status == 200
                return [a.status for a in answers]

    assert asyncio.run(scrape_together()) == [200] * 50
    assert len(renders) <= 3


def test_a_block_is_applied_in_chunks_that_readers_can_come_between(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = local_config(tmp_path)
    daemon = Daemon(config)
    seen: list[int] = []
    real_ingest = ingest

    def counting_ingest(ledger, lines, now, report, stats):
        assert daemon.lock.locked()
        seen.append(len(lines))
        real_ingest(ledger, lines, now, report, stats)

    monkeypatch.setattr(daemon_module, "ingest", counting_ingest)
    lines: list[bytes | None] = [submitted(f"t{i}").encode() for i in range(5000)]
    daemon._sink("x.jsonl", lines, 1, sum(len(x or b"") + 1 for x in lines))
    assert seen == [1000] * 5
    assert daemon.reading.lines == 5000
    assert sum(daemon.ledger.submitted.values()) == 5000


def test_slow_and_surplus_connections_are_bounded(tmp_path: Path, daemon_factory: Factory) -> None:
    d = daemon_factory(
        MK_CONFIG,
        extra=["--web.max-connections", "20", "--web.read-header-timeout", "1s"],
    )
    trickling = []
    for _ in range(20):
        s = socket.create_connection(("127.0.0.1", d.port), timeout=5)
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        trickling.append(s)
    with socket.create_connection(("127.0.0.1", d.port), timeout=5) as surplus:
        assert surplus.recv(100).startswith(b"HTTP/1.1 503")
    time.sleep(1.5)
    for s in trickling:  # each was closed by the header timeout
        s.settimeout(5)
        assert s.recv(100) == b""
        s.close()
    assert d.get("/metrics")[0] == 200


def test_a_second_instance_on_a_taken_port_leaves_the_state_alone(
    tmp_path: Path, daemon_factory: Factory
) -> None:
    config = "state: {path: k.state, interval: 1h}\nlogs: {poll_interval: 200ms}\n"
    write_lines(tmp_path / "logs" / "kling-a.jsonl", [submitted("a")])
    first = daemon_factory(config)
    first.wait_metric("kling_log_lines_read_total", 1)
    assert first.stop(signal.SIGTERM) == 0  # saves the state
    first = daemon_factory(config)
    state = tmp_path / "k.state"
    before = (state.stat().st_ino, state.stat().st_mtime_ns, state.read_bytes())
    second = DaemonProcess(tmp_path, config)
    second.port = first.port  # the port is taken
    second.start(wait_ready=False)
    assert second.proc is not None and second.proc.wait(timeout=30) != 0
    assert (state.stat().st_ino, state.stat().st_mtime_ns, state.read_bytes()) == before


@pytest.mark.parametrize(
    ("where", "field"),
    [("ledger", "lines_read"), ("ledger", "tasks"), ("files", "offset"), ("ledger", "version")],
)
def test_a_state_of_the_wrong_shape_names_the_field_and_is_rebuilt_from_the_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, where: str, field: str
) -> None:
    write_lines(tmp_path / "logs" / "kling-a.jsonl", [submitted("a"), completed("a")])
    state = tmp_path / "k.state"
    first = Daemon(local_config(tmp_path, state))
    first.poll_once()
    first.save_state()
    saved = msgspec.msgpack.decode(state.read_bytes())
    target = saved["ledger"] if where == "ledger" else saved["files"][0]
    target[field] = "not what it should be"
    state.write_bytes(msgspec.msgpack.encode(saved))
    with caplog.at_level("ERROR"):
        again = Daemon(local_config(tmp_path, state))
    assert any(field in str(getattr(r, "err", "")) for r in caplog.records), caplog.records
    again.poll_once()
    assert again.reading.lines == 2  # read again from the start, once
    assert (tmp_path / "k.state.corrupt").exists()


def test_a_state_of_the_previous_format_is_read_and_saved_in_the_one_format(
    tmp_path: Path,
) -> None:
    """Format 1 kept a version of its own for the ledger, and the reader's counts in
    it; such a state continues where it was, and is saved again with one version."""
    logs = tmp_path / "logs" / "kling-a.jsonl"
    write_lines(logs, [submitted("a"), completed("a"), "not json", submitted("b")])
    state = tmp_path / "k.state"
    first = Daemon(local_config(tmp_path, state))
    first.poll_once()
    first.save_state()
    saved = msgspec.msgpack.decode(state.read_bytes())
    assert saved["format"] == 2 and "version" not in saved["ledger"]
    reading = saved.pop("reading")
    assert (reading["lines"], reading["invalid"]["invalid_json"]) == (4, 1)
    old = {**saved, "format": 1}  # as the previous version wrote it
    old["ledger"] = {
        **saved["ledger"],
        "version": 4,
        "lines_read": reading["lines"],
        "bytes_read": reading["bytes"],
        "invalid": list(reading["invalid"].items()),
    }
    state.write_bytes(msgspec.msgpack.encode(old))

    again = Daemon(local_config(tmp_path, state))
    assert again.reading == msgspec.convert(reading, type(again.reading))
    write_lines(logs, [completed("b")])
    again.poll_once()  # only the new line is read
    snap, _ = again.snapshot()
    assert (snap.lines_read, snap.invalid["invalid_json"]) == (5, 1)
    assert sum(snap.completed.values()) == 2
    again.save_state()
    resaved = msgspec.msgpack.decode(state.read_bytes())
    assert resaved["format"] == 2 and "version" not in resaved["ledger"]
    assert resaved["reading"]["lines"] == 5 and "lines_read" not in resaved["ledger"]

    # A reason the saving version did not know is there, at 0, as the ledger's were.
    del resaved["reading"]["invalid"]["too_long"]
    state.write_bytes(msgspec.msgpack.encode(resaved))
    snap, _ = Daemon(local_config(tmp_path, state)).snapshot()
    assert snap.lines_read == 5 and snap.invalid["too_long"] == 0

    # A format the state claims but does not keep is refused, naming the version.
    old["ledger"]["version"] = 7
    state.write_bytes(msgspec.msgpack.encode(old))
    assert Daemon(local_config(tmp_path, state)).reading.lines == 0  # rebuilt from logs


def test_a_glob_that_matches_nothing_is_said_and_counted(
    tmp_path: Path, daemon_factory: Factory
) -> None:
    write_lines(tmp_path / "logs" / "kling-a.jsonl", [submitted("a")])
    config = (
        "state: {path: ''}\n"
        "logs: {paths: [logs/kling-*.jsonl, usage/usage-*.jsonl], poll_interval: 200ms}\n"
    )
    d = daemon_factory(config)
    series = d.wait_metric("kling_log_glob_files", 1, glob="logs/kling-*.jsonl")
    assert ("kling_log_glob_files", frozenset({("glob", "usage/usage-*.jsonl")})) in series
    assert value(series, "kling_log_glob_files", glob="usage/usage-*.jsonl") == 0
    assert "log glob matches no file" in d.output() and "usage/usage-*.jsonl" in d.output()
    write_lines(tmp_path / "usage" / "usage-1.jsonl", [submitted("b")])
    d.wait_metric("kling_log_glob_files", 1, glob="usage/usage-*.jsonl")


def test_the_empty_glob_warning_repeats_every_few_minutes_not_every_poll(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = local_config(tmp_path)
    daemon = Daemon(config)
    with caplog.at_level(logging.WARNING):
        daemon.poll_once()
        daemon.poll_once()
        assert caplog.text.count("log glob matches no file") == 1
        monkeypatch.setattr(daemon_module, "UNMATCHED_WARN_EVERY", 0.0)
        daemon.poll_once()
        assert caplog.text.count("log glob matches no file") == 2
        write_lines(tmp_path / "logs" / "kling-a.jsonl", [submitted("a")])
        daemon.poll_once()
        daemon.poll_once()
        assert caplog.text.count("log glob matches no file") == 2
    daemon.tailer.close()


def test_no_garbage_collection_runs_inside_a_render(tmp_path: Path) -> None:
    """A collection walks every object of the ledger; one inside a render made that
    scrape three times slower. It is left for the reader's next allocation."""
    log = tmp_path / "logs" / "kling-a.jsonl"
    write_lines(log, [submitted(f"t{i}", project=f"p{i % 50}") for i in range(500)])
    daemon = Daemon(local_config(tmp_path))
    daemon.poll_once()
    render, parts = daemon.exposition.render, daemon.exposition.parts
    collecting: list[bool] = []

    def watched(accept: str = "", names: list[str] | None = None) -> tuple[bytes, str]:
        collecting.append(gc.isenabled())
        return render(accept, names)

    def watched_parts() -> list[Part]:
        collecting.append(gc.isenabled())
        return parts()

    daemon.exposition.render = watched  # type: ignore[method-assign]
    daemon.exposition.parts = watched_parts  # type: ignore[method-assign]
    try:
        body, _ = daemon.render()
        openmetrics, _ = daemon.render("application/openmetrics-text")
    finally:
        daemon.tailer.close()
    assert b"kling_tasks_submitted_total" in body
    assert b"kling_tasks_submitted_total" in openmetrics
    assert collecting == [False, False]
    assert gc.isenabled()
