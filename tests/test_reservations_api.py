"""Reservations against the running exporter: concurrent workers, restarts with kill -9,
bad requests, and the producer library's reserve."""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from kling_exporter.client import (
    BudgetClient,
    BudgetExceededError,
    BudgetUnavailableError,
    EventLogger,
)
from kling_exporter.demo import STANDIN_PATH, StandInServer
from kling_exporter.journals.holds import Granted, Hold, HoldJournal
from kling_exporter.kling.standin import KlingStandIn

from tests.helpers import DaemonProcess, free_port, request, value, wait_until, write_lines

Factory = Callable[..., DaemonProcess]

CONFIG = """
state: {{path: {state}}}
logs: {{poll_interval: 100ms}}
budgets:
  - {{name: team, project: p, period: monthly, limit_credits: 100}}
"""
TASK: dict[str, Any] = {
    "project": "p",
    "model": "kling-v2-6",
    "mode": "std",
    "duration": 5,
}  # 10 credits


def start(tmp_path: Path, daemon_factory: Factory, state: str = "''") -> DaemonProcess:
    return daemon_factory(CONFIG.format(state=state))


def post(d: DaemonProcess, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    status, raw = d.post("/api/v1/reservations", json.dumps(body).encode())
    return status, json.loads(raw)


def delete(d: DaemonProcess, rid: str) -> int:
    return request(f"{d.url}/api/v1/reservations/{rid}", method="DELETE")[0]


def live(d: DaemonProcess) -> dict[str, dict[str, Any]]:
    status, raw = d.get("/api/v1/reservations")
    assert status == 200
    return {r["id"]: r for r in json.loads(raw)["reservations"]}


def budget(d: DaemonProcess) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(d.get("/api/v1/budgets")[1])["budgets"][0]
    return result


def test_64_workers_are_granted_exactly_what_fits(tmp_path: Path, daemon_factory: Factory) -> None:
    # With a state file, so that every grant waits for its journal write and fsync.
    d = start(tmp_path, daemon_factory, state=str(tmp_path / "k.state"))
    barrier = threading.Barrier(64)

    def worker(i: int, count: int = 1, ttl: str = "1m") -> tuple[int, int]:
        barrier.wait()
        status, answer = post(d, {**TASK, "count": count, "id": f"w{i}-{count}", "ttl": ttl})
        assert status in (200, 201), answer
        return status, count

    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(worker, range(64)))
    assert sum(1 for status, _ in results if status == 201) == 10  # exactly K, none over
    assert budget(d)["reserved_credits"] == 100

    # Mixed sizes, after releasing everything: the grants fit, and no worker was refused
    # while its size still fitted (room only shrinks in this round).
    for rid in live(d):
        assert delete(d, rid) == 204
    sizes = [random.Random(i).randint(1, 4) for i in range(64)]
    barrier.reset()
    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(worker, range(64, 128), sizes))
    granted = sum(count for status, count in results if status == 201)
    assert granted <= 10
    refused = [count for status, count in results if status == 200]
    assert all(count > 10 - granted for count in refused)
    assert budget(d)["reserved_credits"] == 10 * granted

    # Releases and expiries interleaved with new grants: what comes back is granted again.
    for rid in list(live(d))[: len(live(d)) // 2]:
        assert delete(d, rid) == 204
    barrier = threading.Barrier(32)
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda i: worker(i, 1, "2s"), range(200, 232)))
    held = budget(d)["reserved_credits"]
    assert held == 100  # the released room was taken, exactly
    short = [rid for rid, r in live(d).items() if rid.startswith("w2")]
    assert short
    wait_until(lambda: budget(d)["reserved_credits"] == 100 - 10 * len(short), timeout=10)
    barrier = threading.Barrier(32)
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(worker, range(300, 332)))
    assert sum(1 for status, _ in results if status == 201) == len(short)
    assert value(d.metrics(), "kling_reservations_total", outcome="expired") == len(short)


def test_submissions_use_holds_and_a_kill_9_loses_or_repeats_none(
    tmp_path: Path, daemon_factory: Factory
) -> None:
    d = start(tmp_path, daemon_factory, state=str(tmp_path / "k.state"))
    status, first = post(d, {**TASK, "count": 3, "id": "batch-1", "ttl": "1h"})
    assert status == 201
    assert post(d, {**TASK, "count": 5, "id": "batch-2", "ttl": "1h"})[0] == 201
    assert post(d, {**TASK, "count": 3})[1]["refused_by"] == "team"  # 80 held, 20 left
    d.stop(signal.SIGKILL)  # the grants were on disk before their answers

    d = start(tmp_path, daemon_factory, state=str(tmp_path / "k.state"))
    assert set(live(d)) == {"batch-1", "batch-2"}
    status, again = post(d, {**TASK, "count": 3, "id": "batch-1", "ttl": "1h"})
    assert status == 200 and again["expires_at"] == first["expires_at"]
    log = EventLogger(tmp_path / "logs", project="p")
    for i in range(2):
        log.submitted(f"t{i}", "kling-v2-6", "std", 5, reservation_id="batch-1")
    wait_until(lambda: live(d)["batch-1"]["count_left"] == 1)
    b = budget(d)
    assert (b["reserved_credits"], b["in_flight_credits"]) == (60, 20)
    d.stop(signal.SIGKILL)

    # The reader may read the two submissions again; they still use two tasks.
    d = start(tmp_path, daemon_factory, state=str(tmp_path / "k.state"))
    wait_until(lambda: live(d).get("batch-1", {}).get("count_left") == 1)
    b = budget(d)
    assert (b["reserved_credits"], b["in_flight_credits"]) == (60, 20)
    assert delete(d, "batch-2") == 204
    d.stop()
    d = start(tmp_path, daemon_factory, state=str(tmp_path / "k.state"))
    assert set(live(d)) == {"batch-1"}
    assert delete(d, "batch-2") == 404


def test_a_submission_naming_no_live_reservation_is_counted(
    tmp_path: Path, daemon_factory: Factory
) -> None:
    d = start(tmp_path, daemon_factory)
    write_lines(
        tmp_path / "logs" / "kling-a.jsonl",
        [json.dumps({**TASK, "event": "task_submitted", "task_id": "x", "reservation_id": "no"})],
    )
    d.wait_metric("kling_reservations_total", 1, outcome="unknown")
    assert budget(d)["in_flight_credits"] == 10


BAD_RESERVATIONS: list[tuple[dict[str, Any], str]] = [
    ({"ttl": "25h"}, "ttl"),
    ({"ttl": 0}, "ttl"),
    ({"ttl": "soon"}, "ttl"),
    ({"count": 0}, "count"),
    ({"id": "x" * 129}, "id"),
    ({"id": "has space"}, "id"),
    ({"id": "é"}, "id"),
    ({"reservations": 1}, "reservations"),
]


def test_bad_reservation_requests_name_the_field(tmp_path: Path, daemon_factory: Factory) -> None:
    d = start(tmp_path, daemon_factory)
    for body, field in BAD_RESERVATIONS:
        status, answer = post(d, {**TASK, **body})
        assert status == 400 and answer["field"] == field, (body, answer)
    assert delete(d, "never-granted") == 404
    assert live(d) == {}


def test_client_reserve_holds_releases_on_error_and_fails_as_asked(
    tmp_path: Path, daemon_factory: Factory
) -> None:
    d = start(tmp_path, daemon_factory)
    client = BudgetClient(d.url)
    log = EventLogger(tmp_path / "logs", project="p")
    with client.reserve(count=2, **TASK) as held:
        rid = held.id
        assert rid is not None and rid in live(d)
        log.submitted("c1", "kling-v2-6", "std", 5, reservation_id=rid)
    wait_until(lambda: live(d)[rid]["count_left"] == 1)

    with pytest.raises(RuntimeError), client.reserve(count=5, **TASK) as doomed:
        raise RuntimeError("the Kling call failed")
    assert doomed.id not in live(d)  # released on the error

    with pytest.raises(BudgetExceededError) as refused:
        client.reserve(count=10, **TASK)
    assert refused.value.result["refused_by"] == "team"
    with pytest.raises(ValueError, match="ttl"):
        client.reserve(ttl="2d", **TASK)

    nowhere = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(BudgetUnavailableError):
        BudgetClient(nowhere, timeout=2).reserve(**TASK)
    with pytest.raises(BudgetUnavailableError):
        BudgetClient(nowhere, timeout=2).check(**TASK)
    allowed = BudgetClient(nowhere, timeout=2, fail_open=True).reserve(**TASK)
    assert allowed.id is None and allowed.answer["unavailable"] is True
    assert BudgetClient(nowhere, timeout=2, fail_open=True).check(**TASK)["allowed"] is True
    start_ts = time.monotonic()
    assert not allowed.release()
    assert time.monotonic() - start_ts < 1


def health_latencies(d: DaemonProcess, action: Callable[[], object]) -> list[float]:
    """How long each /-/healthy took, asked one after another while ``action`` ran."""
    latencies: list[float] = []
    done = threading.Event()

    def probe() -> None:
        while not done.is_set():
            began = time.monotonic()
            assert request(f"{d.url}/-/healthy")[0] == 200
            latencies.append(time.monotonic() - began)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        action()
    finally:
        done.set()
        prober.join()
    return latencies


def test_20000_holds_are_listed_a_page_at_a_time_while_health_answers_at_once(
    tmp_path: Path, daemon_factory: Factory
) -> None:
    state = tmp_path / "k.state"
    holds = [
        Hold(f"hold-{i:05d}", "f", "p", None, 1, 0.01, 0.0014, ("team",), time.time() + 3600)
        for i in range(20_000)
    ]
    journal = HoldJournal(state.with_name(state.name + ".reservations"))
    journal.rewrite([Granted(h) for h in holds])
    journal.close()
    d = start(tmp_path, daemon_factory, state=str(state))
    # Pages are asked by the cursor the first answer gave, and decoded afterwards, so
    # that this process's decoding does not delay its own health probes.
    cursor = json.loads(d.get("/api/v1/reservations?limit=10000")[1])["next"]
    bodies: list[bytes] = []

    def list_three_times() -> None:
        for _ in range(3):
            for query in ("?limit=10000", f"?limit=10000&after={cursor}"):
                status, raw = d.get(f"/api/v1/reservations{query}")
                assert status == 200
                bodies.append(raw)

    began = time.monotonic()
    during = health_latencies(d, list_three_times)
    took = time.monotonic() - began
    # The same probes for as long with nothing listed: what the machine itself adds
    # (the tests may share it with others).
    idle = health_latencies(d, lambda: time.sleep(took))
    answers = [json.loads(raw) for raw in bodies]
    assert [a.get("next") for a in answers] == [cursor, None] * 3
    ids = [r["id"] for a in answers[:2] for r in a["reservations"]]
    assert ids == [h.id for h in holds]
    print(
        f"3 listings of 20000 holds in {took:.2f}s; health max {max(during) * 1000:.1f} ms"
        f" (idle: {max(idle) * 1000:.1f} ms)"
    )
    assert max(during) < max(idle) + 0.05, (sorted(during)[-5:], sorted(idle)[-5:])
    status, raw = d.get("/api/v1/reservations")
    assert len(json.loads(raw)["reservations"]) == 1000  # the default page
    for query in ("?limit=0", "?limit=10001", "?limit=x", "?after=" + "a" * 129):
        status, raw = d.get(f"/api/v1/reservations{query}")
        assert status == 400, query
        assert json.loads(raw)["field"] == query[1:].split("=")[0]


@pytest.mark.parametrize("key", ["max_live", "max_live_per_project"])
def test_past_max_live_a_hold_is_429_over_http(
    tmp_path: Path, daemon_factory: Factory, key: str
) -> None:
    d = daemon_factory(
        CONFIG.format(state="''")
        + "  - {name: other, project: q, period: monthly, limit_credits: 100}\n"
        + f"reservations: {{{key}: 2}}\n"
    )
    image = {"project": "p", "kind": "image"}
    assert post(d, {**image, "id": "a"})[0] == 201
    assert post(d, {**image, "id": "b"})[0] == 201
    status, answer = post(d, {**image, "id": "c"})
    assert status == 429
    assert answer["field"] == f"reservations.{key}" and "2" in answer["error"]
    # Another project: refused only by the cap on all live holds.
    status, answer = post(d, {**image, "project": "q", "id": "d"})
    assert status == (429 if key == "max_live" else 201), answer
    assert delete(d, "a") == 204
    assert post(d, {**image, "id": "c"})[0] == 201


ACCESS = "AK-reservations-access-key-71c2"
SECRET = "SK-reservations-secret-key-3f09-0123456789"  # noqa: S105 - the stand-in's own key
GATEWAY_CONFIG = """
state: {{path: k.state}}
logs: {{paths: ["logs/kling-*.jsonl"], poll_interval: 100ms}}
budgets:
  - {{name: team, project: p, period: monthly, limit_credits: 100}}
gateway:
  enabled: true
  upstream: {upstream}
  timeout: 20s
  projects_by_access_key: {{{access}: p}}
"""


def test_the_reservations_api_neither_lists_nor_releases_the_gateways_holds(
    tmp_path: Path, daemon_factory: Factory
) -> None:
    """While creates wait on Kling, their holds are the gateway's: a producer that
    lists holds and deletes them (29 tasks went through a 100-credit limit so) finds
    none, and is told 404 as for an unknown id; the budget still counts them."""
    standin = KlingStandIn(ACCESS, SECRET, [])
    standin.task_mode, standin.task_delay = "slow", 4.0
    with StandInServer(standin) as server:
        upstream = f"http://127.0.0.1:{server.port}{STANDIN_PATH}"
        d = daemon_factory(GATEWAY_CONFIG.format(upstream=upstream, access=ACCESS))
        headers = {
            "Authorization": f"Bearer {standin.token()}",
            "Content-Type": "application/json",
        }
        body = json.dumps(TASK | {"model_name": "kling-v2-6", "duration": "5"}).encode()

        def create(_: int) -> int:
            url = f"{d.url}/kling/v1/videos/text2video"
            return request(url, body, headers, method="POST", timeout=30)[0]

        journal = HoldJournal(tmp_path / "k.state.reservations")
        with ThreadPoolExecutor(3) as pool:
            creates = list(map(lambda i: pool.submit(create, i), range(3)))
            wait_until(lambda: len(journal.load()) == 3, timeout=10)
            held = [r.hold.id for r in journal.load() if isinstance(r, Granted)]
            assert live(d) == {}
            for rid in held:
                status, raw = request(f"{d.url}/api/v1/reservations/{rid}", method="DELETE")
                assert status == 404 and json.loads(raw)["field"] == "id", raw
            assert budget(d)["reserved_credits"] == 30
            assert [f.result() for f in creates] == [200] * 3
