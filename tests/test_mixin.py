"""The rules, alerts and dashboards come from one config (mixin/config.yml): what is
committed is what it gives, every knob is used, and a changed knob changes them."""

from __future__ import annotations

import re

import pytest
import yaml

from mixin import build
from mixin.config import config, values
from tests.helpers import ROOT


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
