"""The dashboards as the JSON files in grafana/dashboards/: rendered, then written or
checked against what is committed."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mixin.dashboards.budgets import budgets
from mixin.dashboards.overview import overview

OUT = Path(__file__).resolve().parents[2] / "grafana" / "dashboards"
DASHBOARDS: dict[str, Callable[[], dict[str, Any]]] = {
    "kling-overview.json": overview,
    "kling-budgets.json": budgets,
}


def render() -> dict[str, str]:
    return {name: json.dumps(build(), indent=2) + "\n" for name, build in DASHBOARDS.items()}


def stale(rendered: dict[str, str]) -> list[str]:
    """The files missing or not as rendered."""
    return [
        n for n, text in rendered.items() if not (OUT / n).exists() or (OUT / n).read_text() != text
    ]


def main(argv: list[str]) -> int:
    """Write the files, or with ``--check`` exit 1 if any differs from what is rendered."""
    rendered = render()
    if "--check" in argv:
        if out_of_date := stale(rendered):
            print(f"out of date: {', '.join(out_of_date)}; run python grafana/build_dashboards.py")
            return 1
        return 0
    OUT.mkdir(exist_ok=True)
    for name, text in rendered.items():
        (OUT / name).write_text(text)
    return 0
