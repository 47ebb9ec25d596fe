"""Drop-in parity with the hand-rolled scripts teams already run: a KlingEventLogger
that writes the log, UsageAnalytics (daily_summary, cost_analysis, export_usage_csv) that
reads it, and a BudgetGuard. The lines here are in exactly their format: naive
``datetime.utcnow().isoformat()`` timestamps, no project, ``prompt_len``, a message cut
to 200 characters, and ``"task_id": null`` on an error before the task existed."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from pathlib import Path

import pytest
import yaml
from kling_exporter.accounting.ledger import Ledger
from kling_exporter.cli import main
from kling_exporter.client import KlingEventLogger
from kling_exporter.configfile import parse_config
from kling_exporter.model import ReadStats, Status
from kling_exporter.pricing import Request
from kling_exporter.reading.ingest import ingest
from prometheus_client import CollectorRegistry, generate_latest

from bench.migration import figures
from tests.helpers import ROOT, THEIR_CSV_COLUMNS, check, collector_of, feed

DAY = dt.datetime(2026, 11, 22, 9, 0, 0, 123456)
CONFIG = """
budgets:
  - {name: team, period: daily, limit_credits: 100, limit_usd: 12}
"""


NOW = (DAY + dt.timedelta(hours=1)).replace(tzinfo=dt.UTC).timestamp()


def at(minutes: int) -> str:
    return (DAY + dt.timedelta(minutes=minutes)).isoformat()  # as utcnow().isoformat()


def their_log() -> list[str]:
    """What their KlingEventLogger writes for a day: three tasks, one that fails, one
    error with a task, and one submission that failed before Kling gave it an id."""
    lines: list[dict[str, object]] = []
    for i, (credits, elapsed) in enumerate(((35, 180.5), (70, 95))):
        lines.append(
            {
                "timestamp": at(i * 10),
                "event": "task_submitted",
                "task_id": f"t{i}",
                "model": "kling-v2-6",
                "duration": 5,
                "mode": "pro",
                "prompt_len": 120,
            }
        )
        lines.append(
            {
                "timestamp": at(i * 10 + 3),
                "event": "task_completed",
                "task_id": f"t{i}",
                "status": "succeed",
                "elapsed_sec": elapsed,
                "credits_used": credits,
            }
        )
    lines.append(
        {
            "timestamp": at(30),
            "event": "task_submitted",
            "task_id": "t2",
            "model": "kling-v1",
            "duration": 10,
            "mode": "std",
            "prompt_len": 80,
        }
    )
    lines.append(
        {
            "timestamp": at(33),
            "event": "task_completed",
            "task_id": "t2",
            "status": "failed",
            "elapsed_sec": 40.0,
            "credits_used": 0,
        }
    )
    lines.append(
        {
            "timestamp": at(40),
            "event": "task_error",
            "task_id": None,
            "error_type": "rate_limit",
            "message": ("429 Too Many Requests: " + "x" * 400)[:200],
        }
    )
    return [json.dumps(x) for x in lines]


@pytest.fixture
def logs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "kling-2026-11-22.jsonl").write_text("\n".join(their_log()) + "\n")
    (tmp_path / "config.yml").write_text(CONFIG)
    return tmp_path


def team_ledger() -> Ledger:
    """Their day read into a ledger with the daily budget of 100 credits and $12."""
    ledger = Ledger(parse_config(yaml.safe_load(CONFIG)))
    feed(ledger, *their_log())
    return ledger


STATUS = Status(
    files_watched=1, ready=True, reload_successful=True, reload_success_ts=0, state_save_ts=0
)


def render(ledger: Ledger) -> str:
    """``/metrics`` as the exporter renders it for this ledger."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector_of(lambda: (ledger.snapshot(NOW, ReadStats()), STATUS)))
    return generate_latest(registry).decode()


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, object]:
    assert main([*args, "--config.file", "config.yml", "--format", "json"]) == 0
    result: dict[str, object] = json.loads(capsys.readouterr().out)
    return result


def test_an_error_before_the_task_existed_is_counted(
    logs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = run_json(capsys, "report", "--date", "2026-11-22")
    assert report["errors"] == 1
    assert report["by_project"]["default"]["errors"] == 1  # type: ignore[index]
    ledger = Ledger(parse_config({}))
    feed(ledger, *their_log())
    assert ledger.errors == {("default", "rate_limit"): 1}


def test_success_rate_says_which_and_gives_theirs_too(
    logs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = run_json(capsys, "report", "--date", "2026-11-22")
    assert report["success_rate"] == round(2 / 4, 4)  # of finished tasks, errors included
    assert report["success_rate_completions"] == round(2 / 3, 4)  # theirs: completions only


def test_videos_are_tasks_submitted_and_succeeded_has_its_own_key(
    logs: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("kling_exporter.cli._today", lambda config: dt.date(2026, 11, 22))
    costs = run_json(capsys, "costs", "--days", "1")
    day = costs["per_day"][0]  # type: ignore[index]
    assert (day["videos"], day["succeeded"]) == (3, 2)
    assert day["credits"] == 105
    assert day["usd_per_succeeded"] == pytest.approx(105 * 0.14 / 2)
    assert costs["total_videos"] == 3 and costs["total_succeeded"] == 2


def their_export(lines: list[str]) -> list[str]:
    """What their export_usage_csv writes for these lines: each line's own seven values
    as ``json.loads`` gives them, blank where the line has none."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(THEIR_CSV_COLUMNS)
    for raw in lines:
        event = json.loads(raw)
        writer.writerow([event.get(column) for column in THEIR_CSV_COLUMNS])
    return out.getvalue().splitlines()


def test_csv_export_is_theirs_byte_for_byte_in_the_first_seven_columns(
    logs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["export", "--config.file", "config.yml", "--output", "usage.csv"]) == 0
    ours = Path("usage.csv").read_text(encoding="utf-8").splitlines()
    theirs = their_export(their_log())
    assert len(ours) == len(theirs)
    for mine, their in zip(ours, theirs, strict=True):
        assert mine.startswith(their + ","), (mine, their)
    # As they write them: the logged timestamp, no model on completions, 95 not 95.0,
    # nothing for an error's credits or a null task id.
    assert theirs[4] == f"{at(13)},task_completed,t1,,succeed,70,95"
    assert theirs[-1] == f"{at(40)},task_error,,,,,"
    # Ours follow: the task's model from the join, and what was counted.
    rows = list(csv.DictReader(io.StringIO("\n".join(ours))))
    assert [r["task_model"] for r in rows[1:4:2]] == ["kling-v2-6", "kling-v2-6"]
    assert [r["credits"] for r in rows[-4:]] == ["70", "", "0", "0"]


def test_overspend_is_shown_not_hidden(logs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = run_json(capsys, "report", "--date", "2026-11-22")
    budgets: list[dict[str, float]] = report["budgets"]  # type: ignore[assignment]
    (team,) = budgets
    assert team["used_credits"] == 105 and team["over_by_credits"] == 5
    assert team["over_by_usd"] == pytest.approx(105 * 0.14 - 12)
    # Their cost tracker's remaining: limit minus used, negative once over.
    assert team["remaining_credits"] == -5
    assert team["remaining_usd"] == pytest.approx(round(12 - 105 * 0.14, 2))
    ledger = team_ledger()
    status = ledger.budget_statuses(NOW)[0]
    assert (status.remaining_credits, status.over_by_credits) == (-5, 5)
    assert status.remaining_usd == pytest.approx(12 - 105 * 0.14)
    answer = check(ledger, Request("kling-v2-6", "standard", 5), 1, "default")
    assert not answer.allowed
    assert answer.budgets[0].over_by_credits == 5
    assert answer.budgets[0].over_by_usd == pytest.approx(105 * 0.14 - 12)
    assert answer.budgets[0].credits_remaining == -5


def test_remaining_gauges_go_negative_once_over() -> None:
    text = render(team_ledger())
    assert 'kling_budget_remaining_credits{budget="team",period="daily"} -5.0' in text
    usd = float(
        text.split('kling_budget_remaining_usd{budget="team",period="daily"} ')[1].split()[0]
    )
    assert usd == pytest.approx(12 - 105 * 0.14)


def test_a_refusal_says_the_real_figure_and_how_far_over() -> None:
    answer = check(team_ledger(), Request("kling-v2-6", "standard", 7), 1, "default")
    # 105 credits ($14.70) used of 100 ($12), and 14 more: the larger is $16.66 of $12.
    assert "would reach 139%" in answer.reason
    assert "already 5 credits over" in answer.reason


PROMPT = "A red fox running through fresh snow at dawn, cinematic, slow motion"


def their_call_sites(logger: KlingEventLogger) -> None:
    """Their scripts' calls, as they are written there: positional in their order,
    elapsed seconds before credits, and ``None`` for an error before a task id."""
    logger.log_submission("t1", PROMPT, "kling-v2-6", 5, "pro")
    logger.log_completion("t1", "succeed", 180.5, 35)
    logger.log_submission("t2", PROMPT, "kling-pro", 7, "std")
    logger.log_completion("t2", "failed", None, None)
    logger.log_submission("t3", PROMPT[:20], "kling-v1", 15, "std")
    logger.log_completion("t3", "succeed", credits_used=30, elapsed_sec=95)
    logger.log_submission("t4", PROMPT, "kling-v2-6", 10, "std")
    logger.log_error("t4", "timeout", "no answer from Kling in 600 s")
    for _ in range(5):  # a burst of refused submissions: there is no task id yet
        logger.log_error(None, "rate_limit", "429 Too Many Requests: " + "x" * 400)


def test_their_logger_calls_write_lines_that_are_all_counted(tmp_path: Path) -> None:
    their_call_sites(KlingEventLogger(tmp_path))
    (path,) = tmp_path.glob("kling-*.jsonl")
    lines = path.read_bytes().splitlines()
    ledger, reading = Ledger(parse_config({})), ReadStats()
    ingest(ledger, lines, NOW, stats=reading)
    ledger.settle_waiting()
    assert reading.lines == 13 and not any(reading.invalid.values()), reading.invalid
    snapshot = ledger.snapshot(NOW, reading)
    assert snapshot.submitted == {
        ("default", "kling-v2-6", "professional"): 1,
        ("default", "kling-pro", "standard"): 1,
        ("default", "kling-v1", "standard"): 1,
        ("default", "kling-v2-6", "standard"): 1,
    }
    assert sum(snapshot.completed.values()) == 3
    assert snapshot.errors == {("default", "rate_limit"): 5, ("default", "timeout"): 1}
    assert snapshot.credits == {("default", "kling-v2-6"): 35, ("default", "kling-v1"): 30}
    first = json.loads(lines[0])
    # The model is the model, the prompt is never written: its length is, as theirs.
    assert (first["model"], first["prompt_len"], first["mode"]) == (
        "kling-v2-6",
        len(PROMPT),
        "pro",
    )
    assert "A red fox" not in path.read_text()
    error = json.loads(lines[-1])
    assert error["task_id"] is None and len(error["message"]) == 200


def test_a_held_out_week_in_their_format_comes_out_as_theirs(tmp_path: Path) -> None:
    """Across the end of daylight saving time, with 7 and 15 s clips: every figure the
    scripts define is ours too (the before/after is ``bench/migration.py``)."""
    tracker = ROOT / "examples" / "pricing" / "cost-tracker.yml"
    found = figures(seed=11, tasks=120, pricing_file=tracker, tmp=tmp_path)
    assert found.pop("lines")[0] > 200
    assert {name: equal for name, (equal, _) in found.items()} == {
        name: total for name, (_, total) in found.items()
    }


def test_a_refusal_just_past_the_limit_is_not_rounded_to_100_percent() -> None:
    ledger = Ledger(
        parse_config({"budgets": [{"name": "d", "period": "daily", "limit_credits": 1000}]})
    )
    feed(
        ledger,
        json.dumps(
            {"timestamp": at(0), "event": "task_completed", "task_id": "a", "credits_used": 995}
        ),
    )
    answer = check(ledger, Request("kling-v2-6", "standard", 5), 1, "default")
    assert not answer.allowed
    assert "would reach 100.5%" in answer.reason and "5 credits left" in answer.reason
