"""The reports laid out: aligned tables of ``report`` and ``costs`` as people read
them, and ``report`` in the shape of the usage scripts' ``daily_summary``."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any

from kling_exporter.config import Config
from kling_exporter.model import Record
from kling_exporter.reports import CostAnalysis, DailyReport, local_date


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


def _or_dash(value: float | None) -> float | str:
    return "-" if value is None else float(value)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def credits(amount: float) -> str:
    """``1 credit``, ``2.5 credits``: the amount and the word that fits it."""
    return f"{amount:g} credit{'' if amount == 1 else 's'}"


def _percent(rate: float, of: int) -> str:
    """A rate as a percentage, or ``-`` when there was nothing to take it of."""
    return f"{rate:.1%}" if of else "-"


def daily_text(result: DailyReport, config: Config) -> str:
    """``report`` as people read it: totals, by model, by project, and the budgets."""
    finished = result.succeeded + result.failed + result.errors
    completed = result.succeeded + result.failed
    out: list[str] = []
    out.append(f"Kling usage on {result.date} ({config.timezone})\n")
    out.append(
        table(
            [
                "submitted",
                "succeeded",
                "failed",
                "errors",
                "success",
                "credits",
                "USD",
                "avg gen s",
            ],
            [
                [
                    result.total_submitted,
                    result.succeeded,
                    result.failed,
                    result.errors,
                    _percent(result.success_rate, finished),
                    float(result.total_credits),
                    float(result.total_usd),
                    float(result.avg_generation_sec),
                ]
            ],
        )
    )
    if finished:
        out.append(
            f"\nsuccess: {result.success_rate:.1%} of finished tasks (errors included), "
            f"{_percent(result.success_rate_completions, completed)} of completions alone"
        )
    else:
        out.append("\nsuccess: - (no task finished this day)")
    for title, tallies in (("model", result.by_model), ("project", result.by_project)):
        rows = [
            [name, t.submitted, t.succeeded, t.failed, t.errors, float(t.credits), float(t.usd)]
            for name, t in tallies.items()
        ]
        if rows:
            out.append(f"\nBy {title}:")
            out.append(
                table([title, "submitted", "succeeded", "failed", "errors", "credits", "USD"], rows)
            )
    budgets = [
        [
            b.name,
            b.period,
            float(b.used_credits),
            _or_dash(b.limit_credits),
            _or_dash(b.over_by_credits),
            float(b.used_usd),
            _or_dash(b.limit_usd),
            _or_dash(b.over_by_usd),
        ]
        for b in result.budgets
    ]
    if budgets:
        out.append(f"\nBudgets at the end of {result.date}:")
        headers = ["budget", "period", "credits", "limit", "over by", "USD", "limit", "over by"]
        out.append(table(headers, budgets))
    return "\n".join(out) + "\n"


def costs_text(result: CostAnalysis, config: Config) -> str:
    """``costs`` as people read it: one row a day, the total and the daily average."""
    out: list[str] = []
    out.append(f"Kling costs, {result.first} to {result.to} ({config.timezone})\n")
    rows: list[list[Any]] = [
        [
            d.date,
            float(d.credits),
            d.videos,
            d.succeeded,
            float(d.usd),
            _or_dash(d.usd_per_succeeded),
        ]
        for d in result.per_day
    ]
    rows.append(
        [
            "total",
            float(result.total_credits),
            result.total_videos,
            result.total_succeeded,
            float(result.total_usd),
            _or_dash(result.usd_per_succeeded),
        ]
    )
    rows.append(
        [
            "average/day",
            float(result.avg_credits_per_day),
            round(result.total_videos / result.days, 2),
            round(result.total_succeeded / result.days, 2),
            float(result.avg_usd_per_day),
            "",
        ]
    )
    # videos: tasks submitted that day, as usage scripts count them.
    headers = ["date", "credits", "videos", "succeeded", "USD", "USD/succeeded"]
    out.append(table(headers, rows))
    return "\n".join(out) + "\n"


def summary(result: DailyReport, records: Iterable[Record], config: Config) -> dict[str, Any]:
    """``report --format summary``: the keys, order and value shapes of the usage
    scripts' ``UsageAnalytics.daily_summary``, so a script that read theirs reads this.

    ``success_rate`` is theirs, of completions alone, as text (``'96.4%'``);
    ``avg_generation_sec`` the mean of succeeded tasks rounded to whole seconds as
    ``round`` does it; ``by_model`` submissions per model in the order first read. The
    figures are the report's: a repeated event counted once, a completion without
    ``credits_used`` priced (MIGRATING.md section 5)."""
    day = dt.date.fromisoformat(result.date)
    by_model: dict[str, int] = {}
    elapsed: list[float] = []
    # The exact mean, not the report's: rounding 2.497 to 2.5 and then to 2 (or 3) is
    # not what their round(2.497) says.
    for r in records:
        if local_date(r.ts, config) != day:
            continue
        if r.event == "submitted":
            by_model[r.model] = by_model.get(r.model, 0) + 1
        elif r.event == "completed" and r.status == "succeed" and r.elapsed is not None:
            elapsed.append(r.elapsed)
    completed = result.succeeded + result.failed
    return {
        "date": result.date,
        "total_submitted": result.total_submitted,
        "succeeded": result.succeeded,
        "failed": result.failed,
        "errors": result.errors,
        "success_rate": f"{result.succeeded / max(completed, 1) * 100:.1f}%",
        "total_credits": result.total_credits,
        "avg_generation_sec": round(sum(elapsed) / len(elapsed)) if elapsed else 0,
        "by_model": by_model,
    }
