"""Every Python and shell example in the README and in docs/ runs as written against a
real exporter, and prints what the page says it prints.

A fenced ```python, ```sh, ```bash or ```console block is run unless the line right
before it is ``<!-- example: not run (why) -->`` (set-up steps, a config to copy). The
count of examples run is fixed below, so none drops out unnoticed. Python examples run
in a process of their own in the exporter's folder (its ``logs/`` is theirs), with the
producer's own Kling SDK stood in for; shell commands (curl, kling-exporter, and echo
and mkdir for the log lines a walkthrough writes) run with the exporter's address in
place of ``localhost:10177``, and their output, as the page quotes it, must match: JSON
answers by the keys quoted, text exactly.

The README's first-budget walkthrough runs in order against an exporter of its own,
started from the budget the walkthrough shows, with no log yet; the other examples run
against one whose budget the examples share.
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
import yaml

from tests.helpers import ROOT, DaemonProcess, line, write_lines

README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
RUN = ("python", "sh", "bash", "console")
NOT_RUN = re.compile(r"^<!-- example: not run \(.+\) -->$")
EXAMPLES_RUN = 11  # raise it with each example added; a marked one does not count
DEFAULT_ADDRESS = re.compile(r"(?:localhost|127\.0\.0\.1):10177")
# The command as the pages spell it (where `make run` installs it) and as run here.
IN_THE_CHECKOUT = re.compile(r"^\.venv/bin/kling-exporter\b")
COMMANDS = ("curl", "kling-exporter", "echo", "mkdir")
# Keys whose values differ from run to run.
VOLATILE = {"expires_at"}
# The README's walkthrough, run against an exporter of its own.
WALKTHROUGH = "## First budget in five minutes"
# The budget the other examples use: 2500 credits left of 7500, as the check example shows.
CONFIG = """
state: {path: ""}
budgets:
  - {name: marketing, project: marketing, period: monthly, limit_credits: 7500}
"""

# What the Python examples take from the producer's program around them: its
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
    page: str  # relative to the checkout, for messages
    line: int  # of the opening fence, for messages
    section: str  # the "## " heading it is under
    run: bool

    def __str__(self) -> str:
        return f"{self.page}:{self.line} ({self.lang})"


def page_examples(page: Path) -> list[Example]:
    lines = page.read_text().splitlines()
    name = str(page.relative_to(ROOT))
    found: list[Example] = []
    section = ""
    i = 0
    while i < len(lines):
        if lines[i].startswith("## "):
            section = lines[i]
        fence = re.match(r"^```(\w*)$", lines[i])
        if fence is None:
            i += 1
            continue
        end = lines.index("```", i + 1)
        lang = fence.group(1)
        if lang in RUN:
            before = lines[i - 1] if i else ""
            code = "\n".join(lines[i + 1 : end]) + "\n"
            run = NOT_RUN.match(before) is None
            found.append(Example(lang, code, name, i + 1, section, run))
        i = end + 1
    return found


def examples_run() -> list[Example]:
    return [e for page in PAGES for e in page_examples(page) if e.run]


def _in_walkthrough(example: Example) -> bool:
    return example.page == "README.md" and example.section == WALKTHROUGH


def test_the_count_of_examples_run_is_known() -> None:
    assert len(examples_run()) == EXAMPLES_RUN, [str(e) for e in examples_run()]


def test_the_walkthrough_has_examples_and_a_budget() -> None:
    assert any(_in_walkthrough(e) for e in examples_run())
    budget = yaml.safe_load(_walkthrough_config())["budgets"][0]
    assert {"name", "project", "period", "limit_credits", "alert_threshold"} <= set(budget)


def _walkthrough_config() -> str:
    """The config the README's walkthrough writes: its section's YAML block."""
    section = README.read_text().split(WALKTHROUGH + "\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```yaml\n", 1)[1].split("```\n", 1)[0]


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
    local = IN_THE_CHECKOUT.sub("kling-exporter", local)
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
    """(command, the output the page quotes) for each command of a shell example."""
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
    """``got`` says what ``quoted`` says; a mapping may have keys the page leaves out."""
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
        assert quoted == got, f"{where}: the page says {quoted!r}, the exporter {got!r}"


def _check_output(example: Example, daemon: DaemonProcess, command: str, quoted: str) -> None:
    out = _run(example, daemon, ["bash", "-c"], command)
    if quoted.lstrip().startswith("{"):
        _same(json.loads(quoted), json.loads(out), str(example))
    elif quoted:
        assert out == quoted, f"{example}: {command}"


def _run_shell(example: Example, daemon: DaemonProcess, settle: float = 0.0) -> None:
    """Each command of ``example`` in turn; with ``settle``, a command whose output is
    quoted may take that many seconds to say it (the reader has lines to read first)."""
    for command, quoted in _commands(example):
        words = shlex.split(IN_THE_CHECKOUT.sub("kling-exporter", command))
        assert words[0] in COMMANDS, f"{example}: runs only {', '.join(COMMANDS)}"
        deadline = time.monotonic() + settle
        while True:
            try:
                _check_output(example, daemon, command, quoted)
                break
            except AssertionError:
                if not quoted or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


def test_every_example_runs_and_says_what_the_page_quotes(
    exporter: Callable[[float], DaemonProcess],
) -> None:
    daemon = exporter(5000)
    for example in examples_run():
        if _in_walkthrough(example):
            continue
        if example.lang == "python":
            _run_python(example, daemon)
        else:
            _run_shell(example, daemon)


def test_the_first_budget_walkthrough_runs_as_written(tmp_path: Path) -> None:
    """From the budget the README shows and no log, each step in order says what the
    README quotes."""
    (tmp_path / "kling.yml").write_text(_walkthrough_config())
    daemon = DaemonProcess(tmp_path, extra=["--config.file", "kling.yml"]).start()
    try:
        for example in examples_run():
            if _in_walkthrough(example):
                assert example.lang != "python", f"{example}: the walkthrough is shell"
                _run_shell(example, daemon, settle=10.0)
    finally:
        daemon.stop()


def test_the_python_examples_run_when_the_budget_is_spent(
    exporter: Callable[[float], DaemonProcess],
) -> None:
    """Refused, an example says so and goes on; it does not fall over."""
    daemon = exporter(7500)
    for example in examples_run():
        if example.lang == "python":
            _run_python(example, daemon)


# The requests that get the 400s the pages quote, by the field the error names.
BAD_REQUESTS = {
    "count": b'{"count": 0}',
    "mode": b'{"mode": "turbo"}',
}


def test_the_400s_the_pages_quote_are_what_the_exporter_answers(
    exporter: Callable[[float], DaemonProcess],
) -> None:
    text = "\n".join(page.read_text() for page in PAGES)
    quoted = re.findall(r"`400 (\{\"error\".*?\})`", text)
    assert len(quoted) == len(BAD_REQUESTS), quoted
    daemon = exporter(0)
    for text in quoted:
        answer = json.loads(text)
        status, body = daemon.post("/api/v1/check", BAD_REQUESTS[answer["field"]])
        assert (status, json.loads(body)) == (400, answer)


def test_the_gateway_try_out_works_against_the_demo_as_written(tmp_path: Path) -> None:
    """docs/gateway.md's curl through the gateway of ``make demo``, with the token that
    ``demo --token`` prints: Kling's answer as the page quotes it, and the task in the
    exporter's journal under the project the curl names."""
    page = ROOT / "docs" / "gateway.md"
    (example,) = [e for e in page_examples(page) if "demo --token" in e.code]
    pairs = _commands(example)
    assert pairs[-1][1], f"{example}: the page quotes the answer"
    # Run where the exporter runs, the checkout's command on the PATH.
    script = "\n".join(c.replace(".venv/bin/kling-exporter", "kling-exporter") for c, _ in pairs)
    extra = ["--backfill", "0", "--rate", "0.05", "--logs", "logs"]
    demo = DaemonProcess(tmp_path, command="demo", extra=extra).start()
    try:
        out = _run(example, demo, ["bash", "-c"], script)
        _same(json.loads(pairs[-1][1]), json.loads(out), str(example))
        task_id = json.loads(out)["data"]["task_id"]
        journal = tmp_path / "logs" / "kling-callbacks.jsonl"
        lines = [json.loads(text) for text in journal.read_text().splitlines()]
        assert [e["project"] for e in lines if e["task_id"] == task_id] == ["research"]
    finally:
        demo.stop()
