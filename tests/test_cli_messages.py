"""What the command line says when something is wrong or done, as a newcomer meets it:
one line naming the path for a path it cannot use, a demo that neither warns falsely
nor leaves folders behind."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
from kling_exporter.report_text import credits
from kling_exporter.reports import MAX_COST_DAYS

from tests.helpers import ROOT, DaemonProcess, by_name, line, wait_until, write_lines


def kling_exporter(
    *args: str, cwd: Path, stdin: int | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kling_exporter", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT / "exporter")},
        stdin=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["demo", "--logs", "/proc/nope"], "--logs /proc/nope: cannot create the folder"),
        (["demo", "--logs", "{file}"], "--logs {file}: is not a directory"),
        (
            ["export", "--output", "/nonexistent/x.csv"],
            "--output /nonexistent/x.csv: no such directory",
        ),
        (["export", "--output", "{dir}"], "--output {dir}: is a directory"),
        (
            ["report", "--config.file", "/nonexistent.yml"],
            "--config.file /nonexistent.yml: no such file",
        ),
        (["costs", "--config.file", "{dir}"], "--config.file {dir}: is a directory"),
        (["serve", "--config.file", "{dir}"], "--config.file {dir}: is a directory"),
        (["check-config", "/nonexistent.yml"], "check-config /nonexistent.yml: no such file"),
        (["check-config", "{dir}"], "check-config {dir}: is a directory"),
        (
            ["serve", "--web.config.file", "/nonexistent.yml"],
            "--web.config.file /nonexistent.yml: no such file",
        ),
    ],
)
def test_a_path_it_cannot_use_is_one_line_naming_it_and_exit_2(
    tmp_path: Path, args: list[str], says: str
) -> None:
    a_file, a_dir = tmp_path / "a-file", tmp_path / "a-dir"
    a_file.write_text("")
    a_dir.mkdir()
    places = {"file": str(a_file), "dir": str(a_dir)}
    result = kling_exporter(*(a.format(**places) for a in args), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"kling-exporter: {says.format(**places)}")
    assert result.stderr.count("\n") == 1, result.stderr


def test_export_says_its_output_is_unusable_before_reading_the_logs(tmp_path: Path) -> None:
    """Not after reading months of logs: no log folder here, yet only the output is named."""
    result = kling_exporter("export", "--output", str(tmp_path / "no" / "x.csv"), cwd=tmp_path)
    assert result.returncode == 2
    assert "no log file matches" not in result.stderr


def test_the_demo_starts_without_warnings_and_leaves_no_folder_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setenv("TMPDIR", str(temporary))
    workdir = tmp_path / "work"
    workdir.mkdir()
    demo = DaemonProcess(workdir, command="demo", extra=["--backfill", "0.05", "--rate", "5"])
    demo.start()
    try:
        # Kling's account, from the demo's stand-in, at the first poll.
        wait_until(lambda: by_name(demo.metrics(), "kling_account_resource_pack_status"))
        assert any(temporary.iterdir())  # its logs and keys, while it runs
    finally:
        assert demo.stop() == 0
    assert "level=warn" not in demo.output(), demo.output()
    assert list(temporary.iterdir()) == []


def _one_submission(folder: Path) -> None:
    write_lines(
        folder / "logs" / "kling-2026-11-22.jsonl",
        [
            line(
                event="task_submitted",
                timestamp="2026-11-22T10:00:00Z",
                task_id="t-1",
                project="marketing",
                kind="image",
                model="kling-v2-6",
            )
        ],
    )


def test_a_day_with_no_finished_task_has_no_success_rate(tmp_path: Path) -> None:
    _one_submission(tmp_path)
    result = kling_exporter("report", "--date", "2026-11-22", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    header, _, totals = result.stdout.splitlines()[2:5]
    success = header.split().index("success")
    assert totals.split()[success] == "-"
    assert "success: - (no task finished this day)" in result.stdout
    assert "0.0%" not in result.stdout


def test_one_credit_is_singular() -> None:
    assert (credits(1), credits(2), credits(0), credits(2.5)) == (
        "1 credit",
        "2 credits",
        "0 credits",
        "2.5 credits",
    )


def test_costs_refuses_more_days_than_it_can_show(tmp_path: Path) -> None:
    result = kling_exporter("costs", "--days", "100000", cwd=tmp_path)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        f"kling-exporter: --days 100000: at most {MAX_COST_DAYS} (ten years, a row a day)\n"
    )
    widest = kling_exporter("costs", "--days", str(MAX_COST_DAYS), cwd=tmp_path)
    assert widest.returncode == 0, widest.stderr
    # A title, a blank line, the header and its rule, a row a day, the total, the average.
    assert widest.stdout.count("\n") == 4 + MAX_COST_DAYS + 2


def _a_day_of_logs(folder: Path) -> None:
    write_lines(
        folder / "logs" / "kling-2026-11-22.jsonl",
        [
            line(
                event="task_submitted",
                timestamp=f"2026-11-22T10:{i // 60:02d}:{i % 60:02d}Z",
                task_id=f"t-{i}",
                project="marketing",
                kind="image",
                model="kling-v2-6",
            )
            for i in range(2000)
        ],
    )


@pytest.mark.parametrize(
    "args", [["report", "--date", "2026-11-22"], ["costs"], ["export", "--output", "-"]]
)
def test_reading_the_logs_writes_nothing_to_stderr_that_is_not_a_terminal(
    tmp_path: Path, args: list[str]
) -> None:
    _a_day_of_logs(tmp_path)
    result = kling_exporter(*args, cwd=tmp_path)
    assert result.returncode == 0
    assert result.stderr == ("wrote 2000 events to -\n" if args[0] == "export" else "")


def test_reading_the_logs_shows_a_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    _a_day_of_logs(tmp_path)
    terminal, tty = pty.openpty()
    # 24 rows of 80 columns: a new pseudo-terminal has none, and no room shows no bar.
    fcntl.ioctl(tty, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "kling_exporter", "report", "--date", "2026-11-22"],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT / "exporter")},
            stdout=subprocess.PIPE,
            stderr=tty,
        )
        os.close(tty)
        shown = b""
        while True:
            try:
                chunk = os.read(terminal, 4096)
            except OSError:  # the terminal closed with the process
                break
            if not chunk:
                break
            shown += chunk
        assert process.wait(timeout=60) == 0
        assert process.stdout is not None
        assert b"Kling usage on 2026-11-22" in process.stdout.read()
        process.stdout.close()
    finally:
        os.close(terminal)
    assert b"reading logs:" in shown and b"B/s" in shown
