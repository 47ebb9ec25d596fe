"""Writes that are on disk before anyone is told of them: appends with a group commit
(the hold journal and the task log write through this), and whole files replaced
atomically (the saved state, the hold journal when compacted)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd``, short writes continued."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_all_and_sync(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd``, then fsync it."""
    write_all(fd, data)
    os.fsync(fd)


class GroupCommit:
    """Each ``append`` is done once its bytes are written and fsynced by ``write`` (on a
    thread, so the event loop goes on), or raises its OSError. Appends that arrive while
    a write is under way share the next one: one fsync for a burst, not one each. A
    write that needs no fsync is made at once with ``write_now`` when none is queued."""

    def __init__(self, write: Callable[[bytes], None]) -> None:
        self.write = write
        self._pending: list[bytes] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._alone = asyncio.Lock()  # held by a flush, or by work that may not meet one

    def append(self, data: bytes) -> asyncio.Future[None]:
        """Queue ``data`` at once, behind every append made before it; the future is
        done once it is on disk. (Queued on the call, not when the future is awaited,
        so a caller that does not wait still keeps its records in order.)"""
        future = asyncio.get_running_loop().create_future()
        self._pending.append(data)
        self._waiters.append(future)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self.settle())
        return future

    async def alone(self, prepare: Callable[[], T], work: Callable[[T], None]) -> None:
        """Run ``work(prepare())`` with no write under way or begun meanwhile: ``prepare``
        on the event loop, ``work`` on a thread (so the loop goes on). Appends made
        meanwhile wait, and are written after it."""
        async with self._alone:
            value = prepare()
            await asyncio.to_thread(work, value)

    def write_now(self, write: Callable[[], None]) -> bool:
        """Run ``write`` (an append that need not be fsynced) at once, on the event loop,
        when no write is under way or queued, so that it cannot pass one made before it;
        False, and nothing run, else. An OSError from ``write`` is raised."""
        if self._pending or self._alone.locked():
            return False
        write()
        return True

    @property
    def queued(self) -> int:
        """Appends queued and not yet being written (the last ones made)."""
        return len(self._pending)

    async def settle(self) -> None:
        """Return once every append queued so far is written (or has failed)."""
        async with self._alone:
            await self._flush_pending()

    async def _flush_pending(self) -> None:
        while self._pending:
            batch, waiters = self._pending, self._waiters
            self._pending, self._waiters = [], []
            try:
                await asyncio.to_thread(self.write, b"".join(batch))
            except OSError as e:
                for w in waiters:
                    if not w.done():
                        w.set_exception(e)
                continue
            for w in waiters:
                if not w.done():
                    w.set_result(None)


def write_atomically(path: Path, data: bytes) -> None:
    """Write atomically: a temporary file readable by the owner only, fsync, rename,
    fsync of the directory. A failed write (a full disk) leaves no temporary file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with open(fd, "wb") as f:
            os.fchmod(fd, 0o600)  # also when an older version left the file 0644
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    sync_folder(path.parent)


def sync_folder(folder: Path) -> None:
    """fsync a folder, so that a rename in it lasts (best effort: not every system can)."""
    with contextlib.suppress(OSError):
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
