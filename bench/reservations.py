"""What the reader's word on consumed holds costs the HTTP process's event loop.

The reader tells ``Reservations.consumed`` the counts of the reservation ids it read
since it last told (a few ids each time, several times a second). Those counts are
remembered for a day, so that a count told again is not counted again: at 100,000 to
300,000 reservation ids a day that table is large, and what a call costs is what
``/-/healthy`` and every other request wait meanwhile. Here a day of ids is told in
batches, with 2,000 holds live, and then calls of 10 new ids each are timed.

    python bench/reservations.py                      # 100,000 and 300,000 ids
    python bench/reservations.py --ids 200000 --calls 500

Measured on the project's 2-core machine: when the counts told were rebuilt on every
call past 100,000 ids, a call took a median 65 ms (p99 154 ms, max 186 ms) at 300,000
ids, and up to 25 ms at 100,000; kept up to date as holds come and go, 0.01 ms (p99
0.3 ms) at either.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kling_exporter.guard.reservations import Reservations
from kling_exporter.journals.holds import Hold

DAY = 86400.0
START = 1_795_000_000.0
LIVE = 2_000  # holds live throughout
BATCH = 1_000  # ids a setup call tells
PER_CALL = 10  # ids a timed call tells


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def told_a_day(ids: int) -> tuple[Reservations, Clock]:
    """Reservations that were told ``ids`` ids evenly over the last day."""
    clock = Clock(START)
    held = Reservations(None, clock)
    for i in range(LIVE):
        rid = f"live-{i}"
        held.holds[rid] = Hold(rid, "f", f"p{i % 50}", None, 1000, 1.0, 0.14, ("b",), START + DAY)
    held._rebuild()
    step = DAY / ids * BATCH
    for start in range(0, ids, BATCH):
        held.consumed({f"day-{i}": 1 for i in range(start, min(start + BATCH, ids))})
        clock.now += step
    return held, clock


def timed_calls(ids: int, calls: int) -> list[float]:
    held, clock = told_a_day(ids)
    step = DAY / ids * PER_CALL
    took = []
    for c in range(calls):
        counts = {f"new-{c}-{i}": 1 for i in range(PER_CALL)}
        counts[f"live-{c % LIVE}"] = 1  # one task of a live hold too
        began = time.perf_counter()
        held.consumed(counts)
        took.append(time.perf_counter() - began)
        clock.now += step
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ids", type=int, nargs="+", default=[100_000, 300_000])
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    print(f"Reservations.consumed(), {PER_CALL + 1} ids a call, {LIVE} holds live")
    for ids in args.ids:
        took = sorted(timed_calls(ids, args.calls))
        p99 = took[min(len(took) - 1, int(len(took) * 0.99))]
        print(
            f"{ids:>9,} ids told in the last day: median {statistics.median(took) * 1e3:8.3f} ms"
            f"  p99 {p99 * 1e3:8.3f} ms  max {took[-1] * 1e3:8.3f} ms"
        )


if __name__ == "__main__":
    main()
