"""Offline reading of the logs for people and scripts: the daily report and the costs
as typed results (``report_text`` lays them out as tables; ``export`` writes the CSV).

The logs are replayed through the same ledger as the daemon, so joins, duplicates and
prices agree with the metrics to the credit.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import TextIO

import msgspec
from tqdm import tqdm

from kling_exporter.accounting.ledger import Ledger
from kling_exporter.budgets import over_by
from kling_exporter.config import Config
from kling_exporter.model import ReadStats, Record
from kling_exporter.periods import period_bounds
from kling_exporter.reading.ingest import ingest
from kling_exporter.reading.listing import matching_files
from kling_exporter.wording import amount_for_people


def read_records(config: Config, progress: TextIO | None = None) -> list[Record]:
    """Every counted event in the configured logs, joined and deduplicated.

    Every file is read before anything is settled: a completion or a usage line counts
    with its task's other lines wherever they are. Then a task still unfinished and older
    than ``tasks.ttl`` before the newest event is charged its estimate (an ``expired``
    record, at its submission time), as the daemon charges it; a task that finishes
    anywhere in the files is charged what its completion says, never an estimate. (The
    daemon, reading live, charges the estimate of a task that finishes more than a TTL
    after its submission, and then only what its completion says beyond it.)"""
    records: list[Record] = []
    ledger, reading = Ledger(config), ReadStats()
    ledger.observer = records.append
    files = matching_files(config.logs.paths)
    for pattern in config.logs.paths:
        if not matching_files([pattern]):
            where = "" if os.path.isabs(pattern) else f" (relative to {os.getcwd()})"
            print(f"kling-exporter: no log file matches {pattern}{where}", file=sys.stderr)
    now = dt.datetime.now(dt.UTC).timestamp()
    # Months of logs take a while: a bar (bytes read, rate, time left) on a terminal only,
    # so that a script reading stderr gets nothing but messages.
    with tqdm(
        total=sum(_size(path) for path in files),
        desc="reading logs",
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=progress,
        disable=progress is None or not progress.isatty(),
        leave=False,
        dynamic_ncols=True,
    ) as bar:
        for path in files:
            try:
                with open(path, "rb") as f:
                    for block in iter(lambda: f.readlines(1 << 20), []):
                        lines = [line.rstrip(b"\n") for line in block]
                        ingest(ledger, lines, now, stats=reading)
                        bar.update(sum(map(len, block)))
            except OSError as e:
                bar.clear()
                print(f"kling-exporter: cannot read {path}: {e.strerror}", file=sys.stderr)
    # The whole log has been read: what still waits for its submission never gets it,
    # and what is unfinished past the TTL is charged its estimate.
    ledger.end_of_logs(now)
    skipped = {reason: n for reason, n in reading.invalid.items() if n}
    if skipped:
        why = ", ".join(f"{reason} {n}" for reason, n in sorted(skipped.items()))
        total = sum(skipped.values())
        print(
            f"kling-exporter: skipped {total} invalid log line{'s' * (total != 1)} "
            f"of {reading.lines} ({why}); the totals leave them out",
            file=sys.stderr,
        )
    return records


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0  # said when it is opened


def local_date(ts: float, config: Config) -> dt.date:
    return dt.datetime.fromtimestamp(ts, config.tz).date()


class Tally(msgspec.Struct):
    """Counts and costs of some tasks: submitted, succeeded, failed, with errors."""

    submitted: int = 0
    succeeded: int = 0
    failed: int = 0
    errors: int = 0
    credits: float = 0.0
    usd: float = 0.0

    def count(self, r: Record) -> None:
        if r.event == "submitted":
            self.submitted += 1
        elif r.event == "completed":
            if r.status == "succeed":
                self.succeeded += 1
            else:
                self.failed += 1
        elif r.event == "error":
            self.errors += 1
        # "expired": a task whose outcome was never seen, charged its estimate.
        self.credits += r.credits
        self.usd += r.usd

    def for_people(self) -> Tally:
        return msgspec.structs.replace(
            self,
            credits=amount_for_people("credits", self.credits),
            usd=amount_for_people("usd", self.usd),
        )


class BudgetUse(msgspec.Struct):
    """A budget in its period as of the end of a day."""

    name: str
    period: str
    used_credits: float
    used_usd: float
    limit_credits: float | None
    limit_usd: float | None
    over_by_credits: float | None  # 0 within the limit, None for no limit
    over_by_usd: float | None
    # Limit minus used, negative once over (None for no limit).
    remaining_credits: float | None = None
    remaining_usd: float | None = None


class DailyReport(msgspec.Struct):
    """``report``: one local day's tasks and costs, by model and project, and budgets."""

    date: str
    total_submitted: int
    succeeded: int
    failed: int
    errors: int
    # Of every finished task, errors included (the rate users feel); and of the
    # completions alone, as hand-rolled trackers compute it.
    success_rate: float
    success_rate_completions: float
    total_credits: float
    total_usd: float
    avg_generation_sec: float
    by_model: dict[str, Tally]
    by_project: dict[str, Tally]
    budgets: list[BudgetUse]


def daily_report(records: Sequence[Record], day: dt.date, config: Config) -> DailyReport:
    total = Tally()
    by_model: dict[str, Tally] = defaultdict(Tally)
    by_project: dict[str, Tally] = defaultdict(Tally)
    elapsed: list[float] = []
    for r in records:
        if local_date(r.ts, config) != day:
            continue
        for t in (total, by_model[r.model], by_project[r.project]):
            t.count(r)
        if r.event == "completed" and r.status == "succeed" and r.elapsed is not None:
            elapsed.append(r.elapsed)
    completed = total.succeeded + total.failed
    finished = completed + total.errors
    return DailyReport(
        date=day.isoformat(),
        total_submitted=total.submitted,
        succeeded=total.succeeded,
        failed=total.failed,
        errors=total.errors,
        success_rate=round(total.succeeded / finished, 4) if finished else 0.0,
        success_rate_completions=round(total.succeeded / completed, 4) if completed else 0.0,
        total_credits=amount_for_people("credits", total.credits),
        total_usd=amount_for_people("usd", total.usd),
        avg_generation_sec=round(sum(elapsed) / len(elapsed), 2) if elapsed else 0.0,
        by_model={k: v.for_people() for k, v in sorted(by_model.items())},
        by_project={k: v.for_people() for k, v in sorted(by_project.items())},
        budgets=budget_report(records, day, config),
    )


def budget_report(records: Iterable[Record], day: dt.date, config: Config) -> list[BudgetUse]:
    """Each budget in its period as of the end of ``day``: used, remaining (limit minus
    used, negative once over) and by how much it is over (``over_by_*``, 0 within)."""
    end = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), config.tz).timestamp()
    out = []
    for b in config.budgets:
        start, _ = period_bounds(b.period, end - 1, config.tz)
        credits = usd = 0.0
        for r in records:
            if (
                start <= r.ts < end
                and (b.project is None or r.project == b.project)
                and (b.user is None or r.user == b.user)
            ):
                credits += r.credits
                usd += r.usd
        over_c, over_u = overspend(b.limit_credits, b.limit_usd, credits, usd)
        out.append(
            BudgetUse(
                name=b.name,
                period=b.period,
                used_credits=amount_for_people("credits", credits),
                used_usd=amount_for_people("usd", usd),
                limit_credits=b.limit_credits,
                limit_usd=b.limit_usd,
                over_by_credits=over_c,
                over_by_usd=over_u,
                remaining_credits=_left("credits", b.limit_credits, credits),
                remaining_usd=_left("usd", b.limit_usd, usd),
            )
        )
    return out


def _left(key: str, limit: float | None, used: float) -> float | None:
    return None if limit is None else amount_for_people(key, limit - used)


class DayCost(msgspec.Struct):
    """One day of ``costs``: "videos" are tasks submitted that day, as the usage scripts
    teams ran before count them; "succeeded" are the ones that succeeded."""

    date: str
    credits: float = 0.0
    videos: int = 0
    succeeded: int = 0
    usd: float = 0.0
    usd_per_succeeded: float | None = None


class CostAnalysis(msgspec.Struct):
    """``costs``: the last ``days`` local days, each, in total and on average."""

    days: int
    first: str = msgspec.field(name="from")
    to: str = ""
    per_day: list[DayCost] = []
    total_credits: float = 0.0
    total_videos: int = 0
    total_succeeded: int = 0
    total_usd: float = 0.0
    usd_per_succeeded: float | None = None
    avg_credits_per_day: float = 0.0
    avg_usd_per_day: float = 0.0


# A row a day: ten years is more than any log kept, and still a table one can page.
MAX_COST_DAYS = 3660


def cost_analysis(
    records: Iterable[Record], days: int, today: dt.date, config: Config
) -> CostAnalysis:
    if not 1 <= days <= MAX_COST_DAYS:
        raise ValueError(f"days: expected 1 to {MAX_COST_DAYS}, got {days}")
    first = today - dt.timedelta(days=days - 1)
    per_day = {
        first + dt.timedelta(days=i): DayCost((first + dt.timedelta(days=i)).isoformat())
        for i in range(days)
    }
    for r in records:
        row = per_day.get(local_date(r.ts, config))
        if row is None:
            continue
        row.credits += r.credits
        row.usd += r.usd
        if r.event == "submitted":
            row.videos += 1
        elif r.event == "completed" and r.status == "succeed":
            row.succeeded += 1
    rows = list(per_day.values())
    total_credits = sum(r.credits for r in rows)
    total_usd = sum(r.usd for r in rows)
    total_succeeded = sum(r.succeeded for r in rows)
    return CostAnalysis(
        days=days,
        first=first.isoformat(),
        to=today.isoformat(),
        per_day=[
            msgspec.structs.replace(
                r,
                credits=amount_for_people("credits", r.credits),
                usd=amount_for_people("usd", r.usd),
                usd_per_succeeded=_per(r.usd, r.succeeded),
            )
            for r in rows
        ],
        total_credits=amount_for_people("credits", total_credits),
        total_videos=sum(r.videos for r in rows),
        total_succeeded=total_succeeded,
        total_usd=amount_for_people("usd", total_usd),
        usd_per_succeeded=_per(total_usd, total_succeeded),
        avg_credits_per_day=amount_for_people("credits", total_credits / days),
        avg_usd_per_day=amount_for_people("usd", total_usd / days),
    )


def _per(amount: float, count: float) -> float | None:
    return round(amount / count, 2) if count else None


def overspend(
    limit_credits: float | None, limit_usd: float | None, credits: float, usd: float
) -> tuple[float | None, float | None]:
    """How far past its limits a budget is, in credits and dollars: 0 within them, None
    for a limit not set."""
    over_c, over_u = over_by(credits, limit_credits), over_by(usd, limit_usd)
    return (
        None if over_c is None else amount_for_people("credits", over_c),
        None if over_u is None else amount_for_people("usd", over_u),
    )
