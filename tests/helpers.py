"""Shared test tools: log writing, a real daemon process, metric parsing, waiting."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import msgspec
import pytest
from kling_exporter.ledger import Ledger
from kling_exporter.state import ledger_state, restore
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def line(**fields: Any) -> str:
    return json.dumps(fields)


def write_lines(path: Path, lines: Iterable[str | Mapping[str, Any]], mode: str = "a") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, mode, encoding="utf-8") as f:
        for item in lines:
            f.write((item if isinstance(item, str) else json.dumps(item)) + "\n")


def saved_and_restored(ledger: Ledger) -> Ledger:
    """A new ledger restored from ``ledger``'s saved form, through msgpack as on disk."""
    saved = msgspec.msgpack.decode(msgspec.msgpack.encode(ledger_state(ledger)))
    restored = Ledger(ledger.config)
    restore(restored, saved)
    return restored


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(check: Callable[[], Any], timeout: float = 15.0, interval: float = 0.05) -> Any:
    """Call ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (OSError, AssertionError, KeyError) as e:
            last = e
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last: {last!r})")


def parse_metrics(text: str) -> Series:
    out: Series = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(series: Series, name: str, **labels: str) -> float:
    return series.get((name, frozenset(labels.items())), 0.0)


def by_name(series: Series, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in series.items() if n == name}


def require_binary(name: str, *other_names: str) -> str:
    """The path of a tool the end-to-end tests need (under any of its names): a failure
    in CI, a skip elsewhere, listed at the end of the run."""
    for candidate in (name, *other_names):
        path = shutil.which(candidate) or shutil.which(candidate, path="/usr/sbin:/sbin")
        if path is not None:
            return path
    if os.environ.get("CI"):
        pytest.fail(f"{name} is not installed (make tools installs it)")
    pytest.skip(f"{name} is not installed; run `make tools`")


class DaemonProcess:
    """The real exporter as a subprocess on a loopback port chosen at run time."""

    def __init__(
        self,
        workdir: Path,
        config: str | None = None,
        extra: list[str] | None = None,
        command: str = "serve",
        nofile: int | None = None,
    ):
        self.workdir = workdir
        self.command = command
        self.port = free_port()
        self.config_path = workdir / "config.yml"
        if config is not None:
            self.config_path.write_text(config)
        self.extra = extra or []
        self.nofile = nofile  # a hard limit of open descriptors, as a small system has
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"daemon-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait_ready: bool = True) -> DaemonProcess:
        cmd = [
            sys.executable,
            "-m",
            "kling_exporter",
            self.command,
            "--web.listen-address",
            f"127.0.0.1:{self.port}",
            *self.extra,
        ]
        if self.config_path.exists() and self.command == "serve":
            cmd += ["--config.file", str(self.config_path)]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "exporter")}
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        limit = self.nofile

        def preexec() -> None:
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

        self.proc = subprocess.Popen(
            cmd,
            cwd=self.workdir,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=preexec,  # noqa: PLW1509 - only setrlimit, no threads touched
        )
        if wait_ready:
            wait_until(lambda: self.get("/-/ready")[0] == 200, timeout=30)
        return self

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        return request(self.url + path, headers=headers)

    def post(
        self, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        return request(self.url + path, data=body, headers=headers, method="POST")

    def metrics(self) -> Series:
        status, body = self.get("/metrics")
        assert status == 200, body
        return parse_metrics(body.decode())

    def wait_metric(
        self, name: str, expected: float, timeout: float = 15.0, **labels: str
    ) -> Series:
        def check() -> Series | None:
            series = self.metrics()
            return series if value(series, name, **labels) == expected else None

        try:
            result: Series = wait_until(check, timeout=timeout)
        except AssertionError:
            got = value(self.metrics(), name, **labels)
            raise AssertionError(f"{name}{labels} is {got}, expected {expected}") from None
        return result

    def send(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._log.close()
        return code

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


def request(
    url: str,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
    method: str = "GET",
    timeout: float = 10,
) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
