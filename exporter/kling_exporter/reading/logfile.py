"""The log files as the tailer knows them: one file's identity, first bytes and
position; every known file, restored from and saved as positions; reading helpers; and
how many files the process may hold open."""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kling_exporter.accounting.state import FilePosition, as_positions
from kling_exporter.config import LogsConfig
from kling_exporter.reading.listing import glob_base

# Positions of files that left the globs, kept in case they come back.
KEEP_GONE = 10_000
KEEP_GONE_SECONDS = 7 * 86400


class FileState:
    """One known file. ``offset`` is just past the last complete line handed on;
    ``read_pos`` is how far the bytes have been read (pending or skipped beyond it).
    ``fd`` is None while the file is closed (idle, gone, or not yet opened)."""

    __slots__ = (
        "changed_at",
        "compressed",
        "dev",
        "fd",
        "fingerprint",
        "gone_since",
        "ino",
        "lineno",
        "mtime_ns",
        "offset",
        "path",
        "pending",
        "read_pos",
        "saved_digest",
        "shadow_of",
        "skipping",
        "verified",
    )

    def __init__(self, path: str, dev: int, ino: int) -> None:
        self.path = path
        self.dev = dev
        self.ino = ino
        self.fd: int | None = None
        self.fingerprint = b""
        # From the saved state, which keeps only a digest of the first bytes (a prompt
        # in a first line must not sit in another file): (length, SHA-256).
        self.saved_digest: tuple[int, bytes] | None = None
        self.offset = 0
        self.read_pos = 0
        self.lineno = 0
        self.pending = b""
        self.skipping = False
        self.gone_since: float | None = None
        # Monotonic time the file last grew, and its mtime when it was closed.
        self.changed_at = 0.0
        self.mtime_ns = 0
        # False while the file is to be opened by its path even if no listing shows it
        # (new, restored from the state, or found renamed beside the globs); its
        # position is checked against the file whenever it is opened.
        self.verified = False
        # The file whose copy this is, while that file still holds the same stream.
        self.shadow_of: tuple[int, int] | None = None
        # A compressed copy (logrotate's compress) under the globs: never read as lines.
        self.compressed = False

    @property
    def ident(self) -> tuple[int, int]:
        return (self.dev, self.ino)

    def begins(self, fd: int) -> bytes | None:
        """The file's first bytes if they are the ones this state knows, else None."""
        if self.saved_digest is not None:
            length, digest = self.saved_digest
            head = os.pread(fd, length, 0)
            return head if hashlib.sha256(head).digest() == digest else None
        head = os.pread(fd, len(self.fingerprint), 0)
        return head if head == self.fingerprint else None

    def rewind(self) -> None:
        self.saved_digest = None
        self.fingerprint = b""
        self.offset = self.read_pos = self.lineno = 0
        self.pending = b""
        self.skipping = False

    def continue_stream(self, fingerprint: bytes, offset: int, lineno: int, size: int) -> None:
        """Go on from where another file holding the same stream was left."""
        self.fingerprint, self.saved_digest = fingerprint, None
        self.offset = self.read_pos = min(offset, size)
        self.lineno = lineno
        self.pending = b""
        self.skipping = False
        self.shadow_of = None


def known_start(
    head: bytes, fingerprint: bytes, saved_digest: tuple[int, bytes] | None
) -> bytes | None:
    """The first bytes of a stream known by ``fingerprint`` (or only by ``saved_digest``,
    from the saved state) if ``head`` begins with them, else None."""
    if saved_digest is not None:
        length, digest = saved_digest
        start = head[:length]
        return start if len(start) == length and hashlib.sha256(start).digest() == digest else None
    return fingerprint if fingerprint and head.startswith(fingerprint) else None


def last_line_end(fd: int, size: int) -> int:
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


def open_fd(path: str) -> int:
    return os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))


def digest(fs: FileState) -> tuple[int, bytes]:
    """How a file begins, for the saved state: its length and SHA-256, not the bytes."""
    if fs.saved_digest is not None:
        return fs.saved_digest
    return len(fs.fingerprint), hashlib.sha256(fs.fingerprint).digest()


def max_open_files() -> int:
    """How many log files to hold open at once: a small share of the descriptor limit,
    so clients and the state writer always have room."""
    try:
        import resource  # noqa: PLC0415
    except ImportError:  # pragma: no cover
        return 64
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return 4096
    return max(4, min(4096, soft // 8))


class KnownFiles:
    """Every file the tailer knows, open, closed or gone, by identity: restored from
    saved positions and saved as positions again, with the descriptors held open."""

    def __init__(
        self, config: LogsConfig, saved: Iterable[FilePosition | dict[str, Any]] = ()
    ) -> None:
        self.configure(config)
        self.files: dict[tuple[int, int], FileState] = {}
        now = time.monotonic()
        for s in as_positions(saved):
            fs = FileState(s.path, s.dev, s.ino)
            fs.offset, fs.lineno = s.offset, s.lineno
            if s.fingerprint is not None:  # saved by an earlier version: the bytes
                fs.fingerprint = s.fingerprint
            elif s.fingerprint_len is not None and s.fingerprint_sha256 is not None:
                # Nothing read yet (empty, or not judged yet): no position to check, the
                # file is judged like a new one, but still drained if renamed away.
                if s.fingerprint_len or s.offset:
                    fs.saved_digest = (s.fingerprint_len, s.fingerprint_sha256)
            else:
                raise ValueError(f"file positions do not fit: {s.path} has no fingerprint")
            fs.read_pos = fs.offset
            if s.gone_for is not None:  # gone before the restart: back only through a listing
                fs.gone_since, fs.verified = now - s.gone_for, True
            self.files[fs.ident] = fs
        # Read by other threads, so plain values replaced whole.
        self.watched = 0
        self.glob_files: dict[str, int] = {}  # files each glob matched at the last listing
        self.open_files = 0
        self.positions: list[tuple[str, int]] = []
        self.max_open = max_open_files()

    def configure(self, config: LogsConfig) -> None:
        self.config = config
        self.patterns = list(config.paths)
        self.max_line = config.max_line_bytes

    def base_dirs(self) -> list[tuple[Path, bool]]:
        """Directories to watch for changes, and whether recursively."""
        out = []
        for pattern in self.patterns:
            base = glob_base(pattern)
            recursive = len(Path(pattern).parts) - len(base.parts) > 1 or "**" in pattern
            out.append((base, recursive))
        return out

    def _close_fd(self, fs: FileState) -> None:
        if fs.fd is None:
            return
        with contextlib.suppress(OSError):
            fs.mtime_ns = os.fstat(fs.fd).st_mtime_ns
        os.close(fs.fd)
        fs.fd = None
        self.open_files -= 1

    def _forget_old(self, now: float) -> None:
        gone = [fs for fs in self.files.values() if fs.gone_since is not None and fs.fd is None]
        gone.sort(key=lambda f: f.gone_since or 0.0)
        excess = len(gone) - KEEP_GONE
        for i, fs in enumerate(gone):
            if i < excess or now - (fs.gone_since or now) > KEEP_GONE_SECONDS:
                del self.files[fs.ident]

    def close(self) -> None:
        for fs in self.files.values():
            if fs.fd is not None:
                os.close(fs.fd)
                fs.fd = None
        self.open_files = 0

    def unread_bytes(self) -> int:
        """Bytes in the followed files beyond what was read at the last poll (called from
        other threads: it reads only ``positions``)."""
        total = 0
        for path, pos in self.positions:
            with contextlib.suppress(OSError):
                total += max(0, os.stat(path).st_size - pos)
        return total

    def to_state(self) -> list[FilePosition]:
        """Positions of every known file, open, closed or gone. A partial last line is not
        part of a position: after a restart it is read again, whole. A copy and a
        compressed file are known again by their first bytes."""
        now = time.monotonic()
        return [
            FilePosition(
                fs.path,
                fs.dev,
                fs.ino,
                fs.offset,
                fs.lineno,
                *digest(fs),
                # Seconds gone, as a monotonic time means nothing to another process.
                gone_for=None if fs.gone_since is None else now - fs.gone_since,
            )
            for fs in self.files.values()
            if fs.shadow_of is None and not fs.compressed
        ]
