"""How a panel asks Prometheus: its queries (over a range, or instant ones for tables)
and the transformations that join instant answers into one table."""

from __future__ import annotations

from typing import Any

DS = {"type": "prometheus", "uid": "${datasource}"}

Target = dict[str, Any]
Columns = dict[str, tuple[str, str]]  # refId -> (query, column title)


def target(expr: str, legend: str = "", ref: str = "A", instant: bool = False) -> Target:
    t: Target = {"refId": ref, "datasource": DS, "expr": expr, "legendFormat": legend}
    if instant:
        t.update(instant=True, range=False, format="table")
    else:
        t.update(range=True)
    return t


def instant_targets(columns: Columns) -> list[Target]:
    """One instant query per column."""
    return [target(expr, "", ref, instant=True) for ref, (expr, _) in columns.items()]


def merged(columns: Columns, hidden: tuple[str, ...] = ("Time",)) -> list[dict[str, Any]]:
    """Transformations that join instant queries into one table, a column per query
    (refId -> title), without the ``hidden`` fields."""
    return [
        {"id": "merge", "options": {}},
        {
            "id": "organize",
            "options": {
                "excludeByName": dict.fromkeys(hidden, True),
                "renameByName": {f"Value #{ref}": title for ref, (_, title) in columns.items()},
            },
        },
    ]
