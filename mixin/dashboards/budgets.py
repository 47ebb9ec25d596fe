"""Kling budgets: each budget now (utilization, limits and what is committed against
them), Kling's resource packs, and the budgets over time with their forecast, burn and
alerts; filtered by budget. It reads the recording rules of alerts/kling.rules.yml."""

from __future__ import annotations

from typing import Any

from mixin.dashboards.board import dashboard, query_var
from mixin.dashboards.knobs import BURN_SPAN, BURN_WINDOW, WARNING_PERCENT
from mixin.dashboards.layout import Layout
from mixin.dashboards.panels import (
    BUDGET_STEPS,
    Look,
    joined_table,
    labels_table,
    override,
    ratio_barchart,
    ratio_bargauge,
    timeseries,
)
from mixin.dashboards.queries import Columns, target

BSEL = 'budget=~"$budget"'
BY_BUDGET = "{{budget}} ({{period}})"
PACK_BY = "max by (pack_id, pack_name, pack_type)"
ONLINE_PACKS = f'{PACK_BY} (kling_account_resource_pack_status{{status="online"}})'


def _budget(metric: str) -> str:
    return f"{metric}{{{BSEL}}}"


def _share_of_limit(metric: str) -> str:
    """Of the credit limit where a budget has one, else of the dollar limit."""
    return " or ".join(
        f"({_budget(metric.format(unit))} / on (budget, period) "
        f"{_budget(f'kling:budget_limit_{unit}:max')})"
        for unit in ("credits", "usd")
    )


def budgets_now(lay: Layout) -> None:
    lay.row("Budgets now")
    lay.add(
        ratio_bargauge(
            "Budget utilization",
            "Share of each budget used in its current period (the larger of "
            "credits and dollars), summed over every exporter. Orange from "
            f"{WARNING_PERCENT}, red from 100%.",
            [target(_budget("kling:budget_utilization:ratio"), BY_BUDGET)],
        ),
        12,
        9,
    )
    lay.add(budgets_table(), 12, 9)
    lay.add(
        ratio_barchart(
            "Committed against the limit",
            "What pre-flight answers count against each budget, as a share of its limit "
            "(credits where it has a credit limit, else dollars): what is used, the "
            "estimate of tasks submitted and not finished (in flight), and live "
            "reservations. A worker is refused once the three would pass 100%.",
            {
                "A": (_share_of_limit("kling:budget_used_{}:sum"), "Used"),
                "B": (_share_of_limit("kling:budget_in_flight_{}:sum"), "In flight"),
                "C": (_share_of_limit("kling:budget_reserved_{}:sum"), "Reserved"),
            },
            x_field="budget",
        ),
        24,
        8,
    )


def budgets_table() -> dict[str, Any]:
    columns: Columns = {
        "A": (_budget("kling:budget_limit_credits:max"), "Limit (credits)"),
        "B": (_budget("kling:budget_used_credits:sum"), "Used (credits)"),
        "C": (_budget("kling:budget_remaining_credits:sum"), "Remaining (credits)"),
        "D": (_budget("kling:budget_limit_usd:max"), "Limit (USD)"),
        "E": (_budget("kling:budget_used_usd:sum"), "Used (USD)"),
        "F": (_budget("kling:budget_remaining_usd:sum"), "Remaining (USD)"),
        "G": (_budget("kling:budget_period_end:max") + " * 1000", "Period ends"),
    }
    return joined_table(
        "Budgets",
        "Limits, usage and the end of the current period of each budget.",
        columns,
        [
            override("byRegexp", ".*\\(USD\\)", ("unit", "currencyUSD"), ("decimals", 2)),
            override("byName", "Period ends", ("unit", "dateTimeAsIso")),
        ],
    )


def resource_packs(lay: Layout) -> None:
    lay.row("Kling resource packs")
    columns: Columns = {
        "A": (f"{PACK_BY} (kling_account_resource_pack_total_units)", "Total units"),
        "B": (f"{PACK_BY} (kling_account_resource_pack_remaining_units)", "Remaining units"),
        "C": (
            f"{PACK_BY} (kling_account_resource_pack_expiry_timestamp_seconds) * 1000",
            "Expires",
        ),
        "D": (ONLINE_PACKS, "Online"),
    }
    lay.add(
        joined_table(
            "Resource packs",
            "Kling's resource packs as its account API reports them (with API keys "
            "configured): what each was bought with, what is left, when it expires and "
            "whether it is online. Units left at expiry are forfeited. Kling's remaining "
            "quantity lags up to 12 hours.",
            columns,
            [override("byName", "Expires", ("unit", "dateTimeAsIso"))],
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
                    f"{PACK_BY} (kling_account_resource_pack_remaining_units) and on (pack_id) "
                    f"{ONLINE_PACKS} == 1",
                    "{{pack_name}}",
                )
            ],
            "short",
        ),
        12,
        8,
    )


def over_time(lay: Layout) -> None:
    lay.row("Over time")
    lay.add(
        timeseries(
            f"Utilization with {WARNING_PERCENT} and 100% thresholds",
            f"Budget utilization over time; the orange line is {WARNING_PERCENT}, the red 100%.",
            [target(_budget("kling:budget_utilization:ratio"), BY_BUDGET)],
            "percentunit",
            steps=BUDGET_STEPS,
            look=Look(threshold_lines=True),
        ),
        24,
        9,
    )
    lay.add(
        timeseries(
            "Forecast utilization at period end",
            f"Where each budget ends its period if the last {BURN_SPAN}'s burn rate holds.",
            [target(_budget("kling:budget_forecast_utilization:ratio"), BY_BUDGET)],
            "percentunit",
            steps=BUDGET_STEPS,
            look=Look(threshold_lines=True),
        ),
        12,
        8,
    )
    lay.add(
        timeseries(
            "Burn rate (credits per hour)",
            f"Credits per hour charged to each budget over the last {BURN_SPAN}.",
            [
                target(
                    _budget(f"kling:budget_burn_credits:rate{BURN_WINDOW}") + " * 3600", BY_BUDGET
                )
            ],
            "short",
        ),
        12,
        8,
    )
    lay.add(
        timeseries(
            "Remaining",
            "Credits (left axis) and dollars (right axis) left in each budget's "
            "current period, for the limits each budget has.",
            [
                target(_budget("kling:budget_remaining_credits:sum"), f"{BY_BUDGET} credits", "A"),
                target(_budget("kling:budget_remaining_usd:sum"), f"{BY_BUDGET} USD", "B"),
            ],
            "short",
            overrides=[
                override(
                    "byFrameRefID",
                    "B",
                    ("unit", "currencyUSD"),
                    ("custom.axisPlacement", "right"),
                )
            ],
        ),
        12,
        8,
    )
    lay.add(
        labels_table(
            "Budget alerts firing",
            "Kling alerts that are firing now.",
            'ALERTS{alertname=~"Kling.*", alertstate="firing"}',
            hidden=("Time", "Value", "__name__", "alertstate"),
        ),
        12,
        8,
    )


def budgets() -> dict[str, Any]:
    lay = Layout()
    for row in (budgets_now, resource_packs, over_time):
        row(lay)
    return dashboard(
        "kling-budgets",
        "Kling budgets",
        f"Kling budgets: utilization against the {WARNING_PERCENT} and "
        "100% thresholds, forecast and burn.",
        lay,
        [query_var("budget", "Budget", "label_values(kling_budget_info, budget)")],
        "Kling usage overview",
    )
