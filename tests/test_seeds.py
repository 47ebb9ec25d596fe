"""The scripts our users run today, run against us: their event logger's calls on our
``KlingEventLogger``, and their ``UsageAnalytics`` (``daily_summary``, ``cost_analysis``)
on their own file against our report and costs on ours.

The scripts are imported from ``../shared/seeds`` beside the repository, as they are;
their clock is set by replacing the ``datetime`` their module reads."""

from __future__ import annotations

import datetime as dt
import importlib.util
import inspect
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from kling_exporter import client
from kling_exporter.cli import main
from kling_exporter.client import EventLogger, KlingEventLogger

SEEDS = Path(__file__).resolve().parent.parent.parent / "shared" / "seeds"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"seeds_{name}", SEEDS / f"{name}.py")
    assert spec is not None and spec.loader is not None, SEEDS
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


seed000 = _load("seed000")


class Clock:
    """The time both loggers write, naive UTC as their ``datetime.utcnow()`` gives it."""

    def __init__(self, now: dt.datetime) -> None:
        self.now = now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """One clock for their module (its ``datetime.utcnow``) and for every logger of ours."""
    shared = Clock(dt.datetime(2026, 10, 25, 9, 0))

    class TheirDatetime(dt.datetime):
        @classmethod
        def utcnow(cls) -> dt.datetime:  # type: ignore[override]
            return shared.now

    monkeypatch.setattr(seed000, "datetime", TheirDatetime)
    monkeypatch.setattr(EventLogger, "_now", lambda self: shared.now.replace(tzinfo=dt.UTC))
    return shared


def _parameters(function: Any) -> list[tuple[str, Any, Any]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


@pytest.mark.parametrize("method", ["log_submission", "log_completion", "log_error"])
def test_each_of_their_methods_is_ours_by_name_parameters_order_and_defaults(
    method: str,
) -> None:
    theirs = getattr(seed000.KlingEventLogger, method)
    assert _parameters(getattr(KlingEventLogger, method)) == _parameters(theirs)
    assert _parameters(getattr(EventLogger, method)) == _parameters(theirs)


def test_their_class_is_made_as_theirs_is() -> None:
    theirs = _parameters(seed000.KlingEventLogger.__init__)
    ours = _parameters(KlingEventLogger.__init__)
    assert ours[: len(theirs)] == theirs  # (self, log_dir="logs"), then ours, optional
    assert all(default is not inspect.Parameter.empty for _, _, default in ours[len(theirs) :])


PROMPT = "A red fox running through fresh snow at dawn, cinematic, slow motion"


def their_call_sites(logger: Any) -> None:
    """Calls as their scripts make them: positional in their order (elapsed seconds
    before credits), a duration read from a command line or a form as text, keywords
    by their names, and ``None`` for an error before Kling gave the task an id."""
    logger.log_submission("t1", PROMPT, "kling-v2-6", 5, "pro")
    logger.log_completion("t1", "succeed", 180.5, 35)
    logger.log_submission("t2", PROMPT, "kling-v1", "10", "std")
    logger.log_completion("t2", "failed", 40.0, 0)
    logger.log_submission(
        task_id="t3", prompt=PROMPT[:20], model="kling-v1-6", duration=10.0, mode="professional"
    )
    logger.log_completion(task_id="t3", status="succeed", elapsed_sec=95, credits_used=70)
    logger.log_submission("t4", PROMPT, "kling-v2-6", 10, "std")
    logger.log_error("t4", "timeout", "no answer from Kling in 600 s")
    logger.log_error(None, "rate_limit", "429 Too Many Requests: " + "x" * 400)
    logger.log_error(task_id="t5", error_type="content_filter", message="refused")


def _written(directory: Path) -> list[dict[str, Any]]:
    (path,) = directory.glob("kling-*.jsonl")
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    return [{k: v for k, v in x.items() if k != "timestamp"} for x in lines]


def test_their_call_sites_write_their_lines_through_ours(tmp_path: Path, clock: Clock) -> None:
    their_call_sites(seed000.KlingEventLogger(str(tmp_path / "theirs")))
    their_call_sites(KlingEventLogger(tmp_path / "ours"))
    theirs, ours = _written(tmp_path / "theirs"), _written(tmp_path / "ours")
    assert ours == theirs
    assert [x["duration"] for x in ours if "duration" in x] == [5, 10, 10, 10]
    assert (ours[1]["elapsed_sec"], ours[1]["credits_used"]) == (180.5, 35)  # not swapped
    assert len(ours[-2]["message"]) == 200 and ours[-2]["task_id"] is None
    (path,) = (tmp_path / "ours").glob("kling-*.jsonl")
    assert path.name == "kling-2026-10-25.jsonl" and "red fox" not in path.read_text()


def test_their_logger_keeps_its_folder_and_ours_can_name_a_project(tmp_path: Path) -> None:
    logger = KlingEventLogger(log_dir=str(tmp_path / "logs"), project="marketing")
    assert logger.log_dir == tmp_path / "logs"
    logger.log_submission("t1", PROMPT, "kling-v2-6", "5", "pro")
    assert _written(tmp_path / "logs")[0]["project"] == "marketing"


def test_the_earlier_names_refuse_two_numbers_in_a_row(tmp_path: Path) -> None:
    logger = KlingEventLogger(tmp_path)
    with pytest.raises(TypeError, match="credits_used and elapsed_sec by keyword only"):
        logger.log_task_completed("t1", "succeed", 35, 180.5)  # type: ignore[arg-type]
    assert not list(tmp_path.glob("kling-*.jsonl"))  # nothing half-written
    logger.log_task_submitted("t1", PROMPT, "kling-v2-6", "10", "pro")
    logger.log_task_completed("t1", "succeed", credits_used=70, elapsed_sec=180.5)
    submitted, completed = _written(tmp_path)
    assert submitted["duration"] == 10 and submitted["prompt_len"] == len(PROMPT)
    assert (completed["credits_used"], completed["elapsed_sec"]) == (70, 180.5)


# Ten days over a month end: six models, lengths as numbers and as text, both spellings
# of the modes, completions the next day, failures, errors with and without a task id.
# Left out: what MIGRATING.md section 5 says is counted differently on purpose (a
# repeated event, a completion without credits_used, a task that never finishes).
FIRST_DAY = dt.datetime(2026, 10, 25)
DAYS = 10
MODELS = ("kling-v1", "kling-v1-6", "kling-v2-5-turbo", "kling-v2-6", "kling-pro", "kling-v2-1")
CREDITS = (10, 20, 35, 70, 12.5, 28, 200, 1.5)


@dataclass(frozen=True)
class Call:
    at: dt.datetime
    method: str
    args: tuple[Any, ...]


def their_ten_days(seed: int = 40, per_day: int = 30) -> list[Call]:
    """Their logger's calls for ten days of traffic, in the order of their time."""
    rng = random.Random(seed)
    calls: list[Call] = []
    for day in range(DAYS):
        for n in range(per_day):
            task = f"d{day}-t{n}"
            # Some just before midnight, so that they finish the next day.
            at = FIRST_DAY + dt.timedelta(days=day, seconds=rng.uniform(0, 86400))
            if n < 2:
                at = FIRST_DAY + dt.timedelta(days=day + 1, seconds=-rng.uniform(2, 120))
            duration = rng.choice((5, 10, "5", "10", 7, 15))
            mode = rng.choice(("std", "pro", "standard", "professional"))
            prompt = "p" * rng.randint(5, 400)
            calls.append(
                Call(at, "log_submission", (task, prompt, rng.choice(MODELS), duration, mode))
            )
            elapsed = round(rng.uniform(20, 600), 1)
            end = at + dt.timedelta(seconds=elapsed)
            if end >= FIRST_DAY + dt.timedelta(days=DAYS):
                end = at + dt.timedelta(seconds=1)  # every task finishes within the ten days
            outcome = rng.random()
            if outcome < 0.85:
                args: tuple[Any, ...] = (task, "succeed", elapsed, rng.choice(CREDITS))
                calls.append(Call(end, "log_completion", args))
            elif outcome < 0.93:
                calls.append(Call(end, "log_completion", (task, "failed", elapsed, 0)))
            else:
                message = f"no answer in {elapsed} s " + "." * rng.randint(0, 300)
                calls.append(Call(end, "log_error", (task, "timeout", message)))
        for _ in range(rng.randint(0, 3)):  # refused before Kling gave an id
            at = FIRST_DAY + dt.timedelta(days=day, seconds=rng.uniform(0, 86400))
            calls.append(Call(at, "log_error", (None, "rate_limit", "429 Too Many Requests")))
    calls.sort(key=lambda c: c.at)
    return calls


def replay(calls: list[Call], clock: Clock, *loggers: Any) -> None:
    for call in calls:
        clock.now = call.at
        for logger in loggers:
            getattr(logger, call.method)(*call.args)


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    assert main(list(args)) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture
def ten_days(
    tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> tuple[Any, list[str]]:
    """Their logger and ours given the same ten days of calls: their analytics on their
    folder, and the days; ours in ``logs/`` where the exporter reads by default."""
    monkeypatch.chdir(tmp_path)
    replay(
        their_ten_days(),
        clock,
        seed000.KlingEventLogger(str(tmp_path / "theirs")),
        KlingEventLogger(tmp_path / "logs"),
    )
    last = FIRST_DAY + dt.timedelta(days=DAYS - 1, hours=23)
    clock.now = last  # "today" for their cost analysis, and for ours
    monkeypatch.setattr("kling_exporter.cli._today", lambda config: last.date())
    days = [(FIRST_DAY + dt.timedelta(days=i)).date().isoformat() for i in range(DAYS)]
    return seed000.UsageAnalytics(str(tmp_path / "theirs")), days


def test_report_summary_is_their_daily_summary_day_by_day(
    ten_days: tuple[Any, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    analytics, days = ten_days
    for day in days:
        theirs = analytics.daily_summary(day)
        ours = run_json(capsys, "report", "--date", day, "--format", "summary")
        assert ours == theirs, day
        assert list(ours) == list(theirs) and list(ours["by_model"]) == list(theirs["by_model"])
        assert isinstance(ours["success_rate"], str) and isinstance(ours["avg_generation_sec"], int)
    assert sum(analytics.daily_summary(day)["errors"] for day in days) > 10


def _their_totals(printed: str) -> dict[str, float]:
    said = dict(
        re.findall(r"^(Total credits|Total videos|Est\. cost): \$?([\d.]+)$", printed, re.M)
    )
    return {
        "credits": float(said["Total credits"]),
        "videos": float(said["Total videos"]),
        "usd": float(said["Est. cost"]),
    }


def test_costs_for_ten_days_are_their_cost_analysis(
    ten_days: tuple[Any, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    analytics, days = ten_days
    seed000.cost_analysis(analytics, days=DAYS)
    theirs = _their_totals(capsys.readouterr().out)
    ours = run_json(capsys, "costs", "--days", str(DAYS), "--format", "json")
    assert (ours["from"], ours["to"]) == (days[0], days[-1])
    assert ours["total_credits"] == theirs["credits"]
    assert ours["total_videos"] == theirs["videos"] == 300
    assert round(ours["total_usd"], 2) == theirs["usd"]  # at their $0.14 a credit
    per_day = {d["date"]: d["credits"] for d in ours["per_day"]}
    assert per_day == {day: analytics.daily_summary(day)["total_credits"] for day in days}


def test_by_model_over_ten_days_is_theirs(
    ten_days: tuple[Any, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    analytics, days = ten_days
    theirs: dict[str, int] = {}
    ours: dict[str, int] = {}
    for day in days:
        for model, count in analytics.daily_summary(day)["by_model"].items():
            theirs[model] = theirs.get(model, 0) + count
        report = run_json(capsys, "report", "--date", day, "--format", "json")
        for model, tally in report["by_model"].items():
            ours[model] = ours.get(model, 0) + tally["submitted"]
    assert {m: n for m, n in ours.items() if n} == theirs
    assert set(theirs) == set(MODELS)


def test_the_data_set_has_what_it_says() -> None:
    calls = their_ten_days()
    assert sum(c.method == "log_submission" for c in calls) == 300
    assert any(isinstance(c.args[3], str) for c in calls if c.method == "log_submission")
    assert any(c.args[0] is None for c in calls if c.method == "log_error")
    submitted = {c.args[0]: c.at.date() for c in calls if c.method == "log_submission"}
    assert any(
        c.at.date() > submitted[c.args[0]] for c in calls if c.method == "log_completion"
    )  # some finish the day after
    assert client.KlingEventLogger is KlingEventLogger
