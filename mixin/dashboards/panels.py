"""The panel kinds the dashboards are made of: stat, time series, bar gauge, bar chart,
and tables (joined from instant queries, or of one query's labels). Each takes what a
panel says (title, description, queries, unit) and gives Grafana's JSON for it."""

from __future__ import annotations

from typing import Any, NamedTuple

from mixin.dashboards.knobs import WARNING_RATIO
from mixin.dashboards.layout import Panel
from mixin.dashboards.queries import (
    DS,
    Columns,
    Target,
    instant_targets,
    merged,
    target,
)

GREEN, ORANGE, RED, BLUE = "green", "orange", "red", "blue"
Steps = dict[str, Any]
Override = dict[str, Any]


def thresholds(*steps: tuple[str, float | None]) -> Steps:
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for c, v in steps]}


BUDGET_STEPS = thresholds((GREEN, None), (ORANGE, WARNING_RATIO), (RED, 1.0))
TABLE_OPTIONS = {
    "showHeader": True,
    "cellHeight": "sm",
    "footer": {"show": False, "reducer": ["sum"], "fields": ""},
}
LAST_VALUE = {"calcs": ["lastNotNull"], "fields": "", "values": False}


def panel(
    kind: str,
    title: str,
    description: str,
    targets: list[Target],
    defaults: dict[str, Any],
    options: dict[str, Any],
    overrides: list[Override] | None = None,
    **extra: Any,
) -> Panel:
    """The envelope every panel shares; ``extra`` (transformations) goes after targets."""
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": targets,
        **extra,
        "fieldConfig": {"defaults": defaults, "overrides": overrides or []},
        "options": options,
    }


def stat(
    title: str,
    description: str,
    expr: str,
    unit: str,
    decimals: int | None = None,
    steps: Steps | None = None,
) -> Panel:
    """One number, the last of its query, over a sparkline."""
    defaults: dict[str, Any] = {
        "unit": unit,
        "color": {"mode": "thresholds"},
        "thresholds": steps or thresholds((BLUE, None)),
    }
    if decimals is not None:
        defaults["decimals"] = decimals
    options = {
        "reduceOptions": LAST_VALUE,
        "colorMode": "value",
        "graphMode": "area",
        "justifyMode": "auto",
        "textMode": "auto",
        "orientation": "auto",
    }
    return panel("stat", title, description, [target(expr)], defaults, options)


class Look(NamedTuple):
    """How a time series is drawn: stacked, as bars, with its thresholds as lines."""

    stack: bool = False
    bars: bool = False
    threshold_lines: bool = False


LINES = Look()
STACKED = Look(stack=True)


def timeseries(
    title: str,
    description: str,
    targets: list[Target],
    unit: str,
    look: Look = LINES,
    steps: Steps | None = None,
    overrides: list[Override] | None = None,
) -> Panel:
    """Lines (or bars), stacked or not, with a table legend of last and max."""
    defaults: dict[str, Any] = {
        "unit": unit,
        "custom": _series_style(*look),
        "color": {"mode": "palette-classic"},
        "thresholds": steps or thresholds((GREEN, None)),
    }
    options = {
        "legend": {
            "displayMode": "table",
            "placement": "bottom",
            "showLegend": True,
            "calcs": ["lastNotNull", "max"],
        },
        "tooltip": {"mode": "multi", "sort": "desc"},
    }
    return panel("timeseries", title, description, targets, defaults, options, overrides)


def _series_style(stack: bool, bars: bool, threshold_lines: bool) -> dict[str, Any]:
    return {
        "drawStyle": "bars" if bars else "line",
        "lineWidth": 1,
        "fillOpacity": 80 if bars else (25 if stack else 10),
        "showPoints": "never",
        "stacking": {"mode": "normal" if stack else "none", "group": "A"},
        "spanNulls": False,
        "axisSoftMin": 0,
        "thresholdsStyle": {"mode": "line+area" if threshold_lines else "off"},
    }


def ratio_bargauge(title: str, description: str, targets: list[Target]) -> Panel:
    """A horizontal bar per series, 0 to 120%, coloured by the budget thresholds."""
    defaults = {
        "unit": "percentunit",
        "min": 0,
        "max": 1.2,
        "decimals": 1,
        "thresholds": BUDGET_STEPS,
        "color": {"mode": "thresholds"},
    }
    options = {
        "displayMode": "gradient",
        "orientation": "horizontal",
        "showUnfilled": True,
        "valueMode": "color",
        "minVizHeight": 16,
        "reduceOptions": LAST_VALUE,
    }
    return panel("bargauge", title, description, targets, defaults, options)


def ratio_barchart(title: str, description: str, columns: Columns, x_field: str) -> Panel:
    """Horizontal bars of shares, one per ``x_field`` value, stacked a part per column
    (instant queries joined), 0 to 120% with the budget thresholds drawn."""
    defaults = {
        "unit": "percentunit",
        "min": 0,
        "max": 1.2,
        "thresholds": BUDGET_STEPS,
        "color": {"mode": "palette-classic"},
        "custom": {"thresholdsStyle": {"mode": "line"}, "fillOpacity": 80},
    }
    options = {
        "orientation": "horizontal",
        "stacking": "normal",
        "xField": x_field,
        "showValue": "never",
        "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
        "tooltip": {"mode": "multi", "sort": "none"},
    }
    return panel(
        "barchart",
        title,
        description,
        instant_targets(columns),
        defaults,
        options,
        transformations=merged(columns, ("Time", "period")),
    )


def joined_table(
    title: str, description: str, columns: Columns, overrides: list[Override]
) -> Panel:
    """A row per series, a column per instant query, whole numbers unless overridden."""
    return panel(
        "table",
        title,
        description,
        instant_targets(columns),
        {"unit": "short", "decimals": 0},
        TABLE_OPTIONS,
        overrides=overrides,
        transformations=merged(columns),
    )


def labels_table(title: str, description: str, expr: str, hidden: tuple[str, ...]) -> Panel:
    """A row per series of one instant query, its labels as columns but ``hidden``."""
    return panel(
        "table",
        title,
        description,
        [target(expr, "", "A", instant=True)],
        {},
        TABLE_OPTIONS,
        transformations=[
            {"id": "organize", "options": {"excludeByName": dict.fromkeys(hidden, True)}}
        ],
    )


def override(matcher_id: str, pattern: str, *properties: tuple[str, Any]) -> Override:
    """Fields that the matcher picks (``byName``, ``byRegexp``, ``byFrameRefID``) take
    these (property id, value) pairs."""
    return {
        "matcher": {"id": matcher_id, "options": pattern},
        "properties": [{"id": key, "value": value} for key, value in properties],
    }
