"""Random sequences of appends, partial lines, rotation, truncation and restarts:
every complete line is counted exactly once at every step."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import msgspec
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule
from kling_exporter.accounting.ledger import Ledger
from kling_exporter.accounting.state import ledger_state, restore
from kling_exporter.configfile import parse_config
from kling_exporter.events import Event, decode_line
from kling_exporter.reading.tailer import Tailer


class Reader:
    """The daemon's reading path without threads or HTTP: tailer into ledger."""

    def __init__(self, root: Path, saved: bytes | None = None) -> None:
        self.config = parse_config(
            {"logs": {"paths": [str(root / "kling-*.jsonl")], "rotate_wait": "0s"}}
        )
        if saved is None:
            self.ledger, self.tailer = Ledger(self.config), Tailer(self.config.logs)
        else:
            state = msgspec.msgpack.decode(saved)
            self.ledger = Ledger(self.config)
            restore(self.ledger, state["ledger"])
            self.tailer = Tailer(self.config.logs, state["files"])

    def sink(self, path: str, lines: list[bytes | None], first: int, nbytes: int) -> None:
        for raw in lines:
            assert raw is not None
            event = decode_line(raw)
            assert isinstance(event, Event), raw
            self.ledger.apply(event, time.time())

    def poll(self) -> None:
        self.tailer.poll(self.sink)

    def save(self) -> bytes:
        return msgspec.msgpack.encode(
            {"files": self.tailer.to_state(), "ledger": ledger_state(self.ledger)}
        )


class ExactlyOnce(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="exactly-once-"))
        self.day = 0
        self.path = self.root / "kling-0.jsonl"
        self.writer = open(self.path, "ab")  # noqa: SIM115 - closed in teardown
        self.written = 0  # complete lines written, each a task with credits = its number
        self.credits = 0
        self.partial = b""
        self.rotations = 0
        self.seen = False  # has the reader looked since the current file was created?
        self.reader = Reader(self.root)

    def _line(self) -> bytes:
        self.written += 1
        self.credits += self.written
        return (
            json.dumps(
                {"task_id": f"t{self.written}", "credits": self.written, "project": "p"}
            ).encode()
            + b"\n"
        )

    @rule(n=st.integers(1, 20))
    def append(self, n: int) -> None:
        self.writer.write(self.partial + b"".join(self._line() for _ in range(n)))
        self.partial = b""
        self.writer.flush()

    @precondition(lambda self: not self.partial)
    @rule(cut=st.integers(1, 30))
    def append_half_a_line(self, cut: int) -> None:
        whole = self._line()
        self.writer.write(whole[:cut])
        self.writer.flush()
        self.partial = whole[cut:]

    @rule()
    def poll(self) -> None:
        self._poll()

    def _poll(self) -> None:
        self.reader.poll()
        self.seen = True

    @rule()
    def restart(self) -> None:
        saved = self.reader.save()
        self.reader.tailer.close()
        self.reader = Reader(self.root, saved)

    @rule()
    def crash_and_restart_from_an_older_save(self) -> None:
        saved = self.reader.save()
        self.reader.poll()  # work done after the save is lost with the process
        self.reader.tailer.close()
        self.reader = Reader(self.root, saved)

    # A file renamed out of the globs before the reader ever saw it cannot be followed.
    @precondition(lambda self: not self.partial and self.seen)
    @rule(late=st.integers(0, 5))
    def rotate_by_rename(self, late: int) -> None:
        self.rotations += 1
        os.rename(self.path, self.root / f"kling-{self.day}.jsonl.{self.rotations}")
        for _ in range(late):  # the writer still holds the old file
            self.writer.write(self._line())
        self.writer.close()
        self.writer = open(self.path, "ab")  # noqa: SIM115
        self.seen = False

    @precondition(lambda self: not self.partial)
    @rule()
    def copytruncate(self) -> None:
        # The reader looks last before the truncation; what it had read is in the copy.
        self._poll()
        self.writer.truncate(0)
        self.writer.seek(0)

    @precondition(lambda self: not self.partial)
    @rule()
    def next_daily_file(self) -> None:
        self.writer.close()
        self.day += 1
        self.path = self.root / f"kling-{self.day}.jsonl"
        self.writer = open(self.path, "ab")  # noqa: SIM115
        self.seen = False

    @rule()
    def every_complete_line_counted_once(self) -> None:
        self._poll()
        ledger = self.reader.ledger
        assert sum(ledger.submitted.values()) == self.written - (1 if self.partial else 0)
        expected = self.credits - (self.written if self.partial else 0)
        assert sum(ledger.credits.values()) == expected
        assert ledger.duplicates == 0

    def teardown(self) -> None:
        if not hasattr(self, "reader"):
            return
        try:
            self.every_complete_line_counted_once()
        finally:
            self.writer.close()
            self.reader.tailer.close()
            shutil.rmtree(self.root, ignore_errors=True)


ExactlyOnce.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestExactlyOnce = ExactlyOnce.TestCase
