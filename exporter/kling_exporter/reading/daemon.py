"""The reading daemon: one reader thread feeding the ledger, state saved beside it.

The reader thread alone changes the ledger and the file offsets, so a saved
state always holds offsets and totals that agree. Others read the ledger under
the same lock, which the reader yields between chunks of lines. ``kling-exporter``
runs this daemon in a process of its own (``kling_exporter.reading.reader``); tests
may also serve it in process.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST

from kling_exporter.accounting.book import KeptStatuses
from kling_exporter.accounting.counters import Tracker
from kling_exporter.accounting.ledger import Ledger
from kling_exporter.accounting.metrics import BudgetViews, declared, families
from kling_exporter.accounting.state import FORMAT, State, ledger_state, read_state, restore
from kling_exporter.blocks import Block, Blocks
from kling_exporter.budgets import DayUsage
from kling_exporter.collector import Exposition, Family, Part, plain_text
from kling_exporter.config import Config
from kling_exporter.configfile import ConfigError, load_config
from kling_exporter.events import explain_invalid
from kling_exporter.journals.durable import write_atomically
from kling_exporter.model import ReadStats, Status
from kling_exporter.reading.ingest import RateLimit, ingest
from kling_exporter.reading.listing import Watcher
from kling_exporter.reading.logfile import max_open_files
from kling_exporter.reading.tailer import Tailer
from kling_exporter.runtime import SWITCH_INTERVAL, raise_open_file_limit
from kling_exporter.views import Consumed, Snapshot, View

log = logging.getLogger(__name__)

# Lines applied under the lock at once: a few milliseconds of work.
INGEST_CHUNK = 1000
# Budget usage is published to pre-flight answers at most this often while lines come
# in (before a scrape is rendered, always): each publication is work on the HTTP
# process's event loop, and at 1,000 tasks a second, publishing after every poll took
# 79 ms of it a second.
PUBLISH_INTERVAL = 0.1
# Woken by every change to a log, the reader still lets this much pass between two
# polls: each lists the globs and publishes, and a journal appended to 500 times a
# second had it polling 170 times a second, a fifth of a core, beside the requests.
POLL_GAP = 0.02
RESERVATIONS_PRUNE_EVERY = 60.0
# Tasks aged out by the TTL in one call, the rest at the next (a poll or a block later):
# an unfinished one is charged its estimate there, and when event time jumps (a restart
# after days, a producer's history), tens of thousands at once held the lock for a
# quarter of a second, and every line appended meanwhile waited.
AGED_PER_CALL = 2000
# While a log glob matches no file, the warning that says so is repeated this often.
UNMATCHED_WARN_EVERY = 300.0


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """No cyclic garbage collection meanwhile. A render makes tens of thousands of
    objects, and a collection they set off walks every object of the ledger: in
    process, after 1,000 new tasks, a render took 26-30 ms, or 91 ms with a collection
    in it. Paused, the collection comes at the reader's next allocation instead, while
    no scrape waits for it."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class Daemon:
    def __init__(
        self,
        config: Config,
        config_path: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.clock = clock  # wall time for events without a timestamp and for periods
        self.config_path = config_path
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.ready = threading.Event()
        self.reload_successful = True
        self.reload_success_ts = time.time()
        self.state_save_ts = 0.0
        self.last_poll_ts = 0.0
        self._empty_warned_at: float | None = None
        self._reservations_pruned_at = -RESERVATIONS_PRUNE_EVERY
        # Threads waiting to read the ledger (a hint for the reader to yield to them).
        self.readers_waiting = 0
        # Set when the reader died: the ledger may hold half a block, so it is never
        # saved again, and /-/healthy fails so that the process is restarted.
        self.failed = threading.Event()
        self._writer: threading.Thread | None = None
        self._invalid_log = RateLimit()
        self._save_error_log = RateLimit(burst=1)
        self.ledger, self.tailer, self.reading = self._restore(config)
        self.watcher = Watcher(self.wake)
        self._thread: threading.Thread | None = None
        # A scrape's counters, kept up to date from one scrape to the next.
        self.tracker = Tracker()
        self.budget_views = BudgetViews()
        self.statuses = KeptStatuses()
        self.exposition = Exposition(
            lambda: families(*self._snapshot()), declared, text_rows=self._text_rows
        )
        self._blocks = Blocks()  # the in-process server's (the reader process sends parts)
        # Told, under the lock, after every chunk of lines and whenever the daemon's
        # health changes (``force``: also when little time has passed): the reader
        # process publishes budget usage to the HTTP process from here.
        self.publish: Callable[[bool], bool] | None = None
        # Told, under the lock, after every chunk of lines (False) and at the end of each
        # poll (True: nothing changes the ledger until the next): the reader process
        # renders a scrape's blocks ahead from here.
        self.after_read: Callable[[bool], None] | None = None
        # Whether the last publication was put off (too soon after the one before):
        # the reader then looks again within PUBLISH_INTERVAL, not at its next poll.
        self.behind = False

    # -- state -----------------------------------------------------------------------

    def _state_path(self) -> Path | None:
        return Path(self.config.state.path) if self.config.state.path else None

    def _restore(self, config: Config) -> tuple[Ledger, Tailer, ReadStats]:
        path = self._state_path()
        state = read_state(path) if path else None
        if state is not None:
            try:
                ledger = Ledger(config)
                restore(ledger, state.ledger)
                tailer = Tailer(config.logs, state.files)
                reading = state.read_stats()
                log.info(
                    "state restored",
                    extra={
                        "path": str(path),
                        "files": len(state.files),
                        "lines_read": reading.lines,
                    },
                )
                return ledger, tailer, reading
            except ValueError as e:
                log.warning(
                    "saved state does not fit, rebuilding from logs",
                    extra={"path": str(path), "err": str(e)},
                )
        return Ledger(config), Tailer(config.logs), ReadStats()

    def save_state(self, wait: bool = True) -> None:
        """Save offsets and ledger together. Called only from the reader thread (or
        after it stopped), so the two always agree. The snapshot is encoded here, in C;
        with ``wait=False`` the write and fsync happen on a thread of their own, so
        reading goes on meanwhile."""
        path = self._state_path()
        if path is None:
            return
        if self.failed.is_set():
            log.error("reader failed: state not saved, the last good one is kept")
            return
        if self._writer is not None:
            if self._writer.is_alive() and not wait:
                return  # the previous save is still being written; the next will do
            self._writer.join()
        with self.lock:
            files, ledger = self.tailer.to_state(), ledger_state(self.ledger)
            data = msgspec.msgpack.encode(State(FORMAT, time.time(), files, ledger, self.reading))
        self._writer = threading.Thread(
            target=self._write_state, args=(path, data), name="state-writer", daemon=True
        )
        self._writer.start()
        if wait:
            self._writer.join()

    def _write_state(self, path: Path, data: bytes) -> None:
        try:
            write_atomically(path, data)
            self.state_save_ts = time.time()
        except OSError as e:
            if self._save_error_log.allow(time.monotonic())[0]:
                log.error("cannot save state", extra={"path": str(path), "err": e.strerror})

    # -- reading ---------------------------------------------------------------------

    def _sink(self, path: str, lines: list[bytes | None], first: int, nbytes: int) -> None:
        """Apply a block (about a megabyte) in chunks, each under the lock on its own, so
        a scrape or a pre-flight check waits for a chunk at most, never a whole block.
        Offsets and totals still agree whenever the state is saved: that happens on this
        thread, between blocks."""
        now = self.clock()
        ledger = self.ledger
        start = 0

        def report(i: int, reason: str) -> None:
            n = start + i
            self._report_invalid(path, first + n if first else 0, reason, now, lines[n])

        for start in range(0, len(lines), INGEST_CHUNK):
            if self.readers_waiting:
                time.sleep(0)  # let the waiting reader take the lock first
            chunk = lines[start : start + INGEST_CHUNK]
            with self.lock:
                ingest(ledger, chunk, now, report, self.reading)
                self._published(False)
                if self.after_read is not None:
                    self.after_read(False)
        with self.lock:
            self.reading.bytes += nbytes
            # Within a long first read too, so the task index stays within its size cap.
            # Not by the TTL until the files there were at start have been read: a usage
            # tracker's file read after the logger's still joins the tasks it names, and
            # only a task unfinished at the end of them is charged its estimate, as the
            # reports do. The first poll's ``expire`` then applies the TTL.
            ledger.expire_tasks(now, by_ttl=self.ready.is_set(), aged=AGED_PER_CALL)

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        """The lock, for threads that read the ledger: the reader yields to them."""
        self.readers_waiting += 1
        try:
            self.lock.acquire()
        finally:
            self.readers_waiting -= 1
        try:
            yield
        finally:
            self.lock.release()

    def _report_invalid(
        self, path: str, lineno: int, reason: str, now: float, line: bytes | None
    ) -> None:
        allowed, held = self._invalid_log.allow(now)
        if held:
            log.warning("invalid log lines not shown", extra={"count": held})
        if allowed:
            extra: dict[str, object] = {"path": path, "line": lineno, "reason": reason}
            if line is not None and reason in ("wrong_type", "bad_value", "missing_field"):
                extra["field"], extra["detail"] = explain_invalid(line)
            log.warning("invalid log line skipped", extra=extra)

    def poll_once(self) -> None:
        self.watcher.watch(self.tailer.base_dirs())
        self.tailer.poll(self._sink, self.stopping)
        with self.lock:
            now = self.clock()
            # What reservations used is kept two days: once a minute is often enough to
            # look for what is past that (the look reads every id, thousands with the
            # gateway's holds). The time is kept here, not on the ledger: one attribute
            # more there made each line cost 800 instructions more (bench/instructions.py).
            prune = not 0 <= now - self._reservations_pruned_at < RESERVATIONS_PRUNE_EVERY
            if prune:
                self._reservations_pruned_at = now
            self.ledger.expire(now, reservations=prune, aged=AGED_PER_CALL)
            self.last_poll_ts = time.time()
            self._published(False)
            if self.after_read is not None:
                self.after_read(True)
        self._warn_of_empty_globs()

    def _warn_of_empty_globs(self) -> None:
        """Say which globs match no file: after the first listing, and again every
        UNMATCHED_WARN_EVERY seconds for as long as one matches nothing."""
        empty = sorted(g for g, n in self.tailer.glob_files.items() if n == 0)
        now = time.monotonic()
        if not empty:
            self._empty_warned_at = None
        elif self._empty_warned_at is None or now - self._empty_warned_at >= UNMATCHED_WARN_EVERY:
            self._empty_warned_at = now
            for glob in empty:
                log.warning(
                    "log glob matches no file; nothing is read from it (logs.paths)",
                    extra={"glob": glob},
                )

    def _published(self, force: bool) -> None:
        if self.publish is not None:
            self.behind = not self.publish(force)

    def _run(self) -> None:
        try:
            self.poll_once()
            with self.lock:
                self.ready.set()
                self._published(True)
            log.info(
                "initial read done",
                extra={"lines_read": self.reading.lines, "files": self.tailer.watched},
            )
            next_save = time.monotonic() + self.config.state.interval_seconds
            polled = time.monotonic()
            while not self.stopping.is_set():
                poll = self.config.logs.poll_seconds
                self.wake.wait(min(poll, PUBLISH_INTERVAL) if self.behind else poll)
                rest = POLL_GAP - (time.monotonic() - polled)
                if rest > 0 and self.stopping.wait(rest):
                    break
                self.wake.clear()
                if self.stopping.is_set():
                    break
                polled = time.monotonic()
                self.poll_once()
                if time.monotonic() >= next_save:
                    self.save_state(wait=False)
                    next_save = time.monotonic() + self.config.state.interval_seconds
        except BaseException:
            self.failed.set()
            with contextlib.suppress(Exception), self._reading():
                self._published(True)
            log.critical("reader failed; no more lines are read and the state is not saved")
            log.exception("reader failed")

    @property
    def reader_up(self) -> bool:
        return not self.failed.is_set()

    def start(self) -> None:
        # The reader runs Python for seconds on end while it reads a backlog; a short
        # switch interval lets the HTTP thread in within a millisecond rather than five,
        # so pre-flight answers and scrapes do not queue behind it.
        sys.setswitchinterval(SWITCH_INTERVAL)
        soft, hard = raise_open_file_limit()
        self.tailer.max_open = max_open_files()
        log.debug("open file limit", extra={"soft": soft, "hard": hard})
        self._thread = threading.Thread(target=self._run, name="reader", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop reading, then save the state one last time. A daemon that never started
        (its port was taken, say) saves nothing: the state file may belong to another
        instance that is running."""
        self.stopping.set()
        self.wake.set()
        if self._thread is not None:
            self._thread.join()
            self.watcher.stop()
            self.save_state()
        self.tailer.close()

    # -- config ----------------------------------------------------------------------

    def reload(self) -> str | None:
        """Load the config file again; return the error (and keep the old config) if bad."""
        try:
            config = load_config(self.config_path, allow_empty=False)
            with self.lock:
                self.ledger.configure(config)
                self.tailer.configure(config.logs)
                self.config = config
        except (ConfigError, ValueError) as e:
            self.reload_successful = False
            log.error("config reload failed, keeping the running config", extra={"err": str(e)})
            # What a remote client is told: the key at fault, not where the file is.
            return e.detail if isinstance(e, ConfigError) else str(e)
        self.reload_successful = True
        self.reload_success_ts = time.time()
        self.wake.set()
        log.info("config reloaded", extra={"budgets": len(config.budgets)})
        return None

    # -- reading for others ----------------------------------------------------------

    def snapshot(self) -> tuple[Snapshot, Status]:
        with self._reading():
            return self._snapshot()

    def _snapshot(self, counted: bool = True) -> tuple[Snapshot, Status]:
        """The ledger and the daemon's health at this instant; the caller holds the lock."""
        kept = None if counted else self.statuses
        snap = self.ledger.snapshot(self.clock(), self.reading, counted, kept)
        state_interval = self.config.state.interval_seconds if self._state_path() else 0.0
        return snap, Status(
            files_watched=self.tailer.watched,
            ready=self.ready.is_set(),
            reload_successful=self.reload_successful,
            reload_success_ts=self.reload_success_ts,
            state_save_ts=self.state_save_ts,
            state_save_interval=state_interval,
            reader_up=self.reader_up,
            last_poll_ts=self.last_poll_ts,
            unread_bytes=self.tailer.unread_bytes(),
            open_files=self.tailer.open_files,
            glob_files=dict(self.tailer.glob_files),
        )

    def _text_rows(self) -> list[Family]:
        """The families of a plain-text scrape: the counters from the tracker, which
        says which of their series changed since the last one."""
        snap, status = self._snapshot(counted=False)
        self.tracker.update(self.ledger)
        self.budget_views.update(snap.budgets)
        return families(snap, status, self.tracker, self.budget_views)

    def render(self, accept: str = "", names: list[str] | None = None) -> tuple[bytes, str]:
        """A scrape's body and content type. The reader waits meanwhile (a render takes
        tens of milliseconds), so the two do not take turns on the interpreter and the
        scrape is no slower while a backlog is read. What is published for pre-flight
        answers is brought up to the same instant first."""
        if plain_text(accept, names):
            return b"".join(part.text for part in self.render_parts()), CONTENT_TYPE_LATEST
        with self._reading(), _collector_paused():
            self._published(True)
            return self.exposition.render(accept, names)

    def render_parts(self) -> list[Part]:
        """A plain-text scrape as blocks, each with the render at which it last changed
        (see ``collector.TextRenderer``); as ``render`` otherwise."""
        with self._reading(), _collector_paused():
            self._published(True)
            return self.rendered_parts()

    def rendered_parts(self) -> list[Part]:
        """``render_parts`` for a caller that holds the lock."""
        try:
            parts = self.exposition.parts()
        except BaseException:
            self.tracker.reset()  # the renderer starts again too
            self.budget_views.reset()
            raise
        self.tracker.take()
        self.budget_views.take()
        return parts

    # -- what the HTTP server asks of its reader (see serving.api.Reader) -------------

    def is_ready(self) -> bool:
        return self.ready.is_set()

    def view(self) -> View:
        """Budget usage as it stands: a copy taken under the lock, since the reader's
        thread goes on changing the ledger while an answer reads it. (The exporter's
        reader process hands its HTTP side copies the same way.)"""
        with self._reading():
            ledger = self.ledger
            usage = {
                day: DayUsage({pair: list(v) for pair, v in bucket.by_pair.items()})
                for day, bucket in ledger.usage.items()
            }
            return View(ledger.budgets, usage, ledger.flight)

    def listen(self, consumed: Consumed) -> None:
        """Tell ``consumed``, on the running event loop, what the reader counted per
        reservation id since it last told (in process; the reader process tells its
        HTTP process the same way)."""
        loop = asyncio.get_running_loop()
        first = [True]

        def publish(force: bool) -> bool:
            if self.ledger.consumed_changed or first[0]:
                counts = self.ledger.take_consumed(every=first[0])
                loop.call_soon_threadsafe(consumed, counts, first[0])
                first[0] = False
            return True

        with self._reading():
            self.publish = publish
            publish(True)

    async def render_metrics(self, accept: str, names: list[str]) -> tuple[list[Block], str]:
        if plain_text(accept, names):
            parts = await asyncio.to_thread(self.render_parts)
            return self._blocks.of(parts), CONTENT_TYPE_LATEST
        body, content_type = await asyncio.to_thread(self.render, accept, names)
        return [Block(body)], content_type

    async def reload_config(self) -> str | None:
        return await asyncio.to_thread(self.reload)
