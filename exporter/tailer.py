"""Finding log files and reading their complete lines exactly once.

The tailer knows files, offsets and rotation, nothing of Kling. A file is
known by its device and inode plus a fingerprint of its first bytes, so a
rename keeps its position, a copytruncate or a reused inode starts it again
from 0, and a rotated-away file is drained through its open handle before it
is let go. Lines go to a sink with the file and the number of the first line.
"""

from __future__ import annotations

import glob
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEventHandler
from watchdog.observers import Observer

from exporter.config import LogsConfig

log = logging.getLogger(__name__)

BLOCK = 1 << 20
FINGERPRINT_LEN = 256

# sink(path, lines, first_line_number, bytes): None in lines marks a line too long to keep.
Sink = Callable[[str, list[bytes | None], int, int], None]


class FileState:
    """One followed file. ``offset`` is just past the last complete line handed on;
    ``read_pos`` is how far the bytes have been read (pending or skipped beyond it)."""

    __slots__ = (
        "dev",
        "fd",
        "fingerprint",
        "gone_since",
        "ino",
        "lineno",
        "offset",
        "path",
        "pending",
        "read_pos",
        "skipping",
    )

    def __init__(self, path: str, dev: int, ino: int, fd: int) -> None:
        self.path = path
        self.dev = dev
        self.ino = ino
        self.fd = fd
        self.fingerprint = b""
        self.offset = 0
        self.read_pos = 0
        self.lineno = 0
        self.pending = b""
        self.skipping = False
        self.gone_since: float | None = None

    def rewind(self) -> None:
        self.fingerprint = b""
        self.offset = self.read_pos = self.lineno = 0
        self.pending = b""
        self.skipping = False


def _glob_base(pattern: str) -> Path:
    """The deepest directory of a glob that has no wildcard in it."""
    parts = Path(pattern).parts
    base: list[str] = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        base.append(part)
    return Path(*base) if base else Path(".")


def matching_files(patterns: Iterable[str]) -> list[str]:
    """Every path the globs match, once each, in name order (so daily files go oldest
    first)."""
    paths: set[str] = set()
    for pattern in patterns:
        paths.update(glob.glob(pattern, recursive=True))
    return sorted(paths)


def _last_line_end(fd: int, size: int) -> int:
    """Position just past the last newline before ``size`` (0 if there is none)."""
    pos = size
    while pos > 0:
        start = max(0, pos - 65536)
        block = os.pread(fd, pos - start, start)
        nl = block.rfind(b"\n")
        if nl >= 0:
            return start + nl + 1
        pos = start
    return 0


class Tailer:
    def __init__(self, config: LogsConfig, saved: Iterable[dict[str, Any]] = ()) -> None:
        self.configure(config)
        self.files: dict[tuple[int, int], FileState] = {}
        self._saved = {(s["dev"], s["ino"]): s for s in saved}
        self._first_poll = True
        self._unreadable: set[str] = set()
        # Files under the globs after the last poll (read by other threads, so a plain int).
        self.watched = 0
        self._stop: threading.Event | None = None

    def configure(self, config: LogsConfig) -> None:
        self.config = config
        self.patterns = list(config.paths)
        self.max_line = config.max_line_bytes

    def base_dirs(self) -> list[tuple[Path, bool]]:
        """Directories to watch for changes, and whether recursively."""
        out = []
        for pattern in self.patterns:
            base = _glob_base(pattern)
            recursive = len(Path(pattern).parts) - len(base.parts) > 1 or "**" in pattern
            out.append((base, recursive))
        return out

    def poll(self, sink: Sink, stop: threading.Event | None = None) -> None:
        """Find files, notice rotation and truncation, and hand on every new complete line.
        ``stop`` set meanwhile ends the poll between two blocks, offsets consistent."""
        self._stop = stop
        now = time.monotonic()
        seen: set[tuple[int, int]] = set()
        for path in matching_files(self.patterns):
            try:
                st = os.stat(path)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            ident = (st.st_dev, st.st_ino)
            fs = self.files.get(ident)
            if fs is None:
                fs = self._open(path, st)
                if fs is None:
                    continue
                self.files[ident] = fs
            elif fs.path != path:
                log.info("file renamed", extra={"old": fs.path, "path": path})
                fs.path = path
            seen.add(ident)
        if self._saved:
            self._find_rotated_while_stopped(now)
        self._first_poll = False
        self._saved.clear()

        for ident, fs in self.files.items():
            if ident in seen:
                fs.gone_since = None
            elif fs.gone_since is None:
                fs.gone_since = now
        self.watched = len(seen)
        # Rotated-away files first, so an old file is drained before its successor.
        order = sorted(self.files.values(), key=lambda f: (f.gone_since is None, f.path))
        for fs in order:
            self._read(fs, sink)
            if fs.gone_since is not None and now - fs.gone_since >= self.config.rotate_wait_seconds:
                self._close(fs, sink)

    def _find_rotated_while_stopped(self, now: float) -> None:
        """A saved file no longer under the globs may have been renamed beside them
        (``kling.jsonl.1``) while the daemon was down: find it by inode and drain it."""
        for (dev, ino), saved in list(self._saved.items()):
            directory = os.path.dirname(saved["path"]) or "."
            try:
                names = os.listdir(directory)
            except OSError:
                continue
            for name in names:
                path = os.path.join(directory, name)
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                if (st.st_dev, st.st_ino) == (dev, ino) and stat.S_ISREG(st.st_mode):
                    fs = self._open(path, st)
                    if fs is not None:
                        fs.gone_since = now
                        self.files[(dev, ino)] = fs
                        log.info("draining file rotated while stopped", extra={"path": path})
                    break

    def _open(self, path: str, st: os.stat_result) -> FileState | None:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            if path not in self._unreadable:
                self._unreadable.add(path)
                log.warning("cannot open log file", extra={"path": path, "err": e.strerror})
            return None
        self._unreadable.discard(path)
        st = os.fstat(fd)  # the file we opened, even if the path changed meanwhile
        fs = FileState(path, st.st_dev, st.st_ino, fd)
        saved = self._saved.pop((st.st_dev, st.st_ino), None)
        if saved is not None:
            fp = saved["fingerprint"]
            if saved["offset"] <= st.st_size and os.pread(fd, len(fp), 0) == fp:
                fs.fingerprint = fp
                fs.offset = fs.read_pos = saved["offset"]
                fs.lineno = saved["lineno"]
                log.info("resuming file", extra={"path": path, "offset": fs.offset})
                return fs
            log.info("file changed while stopped, reading from start", extra={"path": path})
        elif self._first_poll and self.config.start_at == "end":
            fs.offset = fs.read_pos = _last_line_end(fd, st.st_size)
            fs.lineno = -1  # line numbers unknown when starting at the end
            fs.fingerprint = os.pread(fd, FINGERPRINT_LEN, 0)
        log.info("following file", extra={"path": path})
        return fs

    def _close(self, fs: FileState, sink: Sink) -> None:
        if fs.pending and not fs.skipping:
            # The file is gone for good: its last line will never get its newline.
            self._emit(fs, sink, [fs.pending], len(fs.pending))
            fs.pending = b""
        os.close(fs.fd)
        del self.files[(fs.dev, fs.ino)]
        log.info("stopped following file", extra={"path": fs.path})

    def close(self) -> None:
        for fs in self.files.values():
            os.close(fs.fd)
        self.files.clear()

    def _changed_under_us(self, fs: FileState) -> bool:
        """True if the file was truncated, or replaced in place by other content."""
        size = os.fstat(fs.fd).st_size
        if size < fs.read_pos:
            return True
        fp = fs.fingerprint
        return bool(fp) and os.pread(fs.fd, len(fp), 0) != fp

    def _emit(self, fs: FileState, sink: Sink, lines: list[bytes | None], nbytes: int) -> None:
        first = fs.lineno + 1 if fs.lineno >= 0 else 0
        sink(fs.path, lines, first, nbytes)
        fs.offset += nbytes
        if fs.lineno >= 0:
            fs.lineno += len(lines)

    def _read(self, fs: FileState, sink: Sink) -> None:
        if self._changed_under_us(fs):
            log.warning("file truncated or replaced, reading from start", extra={"path": fs.path})
            fs.rewind()
        max_line, stop = self.max_line, self._stop
        while stop is None or not stop.is_set():
            data = os.pread(fs.fd, BLOCK, fs.read_pos)
            if not data:
                break
            fs.read_pos += len(data)
            if len(fs.fingerprint) < FINGERPRINT_LEN:
                fs.fingerprint = os.pread(fs.fd, FINGERPRINT_LEN, 0)
            if fs.skipping:
                nl = data.find(b"\n")
                if nl < 0:
                    continue
                fs.skipping = False
                end = fs.read_pos - len(data) + nl + 1
                self._emit(fs, sink, [None], end - fs.offset)
                data = data[nl + 1 :]
            buf = fs.pending + data if fs.pending else data
            nl = buf.rfind(b"\n")
            if nl < 0:
                fs.pending = buf
            else:
                fs.pending = buf[nl + 1 :]
                lines: list[bytes | None] = buf[:nl].split(b"\n")  # type: ignore[assignment]
                if nl > max_line:  # only a chunk longer than the limit can hold a long line
                    for i, line in enumerate(lines):
                        if line is not None and len(line) > max_line:
                            lines[i] = None
                self._emit(fs, sink, lines, nl + 1)
            if len(fs.pending) > max_line:
                fs.pending = b""
                fs.skipping = True

    def to_state(self) -> list[dict[str, Any]]:
        # Saved positions not yet claimed by a poll are kept, so a save right after a
        # restart does not forget them.
        return [*self._saved.values()] + [
            {
                "path": fs.path,
                "dev": fs.dev,
                "ino": fs.ino,
                "fingerprint": fs.fingerprint,
                "offset": fs.offset,
                "lineno": fs.lineno,
            }
            for fs in self.files.values()
        ]


class Watcher:
    """Wakes the reader when watchdog sees a change under the log directories.

    inotify where the system has it; where it cannot be had (no support, or the
    watch limit reached) the reader's periodic scan is the polling fallback."""

    def __init__(self, wake: threading.Event) -> None:
        self.wake = wake
        self._observer: Any = None
        self._watched: set[tuple[str, bool]] = set()
        self.mode = "polling"

    def watch(self, dirs: Iterable[tuple[Path, bool]]) -> None:
        """Watch these directories (again, if they appeared since the last call)."""
        wake = self.wake

        class _Handler(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:
                wake.set()

        for directory, recursive in dirs:
            key = (str(directory), recursive)
            if key in self._watched or not directory.is_dir():
                continue
            try:
                if self._observer is None:
                    self._observer = Observer()
                    self._observer.daemon = True
                    self._observer.start()
                self._observer.schedule(_Handler(), str(directory), recursive=recursive)
            except OSError as e:
                log.warning(
                    "file events unavailable, polling instead",
                    extra={"path": str(directory), "err": str(e)},
                )
                continue
            self._watched.add(key)
            self.mode = "events"

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None
