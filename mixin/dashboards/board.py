"""The envelope of a dashboard: its settings, variables and links around the panels."""

from __future__ import annotations

from typing import Any

from mixin.dashboards.layout import Layout
from mixin.dashboards.queries import DS

SCHEMA_VERSION = 39
Variable = dict[str, Any]


def query_var(name: str, label: str, query: str) -> Variable:
    """A multi-select variable of a query's label values, All by default."""
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


def datasource_var() -> Variable:
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


ANNOTATIONS = {
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
}


def link_to_the_others(title: str) -> dict[str, Any]:
    """A link, titled ``title``, to the other dashboards tagged kling."""
    return {
        "type": "dashboards",
        "tags": ["kling"],
        "title": title,
        "asDropdown": False,
        "includeVars": False,
        "keepTime": True,
        "targetBlank": False,
        "icon": "external link",
        "tooltip": "",
        "url": "",
    }


def dashboard(
    uid: str,
    title: str,
    description: str,
    layout: Layout,
    variables: list[Variable],
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
        "annotations": ANNOTATIONS,
        "links": [link_to_the_others(links_to)],
        "templating": {"list": [datasource_var(), *variables]},
        "panels": layout.panels,
    }
