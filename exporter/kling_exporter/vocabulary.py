"""The words the exporter reads: a task's mode and kind in Kling's spellings and its
own, the values a few settings accept, and durations as Prometheus writes them."""

from __future__ import annotations

import re
from typing import Literal

MODES = ("standard", "professional")
KINDS = ("video", "image", "try_on", "audio")
START_AT = ("beginning", "end")

_DURATION_RE = re.compile(r"^(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+)s)?(?:(\d+)ms)?$")


def parse_duration(value: str | int | float, key: str) -> float:
    """Parse a Prometheus-style duration (``10s``, ``1m30s``, ``500ms``) or plain seconds."""
    if isinstance(value, bool):
        raise ValueError(f"{key}: expected a duration like '10s', got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION_RE.match(value.strip())
        if not value.strip() or match is None:
            raise ValueError(f"{key}: expected a duration like '10s' or '1m30s', got {value!r}")
        h, m, s, ms = (int(g) if g else 0 for g in match.groups())
        seconds = h * 3600 + m * 60 + s + ms / 1000
    if seconds < 0:
        raise ValueError(f"{key}: must not be negative, got {value!r}")
    return seconds


# Kling's std/pro and our long names, to the long name.
MODE_ALIASES: dict[str, Literal["standard", "professional"]] = {
    "standard": "standard",
    "std": "standard",
    "professional": "professional",
    "pro": "professional",
}


# Spellings of the task kinds users write, to our names. Any other kind is OTHER_KIND: the
# task is counted, and priced by the rules that name no kind or by the fallback.
KIND_ALIASES: dict[str, str] = {
    "video": "video",
    "videos": "video",
    "image": "image",
    "images": "image",
    "try_on": "try_on",
    "try-on": "try_on",
    "tryon": "try_on",
    "virtual_try_on": "try_on",
    "virtual-try-on": "try_on",
}


OTHER_KIND = "other"


def normalize_mode(mode: str) -> str | None:
    """Map Kling's ``std``/``pro`` and our long names to the long name; None if unknown."""
    return MODE_ALIASES.get(mode.lower())
