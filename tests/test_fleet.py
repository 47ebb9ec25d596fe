"""Fleet budgets: several real exporters sharing budgets through a real redis-server,
with workers reserving concurrently, kill -9 of an exporter and of Redis, Redis down,
and the Sentinel and Cluster URLs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml
from kling_exporter.budgets import Ask, Budgets, DayUsage
from kling_exporter.client import EventLogger
from kling_exporter.configfile import load_config, parse_config
from kling_exporter.guard import fleet as fleet_module
from kling_exporter.guard.reservations import Reservations
from kling_exporter.pricing import Request
from kling_exporter.views import View

from tests.helpers import (
    ROOT,
    DaemonProcess,
    require_binary,
    value,
    wait_until,
)
from tests.redis_server import RedisServer, SentinelServer, cluster_port

CONFIG = """
state: {{path: {dir}/k.state}}
logs: {{paths: ["{dir}/logs/kling-*.jsonl"], poll_interval: 100ms}}
fleet: {{redis_url: "{url}", instance: {name}, publish_interval: 200ms, on_unavailable: {mode}}}
budgets:
  - {{name: team, project: p, period: monthly, limit_credits: {limit}}}
  - {{name: everyone, period: daily, limit_usd: 100000}}
"""
TASK: dict[str, Any] = {"project": "p", "model": "kling-v2-6", "mode": "std", "duration": 5}
CREDITS = 10  # what TASK costs


class Fleet:
    """A redis-server and exporters, each with its own folder and logs."""

    def __init__(self, tmp_path: Path, limit: float, mode: str = "refuse") -> None:
        self.tmp_path = tmp_path
        self.limit = limit
        self.mode = mode
        self.redis = RedisServer(tmp_path / "redis").start()
        self.exporters: dict[str, DaemonProcess] = {}

    def config(self, name: str, url: str | None = None, instance: str | None = None) -> str:
        folder = self.tmp_path / name
        return CONFIG.format(
            dir=folder,
            url=url or self.redis.url,
            name=instance or name,
            mode=self.mode,
            limit=self.limit,
        )

    def start(
        self,
        name: str,
        url: str | None = None,
        instance: str | None = None,
        wait_ready: bool = True,
    ) -> DaemonProcess:
        """The exporter ``name`` (its folder), as fleet instance ``instance`` (``name``
        unless given)."""
        folder = self.tmp_path / name
        folder.mkdir(exist_ok=True)
        d = DaemonProcess(folder, self.config(name, url, instance)).start(wait_ready)
        self.exporters[name] = d
        return d

    def log(self, name: str) -> EventLogger:
        return EventLogger(self.tmp_path / name / "logs", project="p")

    def spend(self, name: str, tasks: int, first: int = 0) -> None:
        """``tasks`` tasks of ``CREDITS`` each, completed in ``name``'s logs."""
        log = self.log(name)
        for i in range(first, first + tasks):
            log.submitted(f"{name}-t{i}", "kling-v2-6", "std", 5)
            log.completed(f"{name}-t{i}", credits_used=CREDITS)

    def logged_credits(self) -> float:
        """What every exporter's logs say was used: completions' credits."""
        total = 0.0
        for path in self.tmp_path.glob("*/logs/kling-*.jsonl"):
            for raw in path.read_text().splitlines():
                event = json.loads(raw)
                if event["event"] == "task_completed":
                    total += event["credits_used"]
        return total

    def wait_settled(self) -> None:
        """Until every exporter sees all of them, and Redis has had every entry."""
        for d in self.exporters.values():
            wait_until(partial(settled, d, len(self.exporters)), timeout=20)

    def stop(self) -> None:
        for d in self.exporters.values():
            if d.proc is not None and d.proc.poll() is None:
                d.stop()
        self.redis.stop()

    def restart_redis_empty(self) -> None:
        self.redis.kill()
        self.redis.start()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    made: list[Fleet] = []

    def make(limit: float, mode: str = "refuse") -> Fleet:
        made.append(Fleet(tmp_path, limit, mode))
        return made[-1]

    yield make  # type: ignore[misc]
    for f in made:
        f.stop()


def budgets(d: DaemonProcess) -> dict[str, Any]:
    status, raw = d.get("/api/v1/budgets")
    assert status == 200, raw
    answer: dict[str, Any] = json.loads(raw)
    return answer


def team(d: DaemonProcess) -> dict[str, Any]:
    found: dict[str, Any] = budgets(d)["budgets"][0]
    return found


def settled(d: DaemonProcess, instances: int) -> bool:
    described = budgets(d)["fleet"]
    return bool(described["up"] and described["settled"] and described["instances"] == instances)


def post(d: DaemonProcess, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    status, raw = d.post(path, json.dumps(body).encode())
    return status, json.loads(raw) if raw.startswith(b"{") else {"raw": raw.decode()}


class Workers:
    """Workers that reserve one task at a time through their exporter, log it as their
    exporter's workers do, and stop once refused for want of room."""

    def __init__(self, fleet: Fleet, names: list[str], count: int, pause: float = 0.0) -> None:
        self.fleet = fleet
        self.names = names
        self.count = count
        self.pause = pause  # after each task, as a worker busy with it
        self.granted: list[str] = []
        self.refusals: list[dict[str, Any]] = []
        self.unavailable = 0
        self.lock = threading.Lock()
        self.barrier = threading.Barrier(count)

    def work(self, i: int) -> None:
        name = self.names[i % len(self.names)]
        log = self.fleet.log(name)
        self.barrier.wait()
        n = 0
        while True:
            rid = f"w{i}-{n}"
            d = self.fleet.exporters[name]  # replaced when restarted
            try:
                status, answer = post(d, "/api/v1/reservations", {**TASK, "id": rid, "ttl": "5m"})
            except OSError:  # the exporter is being restarted: the same id again
                time.sleep(0.05)
                continue
            if status in (201, 200) and answer.get("allowed"):
                # 200: granted before, its answer lost to a kill -9
                if rid not in self.granted:
                    log.submitted(rid, "kling-v2-6", "std", 5, reservation_id=rid)
                    log.completed(rid, credits_used=CREDITS)
                    with self.lock:
                        self.granted.append(rid)
                n += 1
                time.sleep(self.pause)
                continue
            if status == 200 and answer["reason"] == "fleet unavailable":
                with self.lock:
                    self.unavailable += 1
                time.sleep(0.05)
                continue
            if status in (503, 502) or "raw" in answer:
                time.sleep(0.05)
                continue
            assert status == 200, (status, answer)
            with self.lock:
                self.refusals.append(answer)
            return

    def run(self) -> None:
        with ThreadPoolExecutor(self.count) as pool:
            list(pool.map(self.work, range(self.count)))


def assert_exact(fleet: Fleet, workers: Workers) -> None:
    """Nothing over-committed, nobody refused while room remained, and every instance
    shows the sum of all logs."""
    assert len(workers.granted) == len(set(workers.granted))  # no hold granted twice
    assert fleet.logged_credits() == fleet.limit == CREDITS * len(workers.granted)
    for refusal in workers.refusals:
        row = next(b for b in refusal["budgets"] if b["name"] == "team")
        assert refusal["refused_by"] == "team", refusal
        assert row["credits_remaining"] < CREDITS, refusal  # refused only without room
    for d in fleet.exporters.values():

        def exact(d: DaemonProcess = d) -> bool:
            b = team(d)
            return (b["used_credits"], b["in_flight_credits"], b["reserved_credits"]) == (
                fleet.limit,
                0,
                0,
            )

        wait_until(exact, timeout=20)


def test_48_workers_over_three_exporters_fill_a_shared_budget_exactly(fleet: Any) -> None:
    f: Fleet = fleet(limit=1500)
    for name in ("a", "b", "c"):
        f.start(name)
    f.wait_settled()
    workers = Workers(f, ["a", "b", "c"], 48)
    workers.run()
    assert_exact(f, workers)
    shares = {name: team(d)["local"]["used_credits"] for name, d in f.exporters.items()}
    assert sum(shares.values()) == 1500 and all(shares.values()), shares
    # /metrics stays each exporter's own; the fleet's health beside it.
    for name, d in f.exporters.items():
        series = d.metrics()
        used = value(series, "kling_budget_used_credits", budget="team", period="monthly")
        assert used == shares[name]
        assert value(series, "kling_fleet_up") == 1
        assert value(series, "kling_fleet_instances") == 3
    # A check anywhere now sees no room.
    status, answer = post(f.exporters["b"], "/api/v1/check", TASK)
    assert status == 200 and answer["refused_by"] == "team"


def test_kill_9_of_an_exporter_and_of_redis_mid_run_keeps_budgets_exact(fleet: Any) -> None:
    f: Fleet = fleet(limit=3000, mode="refuse")
    for name in ("a", "b", "c"):
        f.start(name)
    f.wait_settled()
    workers = Workers(f, ["a", "b", "c"], 48)
    checks: list[dict[str, Any]] = []

    def faults() -> None:
        wait_until(lambda: len(workers.granted) >= 60, timeout=60)
        f.exporters["b"].stop(signal.SIGKILL)
        time.sleep(0.5)
        f.start("b")  # from its saved state and journal; republishes the same totals
        wait_until(lambda: len(workers.granted) >= 150, timeout=60)
        f.redis.kill()  # restarted empty: every instance must publish again
        time.sleep(0.3)
        checks.append(post(f.exporters["a"], "/api/v1/check", TASK)[1])
        f.redis.start()

    chaos = threading.Thread(target=faults)
    chaos.start()
    workers.run()
    chaos.join()
    assert checks and checks[0]["allowed"] is False
    assert checks[0]["reason"] == "fleet unavailable"  # pre-flight obeyed on_unavailable
    assert workers.unavailable > 0  # reservations were refused while Redis settled
    assert_exact(f, workers)


def test_redis_down_allow_decides_on_local_usage_and_the_last_fleet_totals(
    fleet: Any,
) -> None:
    f: Fleet = fleet(limit=100, mode="allow")
    a, b = f.start("a"), f.start("b")
    log = f.log("a")
    for i in range(5):
        log.submitted(f"t{i}", "kling-v2-6", "std", 5)
        log.completed(f"t{i}", credits_used=CREDITS)
    wait_until(lambda: team(b)["used_credits"] == 50 and settled(b, 2), timeout=20)
    assert team(b)["local"]["used_credits"] == 0
    six = {**TASK, "count": 6}
    assert post(b, "/api/v1/check", six)[1]["allowed"] is False

    f.redis.kill()
    b.wait_metric("kling_fleet_up", 0)
    assert post(b, "/api/v1/check", six)[1]["allowed"] is False  # a's 50 still counted
    assert post(b, "/api/v1/check", {**TASK, "count": 5})[1]["allowed"] is True
    assert (
        post(b, "/api/v1/reservations", {**TASK, "count": 2, "id": "offline"})[0] == 201
    )  # decided alone, held here
    assert "does not answer" in b.output()

    # Back, empty: both publish again, and the hold made meanwhile counts fleet-wide.
    f.redis.start()
    b.wait_metric("kling_fleet_up", 1)
    wait_until(lambda: settled(a, 2), timeout=20)
    wait_until(lambda: team(a)["reserved_credits"] == 20, timeout=20)
    assert team(a)["used_credits"] == 50
    assert post(a, "/api/v1/check", {**TASK, "count": 4})[1]["allowed"] is False
    assert post(a, "/api/v1/check", {**TASK, "count": 3})[1]["allowed"] is True


def test_a_stopped_instance_still_counts_and_a_restart_republishes_not_adds(
    fleet: Any,
) -> None:
    f: Fleet = fleet(limit=100)
    a, b = f.start("a"), f.start("b")
    log = f.log("a")
    for i in range(3):
        log.submitted(f"t{i}", "kling-v2-6", "std", 5)
        log.completed(f"t{i}", credits_used=CREDITS)
    wait_until(lambda: team(b)["used_credits"] == 30, timeout=20)
    a.stop()
    time.sleep(1.5)  # several of b's publications
    assert team(b)["used_credits"] == 30  # the host is gone, its spending is not
    wait_until(lambda: budgets(b)["fleet"]["instances"] == 1, timeout=20)

    a = f.start("a")  # the same state: the same totals, published again
    wait_until(lambda: settled(b, 2), timeout=20)
    time.sleep(1.0)
    assert team(b)["used_credits"] == 30
    assert team(a)["used_credits"] == 30


@pytest.mark.parametrize("redis_restarts_empty", [False, True])
def test_an_id_is_one_hold_across_the_fleet(fleet: Any, redis_restarts_empty: bool) -> None:
    f: Fleet = fleet(limit=100)
    a, b = f.start("a"), f.start("b")
    wait_until(lambda: settled(a, 2) and settled(b, 2), timeout=20)
    assert post(a, "/api/v1/reservations", {**TASK, "id": "job-1"})[0] == 201
    if redis_restarts_empty:  # the hold's id written back, as its usage is
        f.restart_redis_empty()
        wait_until(lambda: settled(a, 2) and settled(b, 2), timeout=20)
    status, answer = post(b, "/api/v1/reservations", {**TASK, "id": "job-1"})
    assert status == 409 and answer["field"] == "id", answer
    assert "'a'" in answer["error"]


def test_alone_without_redis_and_a_bad_url_is_refused_by_name(
    tmp_path: Path, daemon_factory: Any
) -> None:
    d = daemon_factory("budgets: [{name: team, limit_credits: 100}]\n")
    answer = budgets(d)
    assert "fleet" not in answer and "local" not in answer["budgets"][0]
    assert "kling_fleet" not in d.get("/metrics")[1].decode()
    (tmp_path / "bad").mkdir()
    bad = DaemonProcess(tmp_path / "bad", "fleet: {redis_url: 'http://x'}\n")
    bad.start(wait_ready=False)
    assert bad.proc is not None and bad.proc.wait(30) != 0
    assert "fleet.redis_url" in bad.output()


# -- faults: Redis that forgets, two exporters with one name, failover ----------------


def published_since_now(d: DaemonProcess) -> None:
    """Until ``d`` has published once more: an exporter remembers the others' entries as
    it read them at its last publication (a memory up to one publish interval old, as
    the README says), so a test that takes Redis's data away waits for one first."""
    now = time.time()
    wait_until(
        lambda: value(d.metrics(), "kling_fleet_last_publish_timestamp_seconds") > now,
        timeout=10,
    )


def test_a_stopped_instances_spending_survives_redis_restarting_empty(fleet: Any) -> None:
    """Redis without persistence restarts empty while b is stopped: a remembers what b
    had published and writes it back, so b's spending still counts."""
    f: Fleet = fleet(limit=100)
    a, b = f.start("a"), f.start("b")
    f.spend("a", 3)
    f.spend("b", 2)
    wait_until(lambda: team(a)["used_credits"] == 50 and settled(a, 2), timeout=20)
    published_since_now(a)
    b.stop()
    f.restart_redis_empty()
    wait_until(lambda: settled(a, 1), timeout=20)
    wait_until(lambda: team(a)["used_credits"] == 50, timeout=10)
    # Decided inside Redis with b's 20 counted: 50 left, not 70.
    assert post(a, "/api/v1/reservations", {**TASK, "count": 6})[1]["allowed"] is False
    assert post(a, "/api/v1/reservations", {**TASK, "count": 5})[0] == 201
    b = f.start("b")  # its own entry again, the same totals: nothing added
    wait_until(lambda: settled(b, 2), timeout=20)
    wait_until(lambda: team(b)["reserved_credits"] == 50, timeout=20)
    assert team(b)["used_credits"] == 50


def test_an_entry_redis_holds_lower_gets_back_the_highest_used_seen(fleet: Any) -> None:
    """A failover to a replica that lagged hands back an older entry of a stopped
    exporter, with less used than it had published: a peer merges back the highest
    used it saw."""
    f: Fleet = fleet(limit=100)
    a, b = f.start("a"), f.start("b")
    f.spend("b", 2)
    wait_until(lambda: team(a)["used_credits"] == 20, timeout=20)
    published_since_now(a)
    b.stop()
    with f.redis.client() as c:
        key = next(iter(c.scan_iter(match="*usage:monthly:*")))
        entry = json.loads(c.hget(key, "b"))
        c.hset(key, "b", json.dumps([10.0, entry[1] / 2, *entry[2:]]))  # as it was before
        wait_until(lambda: json.loads(c.hget(key, "b"))[:2] == entry[:2], timeout=10)
    assert team(a)["used_credits"] == 20


def test_a_second_exporter_with_the_same_instance_refuses_to_start(fleet: Any) -> None:
    f: Fleet = fleet(limit=100)
    a = f.start("a")
    f.spend("a", 3)
    wait_until(lambda: team(a)["used_credits"] == 30, timeout=20)
    twin = f.start("twin", instance="a", wait_ready=False)
    assert twin.proc is not None and twin.proc.wait(20) != 0
    said = [line for line in twin.output().splitlines() if "fleet.instance" in line]
    assert len(said) == 1 and "'a'" in said[0], twin.output()
    # a goes on as before, alone in its name.
    assert a.get("/-/ready")[0] == 200
    assert value(a.metrics(), "kling_fleet_instance_conflict") == 0
    assert post(a, "/api/v1/reservations", {**TASK, "id": "job-1"})[0] == 201
    assert team(a)["reserved_credits"] == 10


def conflicted(d: DaemonProcess) -> bool:
    return value(d.metrics(), "kling_fleet_instance_conflict") == 1


def test_an_exporter_that_finds_its_instance_taken_stops_publishing_and_is_not_ready(
    fleet: Any,
) -> None:
    """Two exporters named "a" that could not see each other at start (Redis was down):
    once Redis is back, one holds the name, the other stops publishing, fails /-/ready
    and raises kling_fleet_instance_conflict; a reservation id is still one hold."""
    f: Fleet = fleet(limit=100)
    first = f.start("a")
    f.spend("a", 3)
    wait_until(lambda: team(first)["used_credits"] == 30 and settled(first, 1), timeout=20)
    f.redis.kill()
    first.wait_metric("kling_fleet_up", 0)
    twin = f.start("twin", instance="a")  # nothing could tell it that "a" runs
    f.spend("twin", 1)
    f.redis.start()
    wait_until(lambda: conflicted(first) or conflicted(twin), timeout=20)
    loser, winner = (first, twin) if conflicted(first) else (twin, first)
    status, body = loser.get("/-/ready")
    assert status == 503 and b"fleet.instance" in body, body
    assert "fleet.instance" in loser.output()
    published = value(loser.metrics(), "kling_fleet_last_publish_timestamp_seconds")
    time.sleep(1.0)  # five publish intervals
    assert value(loser.metrics(), "kling_fleet_last_publish_timestamp_seconds") == published
    assert not conflicted(winner) and winner.get("/-/ready")[0] == 200
    wait_until(lambda: settled(winner, 1), timeout=20)
    # The same id through both: one hold, from the exporter that holds the name.
    status, answer = post(winner, "/api/v1/reservations", {**TASK, "id": "job-1"})
    assert status == 201, answer
    status, answer = post(loser, "/api/v1/reservations", {**TASK, "id": "job-1"})
    assert answer.get("allowed") is not True and status != 201, answer
    assert "fleet.instance" in json.dumps(answer)


def test_decisions_go_on_after_a_sentinel_failover_losing_at_most_the_last_holds(
    fleet: Any, tmp_path: Path
) -> None:
    """A master, its replica and redis-sentinel: the master is killed mid-run, the
    replica takes over, and the workers go on reserving through it. Replication is
    asynchronous: what a failover may lose is at most the holds granted just before
    it, one per worker at most (each has one request under way)."""
    f: Fleet = fleet(limit=600)
    replica = f.redis.replica(tmp_path / "replica").start()
    sentinel = SentinelServer(tmp_path / "sentinel", f.redis)
    try:
        wait_until(f.redis.replicated, timeout=15)
        sentinel.start()
        wait_until(lambda: sentinel.replicas() == 1, timeout=15)
        for name in ("a", "b"):
            f.start(name, sentinel.url)
        f.wait_settled()
        workers = Workers(f, ["a", "b"], 8, pause=0.05)
        before: list[int] = []

        def failover() -> None:
            wait_until(lambda: len(workers.granted) >= 10, timeout=60)
            f.redis.kill()
            before.append(len(workers.granted))
            wait_until(lambda: sentinel.master_port() == replica.port, timeout=20)

        chaos = threading.Thread(target=failover)
        chaos.start()
        workers.run()
        chaos.join()
        assert sentinel.master_port() == replica.port
        assert len(workers.granted) > before[0] + 5  # decided against the new master
        assert len(workers.granted) == len(set(workers.granted))
        assert f.logged_credits() <= f.limit + CREDITS * workers.count
        for refusal in workers.refusals:
            assert refusal["refused_by"] == "team", refusal
        logged = f.logged_credits()
        for d in f.exporters.values():
            wait_until(partial(lambda d: team(d)["used_credits"] == logged, d), timeout=20)
            # Up again: a call that failed on the old master's last connection marks the
            # fleet down until the next one answers, which may come after the totals.
            wait_until(partial(lambda d: budgets(d)["fleet"]["up"], d), timeout=20)
    finally:
        f.stop()  # the exporters first: they give their names back through Sentinel
        sentinel.stop()
        replica.stop()


# -- Sentinel and Cluster: the same code, by URL -------------------------------------


def reserve_until_refused(d: DaemonProcess) -> int:
    granted = 0
    while True:
        status, answer = post(d, "/api/v1/reservations", TASK)
        if status != 201:
            assert status == 200 and answer["refused_by"] == "team", answer
            return granted
        granted += 1


def test_sentinel_and_cluster_urls_share_budgets_too(fleet: Any, tmp_path: Path) -> None:
    f: Fleet = fleet(limit=50)
    sentinel = SentinelServer(tmp_path / "sentinel", f.redis)
    nodes: list[RedisServer] = []
    try:
        sentinel.start()
        a = f.start("a", sentinel.url)
        b = f.start("b")  # the same server, by its plain URL
        wait_until(lambda: settled(a, 2) and settled(b, 2), timeout=20)
        assert reserve_until_refused(a) + reserve_until_refused(b) == 5

        # A three-node Cluster: every key of the fleet in one slot.
        cli = require_binary("redis-cli")
        for i in range(3):
            node = RedisServer(tmp_path / f"node{i}", cluster_port())
            node.extra = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            nodes.append(node.start())
        subprocess.run(
            [cli, "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in nodes], "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=30,
        )
        with nodes[0].client() as c:
            wait_until(lambda: c.execute_command("CLUSTER", "INFO").find("cluster_state:ok") >= 0)
        url = f"redis+cluster://127.0.0.1:{nodes[1].port}"
        c1, c2 = f.start("c1", url), f.start("c2", url)
        wait_until(lambda: settled(c1, 2) and settled(c2, 2), timeout=30)
        assert reserve_until_refused(c1) + reserve_until_refused(c2) == 5
        assert team(c2)["reserved_credits"] == 50
    finally:
        f.stop()  # the exporters first: they give their names back through Sentinel
        sentinel.stop()
        for node in nodes:
            node.stop()


# -- examples/compose: the two-exporter fleet ----------------------------------------

COMPOSE = ROOT / "examples" / "compose"


def test_the_compose_fleet_is_wired_together(tmp_path: Path) -> None:
    compose = yaml.safe_load((COMPOSE / "docker-compose.fleet.yml").read_text())
    services = compose["services"]
    assert {"redis", "exporter-a", "exporter-b", "worker-a", "worker-b"} <= services.keys()
    instances = set()
    for name in ("exporter-a", "exporter-b"):
        mounts = dict(v.split(":")[:2] for v in services[name]["volumes"])
        source = next(s for s, target in mounts.items() if target.endswith("config.yml"))
        config = load_config(COMPOSE / source)  # refused with the key named if wrong
        assert services[name]["command"][-1] == "/etc/kling-exporter/config.yml"
        assert config.fleet.redis_url.split("/")[2].split(":")[0] == "redis"
        assert config.logs.paths[0].startswith("/var/lib/kling-exporter/logs/")
        instances.add(config.fleet.instance)
        # Its worker writes the logs it reads, through the same volume, and reserves
        # through it.
        worker = services[name.replace("exporter", "worker")]
        shared = {v.split(":")[0] for v in worker["volumes"]} & set(mounts)
        assert shared and worker["command"][1] == f"http://{name}:10177"
        assert worker["command"][3] == config.logs.paths[0].rsplit("/", 1)[0]
    assert len(instances) == 2
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in compose["volumes"], f"{name}: volume {source} undeclared"
    prom = yaml.safe_load((COMPOSE / "fleet" / "prometheus.yml").read_text())
    assert prom["scrape_configs"][0]["job_name"] == "kling-exporter"
    targets = prom["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == ["exporter-a:10177", "exporter-b:10177"]
    promtool = require_binary("promtool")
    text = (COMPOSE / "fleet" / "prometheus.yml").read_text()
    rooted = tmp_path / "prometheus.yml"
    rooted.write_text(text.replace("/etc/prometheus/kling/", f"{ROOT / 'alerts'}/"))
    checked = subprocess.run(
        [promtool, "check", "config", str(rooted)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_compose_fleets_workers_share_its_budget(fleet: Any, tmp_path: Path) -> None:
    """The example's workers, for real, against two exporters configured as the example's
    (paths and Redis moved onto this machine): together they stop at the budget."""
    f: Fleet = fleet(limit=0)
    workers = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        text = (COMPOSE / "fleet" / f"exporter-{name}.yml").read_text()
        text = text.replace("/var/lib/kling-exporter", str(folder))
        text = text.replace("redis://redis:6379/0", f.redis.url)
        f.exporters[name] = d = DaemonProcess(folder, text).start()
    f.wait_settled()
    for name, d in f.exporters.items():
        logs = str(tmp_path / name / "logs")
        cmd = [sys.executable, str(COMPOSE / "fleet" / "worker.py"), "--exporter", d.url]
        cmd += ["--logs", logs, "--rate", "40", "--seconds", "6"]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "exporter")}
        workers.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True))
    said = [w.communicate(timeout=60)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), said
    assert all("refused: budget 'demo-daily'" in out for out in said), said
    used = f.logged_credits()
    assert 600 - 20 < used <= 600
    for d in f.exporters.values():
        wait_until(partial(lambda d: team(d)["used_credits"] == used, d), timeout=20)


def test_a_decision_after_a_slow_redis_counts_what_tasks_used_meanwhile(
    tmp_path: Path,
) -> None:
    """Redis stopped (SIGSTOP): the script call times out and ``allow`` decides alone.
    A task that used a hold while the call was waiting moved from held to in flight;
    the decision must count it there, not miss it in both."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        config = parse_config(
            {
                "fleet": {"redis_url": server.url, "timeout": "100ms", "on_unavailable": "allow"},
                "budgets": [{"name": "team", "project": "p", "limit_credits": 10}],
            }
        )
        budgets = Budgets(config)
        flight = DayUsage()
        views = [View(budgets, {}, flight)]
        held = Reservations()
        fleet = fleet_module.Fleet(lambda: config, held, lambda: views[-1], lambda: True)
        ask = Ask(Request("kling-v2-6", "standard", 5), 1, "p", None)  # 10 credits

        async def run() -> Any:
            status, _ = await held.reserve(views[-1], ask, "h1", 600.0, "fp")
            assert status == 201  # 10 of 10 held
            fleet.up = True  # it answered before; now it does not
            assert server.proc is not None
            server.proc.send_signal(signal.SIGSTOP)

            def task_submitted_under_the_hold() -> None:
                views.append(View(budgets, {}, DayUsage({("p", None): [10.0, 1.4]})))
                held.consumed({"h1": 1})

            asyncio.get_running_loop().call_later(0.05, task_submitted_under_the_hold)
            return await fleet.decide(ask, None, 60.0)

        result = asyncio.run(run())
        assert not fleet.up
        assert not result.allowed and result.refused_by == "team", result
    finally:
        if server.proc is not None:
            server.proc.send_signal(signal.SIGCONT)
        server.stop()
