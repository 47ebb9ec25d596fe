"""Instructions per log line, counted by valgrind's callgrind: a figure that does not
move with the machine's load, for comparing two versions of the ingest path on a noisy
machine (run it in both checkouts).

    python bench/instructions.py            # 20,000 lines of bench/generate.py's log
    python bench/instructions.py --lines 50000

It runs the same script twice under callgrind, once reading the lines and once also
decoding (or ingesting) them three times over, and divides the difference by the
number of lines handled, so start-up and imports cancel out.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = 3

SCRIPT = """
import sys, time
sys.path.insert(0, {root!r} + "/exporter")
from kling_exporter.configfile import parse_config
from kling_exporter.events import decode_line
from kling_exporter.reading.ingest import ingest
from kling_exporter.accounting.ledger import Ledger
lines = open({log!r}, "rb").read().splitlines()
what, rounds = sys.argv[1], int(sys.argv[2])
now = time.time()
for _ in range(rounds):
    if what == "decode":
        for line in lines:
            decode_line(line)
    else:
        ingest(Ledger(parse_config({{}})), lines, now)
"""


def instructions(script: Path, what: str, rounds: int) -> int:
    result = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            str(script),
            what,
            str(rounds),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    match = re.search(r"refs:\s+([\d,]+)", result.stderr)
    if match is None:
        raise SystemExit(f"no instruction count in valgrind's output:\n{result.stderr}")
    return int(match.group(1).replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=20_000)
    args = parser.parse_args()
    if args.lines < 1:
        parser.error("--lines must be at least 1")
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "kling.jsonl"
        generate = [sys.executable, str(ROOT / "bench" / "generate.py"), "--out", str(log)]
        subprocess.run(
            [*generate, "--lines", str(args.lines), "--open-tasks", str(args.lines // 10)],
            check=True,
            capture_output=True,
        )
        script = Path(tmp) / "count.py"
        script.write_text(SCRIPT.format(root=str(ROOT), log=str(log)))
        base = instructions(script, "decode", 0)
        for what in ("decode", "ingest"):
            total = instructions(script, what, ROUNDS)
            per_line = (total - base) / (ROUNDS * args.lines)
            print(f"{what:<8} {per_line:>10,.0f} instructions/line")


if __name__ == "__main__":
    main()
