"""HTTP: /metrics, the landing page, health, readiness, reload and the budget API."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import html
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, Protocol

import msgspec
from aiohttp import web

from kling_exporter import __version__
from kling_exporter.budgets import Ask, BudgetStatus
from kling_exporter.collector import Exposition, reservation_families
from kling_exporter.config import KINDS, describe_validation_error, normalize_mode, parse_duration
from kling_exporter.events import DEFAULT_PROJECT, MAX_LABEL_LEN
from kling_exporter.model import Consumed, ReaderUnavailable, View
from kling_exporter.pricing import Request
from kling_exporter.reports import amount_for_people
from kling_exporter.reservations import (
    DEFAULT_TTL,
    MAX_ID,
    MAX_TTL,
    Reservations,
    fingerprint,
    valid_id,
)
from kling_exporter.webconfig import BasicAuth, FailureLimit, WebConfig

log = logging.getLogger(__name__)


class Source(Protocol):
    """What the server asks of the daemon: the reader process's link in the exporter
    (``exporter.reader.ReaderProcess``), or a daemon in process in tests."""

    @property
    def reader_up(self) -> bool: ...

    def is_ready(self) -> bool: ...

    def view(self) -> View: ...

    def listen(self, consumed: Consumed) -> None: ...

    async def render_metrics(self, accept: str, names: list[str]) -> tuple[bytes, str]: ...

    async def reload_config(self) -> str | None: ...


DAEMON: web.AppKey[Source] = web.AppKey("daemon", Source)
RESERVATIONS = web.AppKey("reservations", Reservations)


def metrics_handler(source: Source, reservations: Reservations) -> Any:
    """/metrics, compressed when the client asks. Plain-text scrapes that arrive while a
    render is under way share the reader's render; OpenMetrics and ``name[]`` filters are
    rendered for their own request. The reservations' families, kept on this side, are
    added to what the reader rendered."""
    under_way: asyncio.Future[tuple[bytes, str]] | None = None
    ours = Exposition(lambda: reservation_families(reservations, _statuses(source, reservations)))

    def finished(future: asyncio.Future[tuple[bytes, str]]) -> None:
        nonlocal under_way
        if under_way is future:
            under_way = None

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal under_way
        accept = ",".join(request.headers.getall("Accept", []))
        names = request.query.getall("name[]", [])
        try:
            if "application/openmetrics-text" in accept or names:
                body, content_type = await source.render_metrics(accept, names)
            else:
                if under_way is None:
                    under_way = asyncio.ensure_future(source.render_metrics("", []))
                    under_way.add_done_callback(finished)
                body, content_type = await asyncio.shield(under_way)
        except ReaderUnavailable as e:
            return web.Response(status=503, text=f"Metrics unavailable: {e}.\n")
        body = ours.splice(body, accept, names)
        response = web.Response(body=body, headers={"Content-Type": content_type})
        response.enable_compression()
        return response

    return handler


def _landing(telemetry_path: str) -> str:
    path = html.escape(telemetry_path)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Kling Exporter</title></head>
<body>
<h1>Kling Exporter</h1>
<p>Version {html.escape(__version__)}: Prometheus metrics and budgets for Kling AI video
generation.</p>
<ul>
<li><a href="{path}">Metrics</a></li>
<li><a href="/api/v1/budgets">Budgets (JSON)</a></li>
<li><a href="/-/healthy">Health</a></li>
<li><a href="/-/ready">Readiness</a></li>
</ul>
</body></html>
"""


async def healthy(request: web.Request) -> web.Response:
    if not request.app[DAEMON].reader_up:
        return web.Response(status=503, text="Unhealthy: the log reader has failed.\n")
    return web.Response(text="Healthy.\n")


async def ready(request: web.Request) -> web.Response:
    if request.app[DAEMON].is_ready():
        return web.Response(text="Ready.\n")
    return web.Response(status=503, text="Not ready: still reading the existing logs.\n")


async def reload(request: web.Request) -> web.Response:
    try:
        error = await request.app[DAEMON].reload_config()
    except ReaderUnavailable as e:
        return web.Response(status=503, text=f"failed to reload config: {e}\n")
    if error is not None:
        return web.Response(status=500, text=f"failed to reload config: {error}\n")
    return web.Response(text="Config reloaded.\n")


def for_people(value: Any, key: str = "") -> Any:
    """JSON answers as a person reads them: dollars to the cent, whole credits as
    integers, Unix times also as RFC 3339 (``period_start`` gains ``period_start_rfc3339``).
    Metrics keep full precision."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out[k] = for_people(v, k)
            if k.startswith("period_") and isinstance(v, float):
                stamp = dt.datetime.fromtimestamp(v, dt.UTC).isoformat()
                out[f"{k}_rfc3339"] = stamp.replace("+00:00", "Z")
        return out
    if isinstance(value, list):
        return [for_people(v, key) for v in value]
    if isinstance(value, float):
        return amount_for_people(key, value)
    return value


def _statuses(source: Source, reservations: Reservations) -> list[BudgetStatus]:
    for _ in range(3):
        try:
            return reservations.statuses(source.view())
        except RuntimeError:  # an in-process reader resized what was read: read again
            continue
    raise ReaderUnavailable("budget usage kept changing while it was read")


async def budgets(request: web.Request) -> web.Response:
    statuses = _statuses(request.app[DAEMON], request.app[RESERVATIONS])
    return web.json_response({"budgets": for_people(msgspec.to_builtins(statuses))})


MAX_BODY = 64 * 1024


class CheckRequest(msgspec.Struct, forbid_unknown_fields=True):
    """The body of ``POST /api/v1/check``: every field optional, count at least 1."""

    project: str | None = None
    user: str | None = None
    model: str | None = None
    mode: str | None = None
    duration: int | None = None
    audio: bool = False
    kind: str | None = None
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"count: must be at least 1, got {self.count}")
        if self.count > 100_000:
            raise ValueError(f"count: must be at most 100000, got {self.count}")
        if self.mode is not None:
            mode = normalize_mode(self.mode)
            if mode is None:
                raise ValueError(
                    f"mode: expected one of standard, professional, std, pro, got {self.mode!r}"
                )
            self.mode = mode
        if self.kind is not None and self.kind not in KINDS:
            raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.duration is not None and not 1 <= self.duration <= 3600:
            raise ValueError(f"duration: expected seconds from 1 to 3600, got {self.duration}")
        for key in ("project", "user", "model"):
            value = getattr(self, key)
            if value is not None and not 0 < len(value) <= MAX_LABEL_LEN:
                raise ValueError(f"{key}: expected 1 to {MAX_LABEL_LEN} characters")


def _duplicate_key(body: bytes) -> str | None:
    """The first key an object of the body repeats (which one counts is ambiguous, so
    such a body is refused), or None."""
    found: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in items]
        if not found and len(set(keys)) != len(keys):
            found.append(next(k for i, k in enumerate(keys) if k in keys[:i]))
        return dict(items)

    try:
        json.loads(body, object_pairs_hook=pairs)
    except (ValueError, RecursionError):
        return None  # not JSON: the decoder says what is wrong
    return found[0] if found else None


def _bad_request(message: str) -> web.Response:
    message = message.replace("(top level)", "body", 1)
    field = message.split(":", 1)[0] if ":" in message else "body"
    return web.json_response({"error": message, "field": field}, status=400)


async def _body(request: web.Request, kind: type[CheckRequest]) -> Any:
    """The request's JSON body decoded as ``kind``, or the 400 that says what is wrong."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        return _bad_request(f"body: larger than {MAX_BODY} bytes")
    try:
        async with asyncio.timeout(BODY_TIMEOUT):
            body = await request.content.read(MAX_BODY + 1)
    except TimeoutError:
        return _bad_request(f"body: not received within {BODY_TIMEOUT:g} s")
    except (OSError, web.HTTPException):
        return _bad_request("body: could not be read")
    if len(body) > MAX_BODY:
        return _bad_request(f"body: larger than {MAX_BODY} bytes")
    if not body.strip():
        return _bad_request("body: empty; send a JSON object ({} asks with the defaults)")
    duplicate = _duplicate_key(body)
    if duplicate is not None:
        return _bad_request(f"{duplicate}: given twice")
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as e:
        return _bad_request(describe_validation_error(e))
    except (msgspec.DecodeError, UnicodeDecodeError):
        return _bad_request("body: not a JSON object")


def _json(answer: Any, status: int = 200) -> web.Response:
    body = msgspec.json.encode(for_people(answer))
    return web.Response(body=body, status=status, content_type="application/json")


def _asked(req: CheckRequest) -> Ask:
    return Ask(
        Request(req.model, req.mode, req.duration, req.audio, req.kind),
        req.count,
        req.project or DEFAULT_PROJECT,
        req.user,
    )


async def check(request: web.Request) -> web.Response:
    req = await _body(request, CheckRequest)
    if isinstance(req, web.Response):
        return req
    source, reservations = request.app[DAEMON], request.app[RESERVATIONS]
    for _ in range(3):
        try:
            result = reservations.check(source.view(), _asked(req))
            break
        except RuntimeError:  # an in-process reader resized what was read: read again
            continue
    else:
        return web.Response(status=503, text="Budget usage kept changing; try again.\n")
    return _json(msgspec.to_builtins(result))


class ReserveRequest(CheckRequest, forbid_unknown_fields=True):
    """The body of ``POST /api/v1/reservations``: a check's, a ttl and an id."""

    ttl: str | float | None = None
    id: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.id is not None and not valid_id(self.id):
            raise ValueError(f"id: expected 1 to {MAX_ID} printable ASCII characters")
        seconds = DEFAULT_TTL if self.ttl is None else parse_duration(self.ttl, "ttl")
        if not 1 <= seconds <= MAX_TTL:
            raise ValueError(f"ttl: expected 1s to 24h, got {self.ttl!r}")
        self.ttl = seconds


async def reserve(request: web.Request) -> web.Response:
    req = await _body(request, ReserveRequest)
    if isinstance(req, web.Response):
        return req
    source, reservations = request.app[DAEMON], request.app[RESERVATIONS]
    assert isinstance(req.ttl, float)
    asked = msgspec.to_builtins(req)
    for _ in range(3):
        try:
            status, answer = await reservations.reserve(
                source.view(), _asked(req), req.id, req.ttl, fingerprint(asked)
            )
            break
        except RuntimeError:
            continue
        except OSError:
            return web.Response(status=503, text="Reservations cannot be saved; try again.\n")
    else:
        return web.Response(status=503, text="Budget usage kept changing; try again.\n")
    return _json(answer, status)


async def reservations_list(request: web.Request) -> web.Response:
    return _json({"reservations": request.app[RESERVATIONS].live()})


async def release(request: web.Request) -> web.Response:
    rid = request.match_info["id"]
    if await request.app[RESERVATIONS].release(rid):
        return web.Response(status=204)
    error = f"id: no live reservation {rid!r} (unknown, used up, expired or released)"
    return web.json_response({"error": error, "field": "id"}, status=404)


# At most this many API requests at once; more get 503 rather than queueing behind
# a slow client and stalling scrapes.
MAX_CONCURRENT_API = 64
BODY_TIMEOUT = 10.0


# Credentials not yet verified wait for one of a few bcrypt threads of their own, at
# most this many at once; more are refused at once, and a client past FailureLimit's
# burst of wrong passwords is refused without a check.
BCRYPT_THREADS = 2
MAX_PENDING_LOGINS = 32


def _security_middlewares(web_config: WebConfig | None) -> list[Any]:
    auth = BasicAuth(web_config.basic_auth_users if web_config else {})
    headers = web_config.http_server_config.headers if web_config else {}
    api_slots = asyncio.Semaphore(MAX_CONCURRENT_API)
    failures = FailureLimit()
    bcrypt_pool = ThreadPoolExecutor(BCRYPT_THREADS, thread_name_prefix="bcrypt")
    pending = 0

    def refuse(status: int, text: str) -> web.Response:
        if status == 401:
            extra = {"WWW-Authenticate": 'Basic realm="kling-exporter"'}
        else:
            extra = {"Retry-After": "60"}
        return web.Response(status=status, text=text, headers={**extra, **headers})

    async def verified(request: web.Request) -> web.Response | None:
        """None when the credentials are good, else the answer that refuses them."""
        nonlocal pending
        user, password = _credentials(request)
        if user is None:
            return refuse(401, "Unauthorized\n")
        if auth.known(user, password or ""):
            return None
        client, now = request.remote or "", time.monotonic()
        if failures.blocked(client, now):
            return refuse(429, "Too many failed logins; try again later\n")
        if pending >= MAX_PENDING_LOGINS:
            return refuse(503, "Too many logins being checked; try again\n")
        pending += 1
        try:
            loop = asyncio.get_running_loop()
            ok = await loop.run_in_executor(bcrypt_pool, auth.check, user, password or "")
        finally:
            pending -= 1
        if ok:
            return None
        failures.failed(client, now)
        return refuse(401, "Unauthorized\n")

    @web.middleware
    async def protect(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.version < (1, 0):
            return web.Response(status=505, text="HTTP/1.0 or later is needed\n")
        if auth.enabled and request.path != "/-/healthy":
            refused = await verified(request)
            if refused is not None:
                return refused
        if request.path.startswith("/api/"):
            if api_slots.locked():
                response: web.StreamResponse = web.json_response(
                    {"error": "too many requests at once, try again"}, status=503
                )
            else:
                async with api_slots:
                    response = await handler(request)
        else:
            response = await handler(request)
        response.headers.update(headers)
        return response

    return [protect]


def _credentials(request: web.Request) -> tuple[str | None, str | None]:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None, None
    try:
        user, sep, password = base64.b64decode(value, validate=True).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return None, None
    return (user, password) if sep else (None, None)


def build_app(
    daemon: Source,
    telemetry_path: str = "/metrics",
    web_config: WebConfig | None = None,
    reservations: Reservations | None = None,
) -> web.Application:
    """The HTTP face of ``daemon``. Reservations are kept in memory unless given with a
    journal."""
    app = web.Application(client_max_size=MAX_BODY, middlewares=_security_middlewares(web_config))
    app[DAEMON] = daemon
    held = app[RESERVATIONS] = reservations or Reservations()
    landing = _landing(telemetry_path)

    async def listen(app: web.Application) -> None:
        daemon.listen(held.consumed)

    app.on_startup.append(listen)

    async def index(request: web.Request) -> web.Response:
        return web.Response(text=landing, content_type="text/html")

    app.router.add_get(telemetry_path, metrics_handler(daemon, held))
    if telemetry_path != "/":
        app.router.add_get("/", index)
    app.router.add_get("/-/healthy", healthy)
    app.router.add_get("/-/ready", ready)
    app.router.add_post("/-/reload", reload)
    app.router.add_put("/-/reload", reload)
    app.router.add_get("/api/v1/budgets", budgets)
    app.router.add_post("/api/v1/check", check)
    app.router.add_post("/api/v1/reservations", reserve)
    app.router.add_get("/api/v1/reservations", reservations_list)
    app.router.add_delete("/api/v1/reservations/{id}", release)
    return app


def parse_listen_address(address: str) -> tuple[str | None, int]:
    """``:10177`` (all interfaces), ``127.0.0.1:10177`` or ``[::1]:10177``."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--web.listen-address: expected HOST:PORT, got {address!r}")
    host = host.strip("[]")
    return (host or None), int(port)


class Limits(NamedTuple):
    """What one client may hold: connections past ``max_connections`` get 503 at once; a
    connection whose first request has not sent its headers within ``header_timeout``
    seconds is closed; an idle keep-alive connection is closed after ``idle_timeout``."""

    max_connections: int = 512
    header_timeout: float = 10.0
    idle_timeout: float = 60.0


_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 29\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
    b"Too many connections at once\n"
)


class _Guarded(asyncio.Protocol):
    """aiohttp's protocol for one connection, counted against the cap and timed until
    the headers of its first request are in."""

    def __init__(self, inner: asyncio.Protocol, guard: ConnectionGuard) -> None:
        self.inner, self.guard = inner, guard
        self.counted = False
        self.timer: asyncio.TimerHandle | None = None
        self.head = b""
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        guard = self.guard
        if guard.open >= guard.limits.max_connections:
            guard.refused += 1
            transport.write(_BUSY)  # type: ignore[attr-defined]
            transport.close()
            return
        guard.open += 1
        self.counted = True
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(guard.limits.header_timeout, self._too_slow)
        self.inner.connection_made(transport)

    def _too_slow(self) -> None:
        self.timer = None
        self.guard.timed_out += 1
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if not self.counted:
            return
        if self.timer is not None:
            self.head = (self.head + data)[-8192:]
            if b"\r\n\r\n" in self.head:
                self.timer.cancel()
                self.timer, self.head = None, b""
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.counted else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.counted:
            self.counted = False
            self.guard.open -= 1
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class ConnectionGuard:
    """A protocol factory around aiohttp's that enforces ``Limits``."""

    def __init__(self, factory: Any, limits: Limits) -> None:
        self.factory, self.limits = factory, limits
        self.open = self.refused = self.timed_out = 0

    def __call__(self) -> asyncio.Protocol:
        return _Guarded(self.factory(), self)


class GuardedSite(web.TCPSite):
    """aiohttp's TCP site, its connections passed through a ConnectionGuard."""

    def __init__(self, runner: web.AppRunner, *args: Any, limits: Limits, **kw: Any) -> None:
        super().__init__(runner, *args, **kw)
        self.guard: ConnectionGuard | None = None
        self.limits = limits

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        self.guard = ConnectionGuard(server, self.limits)
        self._server = await asyncio.get_running_loop().create_server(
            self.guard,
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
