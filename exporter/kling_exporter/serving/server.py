"""HTTP: the application (/metrics, the landing page, health, readiness, reload, the
budget API of ``api``, the gateway) and the server's life; what every request passes
through first is ``middlewares``."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import html
import logging
import signal
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, NamedTuple

from aiohttp import web

from kling_exporter import __version__
from kling_exporter.blocks import Block, Blocks, gzipped, joined
from kling_exporter.budgets import Reserved
from kling_exporter.collector import Exposition, plain_text
from kling_exporter.guard.fleet import Fleet, InstanceTaken
from kling_exporter.guard.reservations import Reservations
from kling_exporter.journals.holds import journal_beside
from kling_exporter.journals.tasklog import journal_for
from kling_exporter.kling.account import Account
from kling_exporter.model import ReaderUnavailable
from kling_exporter.runtime import SWITCH_INTERVAL, trim_after
from kling_exporter.serving.api import (
    FLEET,
    READER,
    RESERVATIONS,
    Reader,
    budgets,
    check,
    release,
    reservations_list,
    reserve,
)
from kling_exporter.serving.bodies import MAX_BODY, error_answer
from kling_exporter.serving.callbacks import PATH as CALLBACK_PATH
from kling_exporter.serving.callbacks import Callbacks
from kling_exporter.serving.connections import GuardedSite, Limits
from kling_exporter.serving.gateway import Gateway
from kling_exporter.serving.link import ReaderProcess
from kling_exporter.serving.metrics import (
    AccountFigures,
    FleetFigures,
    GatewayFigures,
    PackFigures,
    Side,
    side_families,
)
from kling_exporter.serving.middlewares import configured_headers, security_middlewares
from kling_exporter.serving.webconfig import WebConfig

log = logging.getLogger(__name__)


def side_of(
    budgets: list[Reserved],
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
    rendered. A plain-text answer is put together from blocks kept from the last
    scrape, so a block that did not change is neither sent again by the reader nor
    compressed again here (``blocks.Block``)."""
    under_way: asyncio.Future[tuple[list[Block], str]] | None = None
    services = (reservations, callbacks, account, fleet, gateway)
    ours = Exposition(
        lambda: side_families(side_of(reservations.reserved(reader.view()), *services)),
        # What there is, without reading usage.
        lambda: side_families(side_of([], *services), samples=False),
        process=False,
    )
    our_blocks = Blocks()
    # The last compressed answer and the blocks it was made of (kept, so that their ids
    # stand for them): the same blocks again are the same answer.
    last_gzip: tuple[list[Block], bytes] = ([], b"")

    def finished(future: asyncio.Future[tuple[list[Block], str]]) -> None:
        nonlocal under_way
        if under_way is future:
            under_way = None

    def compressed(blocks: list[Block]) -> bytes:
        nonlocal last_gzip
        kept, body = last_gzip
        if len(kept) != len(blocks) or any(a is not b for a, b in zip(kept, blocks, strict=True)):
            body = gzipped(blocks)
            last_gzip = (blocks, body)
        return body

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal under_way
        accept = ",".join(request.headers.getall("Accept", []))
        names = request.query.getall("name[]", [])
        try:
            if not plain_text(accept, names):
                blocks, content_type = await reader.render_metrics(accept, names)
                blocks = [Block(ours.splice(joined(blocks), accept, names))]
            else:
                if under_way is None:
                    under_way = asyncio.ensure_future(reader.render_metrics("", []))
                    under_way.add_done_callback(finished)
                blocks, content_type = await asyncio.shield(under_way)
                blocks = [*blocks, *our_blocks.of(ours.parts())]
        except ReaderUnavailable as e:
            return error_answer(503, f"metrics: unavailable: {e}", "")
        headers = {"Content-Type": content_type, "Vary": "Accept-Encoding"}
        pieces: list[bytes]
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            # Off the loop: the blocks that changed are compressed there.
            pieces = [await asyncio.to_thread(compressed, blocks)]
            headers["Content-Encoding"] = "gzip"
        else:
            pieces = [block.text for block in blocks]
        size = sum(map(len, pieces))
        # What making the answer took (the reader's message, the compressing) is handed
        # back to the system once it is free: the text's size says whether it is worth it.
        made = sum(len(block.text) for block in blocks)
        if size <= SENT_WHOLE or request.method == "HEAD":
            trim_after(made)
            return web.Response(body=b"".join(pieces), headers=headers)
        return await sent_in_pieces(request, headers, pieces, size, made)

    return handler


# A /metrics answer larger than this is sent a piece of about this size at a time: a
# copy of the whole answer is never made (nor, while the scraper is slower than the
# loop, held again in the socket's buffer), and what it took is handed back at the end.
SENT_WHOLE = 1 << 20


async def sent_in_pieces(
    request: web.Request, headers: dict[str, str], pieces: list[bytes], size: int, made: int
) -> web.StreamResponse:
    response = web.StreamResponse(headers=headers)
    response.content_length = size
    # A scraper going away ends the answer where it is.
    with contextlib.suppress(ConnectionResetError):
        await response.prepare(request)
        batch: list[bytes | memoryview] = []
        held = 0
        for piece in pieces:
            view = memoryview(piece)
            while view:
                part, view = view[: SENT_WHOLE - held], view[SENT_WHOLE - held :]
                batch.append(part)
                held += len(part)
                if held == SENT_WHOLE:
                    await response.write(b"".join(batch))
                    batch, held = [], 0
        if batch:
            await response.write(b"".join(batch))
        await response.write_eof()
    trim_after(max(size, made))  # what the answer took, back to the system
    return response


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
        client_max_size=MAX_BODY, middlewares=security_middlewares(web_config, prefix)
    )
    app.on_response_prepare.append(configured_headers(web_config))
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
