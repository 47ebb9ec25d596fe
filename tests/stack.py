"""Real Prometheus, Alertmanager and a webhook receiver on 127.0.0.1 for end-to-end tests,
plus the exporter served from this process when a test needs to move its clock."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web
from kling_exporter.config import Config
from kling_exporter.demo import STANDIN_PATH
from kling_exporter.kling.standin import KlingStandIn
from kling_exporter.reading.daemon import Daemon
from kling_exporter.serving.server import build_app

from tests.helpers import ROOT, free_port, request, require_binary, wait_until

ALERTS = ROOT / "alerts"


class Clock:
    """Wall time plus an offset a test can move forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


class InProcessExporter:
    """The daemon and its HTTP server on a thread of the test process."""

    def __init__(
        self,
        config: Config,
        clock: Clock | None = None,
        port: int | None = None,
        standin: KlingStandIn | None = None,
    ) -> None:
        self.clock = clock or Clock()
        self.daemon = Daemon(config, clock=self.clock)
        self.port = port or free_port()
        self.standin = standin
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> InProcessExporter:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(timeout=10)
        self.daemon.start()
        wait_until(self.daemon.ready.is_set, timeout=20)
        return self

    async def _serve(self) -> None:
        standin = self.standin
        mount = None if standin is None else (lambda app: standin.routes(app, STANDIN_PATH))
        app = build_app(self.daemon, mount=mount)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self.daemon.stop()


class Webhook:
    """Collects Alertmanager webhook notifications, with the time each arrived."""

    def __init__(self) -> None:
        self.received: list[tuple[float, str, dict[str, Any]]] = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.append((time.time(), self.path, json.loads(body)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alerts(
        self, path: str | None = None, alertname: str | None = None, status: str | None = None
    ) -> list[tuple[float, str, dict[str, Any]]]:
        """(arrival, path, alert) for every alert in every notification so far, or only
        those sent to ``path`` with that ``alertname`` and ``status`` (firing, resolved)."""
        return [
            (t, p, alert)
            for t, p, body in list(self.received)
            if path is None or p == path
            for alert in body["alerts"]
            if (alertname is None or alert["labels"]["alertname"] == alertname)
            and (status is None or alert["status"] == status)
        ]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Process:
    def __init__(self, name: str, args: list[str], workdir: Path, port: int) -> None:
        self.name, self.port = name, port
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, cwd=workdir)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 30) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log_path.read_text()[-2000:]}")
            return request(self.url + "/-/ready", timeout=2)[0] == 200

        wait_until(ready, timeout=timeout, interval=0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def api(self, path: str) -> Any:
        status, body = request(self.url + path)
        assert status == 200, body
        return json.loads(body)


def alertmanager_config(webhook_url: str, workdir: Path) -> Path:
    """The shipped alertmanager.yml with its routes and inhibitions unchanged; only the
    receivers' URLs point at the test's webhook and the timers are shortened."""
    config = yaml.safe_load((ALERTS / "alertmanager.yml").read_text())
    config["templates"] = [str(ALERTS / t) for t in config["templates"]]
    config["route"].update(group_wait="1s", group_interval="1s")
    for route in config["route"].get("routes", []):
        if "group_wait" in route:
            route["group_wait"] = "1s"
    for receiver in config["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = webhook_url + "/" + hook["url"].rsplit("/", 1)[-1]
    path = workdir / "alertmanager.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@contextmanager
def alertmanager(workdir: Path, webhook: Webhook) -> Iterator[Process]:
    binary = require_binary("prometheus-alertmanager", "alertmanager")
    port = free_port()
    config = alertmanager_config(webhook.url, workdir)
    am = Process(
        "alertmanager",
        [
            binary,
            f"--config.file={config}",
            f"--storage.path={workdir / 'am-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ],
        workdir,
        port,
    )
    try:
        am.wait_ready()
        yield am
    finally:
        am.stop()


@contextmanager
def prometheus(
    workdir: Path,
    targets: list[str],
    alertmanager_port: int | None = None,
    rule_files: list[Path] | None = None,
    interval: str = "1s",
) -> Iterator[Process]:
    binary = require_binary("prometheus")
    port = free_port()
    config: dict[str, Any] = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [
            str(p)
            for p in (
                rule_files
                if rule_files is not None
                else [ALERTS / "kling.rules.yml", ALERTS / "kling.alerts.yml"]
            )
        ],
        "scrape_configs": [
            {"job_name": "kling-exporter", "static_configs": [{"targets": targets}]}
        ],
    }
    if alertmanager_port is not None:
        config["alerting"] = {
            "alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{alertmanager_port}"]}]}]
        }
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    prom = Process(
        "prometheus",
        [
            binary,
            f"--config.file={path}",
            f"--storage.tsdb.path={workdir / 'prom-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        workdir,
        port,
    )
    try:
        prom.wait_ready()
        yield prom
    finally:
        prom.stop()
