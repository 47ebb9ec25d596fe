"""One ingest stage: lines read from a log into ledger updates, and what was skipped.

The daemon and the reports both feed lines through ``ingest``, so a line is
judged the same way everywhere. No line can stop it: a line that is not an
event is counted invalid with its reason, and an error while applying one
(a defect of ours, never the line's fault) is counted as ``internal_error``
and logged, and the lines after it are read as usual.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from kling_exporter.accounting.ledger import Ledger
from kling_exporter.events import Event, decode_line
from kling_exporter.model import ReadStats

log = logging.getLogger(__name__)

# Told of each skipped line: its index in the block and the reason.
OnInvalid = Callable[[int, str], None]


class RateLimit:
    """At most ``burst`` log lines per ``window`` seconds; says how many it held back."""

    def __init__(self, burst: int = 10, window: float = 60.0) -> None:
        self.burst, self.window = burst, window
        self.start, self.count, self.suppressed = 0.0, 0, 0

    def allow(self, now: float) -> tuple[bool, int]:
        if now - self.start >= self.window:
            held, self.suppressed = self.suppressed, 0
            self.start, self.count = now, 0
        else:
            held = 0
        self.count += 1
        if self.count > self.burst:
            self.suppressed += 1
            return False, held
        return True, held


_internal_log = RateLimit(burst=5)


def ingest(
    ledger: Ledger,
    lines: Sequence[bytes | None],
    now: float,
    on_invalid: OnInvalid | None = None,
    stats: ReadStats | None = None,
) -> None:
    """Decode and apply every line (None stands for a line too long to keep); ``now`` is
    the time of reading. Blank lines are neither events nor errors. Each line is counted
    in ``stats``, and each invalid one by its reason there; ``on_invalid`` is told which
    and why."""
    stats = stats if stats is not None else ReadStats()
    stats.lines += len(lines)
    apply, counts, decode = ledger.apply, stats.invalid, decode_line
    for i, line in enumerate(lines):
        try:
            if line is None:
                reason = "too_long"
            else:
                result = decode(line)
                if type(result) is Event:
                    apply(result, now)
                    continue
                if not line.strip():
                    continue
                reason = result  # type: ignore[assignment]
        except Exception:
            reason = "internal_error"
            if _internal_log.allow(now)[0]:
                log.exception("error while applying a log line; line skipped")
        counts[reason] += 1
        if on_invalid is not None:
            on_invalid(i, reason)
