"""mixin/config.yml, the one source of the rules, alerts and dashboards, with every
value in the forms text needs.

A ratio ``x_ratio`` also comes as ``x_ratio_percent`` (0.2: ``20%``); a duration ``x``
as ``x_seconds`` (``900``), ``x_words`` (``15 minutes``) and ``x_span`` (``hour`` for
``1h``, else as words); a whole number ``x`` as ``x_times`` (``three times``,
``twice``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from kling_exporter.vocabulary import parse_duration

CONFIG = Path(__file__).resolve().parent / "config.yml"
DURATION = re.compile(r"^\d+(ms|s|m|h|d|w|y)$")
UNITS = (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1))
TIMES = {1: "once", 2: "twice", 3: "three times", 4: "four times", 5: "five times"}
LONG_UNITS = {"d": 86400, "w": 7 * 86400, "y": 365 * 86400}


def config() -> dict[str, Any]:
    data = yaml.safe_load(CONFIG.read_text())
    if not isinstance(data, dict):
        raise SystemExit(f"{CONFIG}: expected a mapping")
    return data


def words(seconds: float) -> str:
    """15 minutes, 1 hour, 6 hours: the largest unit that divides it."""
    for unit, size in UNITS:
        if seconds >= size and seconds % size == 0:
            n = int(seconds // size)
            return f"{n} {unit}" + ("s" if n != 1 else "")
    return f"{seconds:g} seconds"


def values(data: dict[str, Any]) -> dict[str, str]:
    """Every value, with its forms for text."""
    out: dict[str, str] = {}
    for key, value in data.items():
        out[key] = str(value)
        if key.endswith("_ratio"):
            out[f"{key}_percent"] = f"{float(value):.0%}"
        if isinstance(value, str) and DURATION.match(value):
            out |= _duration_forms(key, _seconds(value, key))
        if isinstance(value, int) and not isinstance(value, bool):
            out[f"{key}_times"] = TIMES.get(value, f"{value} times")
    return out


def _duration_forms(key: str, seconds: float) -> dict[str, str]:
    return {
        f"{key}_seconds": f"{seconds:g}",
        f"{key}_words": words(seconds),
        f"{key}_span": words(seconds).removeprefix("1 "),
    }


def _seconds(value: str, key: str) -> float:
    if value[-1] in LONG_UNITS:
        return int(value[:-1]) * LONG_UNITS[value[-1]]
    return parse_duration(value, key)
