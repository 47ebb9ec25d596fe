"""The holds' journal beside the saved state (not a log the tailer reads): one
length-prefixed msgpack record a grant or an end, appended with a group commit and
fsynced before a grant counts (unless its terms say otherwise), rewritten with the
live holds alone when compacted. A torn last record (a crash mid-write) is dropped on
load and cut off before the next append."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import msgspec

from kling_exporter.journals.durable import (
    GroupCommit,
    sync_folder,
    write_all,
    write_all_and_sync,
    write_atomically,
)

log = logging.getLogger(__name__)


# Who made a hold: the budget API (the default, and what a record written before
# owners were kept is) or the gateway.
API = "api"
GATEWAY = "gateway"


class Hold(msgspec.Struct, gc=False):
    """A live hold. Not tracked by the garbage collector (it holds no containers but a
    tuple of strings): tens of thousands of them would lengthen every full collection,
    which stops the event loop."""

    id: str
    fingerprint: str  # of the request, so that a repeat with another body is refused
    project: str
    user: str | None
    count: int
    credits: float  # per task
    usd: float  # per task
    budgets: tuple[str, ...]
    expires_at: float
    used: int = 0  # tasks submitted under it so far
    owner: str = API  # only its owner releases it (API or GATEWAY)

    @property
    def left(self) -> int:
        return max(self.count - self.used, 0)


class Ended(msgspec.Struct, tag="end", array_like=True):
    id: str
    expires_at: float  # the id may not be used again before then


class Granted(msgspec.Struct, tag="grant", array_like=True):
    hold: Hold


Record = Granted | Ended


def unwritten(error: BaseException) -> None:
    log.error(
        "cannot write the reservation journal; the hold counts until restart",
        extra={"err": str(error)},
    )


def log_unwritten(written: asyncio.Future[None]) -> None:
    error = None if written.cancelled() else written.exception()
    if error is not None:
        unwritten(error)


class HoldJournal:
    """The holds' own journal beside the saved state (not a log the tailer reads):
    grants and ends, one msgpack record after another, fsynced before they count."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records = 0
        self.fd = -1
        self._commit = GroupCommit(self._write)
        self._kept: list[bytes] | None = None  # appends while a compaction is written
        self._failed = False
        self._cut_at = -1  # where a torn record starts that is not cut off yet

    def load(self) -> list[Record]:
        """What the journal holds; a torn last record (a crash mid-write) is dropped."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        out: list[Record] = []
        decode = msgspec.msgpack.Decoder(Record).decode
        offset = 0
        while offset + 4 <= len(data):
            size = int.from_bytes(data[offset : offset + 4], "big")
            body = data[offset + 4 : offset + 4 + size]
            if len(body) < size:
                break
            try:
                out.append(decode(body))
            except msgspec.DecodeError:
                log.error("reservation journal record unreadable; skipped", extra={"at": offset})
            offset += 4 + size
        return out

    def rewrite(self, records: list[Record]) -> None:
        """Replace the journal by these records (atomically), and append after them."""
        write_atomically(self.path, b"".join(framed(r) for r in records))
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self.records, self._cut_at = len(records), -1

    async def compact(self, records: Callable[[], list[Record]]) -> None:
        """Rewrite the journal with ``records()`` while appends go on. The live records
        are taken on the event loop and written to a file aside on a thread, fsynced;
        meanwhile appends are written to the journal as ever, and kept aside too. Then,
        with no write under way, those are added to the new file, which takes the old
        one's place. Appends wait for that last step only: they waited for the whole
        rewrite before (tens of milliseconds at 30,000 live holds, past p99 under a
        flood of grants). A record the journal could not take meanwhile calls the
        rewrite off, so that it cannot reach the new file either."""
        live = records()
        self._kept, self._failed = [], False
        try:
            aside = await asyncio.to_thread(self._write_aside, live)
            await self._commit.alone(
                self._take_kept, lambda kept: self._install(aside, len(live), kept)
            )
        finally:
            self._kept = None

    def _write_aside(self, live: list[Record]) -> Path:
        aside = self.path.with_name(f".{self.path.name}.compacting")
        fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            write_all_and_sync(fd, b"".join(framed(r) for r in live))
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(aside)
            raise
        finally:
            os.close(fd)
        return aside

    def _take_kept(self) -> list[bytes] | None:
        """On the event loop, no write under way: what was written since the live
        records were taken (None when a write failed meanwhile). Records still queued
        are left out: they are written after, to the new file, and only there, so one
        that fails then is in neither."""
        kept, self._kept = self._kept, None
        if kept is None or self._failed:
            return None
        return kept[: max(0, len(kept) - self._commit.queued)]

    def _install(self, aside: Path, live: int, kept: list[bytes] | None) -> None:
        if kept is None:
            os.unlink(aside)
            return
        fd = os.open(aside, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            if kept:
                write_all_and_sync(fd, b"".join(kept))
            os.replace(aside, self.path)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(aside)
            raise
        sync_folder(self.path.parent)
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = fd
        self.records, self._cut_at = live + len(kept), -1

    def append(self, record: Record) -> asyncio.Future[None]:
        """Queue the record; the future is done once it is on disk, or raises OSError
        if it cannot be."""
        self.records += 1
        return self._queue(framed(record))

    def _queue(self, frame: bytes) -> asyncio.Future[None]:
        """Every append to the commit goes by here: while a compaction runs, what is
        queued is kept aside too, so that ``_take_kept`` can tell the last ``queued``
        of what it kept for those not yet written."""
        self._keep_aside(frame)
        return self._commit.append(frame)

    def _keep_aside(self, frame: bytes) -> None:
        if self._kept is not None:
            self._kept.append(frame)

    def append_now(self, record: Record) -> asyncio.Future[None] | None:
        """Write the record at once, not fsynced, and return None; or, with writes
        queued or under way, queue it behind them as ``append`` does and return its
        future. Written at once, it outlives the exporter's death (the kernel has it)
        though not the machine's until the next fsync: for records nobody waits for,
        which spares each a trip to a thread and an fsync of its own. Raises OSError
        if it cannot be written."""
        frame = framed(record)
        self.records += 1
        if not self._commit.write_now(lambda: self._write(frame, sync=False)):
            return self._queue(frame)
        self._keep_aside(frame)
        return None

    async def settle(self) -> None:
        """Return once every record queued so far is written (or has failed)."""
        await self._commit.settle()

    def sync(self) -> asyncio.Future[None]:
        """Done once every record written so far is on disk, those ``append_now`` wrote
        without an fsync too; raises OSError if it cannot be."""
        return self._queue(b"")  # an empty write: what the fsync after it covers

    def _write(self, data: bytes, sync: bool = True) -> None:
        """Append ``data``; on an error, what part of it was written (a full disk takes
        half a record) is cut off again, or every record after it would be read out
        of step at the next start, and lost. A part that could not be cut off is cut
        before the next write, which fails while it cannot be."""
        end = -1
        try:
            if self._cut_at >= 0:
                os.ftruncate(self.fd, self._cut_at)
                self._cut_at = -1
            end = os.fstat(self.fd).st_size
            (write_all_and_sync if sync else write_all)(self.fd, data)
        except OSError:
            self._failed = True  # a compaction under way keeps none of it
            if end >= 0:
                try:
                    os.ftruncate(self.fd, end)
                except OSError:
                    self._cut_at = end
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def journal_beside(state_path: str) -> HoldJournal | None:
    """The journal kept beside the state file (none when no state is kept)."""
    if not state_path:
        return None
    path = Path(state_path)
    return HoldJournal(path.with_name(path.name + ".reservations"))


def framed(record: Record) -> bytes:
    body = msgspec.msgpack.encode(record)
    return len(body).to_bytes(4, "big") + body
