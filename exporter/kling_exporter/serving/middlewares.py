"""What every request passes through before its handler: errors of any kind answered
in the API's one JSON shape, HTTP/1.0 at least, basic auth as the exporter toolkit
checks it (bcrypt in threads of its own, a bound on logins waiting, a burst limit on
wrong passwords), a bound on API requests at once, and the configured headers."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from kling_exporter.model import ReaderUnavailable
from kling_exporter.serving.bodies import error_answer
from kling_exporter.serving.callbacks import PATH as CALLBACK_PATH
from kling_exporter.serving.webconfig import BasicAuth, FailureLimit, WebConfig

log = logging.getLogger(__name__)

# Headers of aiohttp's own error bodies, which the JSON answer replaces.
BODY_HEADERS = ("content-type", "content-length", "content-encoding")


# At most this many API requests at once; more get 503 rather than queueing behind
# a slow client and stalling scrapes.
MAX_CONCURRENT_API = 64


# Credentials not yet verified wait for one of a few bcrypt threads of their own, at
# most this many at once; more are refused at once, and a client past FailureLimit's
# burst of wrong passwords is refused without a check.
BCRYPT_THREADS = 2


MAX_PENDING_LOGINS = 32


class Logins:
    """Basic auth as the exporter toolkit checks it: bcrypt in a few threads of its
    own, at most MAX_PENDING_LOGINS checks waiting, and a client past FailureLimit's
    burst of wrong passwords refused without a check."""

    def __init__(self, auth: BasicAuth, headers: dict[str, str]) -> None:
        self.auth = auth
        self.headers = headers
        self.failures = FailureLimit()
        self.pool = ThreadPoolExecutor(BCRYPT_THREADS, thread_name_prefix="bcrypt")
        self.pending = 0

    def refuse(self, status: int, text: str) -> web.Response:
        if status == 401:
            extra = {"WWW-Authenticate": 'Basic realm="kling-exporter"'}
        else:
            extra = {"Retry-After": "60"}
        return error_answer(status, text, "authorization", {**extra, **self.headers})

    async def verified(self, request: web.Request) -> web.Response | None:
        """None when the credentials are good, else the answer that refuses them."""
        user, password = credentials(request)
        if user is None:
            return self.refuse(401, "authorization: basic credentials needed")
        if self.auth.known(user, password or ""):
            return None
        client, now = request.remote or "", time.monotonic()
        if self.failures.blocked(client, now):
            return self.refuse(429, "authorization: too many failed logins; try again later")
        if self.pending >= MAX_PENDING_LOGINS:
            return self.refuse(503, "authorization: too many logins being checked; try again")
        self.pending += 1
        try:
            loop = asyncio.get_running_loop()
            ok = await loop.run_in_executor(self.pool, self.auth.check, user, password or "")
        finally:
            self.pending -= 1
        if ok:
            return None
        self.failures.failed(client, now)
        return self.refuse(401, "authorization: wrong user or password")


def errors_in_one_shape(headers: dict[str, str]) -> Any:
    """A middleware: aiohttp's own errors (404, 405, 413...), a reader that cannot
    answer, and anything a handler failed to catch answer in the API's one JSON shape;
    the server goes on serving."""

    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            response: web.StreamResponse = await handler(request)
            return response
        except web.HTTPException as e:
            if e.status < 400:
                raise
            field = {404: "path", 405: "method", 413: "body"}.get(e.status, "")
            message = f"{field or 'request'}: {e.reason.lower()}"
            if e.status == 405:
                message += f"; allowed: {', '.join(sorted(e.headers.get('Allow', '').split(',')))}"
            kept = {k: v for k, v in e.headers.items() if k.lower() not in BODY_HEADERS}
            return error_answer(e.status, message, field, {**kept, **headers})
        except ReaderUnavailable as e:
            return error_answer(503, f"reader: {e}", "", headers)
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except Exception:
            log.exception("request failed", extra={"path": request.path[:200]})
            return error_answer(500, "server: internal error (logged)", "", headers)

    return middleware


def protect(logins: Logins, gateway_prefix: str = "") -> Any:
    """A middleware: HTTP/1.0 at least, credentials where users are configured (not
    for health, nor for Kling's callbacks, which carry their own token, nor for the
    gateway, whose producers send Kling's own bearer token, which Kling checks), at
    most MAX_CONCURRENT_API API requests at once (the configured headers are put on
    answers by ``configured_headers``)."""
    api_slots = asyncio.Semaphore(MAX_CONCURRENT_API)
    open_paths = ("/-/healthy", CALLBACK_PATH)

    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.version < (1, 0):
            return error_answer(505, "version: HTTP/1.0 or later is needed")
        gateway = gateway_prefix and request.path.startswith(gateway_prefix + "/")
        if logins.auth.enabled and not gateway and request.path not in open_paths:
            refused = await logins.verified(request)
            if refused is not None:
                return refused
        if not request.path.startswith("/api/"):
            response: web.StreamResponse = await handler(request)
        elif api_slots.locked():
            response = error_answer(503, "too many requests at once, try again", "")
        else:
            async with api_slots:
                response = await handler(request)
        return response

    return middleware


def configured_headers(web_config: WebConfig | None) -> Any:
    """An ``on_response_prepare`` hook: the configured headers on every answer, those
    sent in pieces (``/metrics``, the gateway's pass-through) as the others."""
    headers = web_config.http_server_config.headers if web_config else {}

    async def hook(request: web.Request, response: web.StreamResponse) -> None:
        response.headers.update(headers)

    return hook


def security_middlewares(web_config: WebConfig | None, gateway_prefix: str = "") -> list[Any]:
    auth = BasicAuth(web_config.basic_auth_users if web_config else {})
    headers = web_config.http_server_config.headers if web_config else {}
    return [errors_in_one_shape(headers), protect(Logins(auth, headers), gateway_prefix)]


def credentials(request: web.Request) -> tuple[str | None, str | None]:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None, None
    try:
        user, sep, password = base64.b64decode(value, validate=True).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return None, None
    return (user, password) if sep else (None, None)
