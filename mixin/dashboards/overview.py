"""Kling usage overview: today at a glance, then tasks, spending and the exporter's own
health, a row each; filtered by project and model."""

from __future__ import annotations

from typing import Any

from mixin.dashboards.board import dashboard, query_var
from mixin.dashboards.layout import Layout, Panel
from mixin.dashboards.panels import (
    GREEN,
    LINES,
    ORANGE,
    RED,
    STACKED,
    Look,
    stat,
    thresholds,
    timeseries,
)
from mixin.dashboards.queries import target

SEL = 'project=~"$project", model=~"$model"'
PROJECT = 'project=~"$project"'


def _last_24h(metric: str) -> str:
    return f"sum(increase({metric}{{{SEL}}}[24h]))"


def _per_minute(metric: str, by: str, selector: str = SEL) -> str:
    return f"sum by ({by}) (rate({metric}{{{selector}}}[$__rate_interval])) * 60"


def _per_hour(metric: str, by: str) -> str:
    return f"sum by ({by}) (rate({metric}{{{SEL}}}[$__rate_interval])) * 3600"


def _per_day(metric: str, by: str) -> str:
    return f"sum by ({by}) (increase({metric}{{{SEL}}}[1d]))"


def at_a_glance(lay: Layout) -> None:
    lay.row("Today at a glance")
    success_rate = (
        f'sum(increase(kling_tasks_completed_total{{{SEL}, status="succeed"}}[24h])) / '
        f"({_last_24h('kling_tasks_completed_total')} + "
        f"sum(increase(kling_task_errors_total{{{PROJECT}}}[24h])))"
    )
    stats = [
        stat(
            "Tasks submitted (24h)",
            "Tasks submitted to Kling in the last 24 hours.",
            _last_24h("kling_tasks_submitted_total"),
            "short",
            0,
        ),
        stat(
            "Success rate (24h)",
            "Succeeded among tasks that reached a final status (succeed or failed) or "
            "ended in an error, last 24 hours.",
            success_rate,
            "percentunit",
            1,
            thresholds((RED, None), (ORANGE, 0.8), (GREEN, 0.95)),
        ),
        stat(
            "Credits (24h)",
            "Kling credits charged in the last 24 hours.",
            _last_24h("kling_credits_used_total"),
            "short",
            0,
        ),
        stat(
            "Cost (24h)",
            "Dollars charged in the last 24 hours.",
            _last_24h("kling_cost_usd_total"),
            "currencyUSD",
            2,
        ),
        stat(
            "Video seconds (24h)",
            "Seconds of video requested in the last 24 hours.",
            _last_24h("kling_video_seconds_total"),
            "s",
            0,
        ),
        stat(
            "In flight",
            "Tasks submitted and not yet completed or failed.",
            f"sum(kling_tasks_in_flight{{{PROJECT}}})",
            "short",
            0,
        ),
    ]
    for panel in stats:
        lay.add(panel, 4, 4)


def _series_by(
    label: str,
    title: str,
    description: str,
    expr: str,
    unit: str = "short",
    look: Look = LINES,
) -> Panel:
    """A time series of one query, a series per value of ``label``."""
    legend = f"{{{{{label}}}}}"
    return timeseries(title, description, [target(expr, legend)], unit, look)


def tasks(lay: Layout) -> None:
    lay.row("Tasks")
    lay.add(
        _series_by(
            "model",
            "Submissions per minute by model",
            "Tasks submitted per minute, by model.",
            _per_minute("kling_tasks_submitted_total", "model"),
            look=STACKED,
        ),
        12,
        8,
    )
    lay.add(
        _series_by(
            "status",
            "Completions per minute by status",
            "Tasks that reached a final Kling status, per minute.",
            _per_minute("kling_tasks_completed_total", "status"),
            look=STACKED,
        ),
        12,
        8,
    )
    lay.add(failures_by_reason(), 12, 8)
    lay.add(generation_time_percentiles(), 12, 8)
    lay.add(
        _series_by(
            "project",
            "In flight by project",
            "Tasks waiting for Kling, by project.",
            f"sum by (project) (kling_tasks_in_flight{{{PROJECT}}})",
            look=STACKED,
        ),
        24,
        7,
    )


def failures_by_reason() -> Panel:
    return timeseries(
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
                _per_minute("kling_task_errors_total", "error_type", PROJECT),
                "error: {{error_type}}",
                "B",
            ),
        ],
        "short",
        look=STACKED,
    )


def generation_time_percentiles() -> Panel:
    return timeseries(
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
    )


def spending(lay: Layout) -> None:
    lay.row("Spending")
    for by in ("project", "model"):
        lay.add(
            _series_by(
                by,
                f"Credits per hour by {by}",
                f"Credit burn rate, by {by}.",
                _per_hour("kling_credits_used_total", by),
                look=STACKED,
            ),
            12,
            8,
        )
    per_day = [
        (
            "project",
            "Cost per day by project",
            "Dollars per day, by project.",
            "kling_cost_usd_total",
            "currencyUSD",
        ),
        (
            "model",
            "Credits per day by model",
            "Credits per day, by model.",
            "kling_credits_used_total",
            "short",
        ),
    ]
    for by, title, description, metric, unit in per_day:
        lay.add(
            _series_by(
                by, title, description, _per_day(metric, by), unit, Look(stack=True, bars=True)
            ),
            12,
            8,
        )


def exporter(lay: Layout) -> None:
    lay.row("Exporter")
    health = [
        (
            "instance",
            "Log lines read per second",
            "Lines read from the Kling logs.",
            "sum by (instance) (rate(kling_log_lines_read_total[$__rate_interval]))",
        ),
        (
            "reason",
            "Invalid log lines by reason",
            "Lines skipped as invalid, per minute, by reason.",
            "sum by (reason) (rate(kling_log_lines_invalid_total[$__rate_interval])) * 60",
        ),
        (
            "instance",
            "Log files watched",
            "Files matching the configured globs.",
            "sum by (instance) (kling_log_files_watched)",
        ),
    ]
    for label, title, description, expr in health:
        lay.add(_series_by(label, title, description, expr), 8, 6)


def gateway(lay: Layout) -> None:
    """What passes through the gateway (gateway.enabled): empty where it is off."""
    lay.row("Gateway")
    rate = 'rate(kling_gateway_requests_total{route="%s"}[$__rate_interval])'
    panels = [
        _series_by(
            "outcome",
            "Task creations through the gateway by outcome",
            "Create requests a second: forwarded to Kling, refused by a budget (429, not "
            "sent to Kling), answered with Kling's error, or not reaching Kling (502/504).",
            f"sum by (outcome) ({rate % 'create'})",
            "reqps",
            STACKED,
        ),
        _series_by(
            "route",
            "Gateway requests by route",
            "Requests a second through the gateway: task creations, task queries, and "
            "every other path passed through.",
            "sum by (route) (rate(kling_gateway_requests_total[$__rate_interval]))",
            "reqps",
            STACKED,
        ),
        _series_by(
            "route",
            "Kling's answer time through the gateway, p99",
            "99th percentile of the time Kling took to answer what the gateway sent on, by route.",
            "histogram_quantile(0.99, sum by (le, route) "
            "(rate(kling_gateway_upstream_duration_seconds_bucket[$__rate_interval])))",
            "s",
        ),
    ]
    for panel in panels:
        lay.add(panel, 8, 8)


def overview() -> dict[str, Any]:
    lay = Layout()
    for row in (at_a_glance, tasks, spending, gateway, exporter):
        row(lay)
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
                f"label_values(kling_tasks_submitted_total{{{PROJECT}}}, model)",
            ),
        ],
        "Kling budgets",
    )
