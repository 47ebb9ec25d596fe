"""The HTTP process's end of the reader process: starts it, sends it the config, keeps
the copy of budget usage it publishes (which checks and holds read without waiting
for it), and asks it for scrapes and reloads."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from functools import partial
from multiprocessing.connection import Connection
from typing import Any

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST

from kling_exporter.blocks import Block, Blocks, pack
from kling_exporter.budgets import Budgets, DayUsage
from kling_exporter.collector import plain_text
from kling_exporter.config import Config
from kling_exporter.messages import (
    FromReader,
    Published,
    Pushed,
    Reload,
    Reloaded,
    Render,
    Rendered,
    Scraped,
    Start,
    Stop,
    Stopped,
    ToReader,
    encode,
)
from kling_exporter.model import ReaderUnavailable
from kling_exporter.runtime import raise_open_file_limit
from kling_exporter.views import Consumed, View

log = logging.getLogger(__name__)

# A scrape or a reload the reader has not answered by then gets an error.
ANSWER_TIMEOUT = 30.0
# A plain-text scrape is answered from the blocks the reader pushed (rendered ahead,
# after the lines that changed them) when they are at most this old, without waiting
# for the reader to finish the lines it is reading: while logs are read, a scrape shows
# them as of at most this long before.
PUSHED_FRESH = 1.0
# Time the reader has to save its state when told to stop, before it is killed.
STOP_TIMEOUT = 120.0


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
        # The blocks of the reader's last plain-text scrape, and a turn to ask for more.
        self._blocks = Blocks()
        self._rendering = asyncio.Lock()
        self._packing: asyncio.Future[None] | None = None  # blocks compressed meanwhile
        self._pushed_at: float | None = None  # loop time of the last push taken in
        self._reloading = 0  # reloads asked and not yet answered

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Start the reader; call from the event loop the server runs on."""
        self._loop = asyncio.get_running_loop()
        raise_open_file_limit()  # for connections here; the reader raises its own
        ours, theirs = socket.socketpair()
        # A fresh interpreter rather than a fork: nothing of this process's threads and
        # locks is copied, and no helper process is started beside it.
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kling_exporter.reading.reader", str(theirs.fileno())],
            stdin=subprocess.DEVNULL,
            pass_fds=[theirs.fileno()],
        )
        theirs.close()
        self.conn = Connection(ours.detach())
        start = Start(self.config, self.config_path, os.getpid(), *self.logging)
        self.conn.send_bytes(encode(start))
        threading.Thread(target=self._receive, name="reader-link", daemon=True).start()

    def stop(self) -> None:
        """Tell the reader to stop (it saves its state) and wait for it to end."""
        self.stopping = True
        process = self.process
        if process is None:
            return
        if process.poll() is None and self.conn is not None:
            with contextlib.suppress(OSError, ValueError):
                self.conn.send_bytes(encode(Stop()))
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
                self._on_loop(self._apply, message)
            elif isinstance(message, Pushed):
                self._on_loop(self._pushed, message)
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

    def _on_loop(self, call: Callable[[Any], None], message: Any) -> None:
        """``call(message)`` on the event loop, in the order sent: the usage, flight and
        reservation counts of one publication change together for the answers made
        there, and blocks pushed are taken in the order they were rendered."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(call, message)

    def _pushed(self, message: Pushed) -> None:
        """Blocks the reader rendered ahead: taken in, and compressed off the loop (one
        batch at a time; a scrape compresses what is not yet)."""
        blocks = self._blocks.take(message.epoch, message.version, message.parts)
        # Not served while a reload is under way: the push may show the new budgets
        # before this process has them.
        loop = self._loop
        servable = blocks is not None and loop is not None and not self._reloading
        self._pushed_at = loop.time() if servable and loop is not None else None
        if blocks is None or self._packing is not None or loop is None:
            return
        fresh = [block for block in blocks if not block.packed]
        if fresh:
            self._packing = loop.run_in_executor(None, pack, fresh)
            self._packing.add_done_callback(self._packed)

    def _packed(self, future: asyncio.Future[None]) -> None:
        self._packing = None
        if not future.cancelled() and future.exception() is not None:
            log.error("cannot compress metrics", extra={"err": str(future.exception())})

    def _apply(self, message: Published) -> None:
        if message.flight is not None:
            self.flight = DayUsage({(p, u): [c, usd] for p, u, c, usd in message.flight})
        if self._consumed is not None and (message.consumed or message.first):
            self._consumed(message.consumed, message.first)
        if message.consumed:
            # Holds the tasks after the push took are released from here on, while the
            # push does not show those tasks yet: served together, a scrape would count
            # them nowhere. Scrapes ask the reader until its next push.
            self._pushed_at = None
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
            answer: Any = message
            if isinstance(message, Rendered) and message.parts is not None:
                # Taken here, in the order sent, even when nobody waits any more: the
                # reader's next blocks are sent against these.
                answer = (message, self._blocks.take(message.epoch, message.version, message.parts))
            future = self._waiting.pop(request_id, None)
            if future is not None and not future.done():
                future.set_result(answer)

        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle)

    async def _ask(self, make: Callable[[int], ToReader]) -> Any:
        if self.conn is None or self.ended.is_set():
            raise ReaderUnavailable("the reader process has ended")
        request_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        try:
            self.conn.send_bytes(encode(make(request_id)))
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

    async def render_metrics(self, accept: str, names: list[str]) -> tuple[list[Block], str]:
        """A scrape's blocks. For the plain text format the reader sends only the text
        of the blocks that changed since the render kept here; scrapes of it take turns,
        so that each answer is read against the blocks it was made for."""
        if not plain_text(accept, names):
            answer = await self._rendered(lambda i: Render(i, accept, names))
            return [Block(answer.body)], answer.content_type
        pushed = self._fresh_push()
        if pushed is not None:
            return pushed, CONTENT_TYPE_LATEST
        async with self._rendering:
            kept = self._blocks
            for _ in range(2):
                answer = await self._ask(
                    partial(Render, accept="", names=[], epoch=kept.epoch, since=kept.version)
                )
                if isinstance(answer, Rendered):  # an error: no parts
                    raise ReaderUnavailable(f"the reader could not render: {answer.error}")
                rendered, found = answer
                if found is not None:
                    return found, rendered.content_type
                # A block sent without its text is not kept here: ask for all of them.
            raise ReaderUnavailable("the reader's blocks do not match the ones kept")

    def _fresh_push(self) -> list[Block] | None:
        """The blocks the reader last pushed, if at most ``PUSHED_FRESH`` old and
        nothing was taken in since but a newer render; the reader is told that they
        were scraped, so that it goes on rendering ahead. The usage published before
        them is applied already (messages are taken in the order sent), so a check made
        after this scrape sees at least what it shows."""
        pushed_at, loop, conn = self._pushed_at, self._loop, self.conn
        if pushed_at is None or loop is None or conn is None or self.ended.is_set():
            return None
        if loop.time() - pushed_at > PUSHED_FRESH or self._blocks.epoch == 0:
            return None
        try:
            conn.send_bytes(encode(Scraped()))
        except (OSError, ValueError):
            return None  # asking says why
        return self._blocks.current()

    async def _rendered(self, make: Callable[[int], Render]) -> Rendered:
        answer: Rendered = await self._ask(make)
        if answer.error is not None:
            raise ReaderUnavailable(f"the reader could not render: {answer.error}")
        return answer

    async def reload_config(self) -> str | None:
        self._pushed_at = None  # a scrape after the reload shows its budgets
        self._reloading += 1
        try:
            answer: Reloaded = await self._ask(Reload)
        finally:
            self._reloading -= 1
        self._pushed_at = None
        if answer.config is not None:
            self.config = answer.config
            self.budgets = Budgets(answer.config)
        return answer.error
