"""A stand-in for Kling's API, answering its documented shapes: for the demo, which has
no Kling account, and for the tests and benchmarks, which never call Kling.

It checks the bearer token as Kling does (HS256 with the secret key, ``iss`` the access
key, ``exp`` and ``nbf``), answers ``GET .../account/costs`` with its packs, creates
tasks (``POST /v1/videos/<endpoint>``, ``POST /v1/images/<endpoint>``) and answers
queries of them (``GET /v1/videos/<endpoint>/<task_id>``) in Kling's envelope (``code``,
``message``, ``request_id``, ``data``). ``mode`` makes the account answer as Kling does
when things go wrong, ``task_mode`` the task endpoints."""

from __future__ import annotations

import asyncio
import itertools
import time
import urllib.parse
from typing import Any

import jwt
from aiohttp import web

MODES = ("ok", "empty", "unauthorized", "rate_limited", "server_error", "slow", "malformed")
# How the task endpoints answer: as Kling does when all is well, when the key is wrong
# (401, code 1004), when the account's packs are used up (429, 1102), when requests come
# too fast (429, 1302), on an internal error (500, 5000); ``slow`` answers after
# ``task_delay`` (the task is created first, as a slow Kling creates it), ``drop`` closes
# the connection without an answer, ``unnamed`` answers success without naming the task.
TASK_MODES = (
    "ok",
    "unauthorized",
    "no_credits",
    "rate_limited",
    "server_error",
    "slow",
    "drop",
    "unnamed",
)
_TASK_ERRORS = {
    "unauthorized": (401, 1004, "Authorization is invalid"),
    "no_credits": (429, 1102, "Account balance is not enough"),
    "rate_limited": (429, 1302, "The API request is too fast, please slow down"),
    "server_error": (500, 5000, "Server internal error"),
}


def normalized(raw_path: str) -> str:
    """A request target's path as a server that normalizes reads it: the fragment and
    query gone, every escape decoded, ``;params`` dropped, empty and dot segments
    resolved."""
    path = urllib.parse.unquote(raw_path.split("#", 1)[0].split("?", 1)[0])
    segments: list[str] = []
    for raw in path.split("/"):
        segment = raw.split(";", 1)[0]
        if segment in ("", "."):
            continue
        if segment == "..":
            if segments:
                segments.pop()
            continue
        segments.append(segment)
    return "/" + "/".join(segments)


def demo_packs(now: float) -> list[dict[str, Any]]:
    """A few packs in each status, as a newcomer's demo shows them."""
    day = 86_400_000
    ms = int(now * 1000)

    def pack(i: int, name: str, total: int, left: int, bought: int, lasts: int, status: str):  # type: ignore[no-untyped-def]
        return {
            "resource_pack_name": name,
            "resource_pack_id": f"pack-{i}",
            "resource_pack_type": "decreasing_total",
            "total_quantity": total,
            "remaining_quantity": left,
            "purchase_time": ms - bought * day,
            "effective_time": ms - bought * day,
            "invalid_time": ms + (lasts - bought) * day,
            "status": status,
        }

    return [
        pack(1, "Video Pack 3000", 3000, 1840, 20, 30, "online"),
        pack(2, "Video Pack 10000", 10000, 9200, 85, 90, "online"),  # expires in 5 days
        pack(3, "Video Pack 1000", 1000, 130, 25, 30, "online"),  # low
        pack(4, "Video Pack 1000 (old)", 1000, 0, 40, 30, "runOut"),
        pack(5, "Video Pack 3000 (old)", 3000, 410, 95, 90, "expired"),
        pack(6, "Video Pack 3000 (next)", 3000, 3000, 0, 30, "toBeOnline"),
    ]


class KlingStandIn:
    def __init__(self, access_key: str, secret_key: str, packs: list[dict[str, Any]]) -> None:
        self.access_key = access_key
        self.secret_key = secret_key
        self.keys = {access_key: secret_key}  # every account's access key -> secret
        self.packs = packs
        self.mode = "ok"
        self.slow_seconds = 2.0  # past the exporter's timeout when it is made short
        self.requests: list[float] = []  # monotonic times of every request
        self.refused: list[str] = []  # why tokens were refused
        self.task_mode = "ok"
        self.task_delay = 0.0  # seconds before a create answers in "slow" mode
        self.finish_after = 0.0  # seconds from creation until a task has succeeded
        self.credits = 10.0  # what a finished task is charged (final_unit_deduction)
        self.tasks: dict[str, dict[str, Any]] = {}  # task_id -> the task, as queried
        self.created: list[dict[str, Any]] = []  # the body of every task created
        self.made: list[tuple[str, str, dict[str, Any]]] = []  # (path, task id, body)
        self._ids = itertools.count(1)

    def token(self, now: float | None = None, access_key: str | None = None) -> str:
        """A bearer token as a producer signs it with one of this stand-in's keys."""
        now = time.time() if now is None else now
        key = access_key or self.access_key
        claims = {"iss": key, "exp": int(now) + 1800, "nbf": int(now) - 5}
        return jwt.encode(claims, self.keys[key], algorithm="HS256")

    def _answer(self, status: int, code: int, message: str, data: Any = None) -> web.Response:
        body = {"code": code, "message": message, "request_id": f"standin-{next(self._ids)}"}
        if data is not None:
            body["data"] = data
        return web.json_response(body, status=status)

    def _failure(self, request: web.Request) -> web.Response | None:
        """The error answer the token or ``task_mode`` calls for, or None."""
        refused = self.check_token(request)
        if refused is not None:
            self.refused.append(refused)
            return self._answer(401, 1004, "Authorization is invalid")
        if self.task_mode in _TASK_ERRORS:
            return self._answer(*_TASK_ERRORS[self.task_mode])
        return None

    async def create_task(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(time.monotonic())
        failed = self._failure(request)
        if failed is not None:
            return failed
        try:
            body = await request.json()
        except ValueError:
            return self._answer(400, 1200, "Invalid request parameters")
        if not isinstance(body, dict):
            return self._answer(400, 1200, "Invalid request parameters")
        now = int(time.time() * 1000)
        task_id = f"kt-{next(self._ids)}"
        task: dict[str, Any] = {
            "task_id": task_id,
            "task_status": "submitted",
            "created_at": now,
            "updated_at": now,
        }
        external = body.get("external_task_id")
        if external:
            task["task_info"] = {"external_task_id": external}
        self.tasks[task_id] = task
        self.created.append(body)
        self.made.append((normalized(request.raw_path), task_id, body))
        if self.task_mode == "drop":
            assert request.transport is not None
            request.transport.close()
            return web.Response()  # never sent: the connection is gone
        if self.task_mode == "slow":
            await asyncio.sleep(self.task_delay)
        if self.task_mode == "unnamed":  # made, but the answer does not say which
            return self._answer(200, 0, "SUCCEED", {"task_status": "submitted"})
        return self._answer(200, 0, "SUCCEED", dict(task))

    async def query_task(self, request: web.Request) -> web.Response:
        self.requests.append(time.monotonic())
        failed = self._failure(request)
        if failed is not None:
            return failed
        task = self.tasks.get(request.match_info.get("task_id") or request.path.rsplit("/", 1)[1])
        if task is None:
            return self._answer(404, 1203, "Task does not exist")
        now = int(time.time() * 1000)
        if (
            task["task_status"] == "submitted"
            and now >= task["created_at"] + self.finish_after * 1000
        ):
            task.update(
                task_status="succeed", updated_at=now, final_unit_deduction=str(self.credits)
            )
        return self._answer(200, 0, "SUCCEED", dict(task))

    def check_token(self, request: web.Request) -> str | None:
        """Why the bearer token is refused, or None."""
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme != "Bearer" or not token:
            return "no bearer token"
        try:
            iss = jwt.decode(token, options={"verify_signature": False}).get("iss")
            claims = jwt.decode(
                token,
                self.keys.get(iss, self.secret_key) if isinstance(iss, str) else self.secret_key,
                algorithms=["HS256"],
                options={"require": ["iss", "exp", "nbf"]},
                issuer=iss if iss in self.keys else self.access_key,
            )
        except jwt.PyJWTError as e:
            return type(e).__name__
        if claims["exp"] > time.time() + 1800 + 5:
            return "exp too far ahead"
        return None

    async def costs(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(time.monotonic())
        refused = self.check_token(request)
        if refused is not None or self.mode == "unauthorized":
            self.refused.append(refused or "unauthorized mode")
            return web.json_response({"code": 1004, "message": "auth failed"}, status=401)
        for name in ("start_time", "end_time"):
            if not request.query.get(name, "").isdigit():
                return web.json_response({"code": 1201, "message": f"bad {name}"}, status=400)
        if self.mode == "rate_limited":
            return web.json_response({"code": 1302, "message": "too many requests"}, status=429)
        if self.mode == "server_error":
            return web.json_response({"code": 5000, "message": "internal error"}, status=500)
        if self.mode == "slow":
            await asyncio.sleep(self.slow_seconds)
        if self.mode == "malformed":
            return web.Response(
                text='{"code": 0, "data": {"resource_pack', content_type="application/json"
            )
        if self.mode == "huge":  # a valid answer, streamed without a length, of 6 MiB
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            await response.prepare(request)
            await response.write(b'{"code": 0, "message": "')
            for _ in range(96):
                await response.write(b"x" * 65536)
            await response.write(b'", "data": {"resource_pack_subscribe_infos": []}}')
            await response.write_eof()
            return response
        packs = [] if self.mode == "empty" else self.packs
        return web.json_response(
            {
                "code": 0,
                "message": "SUCCEED",
                "request_id": f"standin-{len(self.requests)}",
                "data": {"code": 0, "msg": "SUCCEED", "resource_pack_subscribe_infos": packs},
            }
        )

    async def any_path(self, request: web.Request) -> web.StreamResponse:
        """Kling behind a server that normalizes paths as many do (``normalized``) and
        makes a task for any write under ``/v1/``: the most a gateway could let slip.
        Like a front server that buffers requests (nginx does), it reads a body whole
        before it answers."""
        await request.read()
        path = normalized(request.raw_path)
        if request.method != "GET" and path.startswith("/v1/"):
            return await self.create_task(request)
        if request.method == "GET" and path.startswith("/v1/") and path.count("/") >= 4:
            return await self.query_task(request)
        return self._answer(404, 1200, "no such path")

    def routes(self, app: web.Application, prefix: str = "") -> None:
        app.router.add_get(prefix + "/account/costs", self.costs)
        for kind in ("videos", "images"):
            app.router.add_post(f"{prefix}/v1/{kind}/{{endpoint}}", self.create_task)
            app.router.add_get(f"{prefix}/v1/{kind}/{{endpoint}}/{{task_id}}", self.query_task)
