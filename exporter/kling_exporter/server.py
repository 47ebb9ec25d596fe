"""HTTP: the application (/metrics, the landing page, health, readiness, reload, the
budget API of ``api``), its security middlewares, and the server's life."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import gzip
import html
import logging
import signal
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

from aiohttp import web

from kling_exporter import __version__
from kling_exporter.account import Account
from kling_exporter.api import (
    FLEET,
    READER,
    RESERVATIONS,
    Reader,
    budgets,
    check,
    release,
    reservations_list,
    reserve,
    statuses,
)
from kling_exporter.bodies import MAX_BODY, error_answer
from kling_exporter.budgets import BudgetStatus
from kling_exporter.callbacks import PATH as CALLBACK_PATH
from kling_exporter.callbacks import Callbacks, journal_for
from kling_exporter.collector import Exposition
from kling_exporter.connections import GuardedSite, Limits
from kling_exporter.fleet import Fleet, InstanceTaken
from kling_exporter.gateway import Gateway
from kling_exporter.holds import journal_beside
from kling_exporter.link import ReaderProcess
from kling_exporter.model import ReaderUnavailable
from kling_exporter.reservations import Reservations
from kling_exporter.runtime import SWITCH_INTERVAL, trim_after
from kling_exporter.side import (
    AccountFigures,
    FleetFigures,
    GatewayFigures,
    PackFigures,
    Side,
    side_families,
)
from kling_exporter.webconfig import BasicAuth, FailureLimit, WebConfig

log = logging.getLogger(__name__)


def side_of(
    budgets: list[BudgetStatus],
    reservations: Reservations,
    callbacks: Callbacks,
    account: Account,
    fleet: Fleet,
    gateway: Gateway,
) -> Side:
    """The figures of this process's own families, read from the services now."""
    packs = [
        PackFigures(
            p.resource_pack_id,
            p.resource_pack_name,
            p.resource_pack_type,
            p.total_quantity,
            p.remaining_quantity,
            p.invalid_time / 1000,
            p.status,
        )
        for p in account.packs
    ]
    durations = {r: (h.cumulative(), h.sum) for r, h in gateway.durations.items()}
    return Side(
        budgets,
        reservations.outcomes,
        callbacks.outcomes,
        AccountFigures(packs, account.errors, account.last_success) if account.enabled() else None,
        FleetFigures(fleet.up, fleet.instances, fleet.last_publish, fleet.conflict)
        if fleet.enabled
        else None,
        GatewayFigures(gateway.outcomes, durations) if gateway.settings.enabled else None,
    )


def metrics_handler(
    reader: Reader,
    reservations: Reservations,
    callbacks: Callbacks,
    account: Account,
    fleet: Fleet,
    gateway: Gateway,
) -> Any:
    """/metrics, compressed when the client asks. Plain-text scrapes that arrive while a
    render is under way share the reader's render; OpenMetrics and ``name[]`` filters are
    rendered for their own request. The families kept on this side (reservations,
    callbacks, Kling's account, the fleet, the gateway) are added to what the reader
    rendered."""
    under_way: asyncio.Future[tuple[bytes, str]] | None = None
    services = (reservations, callbacks, account, fleet, gateway)
    ours = Exposition(
        lambda: side_families(side_of(statuses(reader, reservations), *services)),
        # What there is, without reading usage.
        lambda: side_families(side_of([], *services), samples=False),
        process=False,
    )

    last_size = 0  # of the last body served: a large one is trimmed at the next scrape

    def finished(future: asyncio.Future[tuple[bytes, str]]) -> None:
        nonlocal under_way
        if under_way is future:
            under_way = None

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal under_way, last_size
        trim_after(last_size)  # what the last scrape freed, back to the system
        last_size = 0
        accept = ",".join(request.headers.getall("Accept", []))
        names = request.query.getall("name[]", [])
        try:
            if "application/openmetrics-text" in accept or names:
                body, content_type = await reader.render_metrics(accept, names)
            else:
                if under_way is None:
                    under_way = asyncio.ensure_future(reader.render_metrics("", []))
                    under_way.add_done_callback(finished)
                body, content_type = await asyncio.shield(under_way)
        except ReaderUnavailable as e:
            return error_answer(503, f"metrics: unavailable: {e}", "")
        body = ours.splice(body, accept, names)
        headers = {"Content-Type": content_type, "Vary": "Accept-Encoding"}
        last_size = len(body)
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            # Level 1: a third of the time of the default for a page a quarter larger;
            # a scrape of 30,000 series spent half its time in gzip. Off the loop.
            body = await asyncio.to_thread(gzip.compress, body, GZIP_LEVEL)
            headers["Content-Encoding"] = "gzip"
        return web.Response(body=body, headers=headers)

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
    if not request.app[READER].reader_up:
        return error_answer(503, "reader: the log reader has failed")
    return web.Response(text="Healthy.\n")


async def ready(request: web.Request) -> web.Response:
    if request.app[FLEET].conflict:
        return error_answer(503, request.app[FLEET].conflict_reason, "fleet.instance")
    if request.app[READER].is_ready():
        return web.Response(text="Ready.\n")
    return error_answer(503, "reader: still reading the existing logs")


async def reload(request: web.Request) -> web.Response:
    try:
        error = await request.app[READER].reload_config()
    except ReaderUnavailable as e:
        return error_answer(503, f"reader: unavailable: {e}")
    if error is not None:
        # The error names the key, never the file (a remote client learns no path).
        return error_answer(500, f"config: reload failed, the running config is kept: {error}")
    return web.Response(text="Config reloaded.\n")


# gzip's level for /metrics (see metrics_handler).
GZIP_LEVEL = 1

# Headers of aiohttp's own error bodies, which the JSON answer replaces.
_BODY_HEADERS = ("content-type", "content-length", "content-encoding")

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
        user, password = _credentials(request)
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


def _errors_in_one_shape(headers: dict[str, str]) -> Any:
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
            kept = {k: v for k, v in e.headers.items() if k.lower() not in _BODY_HEADERS}
            return error_answer(e.status, message, field, {**kept, **headers})
        except ReaderUnavailable as e:
            return error_answer(503, f"reader: {e}", "", headers)
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except Exception:
            log.exception("request failed", extra={"path": request.path[:200]})
            return error_answer(500, "server: internal error (logged)", "", headers)

    return middleware


def _protect(logins: Logins, gateway_prefix: str = "") -> Any:
    """A middleware: HTTP/1.0 at least, credentials where users are configured (not
    for health, nor for Kling's callbacks, which carry their own token, nor for the
    gateway, whose producers send Kling's own bearer token, which Kling checks), at
    most MAX_CONCURRENT_API API requests at once, and the configured headers on
    answers."""
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
        response.headers.update(logins.headers)
        return response

    return middleware


def _security_middlewares(web_config: WebConfig | None, gateway_prefix: str = "") -> list[Any]:
    auth = BasicAuth(web_config.basic_auth_users if web_config else {})
    headers = web_config.http_server_config.headers if web_config else {}
    return [_errors_in_one_shape(headers), _protect(Logins(auth, headers), gateway_prefix)]


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


def in_background(
    run: Callable[[], Awaitable[None]], then: Callable[[], Awaitable[None]] | None = None
) -> Callable[[web.Application], AsyncIterator[None]]:
    """An aiohttp cleanup context that runs ``run`` for as long as the application
    runs, cancels it at the end and then awaits ``then``."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.ensure_future(run())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if then is not None:
            await then()

    return context


def build_app(
    reader: Reader,
    telemetry_path: str = "/metrics",
    web_config: WebConfig | None = None,
    reservations: Reservations | None = None,
    mount: Callable[[web.Application], None] | None = None,
) -> web.Application:
    """The HTTP face of ``reader``. Reservations are kept in memory unless given with a
    journal. ``mount`` adds routes of the caller's (tests mount a stand-in of Kling on
    the same server; production mounts nothing)."""
    gateway_config = reader.config.gateway
    prefix = gateway_config.path_prefix if gateway_config.enabled else ""
    app = web.Application(
        client_max_size=MAX_BODY, middlewares=_security_middlewares(web_config, prefix)
    )
    app[READER] = reader
    held = app[RESERVATIONS] = reservations or Reservations()
    landing = _landing(telemetry_path)

    async def listen(app: web.Application) -> None:
        reader.listen(held.consumed)

    app.on_startup.append(listen)

    async def index(request: web.Request) -> web.Response:
        return web.Response(text=landing, content_type="text/html")

    callbacks = Callbacks(lambda: reader.config)
    account = Account(lambda: reader.config)
    app.cleanup_ctx.append(in_background(account.run))
    fleet = app[FLEET] = Fleet(lambda: reader.config, held, reader.view, reader.is_ready)
    app.cleanup_ctx.append(in_background(fleet.run, fleet.stop))
    gateway = Gateway(lambda: reader.config, reader.view, held, fleet, callbacks, reader.is_ready)
    if prefix:
        app.cleanup_ctx.append(gateway.pool)
        app.router.add_route("*", prefix + "/{tail:.*}", gateway.handle)
    # After the cleanup contexts: the gateway's work under way journals first.
    app.on_cleanup.append(callbacks.close)
    handler = metrics_handler(reader, held, callbacks, account, fleet, gateway)
    app.router.add_get(telemetry_path, handler)
    app.router.add_post(CALLBACK_PATH, callbacks.handle)
    if mount is not None:
        mount(app)
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


# -- the server's life ---------------------------------------------------------------


class Serving(NamedTuple):
    """How the server serves: its address, metrics path, TLS and users, connection
    limits."""

    host: str | None
    port: int
    telemetry_path: str = "/metrics"
    web_config: WebConfig | None = None
    tls: ssl.SSLContext | None = None
    limits: Limits = Limits()


async def _serve(reader: ReaderProcess, serving: Serving) -> int:
    """Serve until told to stop (0), or until the reader process ends unasked (1)."""
    host, port, telemetry_path, web_config, tls, limits = serving
    config = reader.config
    if config.state.path:  # as Prometheus makes its data folder: an OSError stops here
        Path(config.state.path).parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    journal = journal_for(config.logs)
    writes = config.gateway.enabled or bool(config.kling.callback_token)
    if writes and journal is None:
        log.warning(
            "the gateway and callbacks have no journal: no glob of logs.paths gives a file "
            "name to write; they answer 503 until logs.journal names one"
        )
    elif writes and config.logs.journal:  # a folder of its own (the logs' are the producers')
        try:
            Path(config.logs.journal).parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        except OSError as e:  # the gateway and callbacks answer 503 until it can be written
            where = {"path": config.logs.journal, "err": str(e)}
            log.error("cannot make the journal's folder", extra=where)
    reservations = Reservations(journal_beside(config.state.path))
    app = build_app(reader, telemetry_path, web_config, reservations)
    await app[FLEET].start()  # refused while another exporter runs under its name
    runner = web.AppRunner(
        app, handle_signals=False, access_log=None, keepalive_timeout=limits.idle_timeout
    )
    await runner.setup()
    site = GuardedSite(runner, host, port, shutdown_timeout=10, ssl_context=tls, limits=limits)
    await site.start()
    # What start-up made (imports, the app) lives as long as the process: out of the
    # collector's sight, a full collection takes milliseconds instead of about 45 ms
    # that no request could be answered in.
    gc.freeze()
    # Journal writes, gzip and the reader's messages run on threads here too: each
    # waited up to the default 5 ms for the event loop's thread to let the interpreter
    # go, which put milliseconds on a gateway create's p99.
    sys.setswitchinterval(SWITCH_INTERVAL)
    log.info(
        "listening",
        extra={
            "address": f"{host or ''}:{port}",
            "version": __version__,
            "tls": tls is not None,
            "basic_auth": bool(web_config and web_config.basic_auth_users),
        },
    )
    if config.gateway.enabled:
        gateway = config.gateway
        log.info(
            "gateway enabled",
            extra={
                "path_prefix": gateway.path_prefix,
                "upstream": gateway.upstream,
                "unpriced": gateway.unpriced,
                "journal": str(journal),
                "fleet": bool(config.fleet.redis_url),
            },
        )
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    reloads: set[asyncio.Task[str | None]] = set()

    def reload() -> None:
        task = asyncio.ensure_future(reader.reload_config())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)
    reader.on_exit = done.set
    reader.start()
    await done.wait()
    log.info("shutting down")
    await runner.cleanup()  # lets scrapes under way finish
    await reservations.close()
    return 0 if reader.stopping or not reader.ended.is_set() else 1


def run(reader: ReaderProcess, serving: Serving) -> int:
    """Serve ``reader`` until SIGTERM or SIGINT (0), or until the reader ends unasked or
    the address cannot be served (1); then stop the reader, which saves its state."""
    try:
        code = asyncio.run(_serve(reader, serving))
    except OSError as e:
        log.error("cannot serve", extra={"err": str(e)})
        return 1
    except InstanceTaken as e:
        log.error("cannot start", extra={"err": str(e)})
        return 1
    finally:
        reader.stop()
    log.info("stopped", extra={"lines_read": reader.lines_read})
    return code
