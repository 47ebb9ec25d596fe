"""Kling's account API, against a local stand-in that checks the JWT as Kling does and
answers its documented shapes and errors: packs exported exactly, errors counted by
reason with backoff, and the keys found nowhere."""

from __future__ import annotations

import asyncio
import functools
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from kling_exporter.config import Config
from kling_exporter.configfile import parse_config
from kling_exporter.demo import STANDIN_PATH, StandInServer
from kling_exporter.kling import account as account_module
from kling_exporter.kling.account import MAX_ANSWER, Account, PollError
from kling_exporter.kling.standin import KlingStandIn, demo_packs

from tests.helpers import DaemonProcess, value, wait_until

Factory = Callable[..., DaemonProcess]
ACCESS = "AK-standin-access-key-7f3a"
SECRET = "SK-standin-secret-key-91c2e-0123456789"  # noqa: S105 - the stand-in's own key


@pytest.fixture
def standin() -> Iterator[tuple[KlingStandIn, str]]:
    """The stand-in on a loopback port of its own, served from a thread."""
    kling = KlingStandIn(ACCESS, SECRET, demo_packs(time.time()))
    with StandInServer(kling) as server:
        yield kling, f"http://127.0.0.1:{server.port}{STANDIN_PATH}"


def config_text(tmp_path: Path, base: str, interval: str = "2s") -> str:
    (tmp_path / "access").write_text(f"  {ACCESS}\n")
    (tmp_path / "secret").write_text(f"\n{SECRET}  \n")
    return (
        f"state: {{path: {tmp_path / 'k.state'}}}\n"
        f"kling: {{api_base: '{base}', access_key_file: {tmp_path / 'access'}, "
        f"secret_key_file: {tmp_path / 'secret'}, account_poll_interval: {interval}}}\n"
    )


def test_every_pack_is_exported_exactly_and_the_keys_nowhere(
    tmp_path: Path, daemon_factory: Factory, standin: tuple[KlingStandIn, str]
) -> None:
    kling, base = standin
    d = daemon_factory(config_text(tmp_path, base))

    def polled() -> Any:
        series = d.metrics()
        return series if value(series, "kling_account_last_success_timestamp_seconds") else None

    series = wait_until(polled)
    assert not kling.refused
    for p in kling.packs:
        pack = {"pack_id": p["resource_pack_id"], "pack_name": p["resource_pack_name"]}
        pack["pack_type"] = p["resource_pack_type"]
        name = "kling_account_resource_pack"
        assert value(series, f"{name}_total_units", **pack) == p["total_quantity"]
        assert value(series, f"{name}_remaining_units", **pack) == p["remaining_quantity"]
        assert value(series, f"{name}_expiry_timestamp_seconds", **pack) == p["invalid_time"] / 1000
        for state in ("toBeOnline", "online", "expired", "runOut"):
            got = value(series, f"{name}_status", **pack, status=state)
            assert got == (1 if p["status"] == state else 0), (p["status"], state)
    scrape = d.get("/metrics")[1].decode()
    d.stop()  # saves the state
    state = (tmp_path / "k.state").read_bytes().decode("latin-1")
    for where in (d.output(), scrape, state):
        assert ACCESS not in where and SECRET not in where


def errors(d: DaemonProcess, reason: str) -> bool:
    return value(d.metrics(), "kling_account_poll_errors_total", reason=reason) >= 1


def test_errors_are_counted_by_reason_and_the_last_packs_stay(
    tmp_path: Path, daemon_factory: Factory, standin: tuple[KlingStandIn, str]
) -> None:
    kling, base = standin
    d = daemon_factory(config_text(tmp_path, base, interval="1s"))
    wait_until(lambda: value(d.metrics(), "kling_account_last_success_timestamp_seconds") > 0)
    for mode, reason in (
        ("unauthorized", "auth"),
        ("rate_limited", "rate_limited"),
        ("server_error", "server"),
        ("malformed", "bad_response"),
    ):
        kling.mode = mode
        counted = functools.partial(errors, d, reason)
        wait_until(counted, timeout=20)
    series = d.metrics()
    pack = {"pack_id": "pack-1", "pack_name": "Video Pack 3000", "pack_type": "decreasing_total"}
    assert value(series, "kling_account_resource_pack_total_units", **pack) == 3000
    kling.mode = "empty"
    wait_until(
        lambda: "kling_account_resource_pack_total_units{" not in d.get("/metrics")[1].decode(),
        timeout=20,
    )
    assert "SK-" not in d.output() and "AK-" not in d.output()


def test_failing_polls_back_off(
    tmp_path: Path, daemon_factory: Factory, standin: tuple[KlingStandIn, str]
) -> None:
    kling, base = standin
    kling.mode = "server_error"
    daemon_factory(config_text(tmp_path, base, interval="1h"))
    time.sleep(6.5)
    # About 1 s, then 2 s, then 4 s between polls (a fifth either way): three or four.
    gaps = [b - a for a, b in zip(kling.requests, kling.requests[1:], strict=False)]
    assert 3 <= len(kling.requests) <= 4, gaps
    assert 0.75 < gaps[0] < 1.3 and 1.55 < gaps[1] < 2.5, gaps


def keyed_config(tmp_path: Path, api_base: str) -> Config:
    """A config whose key files (written here) reach the stand-in at ``api_base``."""
    (tmp_path / "access").write_text(ACCESS)
    (tmp_path / "secret").write_text(SECRET)
    return parse_config(
        {
            "kling": {
                "api_base": api_base,
                "access_key_file": str(tmp_path / "access"),
                "secret_key_file": str(tmp_path / "secret"),
            }
        }
    )


def test_a_slow_answer_is_a_timeout_and_the_token_is_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(account_module, "TIMEOUT", 0.5)

    async def scenario() -> tuple[list[str], int, str, str]:
        kling = KlingStandIn(ACCESS, SECRET, [])
        app = web.Application()
        kling.routes(app)
        async with TestServer(app) as server, aiohttp.ClientSession() as session:
            config = keyed_config(tmp_path, str(server.make_url("")))
            acct = Account(lambda: config)
            await acct.poll(session)
            first = acct.token(ACCESS, SECRET)
            kling.mode, reasons = "slow", []
            try:
                await acct.poll(session)
            except PollError as e:
                reasons.append(e.reason)
            return reasons, len(kling.refused), first, acct.token(ACCESS, SECRET)

    reasons, refused, first, again = asyncio.run(scenario())
    assert reasons == ["timeout"] and refused == 0 and first == again


def test_backoff_doubles_with_jitter_and_stops_at_the_interval() -> None:
    config = parse_config({"kling": {"account_poll_interval": "30s"}})
    acct = Account(lambda: config)
    assert acct.next_delay() == 30
    delays = []
    for failures in range(1, 9):
        acct.failures = failures
        delays.append(acct.next_delay())
    for n, got in enumerate(delays, 1):
        expected = min(30.0, 2.0 ** (n - 1))
        assert max(1.0, 0.8 * expected) <= got <= 1.2 * expected, (n, got)


def test_an_answer_over_the_cap_is_a_bad_response_read_no_further(tmp_path: Path) -> None:
    async def scenario() -> list[str]:
        kling = KlingStandIn(ACCESS, SECRET, [])
        kling.mode = "huge"
        app = web.Application()
        kling.routes(app)
        async with TestServer(app) as server, aiohttp.ClientSession() as session:
            config = keyed_config(tmp_path, str(server.make_url("")))
            reasons = []
            try:
                await Account(lambda: config).poll(session)
            except PollError as e:
                reasons.append(f"{e.reason}: {e}")
            return reasons

    assert asyncio.run(scenario()) == [f"bad_response: larger than {MAX_ANSWER} bytes"]


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kling_exporter", "check-config", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.parametrize(("mode", "warned"), [(0o600, False), (0o640, True), (0o644, True)])
def test_key_files_readable_by_others_are_warned_of(
    tmp_path: Path, mode: int, warned: bool
) -> None:
    for name in ("access", "secret"):
        (tmp_path / name).write_text(ACCESS)
        (tmp_path / name).chmod(mode)
    config = f"kling: {{access_key_file: {tmp_path}/access, secret_key_file: {tmp_path}/secret}}\n"
    (tmp_path / "kling.yml").write_text(config)
    result = check_config(tmp_path / "kling.yml")
    assert result.returncode == 0, result.stderr
    assert ("kling.secret_key_file" in result.stderr) is warned
    assert ("readable by group or others" in result.stderr) is warned
    assert ACCESS not in result.stdout + result.stderr


def test_a_missing_key_file_fails_check_config_naming_it(tmp_path: Path) -> None:
    (tmp_path / "access").write_text(ACCESS)
    (tmp_path / "access").chmod(0o600)
    config = f"kling: {{access_key_file: {tmp_path}/access, secret_key_file: {tmp_path}/nope}}\n"
    (tmp_path / "kling.yml").write_text(config)
    result = check_config(tmp_path / "kling.yml")
    assert result.returncode == 1
    assert f"kling.secret_key_file: cannot read {tmp_path}/nope" in result.stderr
