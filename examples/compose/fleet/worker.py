"""A worker of the compose fleet. Each task is reserved through the worker's own
exporter before it is "submitted" (no Kling call here: a made-up task id), logged under
the reservation, and logged as completed a few seconds later with what it cost. When
the shared budget has no room left the worker waits and asks again, so two workers on
two hosts together never spend more than the fleet's budget.

    python worker.py --exporter http://exporter-a:10177 --logs /var/lib/kling-exporter/logs
"""

from __future__ import annotations

import argparse
import random
import time
import uuid

from kling_exporter.client import (
    BudgetClient,
    BudgetExceededError,
    BudgetUnavailableError,
    EventLogger,
    generate_within_budget,
)

CREDITS = {5: 10, 10: 20}  # standard mode, by duration: the default pricing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exporter", required=True, help="this worker's exporter")
    parser.add_argument("--logs", required=True, help="the folder the exporter reads")
    parser.add_argument("--project", default="demo")
    parser.add_argument("--rate", type=float, default=0.5, help="tasks per second")
    parser.add_argument("--seconds", type=float, default=0, help="stop after (0: never)")
    args = parser.parse_args()
    budget = BudgetClient(args.exporter)
    log = EventLogger(args.logs, project=args.project)
    rng = random.Random()
    pending: list[tuple[float, float, str, int]] = []  # (due, started, task id, duration)
    stop_at = time.monotonic() + args.seconds if args.seconds else float("inf")
    while time.monotonic() < stop_at:
        duration = rng.choice((5, 10))
        try:
            task_id = generate_within_budget(
                budget, log, lambda: f"demo-{uuid.uuid4()}", "kling-v2-6", duration=duration
            )
            started = time.monotonic()
            pending.append((started + rng.uniform(1, 5), started, task_id, duration))
        except BudgetExceededError as e:
            print(f"refused: {e.reason}", flush=True)
            time.sleep(5)
        except BudgetUnavailableError as e:
            print(f"exporter unavailable: {e}", flush=True)
            time.sleep(2)
        now = time.monotonic()
        for item in [p for p in pending if p[0] <= now]:
            pending.remove(item)
            _, started, task_id, duration = item
            elapsed = round(now - started, 1)
            log.completed(task_id, elapsed_sec=elapsed, credits_used=CREDITS[duration])
        time.sleep(rng.expovariate(args.rate) if args.rate > 0 else 1)
    for _, _, task_id, duration in pending:  # what is under way ends before the worker
        log.completed(task_id, credits_used=CREDITS[duration])


if __name__ == "__main__":
    main()
