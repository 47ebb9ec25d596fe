"""The whole /metrics output for a fixed log, against a golden file and promtool."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from kling_exporter.accounting.ledger import Ledger
from kling_exporter.collector import TextRenderer
from kling_exporter.events import Event, decode_line
from kling_exporter.model import Status
from prometheus_client import CollectorRegistry, generate_latest

from tests.helpers import FIXED_LOG_CONFIG, NOW, collector_of, render_fixed_log, require_binary

HERE = Path(__file__).parent
GOLDEN = HERE / "golden" / "metrics.prom"


def test_metrics_output_matches_golden_file() -> None:
    text = render_fixed_log()
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_bytes(text)
    assert text.decode() == GOLDEN.read_text(), "rerun with UPDATE_GOLDEN=1 and review the diff"


def test_promtool_check_metrics_is_clean() -> None:
    promtool = require_binary("promtool")
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=render_fixed_log(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == b"" and result.stderr.strip() == b""


def test_fast_text_renderer_matches_prometheus_client_byte_for_byte() -> None:
    ledger = Ledger(FIXED_LOG_CONFIG)
    for raw in (HERE / "data" / "fixed.jsonl").read_bytes().splitlines():
        result = decode_line(raw)
        if isinstance(result, Event):
            ledger.apply(result, NOW)
    # Label values with every character the format escapes.
    for i, project in enumerate(['quote"d', "back\\slash", "new\nline", "ünïcode", "plain"]):
        for fields in (
            {
                "event": "task_submitted",
                "task_id": f"x{i}",
                "project": project,
                "model": f'm"{i}',
                "mode": "pro",
                "duration": 10,
            },
            {
                "event": "task_completed",
                "task_id": f"x{i}",
                "status": "succeed",
                "elapsed_sec": 12.5 * i,
                "credits_used": 1e7 + i,
            },
        ):
            result = decode_line(json.dumps(fields).encode())
            assert isinstance(result, Event)
            ledger.apply(result, NOW)
    status = Status(
        files_watched=3,
        ready=False,
        reload_successful=False,
        reload_success_ts=NOW,
        state_save_ts=0,
    )
    collector = collector_of(lambda: (ledger.snapshot(NOW), status))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    renderer = TextRenderer()
    expected = generate_latest(registry).decode()
    assert renderer.render(collector.families()) == expected
    assert renderer.render(collector.families()) == expected  # again, from the label cache


def test_text_kept_from_the_last_scrape_is_used_only_while_nothing_changed() -> None:
    ledger = Ledger(FIXED_LOG_CONFIG)
    status = Status(
        files_watched=1, ready=True, reload_successful=True, reload_success_ts=NOW, state_save_ts=0
    )
    collector = collector_of(lambda: (ledger.snapshot(NOW), status))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    renderer = TextRenderer()
    lines = (HERE / "data" / "fixed.jsonl").read_bytes().splitlines()
    for raw in [b"", *lines, b""]:
        result = decode_line(raw) if raw else None
        if isinstance(result, Event):
            ledger.apply(result, NOW)
        status.files_watched += 1
        assert renderer.render(collector.families()) == generate_latest(registry).decode()
