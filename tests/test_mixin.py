"""The rules, alerts and dashboards come from one config (mixin/config.yml): what is
committed is what it gives, every knob is used, and a changed knob changes them."""

from __future__ import annotations

import ast
import graphlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mixin import build
from mixin.config import config, values
from tests.helpers import ROOT

# What writes the generated files: the mixin's own build, the dashboards' source and
# entry point, and the Kubernetes resources.
GENERATORS = [
    *sorted((ROOT / "mixin").glob("*.py")),
    ROOT / "grafana" / "build_dashboards.py",
    *sorted((ROOT / "mixin" / "dashboards").glob("*.py")),
    ROOT / "examples" / "kubernetes" / "build.py",
]


def test_the_committed_rules_are_what_the_mixin_gives() -> None:
    """The rule files; the dashboards and the Kubernetes resources, which the mixin's
    build also writes, are checked by their own tests."""
    for path, text in build.rules().items():
        assert path.read_text() == text, f"{path.name} differs from mixin/; run `make mixin`"


def test_every_knob_is_used() -> None:
    templates = [t.read_text() for t in build.OUTPUTS]
    dashboards = [p.read_text() for p in (ROOT / "mixin" / "dashboards").glob("*.py")]
    used = set().union(*(re.findall(r"@([a-z0-9_]+)@", t) for t in templates))
    for text in dashboards:
        used |= set(re.findall(r"MIXIN\[[\'\"]([a-z0-9_]+)[\'\"]\]", text))
    knobs = set(config())
    unused = {k for k in knobs if not any(u == k or u.startswith(k + "_") for u in used)}
    assert not unused, f"knobs in mixin/config.yml that nothing reads: {unused}"


def test_a_changed_knob_changes_the_expressions_and_the_words() -> None:
    changed = {
        **config(),
        "selector": 'job="kling"',
        "failure_ratio": 0.3,
        "failure_window": "30m",
        "errors_factor": 2,
        "exporter_down_for": "1h",
    }
    alerts = yaml.safe_load(build.rules(changed)[ROOT / "alerts" / "kling.alerts.yml"])
    rules = {r["alert"]: r for g in alerts["groups"] for r in g["rules"] if "alert" in r}
    down = rules["KlingExporterDown"]
    assert down["expr"].strip() == 'up{job="kling"} == 0' and down["for"] == "1h"
    assert "for 1 hour." in down["annotations"]["description"]
    failing = rules["KlingHighFailureRate"]
    assert "kling:task_failure:ratio30m > 0.3" in failing["expr"]
    assert "* 1800 >= 10" in failing["expr"]
    assert "threshold 30%" in failing["annotations"]["description"]
    assert "last 30 minutes" in failing["annotations"]["description"]
    assert (
        "more than twice its usual rate" in rules["KlingErrorsSpike"]["annotations"]["description"]
    )
    recorded = yaml.safe_load(build.rules(changed)[ROOT / "alerts" / "kling.rules.yml"])
    names = {r["record"] for g in recorded["groups"] for r in g["rules"]}
    assert "kling:task_failure:ratio30m" in names  # the alert reads what is recorded


def test_an_unknown_placeholder_is_refused() -> None:
    with pytest.raises(SystemExit, match=r"@nope@ is not in config\.yml"):
        build.render("x @nope@", values(config()), "alerts.yml")


def test_the_example_scrape_jobs_are_the_selectors() -> None:
    job = re.fullmatch(r'job="([^"]+)"', config()["selector"])
    assert job, "the selector names the job"
    for path in (
        ROOT / "examples" / "prometheus.yml",
        ROOT / "examples" / "compose" / "prometheus.yml",
        ROOT / "examples" / "compose" / "fleet" / "prometheus.yml",
    ):
        jobs = [c["job_name"] for c in yaml.safe_load(path.read_text())["scrape_configs"]]
        assert job.group(1) in jobs, path


@pytest.mark.parametrize(
    "script", ["mixin/build.py", "grafana/build_dashboards.py", "examples/kubernetes/build.py"]
)
def test_the_committed_files_are_what_each_command_writes(script: str) -> None:
    """Run as the Makefile runs them, scripts from the checkout: mixin/build.py checks
    all the generated files, the other two theirs."""
    result = subprocess.run(
        [sys.executable, str(ROOT / script), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _module(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _imports(path: Path) -> set[str]:
    """The modules a file imports, by plain import statements."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_the_generators_import_one_way() -> None:
    """The config is the source, the dashboards read it and the mixin's build calls the
    builders: plain imports, no importlib (which hides a circle from every reader), and
    no circle."""
    modules = {_module(p): p for p in GENERATORS}
    graph = {}
    for name, path in modules.items():
        imported = _imports(path)
        assert not {i for i in imported if i.split(".")[0] == "importlib"}, path.name
        graph[name] = {i for i in imported if i in modules and i != name}
    order = list(graphlib.TopologicalSorter(graph).static_order())  # raises on a circle
    assert order.index("mixin.config") < order.index("mixin.dashboards.knobs")
    assert order.index("mixin.dashboards.files") < order.index("mixin.build")
    assert not graph["mixin.config"], "the config reads no builder"
