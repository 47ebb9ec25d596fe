"""Writes the Grafana dashboards in grafana/dashboards/ from the definitions below and
the thresholds and windows of mixin/config.yml (which the rules in alerts/ come from
too; `make mixin` rewrites both).

    python grafana/build_dashboards.py        # rewrite the JSON files
    python grafana/build_dashboards.py --check  # exit 1 if they differ from this code

The JSON files are committed so Grafana can load them as they are; a test checks that
they are exactly what this script writes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "exporter"))  # the package, when not installed

from mixin.config import config, values  # noqa: E402

MIXIN = values(config())
WARNING = float(MIXIN["budget_warning_ratio"])  # the dashboards' warning line
BURN = MIXIN["budget_burn_window"]  # the window of the burn rate recording rules
OUT = HERE / "dashboards"
DS = {"type": "prometheus", "uid": "${datasource}"}
SCHEMA_VERSION = 39

Panel = dict[str, Any]

GREEN, ORANGE, RED, BLUE = "green", "orange", "red", "blue"


def thresholds(*steps: tuple[str, float | None]) -> dict[str, Any]:
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for c, v in steps]}


BUDGET_STEPS = thresholds((GREEN, None), (ORANGE, WARNING), (RED, 1.0))


def target(expr: str, legend: str = "", ref: str = "A", instant: bool = False) -> dict[str, Any]:
    t: dict[str, Any] = {"refId": ref, "datasource": DS, "expr": expr, "legendFormat": legend}
    if instant:
        t.update(instant=True, range=False, format="table")
    else:
        t.update(range=True)
    return t


def merged(titles: dict[str, str], hidden: tuple[str, ...] = ("Time",)) -> list[dict[str, Any]]:
    """Transformations that join instant queries into one table, a column per query
    (refId -> title), without the ``hidden`` fields."""
    return [
        {"id": "merge", "options": {}},
        {
            "id": "organize",
            "options": {
                "excludeByName": dict.fromkeys(hidden, True),
                "renameByName": {f"Value #{ref}": title for ref, title in titles.items()},
            },
        },
    ]


class Layout:
    """Places panels left to right in rows of 24 columns, giving each a unique id."""

    def __init__(self) -> None:
        self.panels: list[Panel] = []
        self.x = self.y = self.row_h = 0
        self.next_id = 1

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append(
            {
                "id": self._id(),
                "type": "row",
                "title": title,
                "collapsed": False,
                "panels": [],
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y},
            }
        )
        self.y += 1

    def add(self, panel: Panel, w: int, h: int) -> None:
        if self.x + w > 24:
            self._newline()
        panel = {"id": self._id(), **panel, "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y}}
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)

    def _newline(self) -> None:
        self.y += self.row_h
        self.x = self.row_h = 0

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1


def panel(
    kind: str,
    title: str,
    description: str,
    targets: list[dict[str, Any]],
    defaults: dict[str, Any],
    options: dict[str, Any],
    overrides: list[dict[str, Any]] | None = None,
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
    steps: dict[str, Any] | None = None,
) -> Panel:
    defaults: dict[str, Any] = {
        "unit": unit,
        "color": {"mode": "thresholds"},
        "thresholds": steps or thresholds((BLUE, None)),
    }
    if decimals is not None:
        defaults["decimals"] = decimals
    options = {
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        "colorMode": "value",
        "graphMode": "area",
        "justifyMode": "auto",
        "textMode": "auto",
        "orientation": "auto",
    }
    return panel("stat", title, description, [target(expr)], defaults, options)


def timeseries(
    title: str,
    description: str,
    targets: list[dict[str, Any]],
    unit: str,
    stack: bool = False,
    bars: bool = False,
    steps: dict[str, Any] | None = None,
    threshold_lines: bool = False,
    min_value: float | None = 0,
    max_value: float | None = None,
) -> Panel:
    custom: dict[str, Any] = {
        "drawStyle": "bars" if bars else "line",
        "lineWidth": 1,
        "fillOpacity": 80 if bars else (25 if stack else 10),
        "showPoints": "never",
        "stacking": {"mode": "normal" if stack else "none", "group": "A"},
        "spanNulls": False,
        "axisSoftMin": min_value,
        "thresholdsStyle": {"mode": "line+area" if threshold_lines else "off"},
    }
    defaults: dict[str, Any] = {
        "unit": unit,
        "custom": custom,
        "color": {"mode": "palette-classic"},
        "thresholds": steps or thresholds((GREEN, None)),
    }
    if max_value is not None:
        defaults["max"] = max_value
    options = {
        "legend": {
            "displayMode": "table",
            "placement": "bottom",
            "showLegend": True,
            "calcs": ["lastNotNull", "max"],
        },
        "tooltip": {"mode": "multi", "sort": "desc"},
    }
    return panel("timeseries", title, description, targets, defaults, options)


def query_var(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "definition": query,
        "query": {
            "query": query,
            "refId": "PrometheusVariableQueryEditor-VariableQuery",
            "qryType": 1,
        },
        "multi": True,
        "includeAll": True,
        "allValue": ".*",
        "refresh": 2,
        "sort": 1,
        "regex": "",
        "hide": 0,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [],
    }


def datasource_var() -> dict[str, Any]:
    return {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "regex": "",
        "hide": 0,
        "refresh": 1,
        "current": {},
        "options": [],
    }


def dashboard(
    uid: str,
    title: str,
    description: str,
    layout: Layout,
    variables: list[dict[str, Any]],
    links_to: str,
) -> dict[str, Any]:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["kling", "kling-exporter"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "refresh": "1m",
        "time": {"from": "now-24h", "to": "now"},
        "timepicker": {},
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "links": [
            {
                "type": "dashboards",
                "tags": ["kling"],
                "title": links_to,
                "asDropdown": False,
                "includeVars": False,
                "keepTime": True,
                "targetBlank": False,
                "icon": "external link",
                "tooltip": "",
                "url": "",
            }
        ],
        "templating": {"list": [datasource_var(), *variables]},
        "panels": layout.panels,
    }


SEL = 'project=~"$project", model=~"$model"'


def overview() -> dict[str, Any]:
    lay = Layout()
    lay.row("Today at a glance")
    lay.add(
        stat(
            "Tasks submitted (24h)",
            "Tasks submitted to Kling in the last 24 hours.",
            f"sum(increase(kling_tasks_submitted_total{{{SEL}}}[24h]))",
            "short",
            0,
        ),
        4,
        4,
    )
    lay.add(
        stat(
            "Success rate (24h)",
            "Succeeded among tasks that reached a final status (succeed or failed) or "
            "ended in an error, last 24 hours.",
            f'sum(increase(kling_tasks_completed_total{{{SEL}, status="succeed"}}[24h])) / '
            f"(sum(increase(kling_tasks_completed_total{{{SEL}}}[24h])) + "
            'sum(increase(kling_task_errors_total{project=~"$project"}[24h])))',
            "percentunit",
            1,
            thresholds((RED, None), (ORANGE, 0.8), (GREEN, 0.95)),
        ),
        4,
        4,
    )
    lay.add(
        stat(
            "Credits (24h)",
            "Kling credits charged in the last 24 hours.",
            f"sum(increase(kling_credits_used_total{{{SEL}}}[24h]))",
            "short",
            0,
        ),
        4,
        4,
    )
    lay.add(
        stat(
            "Cost (24h)",
            "Dollars charged in the last 24 hours.",
            f"sum(increase(kling_cost_usd_total{{{SEL}}}[24h]))",
            "currencyUSD",
            2,
        ),
        4,
        4,
    )
    lay.add(
        stat(
            "Video seconds (24h)",
            "Seconds of video requested in the last 24 hours.",
            f"sum(increase(kling_video_seconds_total{{{SEL}}}[24h]))",
            "s",
            0,
        ),
        4,
        4,
    )
    lay.add(
        stat(
            "In flight",
            "Tasks submitted and not yet completed or failed.",
            'sum(kling_tasks_in_flight{project=~"$project"})',
            "short",
            0,
        ),
        4,
        4,
    )

    lay.row("Tasks")
    lay.add(
        timeseries(
            "Submissions per minute by model",
            "Tasks submitted per minute, by model.",
            [
                target(
                    f"sum by (model) (rate(kling_tasks_submitted_total{{{SEL}}}"
                    "[$__rate_interval])) * 60",
                    "{{model}}",
                )
            ],
            "short",
            stack=True,
        ),
        12,
        8,
    )
    lay.add(
        timeseries(
            "Completions per minute by status",
            "Tasks that reached a final Kling status, per minute.",
            [
                target(
                    f"sum by (status) (rate(kling_tasks_completed_total{{{SEL}}}"
                    "[$__rate_interval])) * 60",
                    "{{status}}",
                )
            ],
            "short",
            stack=True,
        ),
        12,
        8,
    )
    lay.add(
        timeseries(
            "Failures by reason",
            "Failed tasks (Kling status failed) and task errors by error type, per minute.",
            [
                target(
                    f'sum(rate(kling_tasks_completed_total{{{SEL}, status="failed"}}'
                    "[$__rate_interval])) * 60",
                    "status failed",
                    "A",
                ),
                target(
                    "sum by (error_type) (rate(kling_task_errors_total{project=~"
                    '"$project"}[$__rate_interval])) * 60',
                    "error: {{error_type}}",
                    "B",
                ),
            ],
            "short",
            stack=True,
        ),
        12,
        8,
    )
    lay.add(
        timeseries(
            "Generation time percentiles",
            "Time Kling took to generate succeeded tasks (from the histogram).",
            [
                target(
                    f"histogram_quantile({q}, sum by (le) (rate("
                    'kling_task_generation_seconds_bucket{model=~"$model"}'
                    "[$__rate_interval])))",
                    f"p{int(q * 100)}",
                    ref,
                )
                for q, ref in ((0.5, "A"), (0.9, "B"), (0.99, "C"))
            ],
            "s",
        ),
        12,
        8,
    )
    lay.add(
        timeseries(
            "In flight by project",
            "Tasks waiting for Kling, by project.",
            [
                target(
                    'sum by (project) (kling_tasks_in_flight{project=~"$project"})', "{{project}}"
                )
            ],
            "short",
            stack=True,
        ),
        24,
        7,
    )

    lay.row("Spending")
    lay.add(
        timeseries(
            "Credits per hour by project",
            "Credit burn rate, by project.",
            [
                target(
                    f"sum by (project) (rate(kling_credits_used_total{{{SEL}}}"
                    "[$__rate_interval])) * 3600",
                    "{{project}}",
                )
            ],
            "short",
            stack=True,
        ),
        12,
        8,
    )
    lay.add(
        timeseries(
            "Credits per hour by model",
            "Credit burn rate, by model.",
            [
                target(
                    f"sum by (model) (rate(kling_credits_used_total{{{SEL}}}"
                    "[$__rate_interval])) * 3600",
                    "{{model}}",
                )
            ],
            "short",
            stack=True,
        ),
        12,
        8,
    )
    lay.add(
        timeseries(
            "Cost per day by project",
            "Dollars per day, by project.",
            [
                target(
                    f"sum by (project) (increase(kling_cost_usd_total{{{SEL}}}[1d]))", "{{project}}"
                )
            ],
            "currencyUSD",
            stack=True,
            bars=True,
        ),
        12,
        8,
    )
    lay.add(
        timeseries(
            "Credits per day by model",
            "Credits per day, by model.",
            [
                target(
                    f"sum by (model) (increase(kling_credits_used_total{{{SEL}}}[1d]))", "{{model}}"
                )
            ],
            "short",
            stack=True,
            bars=True,
        ),
        12,
        8,
    )

    lay.row("Exporter")
    lay.add(
        timeseries(
            "Log lines read per second",
            "Lines read from the Kling logs.",
            [
                target(
                    "sum by (instance) (rate(kling_log_lines_read_total[$__rate_interval]))",
                    "{{instance}}",
                )
            ],
            "short",
        ),
        8,
        6,
    )
    lay.add(
        timeseries(
            "Invalid log lines by reason",
            "Lines skipped as invalid, per minute, by reason.",
            [
                target(
                    "sum by (reason) (rate(kling_log_lines_invalid_total[$__rate_interval])) * 60",
                    "{{reason}}",
                )
            ],
            "short",
        ),
        8,
        6,
    )
    lay.add(
        timeseries(
            "Log files watched",
            "Files matching the configured globs.",
            [target("sum by (instance) (kling_log_files_watched)", "{{instance}}")],
            "short",
        ),
        8,
        6,
    )
    return dashboard(
        "kling-overview",
        "Kling usage overview",
        "Kling AI video generation: tasks, failures, generation time and spending.",
        lay,
        [
            query_var("project", "Project", "label_values(kling_tasks_submitted_total, project)"),
            query_var(
                "model",
                "Model",
                'label_values(kling_tasks_submitted_total{project=~"$project"}, model)',
            ),
        ],
        "Kling budgets",
    )


BSEL = 'budget=~"$budget"'


TABLE_OPTIONS = {
    "showHeader": True,
    "cellHeight": "sm",
    "footer": {"show": False, "reducer": ["sum"], "fields": ""},
}


def budgets() -> dict[str, Any]:
    lay = Layout()
    lay.row("Budgets now")
    gauge_defaults = {
        "unit": "percentunit",
        "min": 0,
        "max": 1.2,
        "decimals": 1,
        "thresholds": BUDGET_STEPS,
        "color": {"mode": "thresholds"},
    }
    gauge_options = {
        "displayMode": "gradient",
        "orientation": "horizontal",
        "showUnfilled": True,
        "valueMode": "color",
        "minVizHeight": 16,
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
    }
    lay.add(
        panel(
            "bargauge",
            "Budget utilization",
            "Share of each budget used in its current period (the larger of "
            "credits and dollars), summed over every exporter. Orange from "
            f"{MIXIN['budget_warning_ratio_percent']}, red from 100%.",
            [target(f"kling:budget_utilization:ratio{{{BSEL}}}", "{{budget}} ({{period}})")],
            gauge_defaults,
            gauge_options,
        ),
        12,
        9,
    )
    columns = {
        "A": ("kling:budget_limit_credits:max", "Limit (credits)"),
        "B": ("kling:budget_used_credits:sum", "Used (credits)"),
        "C": ("kling:budget_remaining_credits:sum", "Remaining (credits)"),
        "D": ("kling:budget_limit_usd:max", "Limit (USD)"),
        "E": ("kling:budget_used_usd:sum", "Used (USD)"),
        "F": ("kling:budget_remaining_usd:sum", "Remaining (USD)"),
        "G": ("kling:budget_period_end:max", "Period ends"),
    }
    table_targets = [
        target(f"{metric}{{{BSEL}}}" + (" * 1000" if ref == "G" else ""), "", ref, instant=True)
        for ref, (metric, _) in columns.items()
    ]
    lay.add(
        panel(
            "table",
            "Budgets",
            "Limits, usage and the end of the current period of each budget.",
            table_targets,
            {"unit": "short", "decimals": 0},
            TABLE_OPTIONS,
            overrides=[
                {
                    "matcher": {"id": "byRegexp", "options": ".*\\(USD\\)"},
                    "properties": [
                        {"id": "unit", "value": "currencyUSD"},
                        {"id": "decimals", "value": 2},
                    ],
                },
                {
                    "matcher": {"id": "byName", "options": "Period ends"},
                    "properties": [{"id": "unit", "value": "dateTimeAsIso"}],
                },
            ],
            transformations=merged({ref: title for ref, (_, title) in columns.items()}),
        ),
        12,
        9,
    )

    parts = {
        "A": ("kling:budget_used_{}:sum", "Used"),
        "B": ("kling:budget_in_flight_{}:sum", "In flight"),
        "C": ("kling:budget_reserved_{}:sum", "Reserved"),
    }

    def share(metric: str) -> str:
        """Of the credit limit where a budget has one, else of the dollar limit."""
        return " or ".join(
            f"({metric.format(unit)}{{{BSEL}}} / on (budget, period) "
            f"kling:budget_limit_{unit}:max{{{BSEL}}})"
            for unit in ("credits", "usd")
        )

    lay.add(
        panel(
            "barchart",
            "Committed against the limit",
            "What pre-flight answers count against each budget, as a share of its limit "
            "(credits where it has a credit limit, else dollars): what is used, the "
            "estimate of tasks submitted and not finished (in flight), and live "
            "reservations. A worker is refused once the three would pass 100%.",
            [target(share(metric), "", ref, instant=True) for ref, (metric, _) in parts.items()],
            {
                "unit": "percentunit",
                "min": 0,
                "max": 1.2,
                "thresholds": BUDGET_STEPS,
                "color": {"mode": "palette-classic"},
                "custom": {"thresholdsStyle": {"mode": "line"}, "fillOpacity": 80},
            },
            {
                "orientation": "horizontal",
                "stacking": "normal",
                "xField": "budget",
                "showValue": "never",
                "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                "tooltip": {"mode": "multi", "sort": "none"},
            },
            transformations=merged(
                {ref: title for ref, (_, title) in parts.items()}, ("Time", "period")
            ),
        ),
        24,
        8,
    )

    lay.row("Kling resource packs")
    pack_by = "max by (pack_id, pack_name, pack_type)"
    pack_columns = {
        "A": (f"{pack_by} (kling_account_resource_pack_total_units)", "Total units"),
        "B": (f"{pack_by} (kling_account_resource_pack_remaining_units)", "Remaining units"),
        "C": (
            f"{pack_by} (kling_account_resource_pack_expiry_timestamp_seconds) * 1000",
            "Expires",
        ),
        "D": (
            f'{pack_by} (kling_account_resource_pack_status{{status="online"}})',
            "Online",
        ),
    }
    lay.add(
        panel(
            "table",
            "Resource packs",
            "Kling's resource packs as its account API reports them (with API keys "
            "configured): what each was bought with, what is left, when it expires and "
            "whether it is online. Units left at expiry are forfeited. Kling's remaining "
            "quantity lags up to 12 hours.",
            [target(expr, "", ref, instant=True) for ref, (expr, _) in pack_columns.items()],
            {"unit": "short", "decimals": 0},
            TABLE_OPTIONS,
            overrides=[
                {
                    "matcher": {"id": "byName", "options": "Expires"},
                    "properties": [{"id": "unit", "value": "dateTimeAsIso"}],
                }
            ],
            transformations=merged({ref: title for ref, (_, title) in pack_columns.items()}),
        ),
        12,
        8,
    )
    lay.add(
        timeseries(
            "Remaining units by pack",
            "Units left in each online pack, as Kling reports them: they lag up to 12 "
            "hours, so a step down may come long after the work that spent the units.",
            [
                target(
                    f"{pack_by} (kling_account_resource_pack_remaining_units) and on (pack_id) "
                    f'{pack_by} (kling_account_resource_pack_status{{status="online"}}) == 1',
                    "{{pack_name}}",
                )
            ],
            "short",
        ),
        12,
        8,
    )

    lay.row("Over time")
    lay.add(
        timeseries(
            f"Utilization with {MIXIN['budget_warning_ratio_percent']} and 100% thresholds",
            "Budget utilization over time; the orange line is "
            f"{MIXIN['budget_warning_ratio_percent']}, the red 100%.",
            [target(f"kling:budget_utilization:ratio{{{BSEL}}}", "{{budget}} ({{period}})")],
            "percentunit",
            steps=BUDGET_STEPS,
            threshold_lines=True,
        ),
        24,
        9,
    )
    lay.add(
        timeseries(
            "Forecast utilization at period end",
            "Where each budget ends its period if the last "
            f"{MIXIN['budget_burn_window_span']}'s burn rate holds.",
            [
                target(
                    f"kling:budget_forecast_utilization:ratio{{{BSEL}}}", "{{budget}} ({{period}})"
                )
            ],
            "percentunit",
            steps=BUDGET_STEPS,
            threshold_lines=True,
        ),
        12,
        8,
    )
    lay.add(
        timeseries(
            "Burn rate (credits per hour)",
            "Credits per hour charged to each budget over the last "
            f"{MIXIN['budget_burn_window_span']}.",
            [
                target(
                    f"kling:budget_burn_credits:rate{BURN}{{{BSEL}}} * 3600",
                    "{{budget}} ({{period}})",
                )
            ],
            "short",
        ),
        12,
        8,
    )
    remaining = timeseries(
        "Remaining",
        "Credits (left axis) and dollars (right axis) left in each budget's "
        "current period, for the limits each budget has.",
        [
            target(
                f"kling:budget_remaining_credits:sum{{{BSEL}}}",
                "{{budget}} ({{period}}) credits",
                "A",
            ),
            target(f"kling:budget_remaining_usd:sum{{{BSEL}}}", "{{budget}} ({{period}}) USD", "B"),
        ],
        "short",
    )
    remaining["fieldConfig"]["overrides"] = [
        {
            "matcher": {"id": "byFrameRefID", "options": "B"},
            "properties": [
                {"id": "unit", "value": "currencyUSD"},
                {"id": "custom.axisPlacement", "value": "right"},
            ],
        }
    ]
    lay.add(remaining, 12, 8)
    lay.add(
        panel(
            "table",
            "Budget alerts firing",
            "Kling alerts that are firing now.",
            [target('ALERTS{alertname=~"Kling.*", alertstate="firing"}', "", "A", instant=True)],
            {},
            TABLE_OPTIONS,
            transformations=[
                {
                    "id": "organize",
                    "options": {
                        "excludeByName": {
                            "Time": True,
                            "Value": True,
                            "__name__": True,
                            "alertstate": True,
                        }
                    },
                }
            ],
        ),
        12,
        8,
    )
    return dashboard(
        "kling-budgets",
        "Kling budgets",
        f"Kling budgets: utilization against the {MIXIN['budget_warning_ratio_percent']} and "
        "100% thresholds, forecast and burn.",
        lay,
        [query_var("budget", "Budget", "label_values(kling_budget_info, budget)")],
        "Kling usage overview",
    )


DASHBOARDS = {"kling-overview.json": overview, "kling-budgets.json": budgets}


def render() -> dict[str, str]:
    return {name: json.dumps(build(), indent=2) + "\n" for name, build in DASHBOARDS.items()}


def main(argv: list[str]) -> int:
    rendered = render()
    if "--check" in argv:
        stale = [
            n
            for n, text in rendered.items()
            if not (OUT / n).exists() or (OUT / n).read_text() != text
        ]
        if stale:
            print(f"out of date: {', '.join(stale)}; run python grafana/build_dashboards.py")
            return 1
        return 0
    OUT.mkdir(exist_ok=True)
    for name, text in rendered.items():
        (OUT / name).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
