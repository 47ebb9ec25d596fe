"""Realistic synthetic Kling traffic, for trying the exporter with one command."""

from __future__ import annotations

import asyncio
import datetime as dt
import heapq
import json
import random
import socket
import threading
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

import jwt
from aiohttp import web

from kling_exporter.config import Config
from kling_exporter.configfile import parse_config
from kling_exporter.flags import DEFAULT_RATE, DEFAULT_SEED
from kling_exporter.kling.standin import KlingStandIn

PROJECTS = [("marketing", 8), ("product", 5), ("sales", 3), ("support", 2), ("research", 1)]
USERS = ["ann", "bob", "chen", "dana", "eli"]
MODELS = [("kling-v2-6", 5), ("kling-v2-5-turbo", 4), ("kling-v1-6", 2), ("kling-v1", 1)]
ERRORS = [("quota_exceeded", 2), ("content_policy", 3), ("timeout", 1), ("rate_limited", 2)]


# The demo's own Kling account: a stand-in (kling_exporter.kling.standin) served by the
# exporter itself under this path, with these keys.
STANDIN_PATH = "/demo/kling"
DEMO_KEYS = ("demo-access-key", "demo-secret-key-for-the-stand-in-only")


def demo_account(port: int, keys_dir: Path, path: str = STANDIN_PATH) -> dict[str, object]:
    """The ``kling`` section that points the demo at its stand-in on ``port``."""
    keys_dir.mkdir(parents=True, exist_ok=True)
    (keys_dir / "access").write_text(DEMO_KEYS[0])
    (keys_dir / "secret").write_text(DEMO_KEYS[1])
    return {
        "api_base": f"http://127.0.0.1:{port}{path}",
        "access_key_file": str(keys_dir / "access"),
        "secret_key_file": str(keys_dir / "secret"),
        "account_poll_interval": "1m",
    }


def demo_gateway(kling_port: int) -> dict[str, object]:
    """The ``gateway`` section that passes the demo's gateway traffic on to its stand-in
    on ``kling_port``. Its producers name their project in ``X-Kling-Project``, which
    the demo trusts (a real gateway maps access keys to projects instead)."""
    return {
        "enabled": True,
        "upstream": f"http://127.0.0.1:{kling_port}{STANDIN_PATH}",
        "trust_project_header": True,
    }


def demo_config(
    log_dir: Path,
    account: dict[str, object] | None = None,
    gateway: dict[str, object] | None = None,
) -> Config:
    """The demo's config; ``account`` (``demo_account``) adds Kling's resource packs,
    ``gateway`` (``demo_gateway``) the gateway in front of the stand-in."""
    return parse_config(
        {
            **({"kling": account} if account else {}),
            **({"gateway": gateway} if gateway else {}),
            "logs": {"paths": [str(log_dir / "kling-*.jsonl")], "poll_interval": "1s"},
            "state": {"path": ""},
            # Sized for the default rate and backfill: one budget warns at once, one
            # crosses 80% and then 100% within half an hour, the others stay calm.
            "budgets": [
                {
                    "name": "marketing-daily",
                    "project": "marketing",
                    "period": "daily",
                    "limit_credits": 13000,
                },
                {
                    "name": "research-daily",
                    "project": "research",
                    "period": "daily",
                    "limit_credits": 1300,
                    "alert_threshold": 0.7,
                },
                {
                    "name": "product-weekly",
                    "project": "product",
                    "period": "weekly",
                    "limit_credits": 60000,
                    "limit_usd": 9000,
                },
                {"name": "ann-monthly", "user": "ann", "period": "monthly", "limit_usd": 1600},
                {"name": "company-monthly", "period": "monthly", "limit_usd": 50000},
            ],
        }
    )


def _pick(rng: random.Random, weighted: list[tuple[str, int]]) -> str:
    return rng.choices([v for v, _ in weighted], [w for _, w in weighted])[0]


class DemoTraffic:
    """Writes submissions, and completions or errors after a plausible generation time,
    to ``DIR/kling-YYYY-MM-DD.jsonl``; bursts now and then, some failures and errors."""

    def __init__(
        self, log_dir: Path, rate: float = DEFAULT_RATE, seed: int | None = DEFAULT_SEED
    ) -> None:
        self.dir = log_dir
        self.rate = rate
        self.rng = random.Random(seed)
        self.pending: list[tuple[float, int, dict[str, Any]]] = []
        self.count = 0
        self.stop = threading.Event()
        self._thread: threading.Thread | None = None
        log_dir.mkdir(parents=True, exist_ok=True)

    def _submission(self, ts: float) -> list[tuple[float, dict[str, Any]]]:
        rng = self.rng
        self.count += 1
        task_id = f"demo-{self.count:07d}-{rng.randrange(16**6):06x}"
        kind = rng.choices(["video", "image", "try_on"], [90, 8, 2])[0]
        mode = rng.choices(["std", "pro"], [65, 35])[0]
        duration = rng.choice([5, 5, 5, 10])
        sub = {
            "event": "task_submitted",
            "task_id": task_id,
            "project": _pick(rng, PROJECTS),
            "user": rng.choice(USERS),
            "model": _pick(rng, MODELS),
            "mode": mode,
            "duration": duration,
            "audio": rng.random() < 0.15,
            "kind": kind,
            "prompt_len": rng.randint(20, 900),
        }
        out = [(ts, sub)]
        roll = rng.random()
        if roll < 0.04:
            out.append(
                (
                    ts + rng.uniform(0.5, 5),
                    {
                        "event": "task_error",
                        "task_id": task_id,
                        "error_type": _pick(rng, ERRORS),
                        "message": 'simulated error: the prompt "..." was refused',
                    },
                )
            )
        else:
            elapsed = max(5.0, rng.lognormvariate(4.4 + (0.5 if mode == "pro" else 0), 0.4))
            status = "failed" if roll < 0.11 else "succeed"
            out.append(
                (
                    ts + elapsed,
                    {
                        "event": "task_completed",
                        "task_id": task_id,
                        "status": status,
                        "elapsed_sec": round(elapsed, 1),
                    },
                )
            )
        return out

    def _write(self, items: list[tuple[float, dict[str, Any]]]) -> None:
        by_file: dict[Path, list[bytes]] = {}
        for ts, fields in items:
            when = dt.datetime.fromtimestamp(ts, dt.UTC)
            line = {
                "timestamp": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                **fields,
            }
            path = self.dir / f"kling-{when:%Y-%m-%d}.jsonl"
            by_file.setdefault(path, []).append(json.dumps(line).encode() + b"\n")
        for path, lines in by_file.items():
            with open(path, "ab") as f:
                f.write(b"".join(lines))

    def has_history(self) -> bool:
        """Whether the log folder already holds demo logs (a restart)."""
        return any(self.dir.glob("kling-*.jsonl"))

    def backfill(self, seconds: float, now: float | None = None) -> int:
        """History for the last ``seconds``, so graphs have a past from the first scrape."""
        now = time.time() if now is None else now
        ts, items = now - seconds, []
        while ts < now:
            for when, fields in self._submission(ts):
                if when <= now:
                    items.append((when, fields))
                else:
                    heapq.heappush(self.pending, (when, self.count, fields))
            ts += self.rng.expovariate(self.rate)
        items.sort(key=lambda item: item[0])
        self._write(items)
        return len(items)

    def tick(self, now: float, dt_seconds: float) -> None:
        """Write what happens in the next ``dt_seconds``: new tasks and due completions."""
        burst = 6.0 if self.rng.random() < 0.01 else 1.0
        due: list[tuple[float, dict[str, Any]]] = []
        for _ in range(self._poisson(self.rate * burst * dt_seconds)):
            first, *rest = self._submission(now)
            due.append(first)
            for when, fields in rest:
                heapq.heappush(self.pending, (when, self.count, fields))
        while self.pending and self.pending[0][0] <= now:
            when, _, fields = heapq.heappop(self.pending)
            due.append((when, fields))
        if due:
            self._write(due)

    def _poisson(self, mean: float) -> int:
        n, t = 0, self.rng.expovariate(1.0)
        while t < mean:
            n += 1
            t += self.rng.expovariate(1.0)
        return n

    def run(self) -> None:
        while not self.stop.wait(0.5):
            self.tick(time.time(), 0.5)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="demo-traffic", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop writing (the thread finishes the write it is in)."""
        self.stop.set()
        if self._thread is not None:
            self._thread.join(5)


class GatewayTraffic:
    """A producer that calls Kling through the exporter's gateway (``base``, e.g.
    ``http://127.0.0.1:10177/kling``): a create request every ``every`` seconds for a
    project of the demo, then a query of each task until it has finished, as an SDK
    does, so that the gateway's panels have something to show."""

    PROJECTS = ("marketing", "product", "research")

    def __init__(self, base: str, every: float = 2.0, seed: int | None = DEFAULT_SEED) -> None:
        self.base = base.rstrip("/")
        self.every = every
        self.rng = random.Random(seed)
        self.open: list[str] = []
        self.stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        now = int(time.time())
        token = jwt.encode(
            {"iss": DEMO_KEYS[0], "exp": now + 1800, "nbf": now - 5}, DEMO_KEYS[1], "HS256"
        )
        headers = {
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/json",
            "X-Kling-Project": self.rng.choice(self.PROJECTS),
        }
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data, headers, method=method)  # noqa: S310
        try:
            with urllib.request.urlopen(req, timeout=10) as answer:  # noqa: S310 - loopback
                return json.loads(answer.read())
        except (OSError, ValueError):  # refused (429), or the exporter not up yet
            return None

    def tick(self) -> None:
        mode = self.rng.choice(["std", "std", "pro"])
        body = {"model_name": "kling-v2-6", "mode": mode, "duration": "5", "prompt": "a demo"}
        created = self._call("POST", "/v1/videos/text2video", body)
        if created and created.get("code") == 0:
            self.open.append(created["data"]["task_id"])
        for task_id in list(self.open):
            answer = self._call("GET", f"/v1/videos/text2video/{task_id}")
            status = ((answer or {}).get("data") or {}).get("task_status")
            if status in ("succeed", "failed") or answer is None:
                self.open.remove(task_id)

    def run(self) -> None:
        while not self.stop.wait(self.every):
            self.tick()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="demo-gateway", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.stop.set()
        if self._thread is not None:
            self._thread.join(15)


class StandInServer:
    """The demo's Kling account stand-in on a loopback port of its own, served from a
    thread, and listening before ``__enter__`` returns: the exporter polls it as it
    starts, before its own port is served."""

    def __init__(self, standin: KlingStandIn) -> None:
        self.app = web.Application()
        standin.routes(self.app, STANDIN_PATH)
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(self.app, handle_signals=False)
        self.port = 0
        self._thread = threading.Thread(target=self.loop.run_forever, name="demo-kling")

    def __enter__(self) -> StandInServer:
        self.loop.run_until_complete(self.runner.setup())
        listening = socket.socket()
        listening.bind(("127.0.0.1", 0))  # a free port, chosen by the kernel
        self.port = listening.getsockname()[1]
        self.loop.run_until_complete(web.SockSite(self.runner, listening).start())
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.run_until_complete(self.runner.cleanup())
        self.loop.close()
