"""Which log files exist: glob expansion that tells an error from an empty answer, and
the watch that wakes the reader when they change.

``glob.glob`` answers "no files" when a directory cannot be read (too many open files,
no permission); for a tailer that means "every file is gone". Here such an error raises
``ListingError``, and only "not there" (ENOENT, ENOTDIR) is an empty answer. Paths that
lead through a symlink out of their glob's folder are left out unless asked for.
"""

from __future__ import annotations

import errno
import glob
import logging
import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEventHandler
from watchdog.observers import Observer

from kling_exporter.globs import hidden, name_matches

log = logging.getLogger(__name__)

# Errors that say a path is not there (as opposed to "could not look").
ABSENT = (errno.ENOENT, errno.ENOTDIR)


class ListingError(OSError):
    """A directory under a glob could not be listed: which files exist is unknown."""


def glob_base(pattern: str) -> Path:
    """The deepest directory of a glob that has no wildcard in it."""
    parts = Path(pattern).parts
    base: list[str] = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        base.append(part)
    return Path(*base) if base else Path(".")


def scandir(directory: str) -> list[os.DirEntry[str]]:
    """The entries of a directory; none if it is not there; ListingError if it could not
    be read (too many open files, no permission, I/O error)."""
    try:
        with os.scandir(directory or ".") as it:
            return list(it)
    except OSError as e:
        if e.errno in ABSENT:
            return []
        raise ListingError(e.errno, f"cannot list {directory or '.'}: {e.strerror}") from None


def _expand(directory: str, parts: list[str]) -> Iterator[str]:
    """Paths under ``directory`` matching the glob ``parts`` (glob's rules: ``**`` spans
    directories, hidden names match only a pattern that starts with a dot)."""
    if not parts:
        yield directory
        return
    part, rest = parts[0], parts[1:]
    if part == "**":
        yield from _expand(directory, rest)
        for entry in scandir(directory):
            if not hidden(entry.name) and entry.is_dir(follow_symlinks=False):
                yield from _expand(entry.path, parts)
        return
    if not glob.has_magic(part):
        path = os.path.join(directory, part)
        if not rest:
            try:
                os.lstat(path)
            except OSError as e:
                if e.errno in ABSENT:
                    return
                raise ListingError(e.errno, f"cannot look at {path}: {e.strerror}") from None
            yield path
        else:
            yield from _expand(path, rest)
        return
    for entry in scandir(directory):
        if name_matches(entry.name, part) and (not rest or entry.is_dir()):
            yield from _expand(entry.path, rest)


def expand_glob(pattern: str) -> list[str]:
    """Every path a glob matches; ListingError when a directory could not be read, so an
    error is never taken for "no files"."""
    drive, tail = os.path.splitdrive(pattern)
    start = drive + os.sep if os.path.isabs(pattern) else ""
    parts = [p for p in tail.split(os.sep) if p]
    return list(_expand(start, parts))


def _inside(path: str, folder: str) -> bool:
    real, base = os.path.realpath(path), os.path.realpath(folder)
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def matching_files(patterns: Iterable[str], follow_symlinks: bool = False) -> list[str]:
    """Every path the globs match, once each, in name order (so daily files go oldest
    first). A path that leads through a symlink out of its glob's folder is left out
    unless ``follow_symlinks``. Raises ListingError when a directory could not be read."""
    paths: set[str] = set()
    for found in files_by_glob(patterns, follow_symlinks).values():
        paths.update(found)
    return sorted(paths)


def files_by_glob(patterns: Iterable[str], follow_symlinks: bool = False) -> dict[str, list[str]]:
    """The paths each glob matches (see ``matching_files``); ListingError as there."""
    out: dict[str, list[str]] = {}
    for pattern in patterns:
        base = str(glob_base(pattern))
        kept = out.setdefault(pattern, [])
        for path in expand_glob(pattern):
            if follow_symlinks or _inside(path, base):
                kept.append(path)
            else:
                warn_once("symlink leads out of the log folder, not followed", path)
    return out


warned: set[str] = set()


def warn_once(message: str, path: str, **extra: Any) -> None:
    if path not in warned and len(warned) < 10_000:
        warned.add(path)
        log.warning(message, extra={"path": path, **extra})


class Watcher:
    """Wakes the reader when watchdog sees a change under the log directories.

    inotify where the system has it; where it cannot be had (no support, or the
    watch limit reached) the reader's periodic scan is the polling fallback."""

    def __init__(self, wake: threading.Event) -> None:
        self.wake = wake
        self._observer: Any = None
        self._watched: set[tuple[str, bool]] = set()

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

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None
