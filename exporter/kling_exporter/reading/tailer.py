"""Reading the log files' complete lines exactly once.

The tailer knows files, offsets and rotation, nothing of Kling. A file is
known by its device and inode plus a fingerprint of its first bytes, so a
rename keeps its position, a truncation or a reused inode starts it again
from 0, and a rotated-away file is drained through its open handle before it
is let go. Lines go to a sink with the file and the number of the first line.

What is known of a file outlives its descriptor: an idle file is closed and
opened again at its offset when it grows; a file that leaves the globs (a
directory moved away) and comes back continues where it was; the lines a
copytruncate left only in the copy are read from the copy, and a copy whose
first bytes are a stream already read continues that stream. An error while
listing or opening files means "unknown", never "gone".

One job, and long for it: the cases of a file's life are one state machine over the
known files (``logfile``), each case a method, so that rotation, truncation, copies and
restarts are decided in one place.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from kling_exporter.accounting.state import FilePosition
from kling_exporter.config import LogsConfig
from kling_exporter.reading.listing import (
    ABSENT,
    ListingError,
    files_by_glob,
    scandir,
    warn_once,
    warned,
)
from kling_exporter.reading.logfile import (
    FileState,
    KnownFiles,
    known_start,
    last_line_end,
    open_fd,
)

log = logging.getLogger(__name__)

BLOCK = 1 << 20
FINGERPRINT_LEN = 256
# A copy is told by its first bytes only when there are enough of them to be unique:
# this many, or a whole first line of at least MIN_TWIN_LINE (a usage tracker's lines
# are short; a line is an event, its task named in it).
MIN_TWIN_FINGERPRINT = 64
MIN_TWIN_LINE = 16
# How the files that logrotate's compress writes begin: gzip, xz, zstd, bzip2.
COMPRESSED = (b"\x1f\x8b", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd", b"BZh")

# sink(path, lines, first_line_number, bytes): None in lines marks a line too long to keep.
Sink = Callable[[str, list[bytes | None], int, int], None]


def twin_key(first: bytes) -> bytes | None:
    """The part of a file's first bytes its copies are told by (the same for a file and
    for any file that begins with all of its first bytes); None while too few."""
    nl = first.find(b"\n", 0, MIN_TWIN_FINGERPRINT)
    if nl + 1 >= MIN_TWIN_LINE:
        return first[: nl + 1]
    return first[:MIN_TWIN_FINGERPRINT] if len(first) >= MIN_TWIN_FINGERPRINT else None


class Tailer(KnownFiles):
    """Follows the files under the globs: lists them, reads their new complete lines
    into a sink, and keeps each one's stream across renames, truncations and copies."""

    def __init__(
        self, config: LogsConfig, saved: Iterable[FilePosition | dict[str, Any]] = ()
    ) -> None:
        super().__init__(config, saved)
        # Streams left behind by a truncation whose copy has not been seen (yet):
        # fingerprint (or, restored from the saved state, only its digest), offset, line
        # number.
        self.retired: list[tuple[bytes, tuple[int, bytes] | None, int, int]] = []
        self._first_poll = True
        # Files in the saved state, even with nothing read: ``start_at: end`` is not for them.
        self._saved = set(self.files)
        self._unreadable: set[str] = set()
        self._stop: threading.Event | None = None
        # Followed files by their first bytes, and the first bytes of every stream known,
        # sorted: built once a poll when a new file needs them.
        self._heads: dict[bytes, FileState] | None = None
        self._streams: list[bytes] | None = None

    # -- finding files ---------------------------------------------------------------

    def _list(self) -> tuple[dict[tuple[int, int], tuple[str, os.stat_result]], bool]:
        """The regular files under the globs by identity, and whether the listing is
        complete (False after any error other than "not there")."""
        complete = True
        try:
            by_glob = files_by_glob(self.patterns, self.config.follow_symlinks)
        except ListingError as e:
            complete = False
            by_glob = {}
            warn_once("cannot list log files; keeping every known file", "(listing)", err=str(e))
        else:
            warned.discard("(listing)")
            # What each glob matches; after an error, unknown: the last count stays.
            self.glob_files = {glob: len(paths) for glob, paths in by_glob.items()}
        found: dict[tuple[int, int], tuple[str, os.stat_result]] = {}
        for path in sorted({p for paths in by_glob.values() for p in paths}):
            try:
                st = os.stat(path)
            except OSError as e:
                if e.errno not in ABSENT:
                    complete = False
                continue
            if stat.S_ISREG(st.st_mode):
                found[(st.st_dev, st.st_ino)] = (path, st)
        return found, complete

    def poll(self, sink: Sink, stop: threading.Event | None = None) -> None:
        """Find files, notice rotation and truncation, and hand on every new complete line.
        ``stop`` set meanwhile ends the poll between two blocks, offsets consistent."""
        self._stop = stop
        self._heads = self._streams = None
        now = time.monotonic()
        found, complete = self._list()
        for ident, (path, _) in found.items():
            fs = self.files.get(ident)
            if fs is None:
                self.files[ident] = fs = FileState(path, *ident)
            elif fs.path != path:
                log.info("file renamed", extra={"old": fs.path, "path": path})
                fs.path = path
            fs.gone_since = None
        if complete:
            missing = []
            for ident, fs in self.files.items():
                if ident not in found and fs.gone_since is None:
                    fs.gone_since = now
                    if fs.fd is None:
                        missing.append(fs)
            self._locate(missing)
        self.watched = len(found)

        # Rotated-away files first, so an old file is drained before its successor; then
        # files with a position, so a new file is told from a copy by first bytes known.
        order = sorted(
            self.files.values(),
            key=lambda f: (
                f.gone_since is None,
                not (f.offset or f.fingerprint or f.saved_digest is not None),
                f.path,
            ),
        )
        for fs in order:
            if fs.ident not in self.files:
                continue  # taken over as a copy meanwhile
            listed = found.get(fs.ident)
            if listed is not None and not self._worth_reading(fs, listed[1]):
                continue
            if fs.fd is None and ((listed is None and fs.verified) or not self._reopen(fs, sink)):
                continue
            self._read(fs, sink)
            self._maybe_close(fs, sink, now)
        self._first_poll = False
        self._saved = set()
        self._forget_old(now)
        self.open_files = sum(1 for fs in self.files.values() if fs.fd is not None)
        self.positions = [
            (fs.path, fs.read_pos) for fs in self.files.values() if fs.gone_since is None
        ]

    def _worth_reading(self, fs: FileState, st: os.stat_result) -> bool:
        """A closed file is opened again only when it changed since it was closed. A
        compressed one is never read while unchanged; changed, its inode was freed and
        given to a new file (logrotate deletes the oldest copy, then makes the new one),
        which is looked at afresh."""
        if fs.compressed:
            if st.st_mtime_ns == fs.mtime_ns:
                return False
            fs.compressed = False
        if fs.fd is not None or not fs.verified or fs.shadow_of is not None:
            return True
        return st.st_size != fs.read_pos or st.st_mtime_ns != fs.mtime_ns

    def _locate(self, missing: list[FileState]) -> None:
        """A closed file that left the globs may have been renamed beside them
        (``kling.jsonl.1``, while the daemon was down or while the file was idle): find
        it by inode, so that what its writer still appends is drained. One that cannot
        be found comes back only through a listing."""
        by_ident = {fs.ident: fs for fs in missing}
        for directory in {os.path.dirname(fs.path) for fs in missing}:
            try:
                entries = scandir(directory)
            except ListingError:
                continue
            for entry in entries:
                with contextlib.suppress(OSError):
                    st = entry.stat(follow_symlinks=False)
                    fs = by_ident.pop((st.st_dev, st.st_ino), None)
                    if fs is not None and stat.S_ISREG(st.st_mode):
                        fs.path, fs.verified = entry.path, False
                        log.info("draining file rotated away", extra={"path": fs.path})
        for fs in by_ident.values():
            fs.verified = True

    # -- opening and closing ---------------------------------------------------------

    def _reopen(self, fs: FileState, sink: Sink) -> bool:
        """Open a file by its path, checking that the path still leads to it and that
        its known position still fits; False (and try again later) when it cannot."""
        try:
            fd = open_fd(fs.path)
        except OSError as e:
            if e.errno in ABSENT:
                fs.verified = True  # not there: only a listing brings it back
                return False
            if e.errno in (errno.EMFILE, errno.ENFILE):
                warn_once("too many open files; will read this file later", fs.path)
            elif fs.path not in self._unreadable:
                self._unreadable.add(fs.path)
                log.warning("cannot open log file", extra={"path": fs.path, "err": e.strerror})
            return False
        self._unreadable.discard(fs.path)
        warned.discard(fs.path)
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != fs.ident:
            os.close(fd)  # the path changed meanwhile; the next listing sorts it out
            return False
        fs.fd = fd
        self.open_files += 1
        first_open, fs.verified = not fs.verified, True
        if fs.offset or fs.fingerprint or fs.saved_digest:
            # A position from the saved state, from before the file went away, or from
            # before it was closed as idle: it still fits if the file begins the same.
            head = fs.begins(fd) if fs.read_pos <= st.st_size else None
            if head is not None:
                fs.fingerprint, fs.saved_digest = head, None
                self._index(fs)
                if first_open:
                    log.info("resuming file", extra={"path": fs.path, "offset": fs.offset})
                return True
            log.info("file changed while not followed, reading from start", extra={"path": fs.path})
            self._restart(fs, sink)
            return self._take_as_new(fs, st, new=False)
        return self._take_as_new(fs, st, new=True)

    def _take_as_new(self, fs: FileState, st: os.stat_result, new: bool) -> bool:
        """An open file with no position of its own (new, truncated, or an inode reused):
        a copy of a stream already read goes on from that stream's position, anything
        else is read from its start (from its end at start-up with ``start_at: end``).
        False, its descriptor closed, for a compressed file (never read) and for one
        too short yet to be told from a copy (looked at again at the next poll)."""
        fd = fs.fd
        assert fd is not None
        fs.changed_at = time.monotonic()
        head = os.pread(fd, FINGERPRINT_LEN, 0)
        if head.startswith(COMPRESSED):
            fs.compressed = True
            self._close_fd(fs)
            log.info("compressed file, not read", extra={"path": fs.path})
            return False
        if self._undecided(head):
            fs.verified = False
            self._close_fd(fs)
            return False
        if self._as_copy(fs, st, head):
            return True
        if not new:
            return True
        if self._first_poll and self.config.start_at == "end" and fs.ident not in self._saved:
            fs.offset = fs.read_pos = last_line_end(fd, st.st_size)
            fs.lineno = -1  # line numbers unknown when starting at the end
            fs.fingerprint = head
            self._index(fs)
        log.info("following file", extra={"path": fs.path})
        return True

    def _index(self, fs: FileState) -> None:
        """A file's first bytes became known during a poll: the new files met later in
        it are told from copies by them too."""
        if self._streams is not None and fs.fingerprint:
            bisect.insort(self._streams, fs.fingerprint)
        if self._heads is not None and fs.gone_since is None and fs.shadow_of is None:
            key = twin_key(fs.fingerprint)
            if key is not None:
                self._heads[key] = fs

    def _undecided(self, head: bytes) -> bool:
        """Whether a new file is too short yet to be told from a copy: not a whole line
        in it yet, its first bytes all among a stream's first bytes (a copy being
        written, the watcher having seen it created), or the start of a compressed
        file's header."""
        if any(magic.startswith(head) for magic in COMPRESSED):
            return True
        if b"\n" not in head and len(head) < MIN_TWIN_FINGERPRINT:
            return True  # not a line to read yet
        if len(head) >= FINGERPRINT_LEN:
            return False
        if self._streams is None:
            known = {f.fingerprint for f in self.files.values() if f.fingerprint}
            self._streams = sorted(known.union(fp for fp, _, _, _ in self.retired if fp))
        # The first known beginning above ``head`` starts with it if any longer one does.
        i = bisect.bisect_right(self._streams, head)
        return i < len(self._streams) and self._streams[i].startswith(head)

    def _as_copy(self, fs: FileState, st: os.stat_result, head: bytes) -> bool:
        """A new file that starts with the bytes of a stream already read is a copy of
        it (a copytruncate's, or a backup): it shadows a file that still holds that
        stream, or continues a stream a truncation left behind."""
        key = twin_key(head)
        if key is None:
            return False
        if self._heads is None:
            self._heads = {}
            for known in self.files.values():
                if known.gone_since is None and known.shadow_of is None:
                    known_key = twin_key(known.fingerprint)
                    if known_key is not None:
                        self._heads[known_key] = known
        other = self._heads.get(key)
        if other is not None and other is not fs and head.startswith(other.fingerprint):
            fs.shadow_of = other.ident
            fs.fingerprint = other.fingerprint
            log.info("file is a copy of one being read", extra={"path": fs.path, "of": other.path})
            return True
        for i, (fingerprint, saved_digest, offset, lineno) in enumerate(self.retired):
            fp = known_start(head, fingerprint, saved_digest)
            if fp is not None and twin_key(fp) is not None:
                del self.retired[i]
                fs.continue_stream(fp, offset, lineno, st.st_size)
                self._index(fs)
                log.info("copy continues a truncated file", extra={"path": fs.path})
                return True
        return False

    def _maybe_close(self, fs: FileState, sink: Sink, now: float) -> None:
        if fs.fd is None:
            return
        if fs.gone_since is not None:
            if now - fs.gone_since >= self.config.rotate_wait_seconds:
                self._let_go(fs, sink)
            return
        idle = time.monotonic() - fs.changed_at >= self.config.idle_close_seconds
        crowded = self.open_files >= self.max_open
        if (idle or crowded) and not fs.pending and not fs.skipping:
            self._close_fd(fs)

    def _let_go(self, fs: FileState, sink: Sink) -> None:
        """A file gone from the globs for ``rotate_wait``: drained, closed, its position
        kept in case it comes back."""
        if fs.pending and not fs.skipping:
            # The file is gone for good: its last line will never get its newline.
            self._emit(fs, sink, [fs.pending], len(fs.pending))
            fs.pending = b""
        self._close_fd(fs)
        self._adopt_shadows(fs, sink)
        log.info("stopped following file", extra={"path": fs.path})

    # -- truncation and copies -------------------------------------------------------

    def _restart(self, fs: FileState, sink: Sink) -> None:
        """The file was truncated or replaced: the stream read so far goes on in its copy
        if there is one (copytruncate), and the file is read again from its start."""
        if fs.saved_digest is None:
            enough = twin_key(fs.fingerprint) is not None
        else:  # told when a copy is found, from the copy's bytes
            enough = fs.saved_digest[0] >= MIN_TWIN_LINE
        if fs.offset and enough:
            copy = self._adopt_shadows(fs, sink) or self._find_copy(fs, sink)
            if not copy:
                self.retired.append((fs.fingerprint, fs.saved_digest, fs.offset, fs.lineno))
                del self.retired[:-100]
        fs.rewind()

    def _adopt_shadows(self, fs: FileState, sink: Sink) -> bool:
        """The copies of a file that no longer holds its stream take it over."""
        heir: FileState | None = None
        for other in list(self.files.values()):
            if other.shadow_of != fs.ident:
                continue
            if heir is not None:
                other.shadow_of = heir.ident  # a second copy shadows the first
                continue
            heir = other
            if other.fd is None:
                # Not open (yet): it takes the position and is checked when opened.
                other.fingerprint, other.offset, other.lineno = fs.fingerprint, fs.offset, fs.lineno
                other.read_pos, other.shadow_of = fs.offset, None
                self._index(other)
                continue
            other.continue_stream(fs.fingerprint, fs.offset, fs.lineno, os.fstat(other.fd).st_size)
            self._index(other)
            log.info("copy continues a truncated file", extra={"path": other.path})
            self._read(other, sink)
        return heir is not None

    def _find_copy(self, fs: FileState, sink: Sink) -> bool:
        """Look beside a truncated file for the copy a copytruncate made (a name the globs
        may not match) and read from it what was written before the truncation."""
        offset, lineno = fs.offset, fs.lineno
        try:
            entries = scandir(os.path.dirname(fs.path))
        except ListingError:
            return False
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            ident = (st.st_dev, st.st_ino)
            if ident == fs.ident or not stat.S_ISREG(st.st_mode) or st.st_size < offset:
                continue
            known = self.files.get(ident)
            if known is not None and (known.verified or known.fd is not None):
                continue
            try:
                fd = open_fd(entry.path)
            except OSError:
                continue
            fp = fs.begins(fd)
            if fp is None or twin_key(fp) is None:
                os.close(fd)
                continue
            copy = known
            if copy is None:
                # Not under the globs: drained, then let go after rotate_wait.
                copy = self.files[ident] = FileState(entry.path, *ident)
                copy.gone_since = time.monotonic()
            copy.fd, copy.verified = fd, True
            self.open_files += 1
            copy.continue_stream(fp, offset, lineno, st.st_size)
            self._index(copy)
            log.info(
                "reading the rest of a truncated file from its copy", extra={"path": entry.path}
            )
            self._read(copy, sink)
            return True
        return False

    def _changed_under_us(self, fs: FileState) -> bool:
        """True if the file was truncated, or replaced in place by other content."""
        assert fs.fd is not None
        size = os.fstat(fs.fd).st_size
        if size < fs.read_pos:
            return True
        return bool(fs.fingerprint) and fs.begins(fs.fd) is None

    # -- reading ---------------------------------------------------------------------

    def _emit(self, fs: FileState, sink: Sink, lines: list[bytes | None], nbytes: int) -> None:
        first = fs.lineno + 1 if fs.lineno >= 0 else 0
        sink(fs.path, lines, first, nbytes)
        fs.offset += nbytes
        if fs.lineno >= 0:
            fs.lineno += len(lines)

    def _may_read(self, fs: FileState, fd: int, sink: Sink) -> bool:
        """Whether ``fs`` is read now: not a copy whose stream its original still reads,
        and, if it was truncated or replaced under us, only once judged a new file."""
        if fs.shadow_of is not None:
            if fs.shadow_of in self.files:
                return False  # its stream is read from the original, then handed over
            # The original was forgotten without handing over: its stream was read.
            end = last_line_end(fd, os.fstat(fd).st_size)
            fs.continue_stream(fs.fingerprint, end, -1, end)
        if self._changed_under_us(fs):
            log.warning("file truncated or replaced, reading from start", extra={"path": fs.path})
            self._restart(fs, sink)
            return self._take_as_new(fs, os.fstat(fd), new=False) and fs.shadow_of is None
        return True

    def _read(self, fs: FileState, sink: Sink) -> None:
        fd = fs.fd
        assert fd is not None
        if not self._may_read(fs, fd, sink):
            return
        max_line, stop = self.max_line, self._stop
        while stop is None or not stop.is_set():
            data = os.pread(fd, BLOCK, fs.read_pos)
            if not data:
                break
            fs.read_pos += len(data)
            fs.changed_at = time.monotonic()
            if len(fs.fingerprint) < FINGERPRINT_LEN:
                fs.fingerprint = os.pread(fd, FINGERPRINT_LEN, 0)
                self._index(fs)
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
