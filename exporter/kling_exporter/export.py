"""The CSV export (``kling-exporter export``): every counted event, with the seven
cells of the usage scripts teams already run, as those scripts write them from the
logged line, then ours. A stable contract: its columns are only ever added to."""

from __future__ import annotations

import csv
import datetime as dt
from collections import defaultdict, deque
from collections.abc import Iterable
from typing import Any, TextIO

import msgspec

from kling_exporter.config import Config
from kling_exporter.events import Event, decode_line
from kling_exporter.model import Record
from kling_exporter.reading.listing import matching_files
from kling_exporter.reports import local_date

# The first seven columns are those of the usage scripts teams already run
# (export_usage_csv), cell for cell as they write them; ours follow. A stable contract.
CSV_COLUMNS = (
    "timestamp",
    "event",
    "task_id",
    "model",
    "status",
    "credits_used",
    "elapsed_sec",
    "project",
    "user",
    "mode",
    "duration",
    "audio",
    "kind",
    "error_type",
    "usd",
    # What we counted: the charge (estimated from pricing when the line has none), and
    # the task's model from the join (their model column is the line's own).
    "credits",
    "task_model",
)


EVENT_NAMES = {"submitted": "task_submitted", "completed": "task_completed", "error": "task_error"}


class _Logged(msgspec.Struct):
    """The fields of a line their export writes, decoded as ``json.loads`` would."""

    timestamp: Any = None
    event: Any = None
    task_id: Any = None
    model: Any = None
    status: Any = None
    credits_used: Any = None
    elapsed_sec: Any = None


_logged_decoder = msgspec.json.Decoder(_Logged)


Cells = list[Any]


def logged_cells(config: Config) -> dict[tuple[str, str], deque[Cells]]:
    """Their seven cells of every event line in the configured logs, by (event, task
    id) in file order: a counted record takes the first line of its key, so a repeated
    line never takes the place of the one that was counted."""
    found: dict[tuple[str, str], deque[Cells]] = defaultdict(deque)
    for path in matching_files(config.logs.paths):
        try:
            with open(path, "rb") as f:
                for raw in f:
                    try:
                        x = _logged_decoder.decode(raw.removeprefix(b"\xef\xbb\xbf"))
                    except (msgspec.DecodeError, UnicodeDecodeError):
                        continue
                    if x.event not in EVENT_NAMES.values():
                        continue  # a usage line: theirs has no event to write
                    if not isinstance(decode_line(raw), Event):
                        continue  # not counted: no record will ask for it
                    task = "" if x.task_id is None else str(x.task_id)
                    cells = [x.timestamp, x.event, x.task_id, x.model, x.status]
                    found[(x.event, task)].append([*cells, x.credits_used, x.elapsed_sec])
        except OSError:
            continue  # read_records has said so already
    return found


def _our_cells(r: Record) -> Cells:
    """Their seven cells for a record no logged line stands for (a usage line)."""
    stamp = dt.datetime.fromtimestamp(r.ts, dt.UTC).isoformat().replace("+00:00", "Z")
    credits = f"{r.credits:g}" if r.event == "completed" else ""
    model = r.model if r.event == "submitted" else ""
    return [stamp, EVENT_NAMES[r.event], r.task_id, model, r.status, credits, r.elapsed]


def export_csv(
    records: Iterable[Record],
    out: TextIO,
    config: Config,
    since: dt.date | None = None,
    until: dt.date | None = None,
    logged: dict[tuple[str, str], deque[Cells]] | None = None,
) -> int:
    """Write the records between two local dates (both included); returns the row count.

    The first seven cells are those of the line that was counted, as their script
    writes them: the timestamp as logged, the model only where the line has it, numbers
    as logged (``95``, ``180.5``), nothing where the line has nothing. ``logged`` are
    those lines (``logged_cells``); by default the configured logs are read again.
    A task whose outcome was never seen has no row of its own: the estimate it was
    charged is in its submission's ``usd`` and ``credits``, so the column sums are the
    reports' totals."""
    if logged is None:
        logged = logged_cells(config)
    records = list(records)
    estimated = {r.task_id: r for r in records if r.event == "expired"}
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    rows = 0
    for r in records:
        if r.event == "expired":
            continue
        name = EVENT_NAMES[r.event]
        lines = logged.get((name, r.task_id))
        theirs = lines.popleft() if lines else _our_cells(r)
        day = local_date(r.ts, config)
        if (since and day < since) or (until and day > until):
            continue
        charge: Record | None = r
        if r.event == "submitted":
            charge = estimated.get(r.task_id)
        writer.writerow(
            [
                *theirs,
                r.project,
                r.user or "",
                r.mode if r.kind == "video" else "",
                r.duration if r.kind == "video" else "",
                str(r.audio).lower(),
                r.kind,
                r.error_type or "",
                "" if charge is None else f"{charge.usd:.4f}",
                "" if charge is None else f"{charge.credits:g}",
                r.model,
            ]
        )
        rows += 1
    return rows
