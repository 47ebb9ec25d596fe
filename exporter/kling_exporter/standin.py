"""A stand-in for Kling's account API, answering its documented shapes: for the demo,
which has no Kling account, and for the tests, which never call Kling.

It checks the bearer token as Kling does (HS256 with the secret key, ``iss`` the access
key, ``exp`` and ``nbf``) and answers ``GET .../account/costs`` with its packs; ``mode``
makes it answer as Kling does when things go wrong."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import jwt
from aiohttp import web

MODES = ("ok", "empty", "unauthorized", "rate_limited", "server_error", "slow", "malformed")


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
        self.packs = packs
        self.mode = "ok"
        self.slow_seconds = 2.0  # past the exporter's timeout when it is made short
        self.requests: list[float] = []  # monotonic times of every request
        self.refused: list[str] = []  # why tokens were refused

    def check_token(self, request: web.Request) -> str | None:
        """Why the bearer token is refused, or None."""
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme != "Bearer" or not token:
            return "no bearer token"
        try:
            claims = jwt.decode(
                token,
                self.secret_key,
                algorithms=["HS256"],
                options={"require": ["iss", "exp", "nbf"]},
                issuer=self.access_key,
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

    def routes(self, app: web.Application, prefix: str = "") -> None:
        app.router.add_get(prefix + "/account/costs", self.costs)
