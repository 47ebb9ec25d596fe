"""A hostile producer against the gateway, with Kling behind a server that normalizes
paths (decodes every escape, merges ``//``, resolves ``..``, strips ``;params``) and
makes a task for any write under ``/v1/``: whatever reaches it costs money. Requests go
over raw sockets, bodies in pieces; the gateway and the stand-in run in this process.

The property (SPEC section 12): for any sequence of requests, what the stand-in created
for a budget is priced within its limit, and every task it created is on the journal."""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kling_exporter.configfile import parse_config
from kling_exporter.kling.endpoints import CREATES, canonical, priced
from kling_exporter.kling.standin import KlingStandIn
from kling_exporter.pricing import Pricing
from kling_exporter.reading.daemon import Daemon
from kling_exporter.serving.api import READER
from kling_exporter.serving.server import build_app

from tests.helpers import free_port

ACCESS = "AK-attack-access-key-0001"
SECRET = "SK-attack-secret-key-0001-0123456789"  # noqa: S105 - the stand-in's own key
LIMIT = 100.0


class Stack:
    """The stand-in and an exporter's app with the gateway, served in one loop."""

    def __init__(self, folder: Path, extra: dict[str, Any] | None = None) -> None:
        self.folder = folder
        self.standin = KlingStandIn(ACCESS, SECRET, [])
        self.extra = extra or {}

    async def __aenter__(self) -> Stack:
        kling = web.Application()
        kling.router.add_route("*", "/{tail:.*}", self.standin.any_path)
        self.kling = TestServer(kling, host="127.0.0.1")
        await self.kling.start_server()
        gateway = {
            "enabled": True,
            "upstream": f"http://127.0.0.1:{self.kling.port}",
            "default_project": "p",
            "timeout": "5s",
            **self.extra.pop("gateway", {}),
        }
        raw = {
            "logs": {"paths": [str(self.folder / "logs" / "kling-*.jsonl")]},
            "state": {"path": ""},
            "budgets": [{"name": "p", "project": "p", "limit_credits": LIMIT}],
            "gateway": gateway,
            **self.extra,
        }
        self.config = parse_config(raw)
        daemon = Daemon(self.config)
        daemon.ready.set()  # no logs to read first
        self.app = build_app(daemon)
        self.server = TestServer(self.app, host="127.0.0.1")
        await self.server.start_server()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.close()
        await self.kling.close()

    async def send(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """One request over a raw socket, its body in two pieces; status and JSON."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.server.port)
        fields = {
            "Host": "exporter",
            "Authorization": f"Bearer {self.standin.token()}",
            "Content-Type": "application/json",
            "Content-Length": str(len(body)),
            "Connection": "close",
            **(headers or {}),
        }
        head = f"{method} {path} HTTP/1.1\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in fields.items() if v) + "\r\n"
        writer.write(head.encode("latin-1") + body[: len(body) // 2])
        await writer.drain()
        writer.write(body[len(body) // 2 :])
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        status = int(answer.split(b" ", 2)[1])
        payload = answer.split(b"\r\n\r\n", 1)[1]
        try:
            return status, json.loads(payload) if payload else {}
        except ValueError:
            return status, {"raw": payload.decode(errors="replace")}

    def journal(self) -> list[dict[str, Any]]:
        path = self.folder / "logs" / "kling-callbacks.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]

    def created_price(self) -> float:
        """What the tasks Kling made cost by the pricing rules (an unpriceable one is
        infinite: none may be made)."""
        pricing = Pricing(self.config.pricing)
        total = 0.0
        for path, _, body in self.standin.made:
            endpoint = CREATES.get(path)
            if endpoint is None:
                return float("inf")
            asked = priced(body, endpoint)
            total += pricing.credits(asked.req) * asked.tasks
        return total


def run(folder: Path, scenario: Any, extra: dict[str, Any] | None = None) -> Any:
    async def main() -> Any:
        async with Stack(folder, extra) as stack:
            return await scenario(stack)

    return asyncio.run(main())


@pytest.fixture
def folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as name:
        yield Path(name)


PRO10 = {"model_name": "kling-v2-6", "mode": "pro", "duration": "10"}  # 70 credits


@pytest.mark.parametrize(
    "path",
    [
        "/kling/v1/videos/text2video#x",  # finding 1
        "/kling/v1/videos/text2vide%6F",  # 2
        "/kling/v1/%76ideos/text2video",  # 2
        "/kling//v1/videos/text2video",  # 3
        "/kling/v1//videos/text2video",  # 3
        "/kling/v1/x/../videos/text2video",  # 3
        "/kling/v1/videos/text2video;a=b",  # 3
        "/kling/v1/images/../videos/text2video",  # 4
    ],
)
def test_a_create_in_any_spelling_is_priced_as_what_kling_makes(folder: Path, path: str) -> None:
    """Issue 39, findings 1-4: two pro 10 s videos (140 credits) on a 100-credit budget:
    however the path is spelled, the second is refused."""

    async def scenario(stack: Stack) -> list[int]:
        body = json.dumps(PRO10).encode()
        return [(await stack.send("POST", path, body))[0] for _ in range(2)]

    assert run(folder, scenario) == [200, 429]


@pytest.mark.parametrize(
    "path", ["/kling/v1/videos%2Ftext2video", "/kling/v1/videos/text2video%00", "/kling/a\\b"]
)
def test_a_path_with_no_single_meaning_is_refused_in_klings_shape(folder: Path, path: str) -> None:
    async def scenario(stack: Stack) -> tuple[int, dict[str, Any], int]:
        status, body = await stack.send("POST", path, json.dumps(PRO10).encode())
        return status, body, len(stack.standin.made)

    status, body, made = run(folder, scenario)
    assert status == 400 and body["code"] == 1201 and body["message"].startswith("path:"), body
    assert made == 0


@pytest.mark.parametrize(
    "path",
    [
        "/kling/v1/audio/tts",  # finding 5
        "/kling/v1/audio/text-to-audio",
        "/kling/v1/videos/something-new",
        "/kling/v1/anything",
    ],
)
def test_a_write_the_gateway_cannot_price_is_refused_and_says_how_to_allow_it(
    folder: Path, path: str
) -> None:
    async def scenario(stack: Stack) -> tuple[int, dict[str, Any], int]:
        status, body = await stack.send("POST", path, b'{"text": "hello"}')
        return status, body, len(stack.standin.made)

    status, body, made = run(folder, scenario)
    assert status == 400 and "gateway.unpriced: allow" in body["message"], body
    assert made == 0


def test_audio_is_priced_where_a_rule_names_it(folder: Path) -> None:
    async def scenario(stack: Stack) -> list[int]:
        body = b'{"text": "hello", "duration": 5}'
        return [(await stack.send("POST", "/kling/v1/audio/tts", body))[0] for _ in range(3)]

    rules = {"pricing": {"rules": [{"kind": "audio", "credits": 40}]}}
    assert run(folder, scenario, rules) == [200, 200, 429]


def test_effects_are_priced_from_their_input(folder: Path) -> None:
    """Finding 6: pro 10 s effects are 70 credits each, not the 10-credit default."""

    async def scenario(stack: Stack) -> list[int]:
        body = json.dumps({"effect_scene": "hug", "input": {"mode": "pro", "duration": "10"}})
        return [
            (await stack.send("POST", "/kling/v1/videos/effects", body.encode()))[0]
            for _ in range(3)
        ]

    assert run(folder, scenario) == [200, 429, 429]


def test_a_body_with_a_key_given_twice_reaches_no_one(folder: Path) -> None:
    """Finding 7: a first-wins parser upstream would make what was not priced."""

    async def scenario(stack: Stack) -> tuple[int, dict[str, Any], int]:
        raw = b'{"mode": "pro", "mode": "std", "duration": "10"}'
        status, body = await stack.send("POST", "/kling/v1/videos/text2video", raw)
        return status, body, len(stack.standin.made)

    status, body, made = run(folder, scenario)
    assert status == 400 and body["message"] == "mode: given twice" and made == 0


def test_n_images_are_journalled_as_n_tasks(folder: Path) -> None:
    """Finding 8: held for 9 and journalled as 9, so the hold is used up, not lapsed."""

    async def scenario(stack: Stack) -> tuple[int, list[dict[str, Any]]]:
        body = b'{"model_name": "kling-v2", "n": 9, "prompt": "cats"}'
        status, _ = await stack.send("POST", "/kling/v1/images/generations", body)
        return status, stack.journal()

    status, lines = run(folder, scenario)
    assert status == 200
    ids = [line["task_id"] for line in lines]
    assert len(ids) == 9 == len(set(ids)) and ids[0].startswith("kt-")
    assert {line["kind"] for line in lines} == {"image"}
    assert len({line["reservation_id"] for line in lines}) == 1


def test_the_journal_task_id_is_klings_and_a_reused_external_id_hides_nothing(
    folder: Path,
) -> None:
    """Finding 10: five tasks with one external_task_id are five tasks."""

    async def scenario(stack: Stack) -> list[dict[str, Any]]:
        body = json.dumps({"external_task_id": "same", "duration": "5"}).encode()
        for _ in range(5):
            await stack.send("POST", "/kling/v1/videos/text2video", body)
        return stack.journal()

    lines = run(folder, scenario)
    assert len({line["task_id"] for line in lines}) == 5
    assert {line["external_task_id"] for line in lines} == {"same"}


def test_creates_wait_for_ready_and_for_a_writable_journal(folder: Path) -> None:
    """Findings 11 and 12: 503 in Kling's shape before the logs are read, and while a
    link is planted at the journal's path; nothing reaches Kling."""

    async def scenario(stack: Stack) -> list[int]:
        body = json.dumps(PRO10).encode()
        statuses = []
        daemon = stack.app[READER]
        assert isinstance(daemon, Daemon)
        daemon.ready.clear()
        statuses.append((await stack.send("POST", "/kling/v1/videos/text2video", body))[0])
        daemon.ready.set()
        logs = stack.folder / "logs"
        logs.mkdir(exist_ok=True)
        (logs / "kling-callbacks.jsonl").symlink_to(stack.folder / "elsewhere")
        statuses.append((await stack.send("POST", "/kling/v1/videos/text2video", body))[0])
        statuses.append(len(stack.standin.made))
        return statuses

    assert run(folder, scenario) == [503, 503, 0]


def test_a_create_without_a_bearer_token_takes_no_hold(folder: Path) -> None:
    """Finding 19: unauthenticated creates cannot fill a budget meanwhile."""

    async def scenario(stack: Stack) -> list[int]:
        body = json.dumps(PRO10).encode()
        none = {"Authorization": ""}
        out = [(await stack.send("POST", "/kling/v1/videos/text2video", body, none))[0]]
        out.append((await stack.send("POST", "/kling/v1/videos/text2video", body))[0])
        return out

    assert run(folder, scenario) == [401, 200]


def test_an_encoded_body_is_refused_on_every_path(folder: Path) -> None:
    """Finding 20: aiohttp would inflate it and send it on still labelled gzip."""

    async def scenario(stack: Stack) -> list[int]:
        gz = {"Content-Encoding": "gzip"}
        return [
            (await stack.send("POST", "/kling/v1/videos/text2video", b"\x1f\x8b", gz))[0],
            (await stack.send("GET", "/kling/account/costs", b"\x1f\x8b", gz))[0],
        ]

    assert run(folder, scenario) == [415, 415]


def test_a_user_budget_applies_to_a_mapped_key(folder: Path) -> None:
    """Finding 16: a user comes from the key map, so a user's budget holds."""

    async def scenario(stack: Stack) -> list[int]:
        body = json.dumps(PRO10).encode()
        return [(await stack.send("POST", "/kling/v1/videos/text2video", body))[0]]

    extra = {
        "gateway": {"users_by_access_key": {ACCESS: "ann"}},
        "budgets": [{"name": "ann", "user": "ann", "limit_credits": 50}],
    }
    assert run(folder, scenario, extra) == [429]


def test_a_task_callback_url_settles_its_own_task_only(folder: Path) -> None:
    """Finding 15: the injected URL's token is the task's own; no shared token."""

    async def scenario(stack: Stack) -> list[int]:
        stack.standin.task_mode = "ok"
        one = json.dumps({"duration": "5"}).encode()
        await stack.send("POST", "/kling/v1/videos/text2video", one)
        await stack.send("POST", "/kling/v1/videos/text2video", one)
        (_, first, _), (_, second, _) = stack.standin.made
        url = stack.standin.created[0]["callback_url"]
        target = url.split("/api/v1/", 1)[1]
        out = []
        for task in (second, first):
            callback = {"task_id": task, "task_status": "failed", "final_unit_deduction": "0"}
            status, _ = await stack.send("POST", "/api/v1/" + target, json.dumps(callback).encode())
            out.append(status)
        return out

    extra = {
        "gateway": {"inject_callback_url": "https://exporter.example/api/v1/kling/callback"},
        "kling": {"callback_token": "a-token-of-sixteen-chars"},
    }
    assert run(folder, scenario, extra) == [401, 200]


def test_slow_pass_through_requests_leave_creates_their_connections(folder: Path) -> None:
    """Finding 18: 300 producers trickling bodies to a pass-through path hold every
    connection of its pool; a create still reaches Kling on a pool of its own."""

    async def scenario(stack: Stack) -> tuple[int, int]:
        head = (
            "GET /kling/account/costs HTTP/1.1\r\nHost: exporter\r\n"
            f"Authorization: Bearer {stack.standin.token()}\r\nContent-Length: 1000\r\n\r\n"
        )
        slow = []
        for _ in range(300):
            _, writer = await asyncio.open_connection("127.0.0.1", stack.server.port)
            writer.write(head.encode() + b"{")  # and never the rest
            slow.append(writer)
        await asyncio.sleep(0.5)  # the gateway has opened what its pool allows upstream
        status, _ = await stack.send(
            "POST", "/kling/v1/videos/text2video", json.dumps(PRO10).encode()
        )
        for writer in slow:
            writer.close()
        return status, len(stack.standin.made)

    assert run(folder, scenario, {"gateway": {"timeout": "3s"}}) == (200, 1)


def test_with_redis_unreachable_the_gateway_refuses_whatever_the_fleet_allows(
    folder: Path,
) -> None:
    """Finding 22: at start, with Redis down and the fleet's default
    ``on_unavailable: allow``, a burst of creates makes nothing: the gateway never
    decides on this exporter's figures alone. The pre-flight check still answers as
    configured."""

    async def scenario(stack: Stack) -> tuple[list[int], int, bool]:
        body = json.dumps(PRO10).encode()
        sends = [stack.send("POST", "/kling/v1/videos/text2video", body) for _ in range(4)]
        answers = await asyncio.gather(*sends)
        ask = json.dumps({"project": "p", "model": "kling-v2-6", "mode": "pro", "duration": 10})
        _, check = await stack.send("POST", "/api/v1/check", ask.encode())
        assert all("fleet unavailable" in a["message"] for _, a in answers), answers
        return [status for status, _ in answers], len(stack.standin.made), check["allowed"]

    fleet = {"redis_url": f"redis://127.0.0.1:{free_port()}", "timeout": "100ms"}
    statuses, made, preflight = run(folder, scenario, {"fleet": fleet})
    assert statuses == [503] * 4 and made == 0
    assert preflight is True  # on_unavailable: allow, as documented for checks


# -- the property ------------------------------------------------------------------

ENDPOINTS = sorted(CREATES)
SPELLINGS = (
    "{p}",
    "{p}#frag",
    "{p};x=1",
    "/{p}",
    "{p}/",
    "/v1/zz/..{rest}",
    "/v1/images/..{rest}",
    "{p}%2F",
    "/v1{rest_escaped}",
    "/v1/audio/tts",
    "/v1/videos/unknown",
)
BODIES = st.fixed_dictionaries(
    {},
    optional={
        "model_name": st.sampled_from(["kling-v2-6", "kling-v1"]),
        "mode": st.sampled_from(["std", "pro"]),
        "duration": st.sampled_from(["5", "10", 5, 10]),
        "sound": st.sampled_from(["on", "off"]),
        "n": st.integers(1, 9),
        "external_task_id": st.sampled_from(["a", "b"]),
        "input": st.fixed_dictionaries(
            {}, optional={"mode": st.sampled_from(["std", "pro"]), "duration": st.just("10")}
        ),
    },
)
REQUEST = st.tuples(
    st.sampled_from(["POST", "POST", "PUT", "post"]),
    st.sampled_from(ENDPOINTS),
    st.sampled_from(SPELLINGS),
    BODIES,
)


def _spelled(endpoint: str, spelling: str) -> str:
    rest = endpoint[len("/v1") :]
    escaped = rest[:-1] + f"%{ord(rest[-1]):02X}"
    path = spelling.format(p=endpoint, rest=rest, rest_escaped=escaped)
    return "/kling" + path


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(requests=st.lists(REQUEST, min_size=1, max_size=8), together=st.booleans())
def test_nothing_kling_makes_through_the_gateway_escapes_the_budget(
    requests: list[tuple[str, str, str, dict[str, Any]]], together: bool
) -> None:
    async def scenario(stack: Stack) -> tuple[float, set[str], set[str]]:
        sends = [
            stack.send(method, _spelled(endpoint, spelling), json.dumps(body).encode())
            for method, endpoint, spelling, body in requests
        ]
        if together:
            await asyncio.gather(*sends)
        else:
            for send in sends:
                await send
        made = {task for _, task, _ in stack.standin.made}
        journalled = {line["task_id"].split("#")[0] for line in stack.journal()}
        return stack.created_price(), made, journalled

    with tempfile.TemporaryDirectory() as name:
        price, made, journalled = run(Path(name), scenario)
    assert price <= LIMIT
    assert made <= journalled


def test_the_canonical_form_is_stable() -> None:
    for endpoint in ENDPOINTS:
        assert canonical(endpoint) == endpoint == canonical(canonical(endpoint))
