"""The Grafana dashboards: their structure, and every query run against a real Prometheus
that scrapes the exporter fed with realistic traffic."""

from __future__ import annotations

import functools
import itertools
import json
import re
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kling_exporter.demo import (
    DEMO_KEYS,
    DemoTraffic,
    GatewayTraffic,
    demo_account,
    demo_config,
    demo_gateway,
)
from kling_exporter.kling.standin import KlingStandIn, demo_packs

from tests.helpers import ROOT, free_port, wait_until
from tests.stack import InProcessExporter, Process, prometheus

DASHBOARDS = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
VAR_RE = re.compile(r"\$(\w+)|\$\{(\w+)\}")
LABEL_VALUES_RE = re.compile(r"^label_values\((?:(.+),\s*)?(\w+)\)$")


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dash["panels"] if p["type"] != "row"]


def test_two_dashboards_with_stable_unique_uids() -> None:
    uids = [load(p)["uid"] for p in DASHBOARDS]
    assert sorted(uids) == ["kling-budgets", "kling-overview"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_structure(path: Path) -> None:
    dash = load(path)
    assert dash["schemaVersion"] >= 39
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        area = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not area & cells, f"{p['title']} overlaps another panel"
        cells |= area
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for p in panels(dash):
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p.get("description"), f"{p['title']} has no description"
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
            for a, b in VAR_RE.findall(t["expr"]):
                name = a or b
                assert name in variables or name.startswith("__"), f"unknown ${name}"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
    for name, var in variables.items():
        if var["type"] == "query":
            assert var["multi"] and var["includeAll"], name
            assert var["datasource"]["uid"] == "${datasource}"
            assert LABEL_VALUES_RE.match(var["query"]["query"]), name


def test_budget_panels_draw_80_and_100_percent_in_orange_and_red() -> None:
    dash = load(ROOT / "grafana" / "dashboards" / "kling-budgets.json")
    util = next(p for p in panels(dash) if p["title"].startswith("Utilization with"))
    steps = util["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert [(s["color"], s["value"]) for s in steps] == [
        ("green", None),
        ("orange", 0.8),
        ("red", 1.0),
    ]
    assert util["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"] != "off"
    assert util["fieldConfig"]["defaults"]["unit"] == "percentunit"


def test_provisioning_files_point_at_the_dashboards() -> None:
    prov = ROOT / "grafana" / "provisioning"
    providers = yaml.safe_load((prov / "dashboards" / "kling.yml").read_text())["providers"]
    assert providers[0]["type"] == "file" and providers[0]["options"]["path"]
    sources = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())
    assert sources["datasources"][0]["type"] == "prometheus"


# -- against a real Prometheus -------------------------------------------------------------


def _api(prom: Process, path: str, **params: str) -> Any:
    return prom.api(f"{path}?{urllib.parse.urlencode(params)}")


def _label_values(prom: Process, query: str, values: dict[str, str]) -> list[str]:
    match = LABEL_VALUES_RE.match(_substitute(query, values))
    assert match, query
    selector, label = match.groups()
    params = {"match[]": selector} if selector else {}
    return list(_api(prom, f"/api/v1/label/{label}/values", **params)["data"])


def _substitute(expr: str, values: dict[str, str]) -> str:
    fixed = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h"}
    return VAR_RE.sub(lambda m: {**fixed, **values}[m.group(1) or m.group(2)], expr)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    workdir = tmp_path_factory.mktemp("dashboards")
    logs = workdir / "logs"
    traffic = DemoTraffic(logs, rate=0.5, seed=11)
    traffic.backfill(3600)
    traffic.rate = 3.0
    traffic.start()
    # With the demo's Kling stand-in, so that the resource-pack panels have data too.
    # The stand-in is served on the exporter's own port here, and its gateway passes
    # a producer's calls on to it, so that the gateway's panels have data too.
    port = free_port()
    account = demo_account(port, workdir / "keys")
    standin = KlingStandIn(*DEMO_KEYS, demo_packs(time.time()))
    config = demo_config(logs, account, demo_gateway(port))
    exporter = InProcessExporter(config, port=port, standin=standin).start()
    producer = GatewayTraffic(f"{exporter.url}/kling", every=0.5)
    producer.start()
    try:
        with prometheus(workdir, [f"127.0.0.1:{exporter.port}"]) as prom:
            yield prom
    finally:
        traffic.stop.set()
        producer.close()
        exporter.stop()


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_query_returns_series_from_a_real_prometheus(stack: Process, path: Path) -> None:
    dash = load(path)
    # Variables in their order, each from its real values (two, as a multi-select).
    values: dict[str, str] = {}
    for var in dash["templating"]["list"]:
        if var["type"] != "query":
            continue
        query: str = var["query"]["query"]
        found: list[str] = wait_until(
            functools.partial(_label_values, stack, query, dict(values)), timeout=30
        )
        values[var["name"]] = "|".join(sorted(found)[:2])
    # Every query of every panel has data with All selected; a selection may hold only
    # dollar budgets, so there every panel shows something from one of its queries.
    _assert_data(stack, dash, values, every_query=False)
    _assert_data(stack, dash, {k: ".*" for k in values}, every_query=True)


def _assert_data(
    stack: Process, dash: dict[str, Any], values: dict[str, str], every_query: bool
) -> None:
    exprs = [
        (p["title"], _substitute(t["expr"], values)) for p in panels(dash) for t in p["targets"]
    ]

    def empty(exprs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        out = []
        for title, expr in exprs:
            answer = _api(stack, "/api/v1/query", query=expr)
            assert answer["status"] == "success", (title, expr)
            if not answer["data"]["result"]:
                out.append((title, expr))
        return out

    def blank_panels(left: list[tuple[str, str]]) -> set[str]:
        has_data = {title for title, expr in exprs if (title, expr) not in left}
        return {title for title, _ in left} - has_data

    left = empty(exprs)
    deadline = time.monotonic() + 60
    while (left if every_query else blank_panels(left)) and time.monotonic() < deadline:
        time.sleep(1)
        left = empty(left)
    if every_query:
        assert not left, f"queries without data: {left}"
    else:
        assert not blank_panels(left), f"panels without data for {values}: {blank_panels(left)}"


def test_variable_values_are_real(stack: Process) -> None:
    overview = load(ROOT / "grafana" / "dashboards" / "kling-overview.json")
    queries = {
        v["name"]: v["query"]["query"]
        for v in overview["templating"]["list"]
        if v["type"] == "query"
    }
    projects = wait_until(lambda: _label_values(stack, queries["project"], {}), timeout=30)
    assert set(projects) == {"marketing", "product", "research", "sales", "support"}
    models = _label_values(stack, queries["model"], {"project": "marketing"})
    assert set(models) <= {"kling-v2-6", "kling-v2-5-turbo", "kling-v1-6", "kling-v1"}
    assert list(itertools.islice(models, 1))
