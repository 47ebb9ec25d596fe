"""Every Python and shell example in the README runs as written against a real exporter,
and prints what the README says it prints.

A fenced ```python, ```sh, ```bash or ```console block is run unless the line right
before it is ``<!-- example: not run (why) -->`` (set-up steps, a config to copy). The
count of examples run is fixed below, so none drops out unnoticed. Python examples run
in a process of their own in the exporter's folder (its ``logs/`` is theirs), with the
producer's own Kling SDK stood in for; shell commands (curl and kling-exporter only) run
with the exporter's address in place of ``localhost:10177``, and their output, as the
README quotes it, must match: JSON answers by the keys quoted, text exactly.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ROOT, DaemonProcess, line, write_lines

README = ROOT / "README.md"
RUN = ("python", "sh", "bash", "console")
NOT_RUN = re.compile(r"^<!-- example: not run \(.+\) -->$")
EXAMPLES_RUN = 6  # raise it with each example added; a marked one does not count
DEFAULT_ADDRESS = re.compile(r"(?:localhost|127\.0\.0\.1):10177")
# Keys whose values differ from run to run.
VOLATILE = {"expires_at"}
# The budget the examples use: 2500 credits left of 7500, as the check example shows.
CONFIG = """
state: {path: ""}
budgets:
  - {name: marketing, project: marketing, period: monthly, limit_credits: 7500}
"""

# What the README's Python examples take from the producer's program around them: its
# Kling SDK (stood in for: when a task is created it checks that every live hold is on
# the project's budget, so a reservation taken against the wrong budget fails), prompts
# and the callback URL.
PRELUDE = """
import itertools, json, os, urllib.request

class _KlingSDK:
    _ids = itertools.count(1)

    def create_video(self, prompt):
        url = os.environ["EXPORTER_URL"] + "/api/v1/reservations"
        with urllib.request.urlopen(url, timeout=10) as answer:
            holds = json.load(answer)["reservations"]
        assert holds and all("marketing" in h["budgets"] for h in holds), holds
        return f"kling-{next(self._ids)}"

    def text_to_video(self, prompt, **options):
        return f"kling-{next(self._ids)}"

kling = _KlingSDK()
prompts = ["a lighthouse at dawn", "a fox in snow", "rain on a tin roof"]
prompt = prompts[0]
callback_url = "https://exporter.example/api/v1/kling/callback?token=0123456789abcdef"
"""


@dataclass(frozen=True)
class Example:
    lang: str
    code: str
    line: int  # of the opening fence, for messages
    run: bool

    def __str__(self) -> str:
        return f"README.md:{self.line} ({self.lang})"


def readme_examples() -> list[Example]:
    lines = README.read_text().splitlines()
    found: list[Example] = []
    i = 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)$", lines[i])
        if fence is None:
            i += 1
            continue
        end = lines.index("```", i + 1)
        lang = fence.group(1)
        if lang in RUN:
            before = lines[i - 1] if i else ""
            code = "\n".join(lines[i + 1 : end]) + "\n"
            found.append(Example(lang, code, i + 1, NOT_RUN.match(before) is None))
        i = end + 1
    return found


def examples_run() -> list[Example]:
    return [e for e in readme_examples() if e.run]


def test_the_count_of_examples_run_is_known() -> None:
    assert len(examples_run()) == EXAMPLES_RUN, [str(e) for e in examples_run()]


def _usage_lines(credits: float) -> list[str]:
    """``credits`` used by marketing this month, by one finished task."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return [
        line(
            event="task_submitted",
            timestamp=now,
            task_id="earlier-1",
            project="marketing",
            model="kling-v2-6",
            mode="pro",
            duration=10,
        ),
        line(
            event="task_completed",
            timestamp=now,
            task_id="earlier-1",
            status="succeed",
            credits_used=credits,
        ),
    ]


@pytest.fixture
def exporter(tmp_path: Path) -> Iterator[Callable[[float], DaemonProcess]]:
    started: list[DaemonProcess] = []

    def start(used_credits: float) -> DaemonProcess:
        workdir = tmp_path / f"used-{used_credits:g}"
        write_lines(workdir / "logs" / "kling-earlier.jsonl", _usage_lines(used_credits))
        daemon = DaemonProcess(workdir, CONFIG)
        started.append(daemon)
        return daemon.start()

    yield start
    for daemon in started:
        daemon.stop()


def _environment(daemon: DaemonProcess) -> dict[str, str]:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    pythonpath = str(ROOT / "exporter")
    return {**os.environ, "PATH": path, "PYTHONPATH": pythonpath, "EXPORTER_URL": daemon.url}


def _run(example: Example, daemon: DaemonProcess, program: list[str], code: str) -> str:
    """Run ``code`` with ``program`` in the exporter's folder, aimed at the exporter; its
    standard output, after it succeeded."""
    local = DEFAULT_ADDRESS.sub(daemon.url.removeprefix("http://"), code)
    result = subprocess.run(
        [*program, local],
        cwd=daemon.workdir,
        env=_environment(daemon),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"{example}\n{result.stderr}"
    return result.stdout


def _run_python(example: Example, daemon: DaemonProcess) -> str:
    return _run(example, daemon, [sys.executable, "-c"], PRELUDE + example.code)


def _commands(example: Example) -> list[tuple[str, str]]:
    """(command, the output the README quotes) for each command of a shell example."""
    if example.lang != "console":
        return [
            (text, "")
            for text in example.code.splitlines()
            if text.strip() and not text.startswith("#")
        ]
    pairs: list[tuple[str, str]] = []
    for text in example.code.splitlines():
        if text.startswith("$ "):
            pairs.append((text[2:], ""))
        else:
            assert pairs, f"{example}: output before any command"
            pairs[-1] = (pairs[-1][0], pairs[-1][1] + text + "\n")
    return pairs


def _same(quoted: Any, got: Any, where: str) -> None:
    """``got`` says what ``quoted`` says; a mapping may have keys the README leaves out."""
    if isinstance(quoted, dict):
        assert isinstance(got, dict), f"{where}: {got!r}"
        for key, value in quoted.items():
            assert key in got, f"{where}.{key}: not in the answer {got!r}"
            if key not in VOLATILE:
                _same(value, got[key], f"{where}.{key}")
    elif isinstance(quoted, list):
        assert isinstance(got, list) and len(got) == len(quoted), f"{where}: {got!r}"
        for i, (q, g) in enumerate(zip(quoted, got, strict=True)):
            _same(q, g, f"{where}[{i}]")
    else:
        assert quoted == got, f"{where}: the README says {quoted!r}, the exporter {got!r}"


def _run_shell(example: Example, daemon: DaemonProcess) -> None:
    for command, quoted in _commands(example):
        words = shlex.split(command)
        assert words[0] in ("curl", "kling-exporter"), f"{example}: runs only curl and ours"
        out = _run(example, daemon, ["bash", "-c"], command)
        if quoted.lstrip().startswith("{"):
            _same(json.loads(quoted), json.loads(out), str(example))
        elif quoted:
            assert out == quoted, f"{example}: {command}"


def test_every_example_runs_and_says_what_the_readme_quotes(
    exporter: Callable[[float], DaemonProcess],
) -> None:
    daemon = exporter(5000)
    for example in examples_run():
        if example.lang == "python":
            _run_python(example, daemon)
        else:
            _run_shell(example, daemon)


def test_the_python_examples_run_when_the_budget_is_spent(
    exporter: Callable[[float], DaemonProcess],
) -> None:
    """Refused, an example says so and goes on; it does not fall over."""
    daemon = exporter(7500)
    for example in examples_run():
        if example.lang == "python":
            _run_python(example, daemon)


# The requests that get the 400s the README quotes, by the field the error names.
BAD_REQUESTS = {
    "count": b'{"count": 0}',
    "mode": b'{"mode": "turbo"}',
}


def test_the_400s_the_readme_quotes_are_what_the_exporter_answers(
    exporter: Callable[[float], DaemonProcess],
) -> None:
    quoted = re.findall(r"`400 (\{\"error\".*?\})`", README.read_text())
    assert len(quoted) == len(BAD_REQUESTS), quoted
    daemon = exporter(0)
    for text in quoted:
        answer = json.loads(text)
        status, body = daemon.post("/api/v1/check", BAD_REQUESTS[answer["field"]])
        assert (status, json.loads(body)) == (400, answer)
