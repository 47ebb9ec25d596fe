"""Seeded generator of realistic Kling event logs for benchmarks.

    python bench/generate.py --lines 1000000 --open-tasks 100000 --out /tmp/kling-bench.jsonl

Mixed events (submissions, completions with and without credits_used, errors), 50 projects
with a skewed (Zipf-like) share, several models, modes and durations, some audio and image
tasks, the key order shuffled on a fifth of the lines, and error messages with quotes and
newlines. Completions arrive some hundreds of lines after their submission.
"""

from __future__ import annotations

import argparse
import datetime as dt
import heapq
import json
import random
from collections.abc import Iterator
from pathlib import Path

MODELS = ["kling-v2-6", "kling-v2-5-turbo", "kling-v1-6", "kling-v1", "kling-v2-1-master"]
ERRORS = ["quota_exceeded", "content_policy", "timeout", "rate_limited", "invalid_request"]
START = dt.datetime(2026, 11, 1, tzinfo=dt.UTC).timestamp()


def _shuffled(rng: random.Random, fields: dict[str, object]) -> dict[str, object]:
    if rng.random() < 0.2:
        items = list(fields.items())
        rng.shuffle(items)
        return dict(items)
    return fields


def events(lines: int, open_tasks: int, seed: int = 1) -> Iterator[str]:
    """Exactly ``lines`` lines; ``open_tasks`` tasks never finish."""
    rng = random.Random(seed)
    projects = [f"project-{i:02d}" for i in range(50)]
    weights = [1 / (i + 1) for i in range(50)]
    users = [f"user-{i}" for i in range(40)]
    pending: list[tuple[int, str]] = []  # (due line, line)
    written = 0
    task = 0
    # Each finished task is two lines; solve for how many tasks end at `lines`.
    finished_tasks = max(0, (lines - open_tasks) // 2)
    total_tasks = finished_tasks + open_tasks
    open_every = total_tasks / open_tasks if open_tasks else 0.0
    next_open = open_every / 2
    ts = START
    while written < lines:
        if (pending and pending[0][0] <= written) or task >= total_tasks:
            if not pending:
                break
            _, text = heapq.heappop(pending)
            yield text
            written += 1
            continue
        task += 1
        ts += rng.expovariate(2.0)
        stamp = dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds")
        tid = f"{rng.getrandbits(64):016x}-{task}"
        kind = rng.choices(["video", "image", "try_on"], [92, 6, 2])[0]
        sub = {
            "event": "task_submitted",
            "timestamp": stamp.replace("+00:00", "Z"),
            "task_id": tid,
            "project": rng.choices(projects, weights)[0],
            "user": rng.choice(users),
            "model": rng.choice(MODELS),
            "mode": rng.choice(["std", "pro", "standard", "professional"]),
            "duration": rng.choice([5, 10]),
            "audio": rng.random() < 0.15,
            "kind": kind,
            "prompt_len": rng.randint(10, 2000),
        }
        yield json.dumps(_shuffled(rng, sub))
        written += 1
        if open_every and task >= next_open:
            next_open += open_every
            continue
        later = written + rng.randint(50, 2000)
        done_stamp = dt.datetime.fromtimestamp(ts + rng.uniform(30, 600), dt.UTC)
        stamp2 = done_stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        done: dict[str, object]
        if rng.random() < 0.05:
            msg = f'request refused: prompt "{tid[:6]}"\nline two of the message'
            done = {
                "event": "task_error",
                "timestamp": stamp2,
                "task_id": tid,
                "error_type": rng.choice(ERRORS),
                "message": msg,
            }
        else:
            done = {
                "event": "task_completed",
                "timestamp": stamp2,
                "task_id": tid,
                "status": "failed" if rng.random() < 0.07 else "succeed",
                "elapsed_sec": round(rng.uniform(30, 600), 1),
            }
            if rng.random() < 0.5:
                done["credits_used"] = rng.choice([10, 20, 35, 70])
        heapq.heappush(pending, (later, json.dumps(_shuffled(rng, done))))


def write(path: Path, lines: int, open_tasks: int, seed: int = 1) -> int:
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        buf = []
        for text in events(lines, open_tasks, seed):
            buf.append(text)
            count += 1
            if len(buf) >= 10000:
                f.write("\n".join(buf) + "\n")
                buf.clear()
        if buf:
            f.write("\n".join(buf) + "\n")
    return count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--open-tasks", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    n = write(args.out, args.lines, args.open_tasks, args.seed)
    print(f"wrote {n} lines to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
