"""The rules by which a glob of ``logs.paths`` matches a path, in one place: the
listing follows them on disk, the config to check that a path it names is read."""

from __future__ import annotations

import fnmatch
import functools
import os
import re


def hidden(name: str) -> bool:
    return name.startswith(".")


@functools.lru_cache(maxsize=256)
def _compiled(part: str) -> re.Pattern[str]:
    return re.compile(fnmatch.translate(part))


def name_matches(name: str, part: str) -> bool:
    """Whether a file or folder name matches one part of a glob (glob's rules: a hidden
    name only a part that starts with a dot)."""
    if hidden(name) and not hidden(part):
        return False
    return _compiled(part).match(name) is not None


def glob_matches(path: str, pattern: str) -> bool:
    """Whether the listing would find ``path`` by ``pattern``: name by name, a wildcard
    never crossing a ``/``, ``**`` spanning folders (but hidden ones), both taken from
    the working folder when relative."""
    names = [p for p in os.path.abspath(path).split(os.sep) if p]
    parts = [p for p in os.path.abspath(pattern).split(os.sep) if p]
    return _matches(names, parts)


def _matches(names: list[str], parts: list[str]) -> bool:
    if not parts:
        return not names
    part = parts[0]
    if part == "**":
        return _matches(names, parts[1:]) or (
            bool(names) and not hidden(names[0]) and _matches(names[1:], parts)
        )
    return bool(names) and name_matches(names[0], part) and _matches(names[1:], parts[1:])
