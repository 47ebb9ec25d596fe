"""The shipped examples work as written: the sample config is the defaults, and the
Prometheus (and Alertmanager) configs under examples/ pass their own tools' checks."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import msgspec
import yaml
from kling_exporter.config import BudgetConfig, Config
from kling_exporter.configfile import load_config, parse_config

from tests.helpers import ROOT, require_binary

EXAMPLE_CONFIG = ROOT / "kling.example.yml"


def test_the_sample_config_is_the_defaults() -> None:
    assert load_config(EXAMPLE_CONFIG) == Config()


def test_the_configuration_page_shows_the_sample_config() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text()
    section = page.split("\n## The sample config\n", 1)[1]
    shown = section.split("```yaml\n", 1)[1].split("```\n", 1)[0]
    sample = EXAMPLE_CONFIG.read_text()
    assert shown == sample[sample.index("logs:\n") :]


def _missing_keys(data: Any, struct: type[msgspec.Struct], where: str) -> list[str]:
    """Keys of ``struct`` (and of the structs inside it) that ``data`` does not show."""
    missing = [f"{where}{name}" for name in struct.__struct_fields__ if name not in data]
    for name, kind in zip(struct.__struct_fields__, msgspec.structs.fields(struct), strict=True):
        inner = kind.type
        if isinstance(inner, type) and issubclass(inner, msgspec.Struct) and name in data:
            missing += _missing_keys(data[name], inner, f"{where}{name}.")
    return missing


def test_the_sample_config_shows_every_key() -> None:
    data = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    assert _missing_keys(data, Config, "") == []
    # The one list without a default entry shows one, commented, with every key.
    text = EXAMPLE_CONFIG.read_text()
    block = text.split("# No budgets by default.", 1)[1].split("\nbudgets: []", 1)[0]
    commented = "\n".join(line.removeprefix("#  ") for line in block.splitlines()[1:])
    budget = yaml.safe_load(commented)[0]
    assert set(budget) == set(BudgetConfig.__struct_fields__)
    assert parse_config({"budgets": [budget]}).budgets[0].name == "marketing"


def _configs(is_kind: Any) -> list[Path]:
    """The YAML files under examples/ that ``is_kind`` recognises, but compose's: those
    name the paths they are mounted at inside their containers, and the compose tests
    check them with those paths mapped."""
    found = []
    for path in sorted((ROOT / "examples").rglob("*.y*ml")):
        if "compose" in path.relative_to(ROOT / "examples").parts:
            continue
        data = yaml.safe_load(path.read_text())
        if isinstance(data, dict) and is_kind(data):
            found.append(path)
    return found


def _run(*command: str) -> None:
    """A check as a user runs it from the checkout's top level."""
    result = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"{' '.join(command)}: {result.stdout}{result.stderr}"


def test_the_prometheus_configs_pass_promtool_as_written() -> None:
    configs = _configs(lambda data: "scrape_configs" in data)
    assert ROOT / "examples" / "prometheus.yml" in configs
    promtool = require_binary("promtool")
    for path in configs:
        _run(promtool, "check", "config", str(path.relative_to(ROOT)))


def test_the_alertmanager_configs_pass_amtool_as_written() -> None:
    configs = _configs(lambda data: "route" in data and "receivers" in data)
    if configs:
        amtool = require_binary("amtool")
        for path in configs:
            _run(amtool, "check-config", str(path.relative_to(ROOT)))
