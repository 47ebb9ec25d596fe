"""How many of the hand-rolled scripts' own figures come out the same, on a held-out week.

    python bench/migration.py [--seed 7] [--tasks 400] [--pricing FILE] [--json]

Writes a seeded week of logs in the format of the hand-rolled ``KlingEventLogger``
(naive ``utcnow().isoformat()`` timestamps, no project, ``prompt_len``, ``"task_id":
null`` on an error before the task existed, a few repeated lines), across the end of
daylight saving time in America/New_York, with 5, 7, 10 and 15 s clips. Then compares,
figure by figure, what the scripts define with what the kling_exporter on the path
gives (run it with another checkout's package on PYTHONPATH for a before/after):

- csv: the cells of the export's first seven columns (theirs: each line's own values);
  repeated lines are left out, since they are counted once on purpose (MIGRATING.md)
- costs: each submission's credits and dollars under the cost tracker's table
  (``--pricing``, by default ``examples/pricing/cost-tracker.yml``)
- remaining: each local day's remaining credits and dollars of a daily budget, limit
  minus used, as the cost tracker reports it
- drop-in: the logger's own calls made on our client; lines accepted and counted as
  meant (the model, the credits, the error)
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import json
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

from kling_exporter import client, export, reports
from kling_exporter.accounting.ledger import Ledger
from kling_exporter.configfile import parse_config, read_yaml
from kling_exporter.model import ReadStats, Record
from kling_exporter.pricing import Pricing, Request
from kling_exporter.reading.ingest import ingest
from kling_exporter.vocabulary import normalize_mode

ROOT = Path(__file__).resolve().parent.parent
THEIR_COLUMNS = ["timestamp", "event", "task_id", "model", "status", "credits_used", "elapsed_sec"]
MODELS = ["kling-v2-6", "kling-pro", "kling-v1", "kling-pro-v2"]
DURATIONS = [5, 7, 10, 15]
# Midnight in New York, the Thursday before daylight saving time ends (Sunday 1 Nov).
WEEK_START = dt.datetime(2026, 10, 29, 4, 0)
TZ = "America/New_York"
LIMIT_CREDITS, LIMIT_USD = 2400, 140  # over on some days of this week, not on others


def tracker_price(model: str, duration: int) -> tuple[float, float]:
    """The cost tracker's price: by length, times its multiplier of the model named."""
    base = {5: 10, 10: 20}.get(duration, 2 * duration)
    credits = base * {"kling-pro": 2}.get(model, 1)
    return credits, credits * 0.06


def their_week(seed: int, tasks: int) -> list[dict[str, Any]]:
    """A week of lines as their logger writes them, in the order it writes them."""
    rng = random.Random(seed)
    lines: list[tuple[dt.datetime, dict[str, Any]]] = []
    step = 7 * 86400 / tasks

    def stamp(t: dt.datetime) -> str:
        return t.isoformat()  # as utcnow().isoformat(): no microseconds when they are 0

    for i in range(tasks):
        t = WEEK_START + dt.timedelta(seconds=i * step + rng.uniform(0, step))
        t = t.replace(microsecond=0 if rng.random() < 0.1 else rng.randrange(1, 10**6))
        if rng.random() < 0.04:  # refused before Kling gave a task id
            error = {"event": "task_error", "task_id": None, "error_type": "rate_limit"}
            lines.append((t, {"timestamp": stamp(t), **error, "message": "429 " + "x" * 196}))
            continue
        task, model, duration = f"task-{seed}-{i}", rng.choice(MODELS), rng.choice(DURATIONS)
        mode = rng.choice(["std", "pro"])
        sub: dict[str, Any] = {"event": "task_submitted", "task_id": task, "model": model}
        sub |= {"duration": duration, "mode": mode, "prompt_len": rng.randrange(20, 400)}
        lines.append((t, {"timestamp": stamp(t), **sub}))
        end = t + dt.timedelta(seconds=rng.uniform(40, 500))
        fate = rng.random()
        if fate < 0.75:
            elapsed: float = (
                rng.randrange(40, 500) if rng.random() < 0.3 else round(rng.uniform(40, 500), 1)
            )
            credits = tracker_price(model, duration)[0] * (3.5 if mode == "pro" else 1)
            done: dict[str, Any] = {"event": "task_completed", "task_id": task}
            done["status"] = "succeed"
            done |= {"credits_used": int(credits), "elapsed_sec": elapsed}
            lines.append((end, {"timestamp": stamp(end), **done}))
            if rng.random() < 0.03:  # a retried write: the same line again
                lines.append((end, {"timestamp": stamp(end), **done}))
        elif fate < 0.87:
            done = {"event": "task_completed", "task_id": task, "status": "failed"}
            lines.append((end, {"timestamp": stamp(end), **done, "elapsed_sec": 12.5}))
        elif fate < 0.95:
            error = {"event": "task_error", "task_id": task, "error_type": "timeout"}
            lines.append((end, {"timestamp": stamp(end), **error, "message": "no answer"}))
        # else: still running at the end of the week
    lines.sort(key=lambda x: x[0])
    return [x for _, x in lines]


def write_logs(week: list[dict[str, Any]], directory: Path) -> None:
    """One file per UTC day, as their logger names them."""
    directory.mkdir(parents=True, exist_ok=True)
    for x in week:
        path = directory / f"kling-{x['timestamp'][:10]}.jsonl"
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(x) + "\n")


def their_export(week: list[dict[str, Any]]) -> list[list[str]]:
    """Their export's rows, as text cells, one per line, repeated lines left out."""
    out, seen = io.StringIO(), set()
    writer = csv.writer(out, lineterminator="\n")
    for x in week:
        key = (x["event"], x["task_id"])
        if key in seen and x["task_id"] is not None:
            continue
        seen.add(key)
        writer.writerow([x.get(c) for c in THEIR_COLUMNS])
    return list(csv.reader(io.StringIO(out.getvalue())))


def compare_csv(week: list[dict[str, Any]], config: Any) -> tuple[int, int]:
    out = io.StringIO()
    export.export_csv(reports.read_records(config), out, config)
    ours = [row[:7] for row in list(csv.reader(io.StringIO(out.getvalue())))[1:]]
    theirs = their_export(week)
    total = 7 * max(len(ours), len(theirs))
    pairs = zip(ours, theirs, strict=False)  # a missing row counts as unequal
    equal = sum(a == b for mine, their in pairs for a, b in zip(mine, their, strict=True))
    return equal, total


def compare_costs(week: list[dict[str, Any]], pricing: Pricing) -> tuple[int, int]:
    equal = total = 0
    for x in week:
        if x["event"] != "task_submitted":
            continue
        want_c, want_u = tracker_price(x["model"], x["duration"])
        req = Request(x["model"], normalize_mode(x["mode"]), x["duration"], False, "video")
        got = pricing.credits(req)
        equal += (got == want_c) + (abs(pricing.usd(got) - want_u) < 1e-9)
        total += 2
    return equal, total


def compare_remaining(week: list[dict[str, Any]], config: Any) -> tuple[int, int]:
    """Each day's remaining of a daily budget against limit minus the same used."""
    ledger = Ledger(config)
    lines = [json.dumps(x).encode() for x in week]
    ingest(ledger, lines, WEEK_START.replace(tzinfo=dt.UTC).timestamp() + 8 * 86400)
    ledger.settle_waiting()
    equal = total = 0
    day = dt.datetime(2026, 10, 29, 12, tzinfo=config.tz)
    for _ in range(7):
        (status,) = ledger.budget_statuses(day.timestamp())
        want_c = LIMIT_CREDITS - status.used_credits
        want_u = LIMIT_USD - status.used_usd
        equal += (status.remaining_credits == want_c) + (
            status.remaining_usd is not None and abs(status.remaining_usd - want_u) < 1e-9
        )
        total += 2
        day += dt.timedelta(days=1)
    return equal, total


def their_calls(logger: Any, week: list[dict[str, Any]]) -> int:
    """Their call sites, one per event; a logger without their names gets the calls in
    their order on ours, as a migration by renaming would. Returns the calls made."""
    drop_in = hasattr(logger, "log_submission")
    calls, seen = 0, set()
    for x in week:
        key = (x["event"], x["task_id"])
        if key in seen and x["task_id"] is not None:
            continue
        seen.add(key)
        calls += 1
        args: tuple[Any, ...]
        if x["event"] == "task_submitted":
            args = (x["task_id"], "p" * x["prompt_len"], x["model"], x["duration"], x["mode"])
            (logger.log_submission if drop_in else logger.submitted)(*args)
        elif x["event"] == "task_completed":
            args = (x["task_id"], x["status"], x.get("elapsed_sec"), x.get("credits_used"))
            (logger.log_completion if drop_in else logger.completed)(*args)
        else:
            args = (x["task_id"], x["error_type"], x["message"])
            (logger.log_error if drop_in else logger.error)(*args)
    return calls


def compare_drop_in(week: list[dict[str, Any]], directory: Path) -> tuple[int, int]:
    """Lines their calls write on our client that are counted as they meant them."""
    calls = their_calls(client.EventLogger(directory), week)
    ledger, reading = Ledger(parse_config({})), ReadStats()
    records: list[Record] = []
    ledger.observer = records.append
    for path in sorted(directory.glob("kling-*.jsonl")):
        ingest(ledger, path.read_bytes().splitlines(), 4e9, stats=reading)
    ledger.settle_waiting()
    meant = {(x["event"], x["task_id"] or ""): x for x in week}
    right = 0
    for r in records:
        x = meant.get((export.EVENT_NAMES[r.event], r.task_id))
        if x is None:
            continue
        if r.event == "submitted":
            right += r.model == x["model"]
        elif r.event == "completed":
            right += r.credits == (x.get("credits_used") or 0)
        else:
            right += r.error_type == x["error_type"]
    return right, calls


def figures(
    seed: int, tasks: int, pricing_file: str | Path, tmp: Path
) -> dict[str, tuple[int, int]]:
    """Each figure as (equal, of) for a week written under ``tmp``."""
    week = their_week(seed, tasks)
    logs = tmp / "logs"
    write_logs(week, logs)
    budget: dict[str, Any] = {"name": "team", "period": "daily"}
    budget |= {"limit_credits": LIMIT_CREDITS, "limit_usd": LIMIT_USD}
    config = parse_config(
        {
            "logs": {"paths": [str(logs / "kling-*.jsonl")]},
            "timezone": TZ,
            "pricing": read_yaml(pricing_file)["pricing"],
            "budgets": [budget],
        }
    )
    return {
        "lines": (len(week), len(week)),
        "csv cells": compare_csv(week, config),
        "costs": compare_costs(week, Pricing(config.pricing)),
        "remaining": compare_remaining(week, config),
        "drop-in lines": compare_drop_in(week, tmp / "drop-in"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--tasks", type=int, default=400)
    parser.add_argument("--pricing", default=str(ROOT / "examples/pricing/cost-tracker.yml"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        found = figures(args.seed, args.tasks, args.pricing, Path(tmp))
    if args.json:
        print(json.dumps({k: {"equal": e, "of": n} for k, (e, n) in found.items()}))
        return 0
    print(f"{found.pop('lines')[0]} lines, {args.tasks} tasks, seed {args.seed}")
    for name, (equal, total) in found.items():
        print(f"{name:<14} {equal:>6,} of {total:>6,} equal")
    return 0


if __name__ == "__main__":
    sys.exit(main())
