"""The reader in a process of its own, so that reading never slows the HTTP face.

Python runs one thread of a process at a time. While the reader works through a
backlog it wants the interpreter all the time, and an HTTP thread beside it waited for
its turn at every step of every request: pre-flight answers fell from thousands a
second to a few hundred, and scrapes took seconds. So ``kling-exporter`` runs the
daemon (tailer, ledger, saved state) in a child process and serves HTTP in the first:

- pre-flight checks and ``/api/v1/budgets`` are answered in the HTTP process from a
  copy of the daily budget usage, which the reader publishes after its chunks of lines
  (at most every ``daemon.PUBLISH_INTERVAL`` while lines come in, or nine times what
  the last publication took if that is longer, and within that of the last line), so
  they never wait for the reader;
- a scrape is rendered by the reader between two chunks and handed over as bytes, the
  copy of the usage brought up to the same instant first: a check made after a scrape
  sees at least what the scrape showed. While lines come in and the exporter is
  scraped, the reader renders ahead and pushes the blocks (the usage published first),
  and a scrape within ``serving.link.PUSHED_FRESH`` of a push is answered from them
  without waiting for the reader;
- a reload is made by the reader, which sends back the config it took.

The reader ends with the HTTP process: told to stop, it saves its state; if the HTTP
process is killed, the reader is killed with it (on Linux; elsewhere it ends when the
link closes), without saving, just as one process killed would.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST

from kling_exporter.blocks import to_send
from kling_exporter.budgets import DayUsage
from kling_exporter.collector import plain_text
from kling_exporter.logsetup import setup_logging
from kling_exporter.messages import (
    FromReader,
    Published,
    Pushed,
    Reload,
    Reloaded,
    Render,
    Rendered,
    Row,
    Scraped,
    Start,
    Stop,
    Stopped,
    ToReader,
    encode,
)
from kling_exporter.reading.daemon import PUBLISH_INTERVAL, Daemon
from kling_exporter.runtime import trim_after

log = logging.getLogger(__name__)

# A scrape's blocks are rendered ahead (``_Link.ahead``) for this long after the last
# scrape (longer than any scrape interval), and at most this often.
AHEAD_FOR = 300.0
AHEAD_INTERVAL = 0.1
AHEAD_WITHIN_POLL = 0.25


# -- the reader process --------------------------------------------------------------


def _die_with_parent(parent: int) -> None:
    """Have the kernel kill this process when the HTTP process dies (Linux)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            pr_set_pdeathsig = 1
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(0)  # it died before we asked


class _Link:
    """The reader's end: publishes usage, answers renders, reloads and the stop."""

    def __init__(self, conn: Connection, daemon: Daemon) -> None:
        self.conn = conn
        self.daemon = daemon
        self.sending = threading.Lock()
        self.sent: dict[float, tuple[DayUsage, int]] = {}
        self.health: tuple[bool, bool] | None = None
        self.flight_sent: list[Row] | None = None
        self.last = 0.0
        self.gap = PUBLISH_INTERVAL  # to the next publication: grows with what one costs
        # The last plain-text render sent (renderer epoch, version), whether answered or
        # pushed; held from a render until it is sent, so that renders go out in order.
        self.sent_render = (0, 0)
        self.rendering = threading.Lock()
        self.scraped = -AHEAD_FOR  # when the HTTP process last asked for a scrape
        self.ahead_at = 0.0
        self.ahead_gap = AHEAD_INTERVAL
        self.ahead_lines = -1  # lines read at the last render

    def send(self, message: FromReader) -> None:
        data = encode(message)
        with self.sending:
            self.conn.send_bytes(data)

    def publish(self, force: bool) -> bool:
        """Send the days that changed since the last time; False when it is too soon
        after the last publication (and ``force`` is not set). Called under the
        daemon's lock, so what is sent is what the ledger holds between two chunks."""
        now = time.monotonic()
        if not force and now - self.last < self.gap:
            return False
        self.last = now
        try:
            return self._publish()
        finally:
            # At most a tenth of the reader's time: a day of 10,000 projects' usage
            # sent every 0.1 s while a history was read made a 3 s read take 27.
            self.gap = max(PUBLISH_INTERVAL, 9 * (time.monotonic() - now))

    def ahead(self, settled: bool) -> None:
        """While the exporter is scraped, render the blocks that the lines read since
        the last render changed, and push them to the HTTP process, which compresses
        them meanwhile: a scrape made soon after is answered from them there without
        waiting for the reader (``serving.link.PUSHED_FRESH``), and a later one renders
        and sends only what came after. The usage is published first. At the end of a
        poll (``settled``: the ledger stays as it is until the next), at most every
        ``AHEAD_INTERVAL``; within a long poll, at most every ``AHEAD_WITHIN_POLL``; at
        most a tenth of the reader's time, and never while a scrape's render is on its
        way. Called under the daemon's lock."""
        now = time.monotonic()
        lines = self.daemon.reading.lines
        gap = self.ahead_gap if settled else max(self.ahead_gap, AHEAD_WITHIN_POLL)
        if (
            now - self.scraped > AHEAD_FOR
            or now - self.ahead_at < gap
            or lines == self.ahead_lines
            or not self.rendering.acquire(blocking=False)
        ):
            return
        try:
            self.ahead_at, self.ahead_lines = now, lines
            # The usage first: the HTTP process may answer a scrape from these blocks,
            # and a check made after it must see at least what it showed.
            self.publish(True)
            parts = self.daemon.rendered_parts()
            renderer = self.daemon.exposition.text
            epoch, version = renderer.epoch, renderer.renders
            self.send(Pushed(epoch, version, to_send(parts, *self.sent_render, epoch)))
            self.sent_render = (epoch, version)
        except Exception:
            # Never the reading's failure: no more renders ahead until the next scrape,
            # which renders (and says what fails) itself.
            log.exception("cannot render metrics ahead")
            self.scraped = -AHEAD_FOR
        finally:
            self.rendering.release()
            self.ahead_gap = max(AHEAD_INTERVAL, 9 * (time.monotonic() - now))

    def _publish(self) -> bool:
        d = self.daemon
        usage = d.ledger.usage
        days: dict[float, list[Row]] = {}
        for start, day in usage.items():
            seen = self.sent.get(start)
            if seen is None or seen[0] is not day or seen[1] != day.version:
                days[start] = [(p, u, c, usd) for (p, u), (c, usd) in day.by_pair.items()]
                self.sent[start] = (day, day.version)
        dropped = [start for start in self.sent if start not in usage]
        for start in dropped:
            del self.sent[start]
        ledger = d.ledger
        flight: list[Row] | None = [
            (p, u, c, usd) for (p, u), (c, usd) in ledger.flight.by_pair.items()
        ]
        if flight == self.flight_sent:
            flight = None  # unchanged: not sent again
        else:
            self.flight_sent = flight
        consumed = ledger.take_consumed(every=self.health is None)  # the first word: all
        health = (d.ready.is_set(), d.reader_up)
        if days or dropped or flight is not None or consumed or health != self.health:
            first = self.health is None
            self.health = health
            self.send(Published(days, dropped, *health, flight, consumed, first))
        return True

    def answer(self, message: ToReader) -> None:
        if isinstance(message, Render):
            try:
                with self.rendering:
                    answer = self._rendered(message)
                    self.send(answer)
                    if answer.parts is not None:
                        self.sent_render = (answer.epoch, answer.version)
                size = len(answer.body) + sum(len(p[2] or b"") for p in answer.parts or ())
                del answer
                trim_after(size)
            except Exception as e:
                log.exception("cannot render metrics")
                self.send(Rendered(message.id, b"", "", error=str(e) or type(e).__name__))
        elif isinstance(message, Scraped):
            self.scraped = time.monotonic()
        elif isinstance(message, Reload):
            error = self.daemon.reload()
            self.send(Reloaded(message.id, error, None if error else self.daemon.config))

    def _rendered(self, message: Render) -> Rendered:
        """A scrape's answer: for the plain text format, only the blocks that changed
        since the render the asker holds carry their text."""
        daemon = self.daemon
        if not plain_text(message.accept, message.names):
            body, content_type = daemon.render(message.accept, message.names)
            return Rendered(message.id, body, content_type)
        self.scraped = time.monotonic()
        parts = daemon.render_parts()
        renderer = daemon.exposition.text
        epoch, version = renderer.epoch, renderer.renders
        self.ahead_lines = daemon.reading.lines
        sent = to_send(parts, message.epoch, message.since, epoch)
        return Rendered(message.id, b"", CONTENT_TYPE_LATEST, None, sent, epoch, version)

    def serve(self) -> None:
        decode = msgspec.msgpack.Decoder(ToReader).decode
        while True:
            try:
                message = decode(self.conn.recv_bytes())
            except (EOFError, OSError):
                # The HTTP process is gone without a word: it was killed. End as it did,
                # without saving (the last saved state and the logs agree).
                os._exit(0)
            if isinstance(message, Stop):
                self.daemon.stop()
                self.send(Stopped(self.daemon.reading.lines))
                return
            try:
                self.answer(message)
            except (OSError, ValueError):
                os._exit(0)  # the link broke while answering


def reader_main(fd: int) -> None:
    """The reader process (``python -m kling_exporter.reading.reader FD``): the daemon, and the link
    on the socket ``FD`` that serves the HTTP process."""
    # The HTTP process decides when to stop or reload (a Ctrl-C reaches both processes).
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    conn = Connection(fd)
    try:
        start = msgspec.msgpack.decode(conn.recv_bytes(), type=Start)
    except (EOFError, OSError):
        return
    _die_with_parent(start.parent)
    setup_logging(start.log_level, start.log_format)
    daemon = Daemon(start.config, start.config_path)
    # What start-up made (imports, the state's ledger) lives as long as the process:
    # out of the collector's sight, a full collection takes a millisecond instead of
    # 20-50 ms of a core taken from the HTTP process beside it.
    gc.freeze()
    link = _Link(conn, daemon)
    daemon.publish = link.publish
    daemon.after_read = link.ahead
    daemon.start()
    link.serve()


if __name__ == "__main__":
    reader_main(int(sys.argv[1]))
