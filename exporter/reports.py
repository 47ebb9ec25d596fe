"""Offline reading of the logs for people and scripts: daily report, costs, CSV, estimate.

The logs are replayed through the same ledger as the daemon, so joins, duplicates and
prices agree with the metrics to the credit.
"""

from __future__ import annotations

import csv
import datetime as dt
import sys
from collections import defaultdict
from collections.abc import Iterable
from typing import Any, TextIO

from exporter.config import Config
from exporter.ingest import ingest
from exporter.ledger import Ledger, Record
from exporter.tailer import matching_files


def read_records(config: Config, progress: TextIO | None = None) -> list[Record]:
    """Every counted event in the configured logs, joined and deduplicated."""
    records: list[Record] = []
    ledger = Ledger(config)
    ledger.observer = records.append
    files = matching_files(config.logs.paths)
    now = dt.datetime.now(dt.UTC).timestamp()
    show = progress is not None and progress.isatty() and len(files) > 1
    for i, path in enumerate(files, 1):
        if show and progress is not None:
            progress.write(f"\rreading {i}/{len(files)}: {path[-50:]:<50}")
            progress.flush()
        try:
            with open(path, "rb") as f:
                for block in iter(lambda: f.readlines(1 << 20), []):
                    ingest(ledger, [line.rstrip(b"\n") for line in block], now)
        except OSError as e:
            print(f"kling-exporter: cannot read {path}: {e.strerror}", file=sys.stderr)
    # The whole log has been read: what still waits for its submission never gets it.
    ledger.settle_waiting()
    if show and progress is not None:
        progress.write("\r" + " " * 70 + "\r")
    return records


def local_date(ts: float, config: Config) -> dt.date:
    return dt.datetime.fromtimestamp(ts, config.tz).date()


def _tally() -> dict[str, float]:
    return {"submitted": 0, "succeeded": 0, "failed": 0, "errors": 0, "credits": 0.0, "usd": 0.0}


def _count(t: dict[str, float], r: Record) -> None:
    if r.event == "submitted":
        t["submitted"] += 1
    elif r.event == "completed":
        t["succeeded" if r.status == "succeed" else "failed"] += 1
    else:
        t["errors"] += 1
    t["credits"] += r.credits
    t["usd"] += r.usd


def daily_report(records: Iterable[Record], day: dt.date, config: Config) -> dict[str, Any]:
    total = _tally()
    by_model: dict[str, dict[str, float]] = defaultdict(_tally)
    by_project: dict[str, dict[str, float]] = defaultdict(_tally)
    elapsed: list[float] = []
    for r in records:
        if local_date(r.ts, config) != day:
            continue
        for t in (total, by_model[r.model], by_project[r.project]):
            _count(t, r)
        if r.event == "completed" and r.status == "succeed" and r.elapsed is not None:
            elapsed.append(r.elapsed)
    finished = total["succeeded"] + total["failed"] + total["errors"]
    return {
        "date": day.isoformat(),
        "total_submitted": int(total["submitted"]),
        "succeeded": int(total["succeeded"]),
        "failed": int(total["failed"]),
        "errors": int(total["errors"]),
        "success_rate": round(total["succeeded"] / finished, 4) if finished else 0.0,
        "total_credits": round(total["credits"], 4),
        "total_usd": round(total["usd"], 4),
        "avg_generation_sec": round(sum(elapsed) / len(elapsed), 2) if elapsed else 0.0,
        "by_model": {k: _rounded(v) for k, v in sorted(by_model.items())},
        "by_project": {k: _rounded(v) for k, v in sorted(by_project.items())},
    }


def _rounded(t: dict[str, float]) -> dict[str, float]:
    return {k: (round(v, 4) if k in ("credits", "usd") else int(v)) for k, v in t.items()}


def cost_analysis(
    records: Iterable[Record], days: int, today: dt.date, config: Config
) -> dict[str, Any]:
    first = today - dt.timedelta(days=days - 1)
    per_day = {
        first + dt.timedelta(days=i): {"credits": 0.0, "videos": 0, "usd": 0.0} for i in range(days)
    }
    for r in records:
        row = per_day.get(local_date(r.ts, config))
        if row is None:
            continue
        row["credits"] += r.credits
        row["usd"] += r.usd
        if r.event == "completed" and r.status == "succeed" and r.kind == "video":
            row["videos"] += 1
    total_credits = sum(r["credits"] for r in per_day.values())
    total_usd = sum(r["usd"] for r in per_day.values())
    return {
        "days": days,
        "from": first.isoformat(),
        "to": today.isoformat(),
        "per_day": [
            {
                "date": d.isoformat(),
                "credits": round(r["credits"], 4),
                "videos": int(r["videos"]),
                "usd": round(r["usd"], 4),
            }
            for d, r in per_day.items()
        ],
        "total_credits": round(total_credits, 4),
        "total_videos": int(sum(r["videos"] for r in per_day.values())),
        "total_usd": round(total_usd, 4),
        "avg_credits_per_day": round(total_credits / days, 4),
        "avg_usd_per_day": round(total_usd / days, 4),
    }


CSV_COLUMNS = (
    "timestamp",
    "event",
    "task_id",
    "project",
    "user",
    "model",
    "mode",
    "duration",
    "audio",
    "kind",
    "status",
    "elapsed_sec",
    "error_type",
    "credits",
    "usd",
)


def export_csv(
    records: Iterable[Record],
    out: TextIO,
    config: Config,
    since: dt.date | None = None,
    until: dt.date | None = None,
) -> int:
    """Write the records between two local dates (both included); returns the row count."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    rows = 0
    for r in records:
        day = local_date(r.ts, config)
        if (since and day < since) or (until and day > until):
            continue
        stamp = dt.datetime.fromtimestamp(r.ts, dt.UTC).isoformat().replace("+00:00", "Z")
        writer.writerow(
            [
                stamp,
                r.event,
                r.task_id,
                r.project,
                r.user or "",
                r.model,
                r.mode,
                r.duration,
                str(r.audio).lower(),
                r.kind,
                r.status or "",
                "" if r.elapsed is None else r.elapsed,
                r.error_type or "",
                f"{r.credits:g}",
                f"{r.usd:.4f}",
            ]
        )
        rows += 1
    return rows


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """An aligned text table: numbers right, text left."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [
        all(isinstance(row[i], int | float) for row in rows) and rows for i in range(len(headers))
    ]

    def line(values: list[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
