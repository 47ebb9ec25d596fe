"""What each of the two processes sets on the interpreter and the system: how long a
thread keeps the interpreter, the open-file limit, and memory a large piece of work
freed, given back at once.

A scrape of a wide exposition builds tens of megabytes of text in both processes; freed,
most of it stays with the C allocator, in heaps the next scrape may not fit back into, so
the processes' resident size grew by the size of a few scrapes. glibc's ``malloc_trim``
returns what is free at the top and in whole pages of its heaps (elsewhere it does
nothing)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys

# A body at least this large is worth a trim (a trim of a small heap costs more than it
# gives).
LARGE = 1 << 20

_trim = None
if sys.platform.startswith("linux"):
    try:
        _trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has none)
        _trim = None


def trim_after(nbytes: int) -> None:
    """Give freed memory back after work of ``nbytes`` of output, if that is large."""
    if _trim is not None and nbytes >= LARGE:
        _trim(0)


def raise_open_file_limit() -> tuple[int, int]:
    """Raise the soft limit of open descriptors to the hard one (systemd's default soft
    limit is 1024); returns the limits now in force."""
    try:
        import resource  # noqa: PLC0415 - not on every platform
    except ImportError:  # pragma: no cover
        return (1024, 1024)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


SWITCH_INTERVAL = 0.0005
