"""The operator's subcommands on a fixed log."""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from kling_exporter.cli import main
from kling_exporter.demo import DemoTraffic
from kling_exporter.flags import COMMANDS

from tests.helpers import ROOT, THEIR_CSV_COLUMNS, line, write_lines

DATA = Path(__file__).parent / "data" / "fixed.jsonl"

REPORT = """\
Kling usage on 2026-11-22 (UTC)

submitted  succeeded  failed  errors  success  credits    USD  avg gen s
---------  ---------  ------  ------  -------  -------  -----  ---------
        7          3       1       1  60.0%     245.00  34.30     235.25

success: 60.0% of finished tasks (errors included), 75.0% of completions alone

By model:
model             submitted  succeeded  failed  errors  credits    USD
----------------  ---------  ---------  ------  ------  -------  -----
kling-v1-6                1          0       1       0     0.00   0.00
kling-v2-5-turbo          1          0       0       1     0.00   0.00
kling-v2-6                4          2       0       0   210.00  29.40
unknown                   1          1       0       0    35.00   4.90

By project:
project    submitted  succeeded  failed  errors  credits    USD
---------  ---------  ---------  ------  ------  -------  -----
marketing          2          2       0       0   210.00  29.40
rnd                3          1       0       0    35.00   4.90
sales              2          0       1       1     0.00   0.00
"""


@pytest.fixture
def logs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "logs").mkdir()
    shutil.copy(DATA, tmp_path / "logs" / "kling-2026-11-22.jsonl")
    return tmp_path / "logs"


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_report_text(logs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    skipped = (
        "kling-exporter: skipped 3 invalid log lines of 15 "
        "(invalid_json 1, unknown_event 1, wrong_type 1); the totals leave them out\n"
    )
    assert run(capsys, "report", "--date", "2026-11-22") == (0, REPORT, skipped)


def test_report_json_has_the_spec_keys(logs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _code, out, _ = run(capsys, "report", "--date", "2026-11-22", "--format", "json")
    report = json.loads(out)
    assert {
        "date",
        "total_submitted",
        "succeeded",
        "failed",
        "errors",
        "success_rate",
        "total_credits",
        "total_usd",
        "avg_generation_sec",
        "by_model",
        "by_project",
    } <= report.keys()
    assert (report["total_submitted"], report["succeeded"], report["failed"], report["errors"]) == (
        7,
        3,
        1,
        1,
    )
    assert report["success_rate"] == 0.6
    assert report["total_credits"] == 245
    assert report["avg_generation_sec"] == pytest.approx((115.5 + 355) / 2)

    def credits(value: Any, key: str = "") -> list[Any]:
        if isinstance(value, dict):
            return [c for k, v in value.items() for c in credits(v, k)]
        if isinstance(value, list):
            return [c for v in value for c in credits(v, key)]
        return [value] if "credits" in key else []

    # Whole credits are written one way, as integers (100, never 100.0): the budgets'
    # limits too, which the config reads as numbers.
    Path("kling.yml").write_text("budgets: [{name: mk, project: marketing, limit_credits: 100}]")
    args = ("--config.file", "kling.yml", "--date", "2026-11-22", "--format", "json")
    report = json.loads(run(capsys, "report", *args)[1])
    assert report["budgets"][0]["limit_credits"] == 100
    found = credits(report)
    assert found and not [c for c in found if isinstance(c, float) and c.is_integer()]
    assert report["by_project"]["marketing"]["credits"] == 210


# The usage scripts' daily_summary, as JSON: their keys in their order, the rate of
# completions as text, whole seconds, submissions per model in the order first read.
SUMMARY = """\
{
  "date": "2026-11-22",
  "total_submitted": 7,
  "succeeded": 3,
  "failed": 1,
  "errors": 1,
  "success_rate": "75.0%",
  "total_credits": 245,
  "avg_generation_sec": 235,
  "by_model": {
    "kling-v2-6": 4,
    "kling-v1-6": 1,
    "kling-v2-5-turbo": 1,
    "unknown": 1
  }
}
"""


def test_report_summary_is_their_daily_summary_shape(
    logs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "report", "--date", "2026-11-22", "--format", "summary")
    assert (code, out) == (0, SUMMARY)


def test_report_help_says_what_summary_is(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--format {text,json,summary}" in out and "daily_summary" in out


def test_report_for_a_date_without_events(logs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "report", "--date", "2020-01-01", "--format", "json")
    report = json.loads(out)
    assert code == 0
    assert report["total_submitted"] == 0 and report["success_rate"] == 0
    assert report["by_model"] == {} and report["by_project"] == {}
    code, out, _ = run(capsys, "report", "--date", "2020-01-01")
    assert "By model" not in out and "        0          0" in out


def test_report_with_an_empty_log_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, "report", "--format", "json")
    assert code == 0 and json.loads(out)["total_submitted"] == 0


def test_report_uses_the_configured_timezone(
    logs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (logs.parent / "tz.yml").write_text("timezone: Pacific/Kiritimati\n")  # UTC+14
    _code, out, _ = run(
        capsys, "report", "--config.file", "tz.yml", "--date", "2026-11-22", "--format", "json"
    )
    assert json.loads(out)["total_submitted"] == 2  # only the 09:00 UTC tasks: 23:00 local


def test_costs_per_day(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    today = dt.datetime.now(dt.UTC).replace(hour=0, minute=30, second=0, microsecond=0)

    def stamp(days_ago: int) -> str:
        return (today - dt.timedelta(days=days_ago)).isoformat()

    write_lines(
        tmp_path / "logs" / "kling-x.jsonl",
        [
            line(task_id="a", credits=10, timestamp=stamp(0), duration=5),
            line(task_id="b", credits=30, timestamp=stamp(1), duration=5),
            line(task_id="c", credits=20, timestamp=stamp(1), duration=5),
            line(task_id="d", credits=99, timestamp=stamp(9), duration=5),  # outside 3 days
        ],
    )
    code, out, _ = run(capsys, "costs", "--days", "3", "--format", "json")
    result = json.loads(out)
    assert [d["credits"] for d in result["per_day"]] == [0, 50, 10]
    assert [d["videos"] for d in result["per_day"]] == [0, 2, 1]
    assert result["total_credits"] == 60 and result["avg_credits_per_day"] == 20
    assert result["total_usd"] == pytest.approx(8.4)
    code, out, _ = run(capsys, "costs", "--days", "3")
    assert code == 0
    assert out.splitlines()[-2].split() == ["total", "60.00", "3", "3", "8.40", "2.80"]
    assert out.splitlines()[-1].split() == ["average/day", "20.00", "1.00", "1.00", "2.80"]


def test_export_csv_with_a_date_range(logs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_lines(
        logs / "kling-2026-11-23.jsonl",
        [line(task_id="z", credits=5, timestamp="2026-11-23T08:00:00Z")],
    )
    code, _, err = run(capsys, "export", "--output", "all.csv")
    assert code == 0 and "wrote 14 events" in err
    rows = list(csv.DictReader(open("all.csv", encoding="utf-8")))  # noqa: SIM115
    # The seven columns of the usage scripts teams already run come first, as they wrote
    # them; ours follow.
    assert list(rows[0]) == [
        *THEIR_CSV_COLUMNS,
        "project",
        "user",
        "mode",
        "duration",
        "audio",
        "kind",
        "error_type",
        "usd",
        "credits",
        "task_model",
    ]
    assert rows[3] == {
        "timestamp": "2026-11-22T09:06:00Z",
        "event": "task_completed",
        "task_id": "m2",
        "model": "",
        "status": "succeed",
        "credits_used": "200",
        "elapsed_sec": "355",
        "project": "marketing",
        "user": "ann",
        "mode": "professional",
        "duration": "10",
        "audio": "true",
        "kind": "video",
        "error_type": "",
        "usd": "28.0000",
        "credits": "200",
        "task_model": "kling-v2-6",
    }
    assert {r["event"] for r in rows} == {"task_submitted", "task_completed", "task_error"}
    assert all(r["credits_used"] == "" for r in rows if r["event"] == "task_submitted")
    assert sum(float(r["credits"] or 0) for r in rows) == 250
    code, _, err = run(
        capsys, "export", "--output", "day.csv", "--since", "2026-11-23", "--until", "2026-11-23"
    )
    assert "wrote 2 events" in err
    assert "The prompt" not in Path("all.csv").read_text()


def test_export_refuses_a_reversed_range(logs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(
        capsys, "export", "--output", "x.csv", "--since", "2026-11-23", "--until", "2026-11-01"
    )
    assert code == 2 and "--since is after --until" in err


def test_estimate(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys,
        "estimate",
        "--model",
        "kling-v2-6",
        "--mode",
        "pro",
        "--duration",
        "10",
        "--count",
        "40",
    )
    assert code == 0
    assert out == (
        "40 x kling-v2-6 professional 10s video: 70 credits each, 2800 credits, $392.00\n"
    )
    code, out, _ = run(
        capsys,
        "estimate",
        "--model",
        "kling-v2-6",
        "--mode",
        "std",
        "--duration",
        "5",
        "--audio",
        "--format",
        "json",
    )
    assert json.loads(out)["credits"] == 50 and json.loads(out)["usd"] == 7


def test_estimate_refuses_an_unknown_mode(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["estimate", "--model", "m", "--mode", "turbo", "--duration", "5"])
    assert exit_.value.code == 2
    assert "expected standard, professional, std or pro" in capsys.readouterr().err


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command in out


def test_a_closed_pipe_ends_quietly(logs: Path) -> None:
    """`kling-exporter costs --days 400 | head -1`: no BrokenPipeError traceback."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "kling_exporter", "costs", "--days", "400"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT / "exporter")},
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    proc.stdout.close()  # the reader goes away, as head does
    err = proc.stderr.read().decode()
    proc.wait(timeout=30)
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_a_misspelt_command_gets_the_closest_one(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["reprot"])
    assert exit_.value.code == 2
    assert "unknown command 'reprot'; did you mean 'report'?" in capsys.readouterr().err


def test_flags_may_come_before_the_command(logs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Path("c.yml").write_text("timezone: UTC\n")
    assert main(["--config.file", "c.yml", "report", "--date", "2026-11-22"]) == 0
    assert "Kling usage on 2026-11-22" in capsys.readouterr().out


def test_globs_that_match_nothing_are_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["costs", "--days", "1"]) == 0
    err = capsys.readouterr().err
    assert f"no log file matches logs/kling-*.jsonl (relative to {tmp_path})" in err


def test_estimate_an_image_needs_no_mode_or_duration(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "estimate", "--kind", "image", "--count", "3")
    assert (code, out) == (0, "3 x image: 1 credit each, 3 credits, $0.42\n")
    code, _, err = run(capsys, "estimate", "--model", "kling-v2-6")
    assert code == 2 and "a video needs --mode, --duration" in err


def test_exports_invent_no_mode_or_duration_for_images(
    logs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["export", "--output", "all.csv"]) == 0
    rows = list(csv.DictReader(open("all.csv", encoding="utf-8")))  # noqa: SIM115
    image = next(r for r in rows if r["kind"] == "image")
    assert (image["mode"], image["duration"]) == ("", "")


def test_money_in_reports_is_to_the_cent(logs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = json.loads(run(capsys, "report", "--date", "2026-11-22", "--format", "json")[1])
    for value in [result["total_usd"], *(m["usd"] for m in result["by_model"].values())]:
        assert value == round(value, 2)
    assert result["total_credits"] == 245 and isinstance(result["total_credits"], int)


def test_a_restarted_demo_does_not_backfill_again(tmp_path: Path) -> None:
    first = DemoTraffic(tmp_path)
    assert not first.has_history()
    first.backfill(600)
    assert DemoTraffic(tmp_path).has_history()


@pytest.mark.parametrize("command", ["report", "costs", "export"])
def test_reports_say_how_many_lines_they_skipped_and_why(
    logs: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    with open(logs / "kling-2026-11-22.jsonl", "a") as f:
        f.write('{"event": "task_submitted", "task_id": "z", "duration": "long"}\nnot json\n')
    lines = len((logs / "kling-2026-11-22.jsonl").read_text().splitlines())
    args = {
        "report": ["--date", "2026-11-22"],
        "costs": ["--days", "1"],
        "export": ["--output", "-"],
    }
    code, _, err = run(capsys, command, *args[command])
    assert code == 0
    # The fixed log holds three bad lines of its own.
    assert f"skipped 5 invalid log lines of {lines} (" in err, err
    assert "invalid_json 2, unknown_event 1, wrong_type 2)" in err, err
