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
  sees at least what the scrape showed;
- a reload is made by the reader, which sends back the config it took.

The reader ends with the HTTP process: told to stop, it saves its state; if the HTTP
process is killed, the reader is killed with it (on Linux; elsewhere it ends when the
link closes), without saving, just as one process killed would.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import msgspec

from kling_exporter.budgets import Budgets, DayUsage
from kling_exporter.config import Config
from kling_exporter.daemon import PUBLISH_INTERVAL, Daemon
from kling_exporter.logsetup import setup_logging
from kling_exporter.model import Consumed, ReaderUnavailable, View
from kling_exporter.runtime import raise_open_file_limit, trim_after

log = logging.getLogger(__name__)

# A scrape or a reload the reader has not answered by then gets an error.
ANSWER_TIMEOUT = 30.0
# Time the reader has to save its state when told to stop, before it is killed.
STOP_TIMEOUT = 120.0


# -- messages ------------------------------------------------------------------------

Row = tuple[str, str | None, float, float]  # project, user, credits, usd


class Published(msgspec.Struct, tag="usage", array_like=True):
    """Days whose usage changed (all of each such day), days dropped, tasks in flight
    (when they changed), tasks counted per reservation id (those that changed), and
    health."""

    days: dict[float, list[Row]]
    dropped: list[float]
    ready: bool
    reader_up: bool
    flight: list[Row] | None = None
    consumed: dict[str, int] = {}
    first: bool = False


class Render(msgspec.Struct, tag="render", array_like=True):
    id: int
    accept: str
    names: list[str]


class Rendered(msgspec.Struct, tag="rendered", array_like=True):
    id: int
    body: bytes
    content_type: str
    error: str | None = None


class Reload(msgspec.Struct, tag="reload", array_like=True):
    id: int


class Reloaded(msgspec.Struct, tag="reloaded", array_like=True):
    id: int
    error: str | None
    config: Config | None


class Stop(msgspec.Struct, tag="stop", array_like=True):
    pass


class Start(msgspec.Struct, tag="start", array_like=True):
    """The first message: what the reader runs on."""

    config: Config
    config_path: str | None
    parent: int
    log_level: str
    log_format: str


class Stopped(msgspec.Struct, tag="stopped", array_like=True):
    lines_read: int


ToReader = Render | Reload | Stop
FromReader = Published | Rendered | Reloaded | Stopped
_encode = msgspec.msgpack.Encoder().encode


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

    def send(self, message: FromReader) -> None:
        data = _encode(message)
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
                body, content_type = self.daemon.render(message.accept, message.names)
                self.send(Rendered(message.id, body, content_type))
                size = len(body)
                del body
                trim_after(size)
            except Exception as e:
                log.exception("cannot render metrics")
                self.send(Rendered(message.id, b"", "", error=str(e) or type(e).__name__))
        elif isinstance(message, Reload):
            error = self.daemon.reload()
            self.send(Reloaded(message.id, error, None if error else self.daemon.config))

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
    """The reader process (``python -m kling_exporter.reader FD``): the daemon, and the link
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
    daemon.start()
    link.serve()


# -- the HTTP process's end ----------------------------------------------------------


class ReaderProcess:
    """The daemon in a child process, as the HTTP server sees it (``api.Reader``)."""

    def __init__(
        self,
        config: Config,
        config_path: str | None = None,
        log_level: str = "info",
        log_format: str = "logfmt",
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.logging = [log_level, log_format]
        self.budgets = Budgets(config)
        # Replaced whole on every publication, never changed in place: a check reads one
        # consistent copy without a lock.
        self.usage: dict[float, DayUsage] = {}
        self.flight = DayUsage()
        self._consumed: Consumed | None = None
        self._ready = False
        self._reader_up = True
        self.lines_read = 0
        self.stopping = False
        self.ended = threading.Event()
        # Called on the event loop when the reader ends unasked.
        self.on_exit: Callable[[], None] | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.conn: Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count()
        self._waiting: dict[int, asyncio.Future[Any]] = {}

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Start the reader; call from the event loop the server runs on."""
        self._loop = asyncio.get_running_loop()
        raise_open_file_limit()  # for connections here; the reader raises its own
        ours, theirs = socket.socketpair()
        # A fresh interpreter rather than a fork: nothing of this process's threads and
        # locks is copied, and no helper process is started beside it.
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kling_exporter.reader", str(theirs.fileno())],
            stdin=subprocess.DEVNULL,
            pass_fds=[theirs.fileno()],
        )
        theirs.close()
        self.conn = Connection(ours.detach())
        start = Start(self.config, self.config_path, os.getpid(), *self.logging)
        self.conn.send_bytes(_encode(start))
        threading.Thread(target=self._receive, name="reader-link", daemon=True).start()

    def stop(self) -> None:
        """Tell the reader to stop (it saves its state) and wait for it to end."""
        self.stopping = True
        process = self.process
        if process is None:
            return
        if process.poll() is None and self.conn is not None:
            with contextlib.suppress(OSError, ValueError):
                self.conn.send_bytes(_encode(Stop()))
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.error("the reader did not stop in time; killed", extra={"pid": process.pid})
            process.kill()
            process.wait()
        self.ended.wait(5)

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def _receive(self) -> None:
        assert self.conn is not None
        decode = msgspec.msgpack.Decoder(FromReader).decode
        while True:
            try:
                message = decode(self.conn.recv_bytes())
            except (EOFError, OSError):
                break
            if isinstance(message, Published):
                self._publish(message)
            elif isinstance(message, Stopped):
                self.lines_read = message.lines_read
            else:
                self._answer(message.id, message)
        self._reader_up = False
        self.ended.set()
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(self._ended)

    def _ended(self) -> None:
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(ReaderUnavailable("the reader process has ended"))
        self._waiting.clear()
        if self.stopping:
            return
        code = None
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = self.process.wait(1)
        log.critical("the reader process ended unasked", extra={"exit_code": code})
        if self.on_exit is not None:
            self.on_exit()

    def _publish(self, message: Published) -> None:
        """On the event loop, in the order sent: the usage, flight and reservation counts
        of one message change together for the answers made there."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._apply, message)

    def _apply(self, message: Published) -> None:
        if message.flight is not None:
            self.flight = DayUsage({(p, u): [c, usd] for p, u, c, usd in message.flight})
        if self._consumed is not None and (message.consumed or message.first):
            self._consumed(message.consumed, message.first)
        usage = dict(self.usage)
        for start, rows in message.days.items():
            usage[start] = DayUsage({(p, u): [c, usd] for p, u, c, usd in rows})
        for start in message.dropped:
            usage.pop(start, None)
        self.usage = usage
        self._ready = message.ready
        self._reader_up = message.reader_up

    def _answer(self, request_id: int, message: Rendered | Reloaded) -> None:
        loop = self._loop
        if loop is None:
            return

        def settle() -> None:
            future = self._waiting.pop(request_id, None)
            if future is not None and not future.done():
                future.set_result(message)

        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle)

    async def _ask(self, make: Callable[[int], ToReader]) -> Any:
        if self.conn is None or self.ended.is_set():
            raise ReaderUnavailable("the reader process has ended")
        request_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        try:
            self.conn.send_bytes(_encode(make(request_id)))
            async with asyncio.timeout(ANSWER_TIMEOUT):
                return await future
        except TimeoutError:
            raise ReaderUnavailable(f"the reader did not answer in {ANSWER_TIMEOUT:g} s") from None
        except (OSError, ValueError) as e:
            raise ReaderUnavailable(f"the reader cannot be reached: {e}") from None
        finally:
            self._waiting.pop(request_id, None)

    # -- what the server asks --------------------------------------------------------

    @property
    def reader_up(self) -> bool:
        return self._reader_up

    def is_ready(self) -> bool:
        return self._ready

    def view(self) -> View:
        return View(self.budgets, self.usage, self.flight)

    def listen(self, consumed: Consumed) -> None:
        self._consumed = consumed

    async def render_metrics(self, accept: str, names: list[str]) -> tuple[bytes, str]:
        answer: Rendered = await self._ask(lambda i: Render(i, accept, names))
        if answer.error is not None:
            raise ReaderUnavailable(f"the reader could not render: {answer.error}")
        return answer.body, answer.content_type

    async def reload_config(self) -> str | None:
        answer: Reloaded = await self._ask(Reload)
        if answer.config is not None:
            self.config = answer.config
            self.budgets = Budgets(answer.config)
        return answer.error


if __name__ == "__main__":
    reader_main(int(sys.argv[1]))
