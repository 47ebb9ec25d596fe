from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import DaemonProcess

# Modules whose every test runs real processes (Prometheus, Alertmanager, promtool,
# Redis, logrotate, the exporter's command line); elsewhere a test that asks for an
# exporter process is end-to-end by its fixtures.
END_TO_END_MODULES = {
    "test_alerting",
    "test_callbacks",
    "test_cli_messages",
    "test_dashboards",
    "test_deploy",
    "test_examples",
    "test_faults",
    "test_fleet",
    "test_kubernetes",
    "test_readme_examples",
    "test_reader",
    "test_web",
}
PROCESS_FIXTURES = {"daemon_factory", "module_daemon_factory"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark end-to-end tests, so that ``make test-fast`` can leave them out."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if item.path.stem in END_TO_END_MODULES or fixtures & PROCESS_FIXTURES:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Start real exporter processes in tmp_path; all are stopped after the test."""
    yield from _factory(tmp_path)


@pytest.fixture(scope="module")
def module_daemon_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., DaemonProcess]]:
    """The same, shared by a module's tests that only read what the exporter answers:
    one process start for the module instead of one a test."""
    yield from _factory(tmp_path_factory.mktemp("module"))


def _factory(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    started: list[DaemonProcess] = []

    def make(
        config: str | None = None,
        extra: list[str] | None = None,
        wait_ready: bool = True,
        command: str = "serve",
        nofile: int | None = None,
    ) -> DaemonProcess:
        d = DaemonProcess(tmp_path, config, extra, command, nofile)
        started.append(d)
        return d.start(wait_ready=wait_ready)

    yield make
    for d in started:
        if d.proc is not None and d.proc.poll() is None:
            d.stop()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Say loudly which end-to-end tests did not run for want of a tool."""
    missing = [
        report
        for report in terminalreporter.stats.get("skipped", [])
        if "is not installed" in str(report.longrepr)
    ]
    if missing:
        terminalreporter.write_sep("!", f"{len(missing)} END-TO-END TESTS SKIPPED", red=True)
        for report in missing:
            terminalreporter.write_line(f"  {report.nodeid}: {report.longrepr[-1]}")
        terminalreporter.write_line(
            "  Install the tools (make tools says how) for the whole suite."
        )
