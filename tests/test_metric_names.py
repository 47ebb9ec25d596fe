"""Every metric name that the rules, the dashboards, the README and the pages of docs/ use
is one the exporter serves, and docs/metrics.md lists every metric it serves."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from kling_exporter.accounting.metrics import METRICS
from kling_exporter.budgets import Budgets, DayUsage
from kling_exporter.collector import Family
from kling_exporter.config import Config, FleetConfig, GatewayConfig
from kling_exporter.guard.fleet import Fleet
from kling_exporter.guard.reservations import Reservations
from kling_exporter.kling.account import Account
from kling_exporter.serving.callbacks import Callbacks
from kling_exporter.serving.gateway import Gateway
from kling_exporter.serving.metrics import SIDE_METRICS, Side, side_families
from kling_exporter.serving.server import side_of
from kling_exporter.views import View

from tests.helpers import collector_of, render_fixed_log

ROOT = Path(__file__).resolve().parent.parent
NAME = re.compile(r"\bkling_[a-z0-9_]+")


def served() -> set[str]:
    """Every sample name of a scrape: the reader's families and the HTTP process's."""
    names = set()
    for line in render_fixed_log().decode().splitlines():
        if line.startswith("# TYPE "):  # families without samples too
            names.add(line.split()[2])
        elif line.startswith("kling_"):
            names.add(line.split("{")[0].split(" ")[0])
    for f in http_process_families():
        if f.type == "histogram":
            names.update(f.name + suffix for suffix in ("_bucket", "_count", "_sum"))
        else:
            names.add(f.name + "_total" if f.type == "counter" else f.name)
    return names


def every_feature_on() -> Side:
    """The HTTP side with Kling's account (keys in the environment), a fleet (a Redis
    URL) and the gateway configured, so that every family is shown."""
    in_fleet = Config(fleet=FleetConfig(redis_url="redis://127.0.0.1:6379/0"))
    held = Reservations()
    fleet = Fleet(lambda: in_fleet, held, lambda: View(Budgets(in_fleet), {}, DayUsage()), bool)
    gateway_on = Config(gateway=GatewayConfig(enabled=True))
    gateway = Gateway(lambda: gateway_on, fleet.view, held, fleet, Callbacks(Config))
    return side_of([], held, Callbacks(Config), Account(Config), fleet, gateway)


def http_process_families(samples: bool = True) -> list[Family]:
    """The families the HTTP process adds to the reader's scrape, every feature on."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("KLING_ACCESS_KEY", "access")
        env.setenv("KLING_SECRET_KEY", "secret")
        found = side_families(every_feature_on(), samples)
    assert {spec.name for spec in SIDE_METRICS} == {f.name for f in found}
    return found


def families(names: set[str]) -> set[str]:
    """The family names of these sample names (``_bucket``, ``_count`` and ``_sum`` of a
    histogram belong to it)."""
    return {re.sub(r"_(bucket|count|sum)$", "", n) for n in names} | names


USERS = sorted(
    [
        *(ROOT / "alerts").glob("*.yml"),
        *(ROOT / "alerts" / "tests").glob("*.yml"),
        *(ROOT / "grafana" / "dashboards").glob("*.json"),
        *(ROOT / "examples" / "kubernetes").glob("*.yaml"),
        *(ROOT / "docs").glob("*.md"),
        ROOT / "README.md",
        ROOT / "MIGRATING.md",
    ]
)


def test_the_pattern_finds_the_names_in_use() -> None:
    used = set().union(*(NAME.findall(p.read_text()) for p in USERS))
    assert {"kling_budget_used_credits", "kling_task_generation_seconds_bucket"} <= used


@pytest.mark.parametrize("path", USERS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_metric_name_used_is_served(path: Path) -> None:
    known = families(served())
    used = set(NAME.findall(path.read_text()))
    unknown = used - known - {"kling_exporter"}  # the package's name, in imports
    assert not unknown, f"{path.name} uses metrics the exporter does not serve: {unknown}"


def test_the_metrics_page_lists_every_metric_served() -> None:
    listed = set(NAME.findall((ROOT / "docs" / "metrics.md").read_text()))
    missing = {
        name
        for name in families(served())
        if not re.search(r"_(bucket|count|sum)$", name) and name not in listed
    }
    # The page writes `..._end_...` for the pair of period bound gauges.
    missing.discard("kling_budget_period_end_timestamp_seconds")
    assert not missing, f"served but not in docs/metrics.md: {sorted(missing)}"


def test_the_collector_describes_the_table_without_reading() -> None:
    def never() -> Any:
        raise AssertionError("describe must not read the ledger")

    described = {m.name for m in collector_of(never).describe()}
    assert described == {spec.name for spec in METRICS}
    # What a scrape serves is exactly what is described (counters gain _total).
    serves = {re.sub(r"_(total|bucket|count|sum)$", "", n) for n in served()}
    assert described == serves - {f.name for f in http_process_families()}


def test_the_http_process_describes_what_it_serves() -> None:
    described = http_process_families(samples=False)
    assert [(f.name, f.type, f.labels) for f in described] == [
        (f.name, f.type, f.labels) for f in http_process_families()
    ]
    assert all(not f.samples for f in described)
