"""The gateway: producers call Kling through the exporter, and no task over budget
reaches Kling. Real exporter processes and sockets against a local stand-in of Kling's
create and query endpoints; nothing calls the real service."""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import functools
import http.client
import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kling_exporter.configfile import ConfigError, parse_config
from kling_exporter.demo import STANDIN_PATH, StandInServer
from kling_exporter.guard.reservations import Reservations
from kling_exporter.journals.holds import Granted, HoldJournal
from kling_exporter.journals.tasklog import EventJournal
from kling_exporter.kling.endpoints import CREATES, priced, route_of
from kling_exporter.kling.standin import KlingStandIn
from kling_exporter.reading.daemon import Daemon
from kling_exporter.serving.server import build_app

from tests.helpers import DaemonProcess, by_name, value, wait_until
from tests.redis_server import RedisServer

ACCESS = "AK-gateway-access-key-5b1e"
MAPPED = "AK-gateway-mapped-key-77aa"  # mapped to the project "mapped"
SECRET = "SK-gateway-secret-key-0c44d-0123456789"  # noqa: S105 - the stand-in's own key
CREATE = "/kling/v1/videos/text2video"
# Default pricing: a standard 5 s video is 10 credits.
VIDEO = {"model_name": "kling-v2-6", "mode": "std", "duration": "5", "prompt": "a fox in snow"}


def config(upstream: str, extra: str = "") -> str:
    return f"""
logs: {{paths: ["logs/kling-*.jsonl"], poll_interval: 100ms}}
state: {{path: gw.state, interval: 1s}}
budgets:
  - {{name: crowd, project: crowd, period: monthly, limit_credits: 100}}
  - {{name: errors, project: errors, period: monthly, limit_credits: 1000000}}
  - {{name: killed, project: killed, period: monthly, limit_credits: 1000000}}
gateway:
  enabled: true
  upstream: {upstream}
  timeout: 1s
  projects_by_access_key: {{{MAPPED}: mapped}}
  trust_project_header: true
  inject_callback_url: https://exporter.example/api/v1/kling/callback
kling: {{callback_token: 0123456789abcdef}}
{extra}
"""


@pytest.fixture(scope="module")
def kling() -> Iterator[tuple[KlingStandIn, str]]:
    """The stand-in on a loopback port of its own, served from a thread."""
    standin = KlingStandIn(ACCESS, SECRET, [])
    standin.keys[MAPPED] = SECRET
    with StandInServer(standin) as server:
        yield standin, f"http://127.0.0.1:{server.port}{STANDIN_PATH}"


@pytest.fixture(autouse=True)
def well(kling: tuple[KlingStandIn, str]) -> None:
    """Each test starts with the stand-in answering promptly."""
    kling[0].task_mode = "ok"
    kling[0].task_delay = 0.0


@pytest.fixture(scope="module")
def exporter(
    kling: tuple[KlingStandIn, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DaemonProcess]:
    """One exporter with the gateway for the tests that do not stop it."""
    workdir = tmp_path_factory.mktemp("gateway")
    daemon = DaemonProcess(workdir, config(kling[1]))
    daemon.start()
    yield daemon
    daemon.stop()


def call(
    daemon: DaemonProcess,
    body: Any,
    project: str | None = None,
    token: str | None = None,
    path: str = CREATE,
    method: str = "POST",
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """A producer's request through the gateway: status, JSON answer, headers."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if project is not None:
        headers["X-Kling-Project"] = project
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=30)
    try:
        conn.request(method, path, body=data if method == "POST" else None, headers=headers)
        answer = conn.getresponse()
        raw = answer.read()
        return answer.status, json.loads(raw) if raw else {}, dict(answer.getheaders())
    finally:
        conn.close()


def ext(event: dict[str, Any]) -> str:
    """The producer's own id of a journal line (its task id is Kling's)."""
    return str(event.get("external_task_id", event["task_id"]))


def journal(daemon: DaemonProcess) -> list[dict[str, Any]]:
    path = daemon.workdir / "logs" / "kling-callbacks.jsonl"
    if not path.exists():
        return []
    return [json.loads(text) for text in path.read_text().splitlines()]


def submitted(daemon: DaemonProcess, project: str) -> list[dict[str, Any]]:
    return [
        e for e in journal(daemon) if e["event"] == "task_submitted" and e["project"] == project
    ]


def budget(daemon: DaemonProcess, name: str) -> dict[str, Any]:
    status, raw = daemon.get("/api/v1/budgets")
    assert status == 200, raw
    found: dict[str, Any] = next(b for b in json.loads(raw)["budgets"] if b["name"] == name)
    return found


def committed(row: dict[str, Any]) -> float:
    return float(row["used_credits"] + row["in_flight_credits"] + row["reserved_credits"])


def test_concurrent_producers_never_commit_more_than_the_budget(
    kling: tuple[KlingStandIn, str], exporter: DaemonProcess
) -> None:
    """64 producers at once against room for exactly 10 tasks: 10 reach Kling, 54 are
    refused in Kling's shape, and the budget commits exactly 10 tasks."""
    standin = kling[0]
    token = standin.token()
    before = len(standin.created)
    start = threading.Barrier(64)

    def produce(i: int) -> tuple[int, dict[str, Any], dict[str, str]]:
        start.wait()
        return call(exporter, {**VIDEO, "external_task_id": f"crowd-{i}"}, "crowd", token)

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        answers = list(pool.map(produce, range(64)))
    statuses = sorted(status for status, _, _ in answers)
    assert statuses == [200] * 10 + [429] * 54
    assert len(standin.created) - before == 10
    for status, body, headers in answers:
        if status == 429:
            assert body["code"] == 1102 and body["request_id"], body
            assert "'crowd'" in body["message"] and "%" in body["message"], body
            assert headers["X-Budget-Refused-By"] == "crowd"
        else:
            assert body["code"] == 0 and body["data"]["task_id"].startswith("kt-"), body
    assert committed(budget(exporter, "crowd")) == 100
    # Once the reader has read the journal, the holds have become tasks in flight.
    wait_until(lambda: budget(exporter, "crowd")["reserved_credits"] == 0)
    row = budget(exporter, "crowd")
    assert committed(row) == 100 and row["in_flight_credits"] == 100, row
    assert sorted(ext(e) for e in submitted(exporter, "crowd")) == sorted(
        body["data"]["task_info"]["external_task_id"] for s, body, _ in answers if s == 200
    )
    series = exporter.metrics()
    assert value(series, "kling_gateway_requests_total", route="create", outcome="refused") == 54
    assert (
        value(
            series,
            "kling_tasks_submitted_total",
            project="crowd",
            model="kling-v2-6",
            mode="standard",
        )
        == 10
    )


def test_a_producer_that_goes_away_still_has_its_task_journalled_once(
    kling: tuple[KlingStandIn, str], exporter: DaemonProcess
) -> None:
    standin = kling[0]
    standin.task_mode, standin.task_delay = "slow", 0.5
    before = len(standin.created)
    body = json.dumps({**VIDEO, "external_task_id": "gone-1"}).encode()
    head = (
        f"POST {CREATE} HTTP/1.1\r\nHost: x\r\nX-Kling-Project: free\r\n"
        f"Authorization: Bearer {standin.token()}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", exporter.port), timeout=5) as producer:
        producer.sendall(head + body)
        wait_until(lambda: len(standin.created) > before, timeout=5)
    # Gone before Kling answered; the gateway journals the task all the same.
    wait_until(lambda: [e for e in submitted(exporter, "free") if ext(e) == "gone-1"])
    time.sleep(0.7)
    lines = [e for e in submitted(exporter, "free") if ext(e) == "gone-1"]
    assert len(lines) == 1, lines
    assert lines[0]["task_id"].startswith("kt-") and lines[0]["mode"] == "standard"


def create_in_process(
    kling: tuple[KlingStandIn, str], tmp_path: Path, journal: HoldJournal
) -> tuple[int, dict[str, Any]]:
    """One create through the gateway of an app served in this process, with ``journal``
    as its reservation journal (closed after); Kling's status and answer."""
    logs = tmp_path / "logs"
    daemon = Daemon(
        parse_config(
            {
                "logs": {"paths": [str(logs / "kling-*.jsonl")]},
                "budgets": [{"name": "b", "project": "inproc", "limit_credits": 1000}],
                "gateway": {"enabled": True, "upstream": kling[1], "default_project": "inproc"},
            }
        )
    )
    daemon.ready.set()  # no logs to read first
    held = Reservations(journal)
    app = build_app(daemon, reservations=held)

    async def create() -> tuple[int, dict[str, Any]]:
        async with TestServer(app) as server, aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{server.port}{CREATE}"
            token = kling[0].token()
            headers = {"X-Kling-Project": "inproc", "Authorization": f"Bearer {token}"}
            try:
                async with asyncio.timeout(5):
                    async with session.post(url, json=VIDEO, headers=headers) as answer:
                        return answer.status, await answer.json()
            finally:
                await held.close()

    return asyncio.run(create())


def test_a_create_goes_on_to_kling_while_its_hold_is_written(
    kling: tuple[KlingStandIn, str], tmp_path: Path
) -> None:
    """One fsync on a create's way, not two: the task line is on disk before the
    producer hears of it; the hold's record waits for no fsync, and lands."""
    journal = HoldJournal(tmp_path / "holds.journal")
    journal.rewrite([])
    unblock = threading.Event()
    write = journal._commit.write

    def stalled_write(data: bytes) -> None:
        unblock.wait(10)  # a disk that takes its time over the hold journal's fsync
        write(data)

    journal._commit.write = stalled_write
    try:
        status, body = create_in_process(kling, tmp_path, journal)
    finally:
        unblock.set()
    assert status == 200 and body["code"] == 0, body
    path = tmp_path / "logs" / "kling-callbacks.jsonl"
    lines = [json.loads(t) for t in path.read_text().splitlines()]
    assert [e["task_id"] for e in lines] == [body["data"]["task_id"]]
    (granted,) = HoldJournal(tmp_path / "holds.journal").load()
    assert isinstance(granted, Granted) and granted.hold.id == lines[0]["reservation_id"]


@pytest.mark.parametrize("cause", ["no task line", "no task named"])
def test_a_hold_that_is_a_tasks_only_record_is_fsynced_before_the_answer(
    kling: tuple[KlingStandIn, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cause: str
) -> None:
    """The task line cannot be written (its path is a folder), or Kling's answer does
    not name the task it may have made: Kling's answer still goes back, a retry would
    pay twice, and the hold that counts the task meanwhile is fsynced first, not left
    to the kernel's writeback as a hold usually is."""
    if cause == "no task line":  # the disk fills between the journal's check and its write

        def full(self: EventJournal, data: bytes) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(EventJournal, "_write", full)
    else:
        kling[0].task_mode = "unnamed"
    journal = HoldJournal(tmp_path / "holds.journal")
    journal.rewrite([])
    fsynced: list[int] = []
    fsync = os.fsync

    def recorded(fd: int) -> None:
        fsynced.append(fd)
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recorded)
    hold_fd = journal.fd
    status, body = create_in_process(kling, tmp_path, journal)
    assert status == 200 and body["code"] == 0, body
    assert hold_fd in fsynced
    (granted,) = HoldJournal(tmp_path / "holds.journal").load()
    assert isinstance(granted, Granted) and granted.hold.project == "inproc"


@pytest.mark.parametrize(
    ("mode", "status", "code"),
    [
        ("server_error", 500, 5000),
        ("unauthorized", 401, 1004),
        ("no_credits", 429, 1102),
        ("rate_limited", 429, 1302),
        ("slow", 504, 5002),
        ("drop", 502, 5001),
    ],
)
def test_a_kling_error_or_transport_failure_releases_the_hold(
    kling: tuple[KlingStandIn, str], exporter: DaemonProcess, mode: str, status: int, code: int
) -> None:
    standin = kling[0]
    standin.task_mode, standin.task_delay = mode, 1.5  # past the gateway's timeout of 1s
    external = f"err-{mode}"
    token = standin.token()
    got, body, _ = call(exporter, {**VIDEO, "external_task_id": external}, "errors", token)
    if mode in ("slow", "drop"):  # the gateway's own answer, in Kling's shape
        assert body["code"] == code and body["request_id"].startswith("gateway-"), body
    else:  # Kling's answer, passed on as it was
        assert body["code"] == code and body["request_id"].startswith("standin-"), body
    assert got == status
    row = budget(exporter, "errors")
    assert row["reserved_credits"] == 0 and committed(row) == 0, row
    assert not [e for e in submitted(exporter, "errors") if ext(e) == external]
    outcome = "transport_error" if mode in ("slow", "drop") else "upstream_error"
    assert (
        value(exporter.metrics(), "kling_gateway_requests_total", route="create", outcome=outcome)
        >= 1
    )


def test_a_finished_task_seen_by_a_query_is_journalled_once(
    kling: tuple[KlingStandIn, str], exporter: DaemonProcess
) -> None:
    standin = kling[0]
    token = standin.token()
    status, body, _ = call(exporter, {**VIDEO, "external_task_id": "q-1"}, "free", token)
    assert status == 200, body
    kling_id = body["data"]["task_id"]
    for _ in range(3):
        got, answer, _ = call(
            exporter, None, token=token, path=f"{CREATE}/{kling_id}", method="GET"
        )
        assert got == 200 and answer["data"]["task_status"] == "succeed", answer
    lines = [e for e in journal(exporter) if e["event"] == "task_completed" and ext(e) == "q-1"]
    assert len(lines) == 1, lines
    assert lines[0]["credits_used"] == standin.credits and lines[0]["kling_task_id"] == kling_id
    wait_until(
        lambda: (
            value(
                exporter.metrics(),
                "kling_tasks_completed_total",
                project="free",
                model="kling-v2-6",
                status="succeed",
            )
            >= 1
        )
    )


def test_a_mapped_access_key_binds_its_project_and_the_header_chooses_only_if_trusted(
    kling: tuple[KlingStandIn, str], exporter: DaemonProcess
) -> None:
    """A producer whose key is mapped cannot move its tasks to another budget with the
    header (issue 39, finding 13); an unmapped one may, since the config trusts it."""
    mapped = kling[0].token(access_key=MAPPED)
    assert call(exporter, {**VIDEO, "external_task_id": "p-1"}, None, mapped)[0] == 200
    assert call(exporter, {**VIDEO, "external_task_id": "p-2"}, "crowd", mapped)[0] == 200
    unmapped = kling[0].token()
    assert call(exporter, {**VIDEO, "external_task_id": "p-3"}, "named", unmapped)[0] == 200
    projects = {ext(e): e["project"] for e in journal(exporter) if ext(e)[:2] == "p-"}
    assert projects == {"p-1": "mapped", "p-2": "mapped", "p-3": "named"}
    status, body, _ = call(exporter, VIDEO, None, unmapped)
    assert status == 400 and body["code"] == 1201, body
    assert body["message"].startswith("project:") and "X-Kling-Project" in body["message"]
    assert set(body) == {"code", "message", "request_id"}
    assert mapped not in exporter.output() and MAPPED not in exporter.output()


def test_a_create_body_over_64_kib_is_413_and_reaches_no_one(
    kling: tuple[KlingStandIn, str], exporter: DaemonProcess
) -> None:
    before = len(kling[0].created)
    large = {**VIDEO, "prompt": "x" * (64 * 1024)}
    status, body, _ = call(exporter, large, "free", kling[0].token())
    assert status == 413 and body["code"] == 1201 and body["message"].startswith("body:"), body
    assert len(kling[0].created) == before


def test_the_callback_url_is_injected_only_where_none_is_given(
    kling: tuple[KlingStandIn, str], exporter: DaemonProcess
) -> None:
    standin = kling[0]
    own = "https://producer.example/done"
    call(exporter, {**VIDEO, "external_task_id": "cb-1"}, "free", standin.token())
    call(
        exporter,
        {**VIDEO, "external_task_id": "cb-2", "callback_url": own},
        "free",
        standin.token(),
    )
    sent = {b["external_task_id"]: b["callback_url"] for b in standin.created[-2:]}
    assert sent["cb-2"] == own
    assert sent["cb-1"].startswith("https://exporter.example/api/v1/kling/callback?token=")


def test_other_requests_pass_through_unchanged(
    kling: tuple[KlingStandIn, str], exporter: DaemonProcess
) -> None:
    standin = kling[0]
    path = "/account/costs?start_time=1&end_time=2"
    headers = {"Authorization": f"Bearer {standin.token()}"}
    conn = http.client.HTTPConnection("127.0.0.1", exporter.port, timeout=10)
    conn.request("GET", "/kling" + path, headers=headers)
    through = conn.getresponse()
    assert through.status == 200 and json.loads(through.read())["code"] == 0
    conn.request("GET", "/kling/v1/nowhere", headers=headers)
    missing = conn.getresponse()
    assert missing.status == 404 and missing.read() == b"404: Not Found"  # aiohttp's own
    conn.close()
    series = exporter.metrics()
    assert value(series, "kling_gateway_requests_total", route="other", outcome="forwarded") >= 1
    assert by_name(series, "kling_gateway_upstream_duration_seconds_count")


# Any JSON value, and objects with the fields the gateway prices.
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = ("model_name", "mode", "duration", "sound", "n", "external_task_id", "callback_url")
BODIES = JSON | st.dictionaries(
    st.sampled_from(FIELDS),
    JSON
    | st.sampled_from(["std", "pro", "5", "10", "on", "off", "kling-v2-6", 5, 10, "", "x" * 200]),
    max_size=6,
)


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=BODIES)
def test_any_create_body_gets_2xx_or_4xx_naming_the_bad_field(
    kling: tuple[KlingStandIn, str], exporter: DaemonProcess, body: Any
) -> None:
    raw = json.dumps(body, allow_nan=True).encode()
    status, answer, _ = call(exporter, raw, "free", kling[0].token())
    assert status < 500, (status, answer)
    if status == 400:
        field = answer["message"].split(":", 1)[0]
        assert field == "body" or field in FIELDS, answer


def test_the_pricing_input_is_read_as_kling_documents_it() -> None:
    text2video = CREATES["/v1/videos/text2video"]
    asked = priced(
        {"model_name": "kling-v2-6", "mode": "pro", "duration": "10", "sound": "on"}, text2video
    )
    assert asked.req == ("kling-v2-6", "professional", 10, True, "video") and asked.tasks == 1
    assert priced({"n": 4}, CREATES["/v1/images/generations"]).tasks == 4
    assert priced({"n": 4}, text2video).tasks == 1
    with pytest.raises(ValueError, match=r"^duration: "):
        priced({"duration": "five"}, text2video)
    # Effects nest what is priced under input.
    effects = priced(
        {"effect_scene": "hug", "input": {"mode": "pro", "duration": "10"}},
        CREATES["/v1/videos/effects"],
    )
    assert effects.req.mode == "professional" and effects.req.duration == 10
    assert route_of("POST", "/v1/images/generations") == "create"
    assert route_of("POST", "/v1/anything/new") == "create"  # deny by default
    assert route_of("PUT", "/v1/videos/text2video") == "create"
    assert route_of("GET", "/v1/videos/text2video/kt-1") == "query"
    assert route_of("GET", "/account/costs") == "other"


@pytest.mark.parametrize(
    ("key", "value", "error"),
    [
        ("path_prefix", "/api/kling", "gateway.path_prefix: '/api/kling' is a path"),
        ("path_prefix", "kling/", "gateway.path_prefix: expected a path"),
        ("upstream", "api.klingai.com", "gateway.upstream: expected an http(s) URL"),
        ("timeout", "0s", "gateway.timeout: expected 1s to 10m"),
        ("project_header", "X Project", "gateway.project_header: expected an HTTP header"),
        ("default_project", "x" * 200, "gateway.default_project: expected up to 128"),
    ],
)
def test_a_bad_gateway_setting_is_refused_naming_its_key(key: str, value: Any, error: str) -> None:
    with pytest.raises(ConfigError, match="^" + re.escape(error)):
        parse_config({"gateway": {key: value}})


def test_kill_9_loses_no_task_the_producer_was_told_of_and_counts_none_twice(
    kling: tuple[KlingStandIn, str], tmp_path: Path
) -> None:
    standin, base = kling
    standin.task_mode, standin.task_delay = "slow", 0.3
    daemon = DaemonProcess(tmp_path, config(base)).start()
    before = len(standin.created)
    token = standin.token()

    def produce(i: int) -> str | None:
        time.sleep(i * 0.05)  # one after another, so that the kill finds each stage
        try:
            status, body, _ = call(daemon, {**VIDEO, "external_task_id": f"k-{i}"}, "killed", token)
        except (OSError, http.client.HTTPException):
            return None  # the exporter died before answering
        return f"k-{i}" if status == 200 and body["code"] == 0 else None

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        futures = [pool.submit(produce, i) for i in range(24)]
        # Some answered, some with Kling, some not yet sent.
        wait_until(lambda: len(standin.created) - before >= 14, timeout=10)
        daemon.send(signal.SIGKILL)
        told = {f.result() for f in futures} - {None}
    daemon.stop()
    assert told, "no producer was told of a task before the kill"
    standin.task_mode = "ok"
    daemon.start()
    ids = [ext(e) for e in submitted(daemon, "killed")]
    assert len(ids) == len(set(ids)) and told <= set(ids), (told, ids)

    def counted() -> float:
        return sum(by_name(daemon.metrics(), "kling_tasks_submitted_total").values())

    wait_until(lambda: counted() == len(ids))
    time.sleep(0.5)
    assert counted() == len(ids)
    daemon.stop()


def test_a_fleet_of_gateways_never_commits_more_than_the_budget(
    kling: tuple[KlingStandIn, str], tmp_path: Path
) -> None:
    """Two exporters sharing budgets through a real redis-server: 32 producers split
    between their gateways against room for exactly 10 tasks fleet-wide."""
    standin, base = kling
    redis = RedisServer(tmp_path / "redis").start()
    daemons: list[DaemonProcess] = []
    try:
        for name in ("east", "west"):
            fleet = (
                f"fleet: {{redis_url: '{redis.url}', instance: {name}, publish_interval: 200ms}}"
            )
            (tmp_path / name).mkdir()
            daemons.append(DaemonProcess(tmp_path / name, config(base, fleet)).start())

        def settled(d: DaemonProcess) -> bool:
            described = json.loads(d.get("/api/v1/budgets")[1])["fleet"]
            return bool(described["up"] and described["settled"] and described["instances"] == 2)

        for d in daemons:
            wait_until(functools.partial(settled, d), timeout=20)
        before = len(standin.created)
        token = standin.token()
        start = threading.Barrier(32)

        def produce(i: int) -> int:
            start.wait()
            body = {**VIDEO, "external_task_id": f"fleet-{i}"}
            return call(daemons[i % 2], body, "crowd", token)[0]

        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            statuses = sorted(pool.map(produce, range(32)))
        assert statuses == [200] * 10 + [429] * 22
        assert len(standin.created) - before == 10
        assert sum(len(submitted(d, "crowd")) for d in daemons) == 10
        assert committed(budget(daemons[0], "crowd")) == 100
    finally:
        for d in daemons:
            d.stop()
        redis.stop()


def test_a_prefix_sent_percent_encoded_still_reaches_the_upstream(
    kling: tuple[KlingStandIn, str], exporter: DaemonProcess
) -> None:
    """``/%6Bling/...`` is ``/kling/...``: what follows the prefix goes to the configured
    upstream, never glued to its host."""
    headers = {"Authorization": f"Bearer {kling[0].token()}"}
    conn = http.client.HTTPConnection("127.0.0.1", exporter.port, timeout=10)
    conn.request("GET", "/%6Bling/account/costs?start_time=1&end_time=2", headers=headers)
    answer = conn.getresponse()
    assert answer.status == 200 and json.loads(answer.read())["code"] == 0
    conn.close()


def test_the_journal_may_live_apart_so_the_logs_stay_read_only(
    kling: tuple[KlingStandIn, str], tmp_path: Path
) -> None:
    """``logs.journal`` in a folder of its own (made at start, as the state's is): the
    gateway's lines go there, are counted, and nothing is written among the logs. The
    start says the gateway is on and where it sends."""
    standin, base = kling
    (tmp_path / "logs").mkdir()
    text = config(base).replace(
        'logs: {paths: ["logs/kling-*.jsonl"], poll_interval: 100ms}',
        'logs: {paths: ["logs/kling-*.jsonl", "journal/kling-*.jsonl"],'
        " journal: journal/kling-gateway.jsonl, poll_interval: 100ms}",
    )
    text = text.replace("state: {path: gw.state", "state: {path: var/lib/kling/gw.state")
    daemon = DaemonProcess(tmp_path, text).start()
    try:
        status, _, _ = call(daemon, VIDEO, "crowd", standin.token())
        assert status == 200
        daemon.wait_metric(
            "kling_tasks_submitted_total", 1, project="crowd", model="kling-v2-6", mode="standard"
        )
        assert list((tmp_path / "logs").iterdir()) == []
        lines = (tmp_path / "journal" / "kling-gateway.jsonl").read_text().splitlines()
        assert [json.loads(line)["project"] for line in lines] == ["crowd"]
        started = [line for line in daemon.output().splitlines() if "gateway enabled" in line]
        assert started and f"upstream={base} " in started[0], daemon.output()
    finally:
        assert daemon.stop() == 0
    assert (tmp_path / "var" / "lib" / "kling" / "gw.state").exists()


def test_a_journal_no_glob_reads_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^logs.journal: 'elsewhere/j.jsonl' is matched by none"):
        parse_config({"logs": {"journal": "elsewhere/j.jsonl"}})
