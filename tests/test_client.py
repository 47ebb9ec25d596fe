"""The producer library: the event log it writes and the budget check it asks."""

from __future__ import annotations

import datetime as dt
import json
import multiprocessing
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from kling_exporter.accounting.ledger import Ledger
from kling_exporter.client import (
    BudgetClient,
    BudgetExceededError,
    EventLogger,
    generate_within_budget,
)
from kling_exporter.configfile import parse_config
from kling_exporter.demo import DemoTraffic, demo_config
from kling_exporter.events import Event, decode_line
from kling_exporter.flags import DEFAULT_BACKFILL_HOURS, DEFAULT_RATE, DEFAULT_SEED
from kling_exporter.reading.ingest import ingest
from kling_exporter.reading.tailer import Tailer

from tests.helpers import DaemonProcess, by_name, value, wait_until

Factory = Callable[..., DaemonProcess]


def _log_many(directory: str, worker: int, count: int) -> None:
    log = EventLogger(directory, project=f"p{worker}")
    for i in range(count):
        # Longer than a pipe buffer: still one write, still one whole line.
        log.error(f"w{worker}-{i}", error_type="timeout", message="m" * (5000 + i))


def test_processes_logging_at_once_never_tear_a_line(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_log_many, args=(str(tmp_path), w, 300)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    lines = b"".join(f.read_bytes() for f in tmp_path.glob("kling-*.jsonl")).splitlines()
    assert len(lines) == 1200
    ids = set()
    for raw in lines:
        event = decode_line(raw)
        assert isinstance(event, Event), raw[:80]
        ids.add(event.task_id)
    assert len(ids) == 1200


def test_event_logger_writes_the_spec_format(tmp_path: Path) -> None:
    log = EventLogger(tmp_path, project="marketing", user="ann")
    log.submitted("t1", model="kling-v2-6", mode="pro", duration=10, audio=True, prompt_len=9)
    log.completed("t1", status="succeed", elapsed_sec=80.5, credits_used=200)
    (path,) = tmp_path.glob("kling-*.jsonl")
    first, second = (json.loads(x) for x in path.read_text().splitlines())
    assert first["event"] == "task_submitted" and first["project"] == "marketing"
    assert first["user"] == "ann" and first["timestamp"].endswith("Z")
    assert second == {**second, "event": "task_completed", "credits_used": 200}
    assert path.name == f"kling-{time.strftime('%Y-%m-%d', time.gmtime())}.jsonl"


def test_an_error_before_a_task_id_is_written_as_null_and_counted(tmp_path: Path) -> None:
    log = EventLogger(tmp_path, project="marketing")
    log.error(None, "rate_limit", "429 Too Many Requests")
    (path,) = tmp_path.glob("kling-*.jsonl")
    (raw,) = path.read_bytes().splitlines()
    assert json.loads(raw)["task_id"] is None
    event = decode_line(raw)
    assert isinstance(event, Event), event
    ledger = Ledger(parse_config({}))
    ledger.apply(event, time.time())
    assert ledger.errors == {("marketing", "rate_limit"): 1}


def test_our_keyword_calls_and_their_positional_ones_write_the_same_task(tmp_path: Path) -> None:
    ours, theirs = EventLogger(tmp_path / "ours"), EventLogger(tmp_path / "theirs")
    ours.submitted("t1", model="kling-v2-6", mode="pro", duration=10, prompt_len=5)
    ours.completed("t1", status="succeed", elapsed_sec=80.5, credits_used=70)
    theirs.log_submission("t1", "a cat", "kling-v2-6", "10", "pro")
    theirs.log_completion("t1", "succeed", 80.5, 70)

    def written(directory: Path) -> list[dict[str, object]]:
        (path,) = directory.glob("kling-*.jsonl")
        lines = [json.loads(x) for x in path.read_text().splitlines()]
        return [{k: v for k, v in x.items() if k != "timestamp"} for x in lines]

    ours_written, theirs_written = written(tmp_path / "ours"), written(tmp_path / "theirs")
    # Theirs writes what their script writes: no audio or kind, ours their defaults.
    assert ours_written[0] == {**theirs_written[0], "audio": False, "kind": "video"}
    assert ours_written[1] == theirs_written[1]


def test_budget_client_and_the_guarded_submit(tmp_path: Path, daemon_factory: Factory) -> None:
    d = daemon_factory(
        "state: {path: ''}\nlogs: {poll_interval: 200ms}\nbudgets:\n"
        "  - {name: mk, project: marketing, period: daily, limit_credits: 30}\n"
    )
    client = BudgetClient(d.url)
    log = EventLogger(tmp_path / "logs", project="marketing")
    assert client.check(project="marketing", mode="std", duration=5)["allowed"] is True

    task_id = generate_within_budget(
        client, log, submit=lambda: "kling-task-1", model="kling-v2-6", mode="std", duration=10
    )
    log.completed(task_id, status="succeed", elapsed_sec=50)
    d.wait_metric("kling_budget_used_credits", 20, budget="mk", period="daily")

    with pytest.raises(BudgetExceededError) as refused:
        generate_within_budget(
            client, log, submit=lambda: "never", model="kling-v2-6", mode="std", duration=10
        )
    assert "'mk'" in refused.value.reason
    assert refused.value.result["credits_needed"] == 20

    def broken() -> str:
        raise ConnectionError("kling unreachable")

    with pytest.raises(ConnectionError):
        generate_within_budget(client, log, submit=broken, model="kling-v2-6", duration=5)
    series = d.wait_metric(
        "kling_task_errors_total", 1, project="marketing", error_type="ConnectionError"
    )
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
    with pytest.raises(ValueError, match="count"):
        client.check(count=0)


def test_demo_traffic_is_valid_and_varied(tmp_path: Path) -> None:
    traffic = DemoTraffic(tmp_path, rate=2.0, seed=5)
    now = time.time()
    traffic.backfill(1800, now)
    for i in range(60):
        traffic.tick(now + i, 1.0)
    events = [
        decode_line(raw)
        for f in sorted(tmp_path.glob("*.jsonl"))
        for raw in f.read_bytes().splitlines()
    ]
    assert len(events) > 3000
    assert all(isinstance(e, Event) for e in events)
    kinds = {(e.type, e.status, e.error_type) for e in events if isinstance(e, Event)}
    assert {(1, "succeed", None), (1, "failed", None)} <= kinds
    assert any(t == 2 for t, _, _ in kinds)
    projects = {e.project for e in events if isinstance(e, Event) and e.type == 0}
    assert projects == {"marketing", "product", "sales", "support", "research"}


def test_demo_command_serves_live_metrics(tmp_path: Path, daemon_factory: Factory) -> None:
    d = daemon_factory(
        command="demo",
        extra=["--logs", str(tmp_path / "demo-logs"), "--rate", "5", "--backfill", "0.1"],
    )
    first = value(d.metrics(), "kling_log_lines_read_total")
    assert first > 0
    wait_until(lambda: value(d.metrics(), "kling_log_lines_read_total") > first, timeout=20)
    series = d.metrics()
    assert (
        value(series, "kling_budget_limit_credits", budget="marketing-daily", period="daily")
        == 13000
    )
    assert sum(by_name(series, "kling_log_lines_invalid_total").values()) == 0
    # Kling's resource packs, from the demo's own stand-in: one in each status.
    statuses = wait_until(
        lambda: by_name(d.metrics(), "kling_account_resource_pack_status") or None
    )
    current = {dict(labels)["status"] for labels, v in statuses.items() if v == 1}
    assert current == {"toBeOnline", "online", "expired", "runOut"}
    assert d.stop() == 0


def test_demo_defaults_keep_the_readmes_promise(tmp_path: Path) -> None:
    """With the demo's own defaults (an hour of history at 0.2 tasks/s), on a working
    morning: one budget warns at once, none is exhausted, and another crosses 80% and
    then 100% within about half an hour, as the README says."""
    now = dt.datetime(2026, 11, 23, 10, tzinfo=dt.UTC).timestamp()
    traffic = DemoTraffic(tmp_path, rate=DEFAULT_RATE, seed=DEFAULT_SEED)
    traffic.backfill(DEFAULT_BACKFILL_HOURS * 3600, now)
    config = demo_config(tmp_path)
    ledger, tailer = Ledger(config), Tailer(config.logs)

    def read(at: float) -> dict[str, float]:
        tailer.poll(lambda path, lines, first, nbytes: ingest(ledger, lines, at))
        return {b.name: b.utilization for b in ledger.budget_statuses(at)}

    thresholds = {b.name: b.alert_threshold for b in config.budgets}
    start = read(now)
    warning = {name for name, u in start.items() if u >= thresholds[name]}
    assert warning == {"research-daily"} and max(start.values()) < 1, start
    crossed80 = crossed100 = None
    at = now
    for step in range(1, 2 * 40 * 60 + 1):  # 40 minutes in half seconds, as the demo ticks
        at = now + step * 0.5
        traffic.tick(at, 0.5)
        if step % 120 == 0:
            u = read(at)["marketing-daily"]
            crossed80 = crossed80 or (at if u >= 0.8 else None)
            crossed100 = crossed100 or (at if u >= 1.0 else None)
    assert crossed80 is not None and crossed100 is not None
    assert crossed80 < crossed100 <= now + 40 * 60
    end = read(at)
    calm = {"product-weekly", "ann-monthly", "company-monthly"}
    assert all(end[name] < thresholds[name] for name in calm), end
