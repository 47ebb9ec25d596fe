"""The exporter's own task log among the logs, which Kling's callbacks and the
gateway's tasks are written to: where it is (a file the log globs match, or
``logs.journal``), and appends that are on disk before their caller is answered. A
line left torn by a crash or a full disk is ended before the next one is written, so
the tailer never joins two lines."""

from __future__ import annotations

import errno
import glob
import json
import os
import stat
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from kling_exporter.config import LogsConfig
from kling_exporter.journals.durable import GroupCommit, write_all_and_sync

JOURNAL_NAME = "callbacks"  # put where the glob's file name has its first wildcard


def journal_for(logs: LogsConfig) -> Path | None:
    """A file the first fitting log glob matches, in a folder without wildcards, where
    the journal is written: ``logs/kling-*.jsonl`` gives ``logs/kling-callbacks.jsonl``;
    ``logs.journal`` where it is given."""
    if logs.journal:
        return Path(logs.journal)
    for pattern in logs.paths:
        folder, name = os.path.split(pattern)
        if glob.has_magic(folder) or "*" not in name:
            continue
        candidate = name.replace("*", JOURNAL_NAME, 1).replace("*", "")
        if not glob.has_magic(candidate) and fnmatchcase(candidate, name):
            return Path(folder or ".") / candidate
    return None


class EventJournal:
    """The exporter's own event log among the logs (Kling's callbacks and the
    gateway's tasks): appends lines, each on disk before its caller is answered;
    concurrent appends share one fsync.

    The file stays open from one write to the next, while its path still names it (one
    ``lstat`` a write tells): opening, checking and closing it each time took four more
    calls, each a wait for the interpreter on a busy event loop's process, and put
    milliseconds on the gateway's p99. Renamed, removed or replaced, it is opened again
    with every check ``open_journal`` makes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1
        self._file: tuple[int, int] | None = None  # (device, inode) of what _fd is
        self._commit = GroupCommit(self._write)
        self._torn: tuple[int, int] | None = None  # the file that may end mid-line

    async def append(self, *events: dict[str, Any]) -> None:
        """Return once the lines are on disk (written at once); OSError if they cannot
        be."""
        lines = "".join(
            json.dumps(event, separators=(",", ":"), ensure_ascii=False) + "\n" for event in events
        )
        await self._commit.append(lines.encode())

    def check(self) -> None:
        """OSError when the journal plainly cannot be written (a link or another
        file planted at its path, or its folder not writable): one look, no open."""
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            folder = self.path.parent
            if folder.is_dir() and not os.access(folder, os.W_OK):
                raise OSError(errno.EACCES, "its folder is not writable") from None
            return
        if stat.S_ISLNK(info.st_mode):
            raise OSError(errno.ELOOP, "a symbolic link; refusing to follow it")
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            raise OSError(errno.EPERM, "not a regular file of this user")

    async def close(self) -> None:
        """Close the file once the lines queued so far are written."""
        await self._commit.settle()
        self._close()

    def _write(self, data: bytes) -> None:
        """Append lines. A file left mid-line (a write a full disk took half of, a crash
        during one) has that line ended first, so that the torn part is one bad line
        the reader counts and skips, not glued to the next good one; a newline too many
        is a blank line, which it skips. (Cutting the torn part off instead could take
        back bytes the reader has read.)"""
        fd = self._open()
        if self._torn == self._file:  # _file is set by _open
            data = b"\n" + data
        try:
            write_all_and_sync(fd, data)
        except OSError:
            self._torn = self._file
            raise
        self._torn = None

    def _open(self) -> int:
        try:
            info = os.lstat(self.path)
            if (info.st_dev, info.st_ino) == self._file:
                return self._fd
        except FileNotFoundError:
            pass
        self._close()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = open_journal(self.path)
        info = os.fstat(fd)
        self._fd, self._file = fd, (info.st_dev, info.st_ino)
        if info.st_size and os.pread(fd, 1, info.st_size - 1) != b"\n":
            self._torn = self._file  # left mid-line by a crash or a full disk
        return fd

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._file = -1, None


def open_journal(path: Path) -> int:
    """A descriptor to append to ``path`` (and read its end), created if missing. A
    symlink planted at the path is not followed (``O_NOFOLLOW``), and anything but a
    regular file this process owns is refused with OSError, so no callback is written
    outside the log folder."""
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OSError(e.errno, "a symbolic link; refusing to follow it") from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
        os.close(fd)
        what = "not a regular file" if not stat.S_ISREG(info.st_mode) else "owned by another user"
        raise OSError(errno.EPERM, f"{what}; refusing to write to it")
    return fd
