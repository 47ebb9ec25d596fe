"""The gateway: Kling's API served by the exporter, with budgets enforced on the way.

A producer points its Kling base URL at ``http://exporter/kling`` and changes nothing
else. Every request is passed on to Kling as it came (its ``Authorization`` untouched);
a task-creating one is first priced from its own body and given a reservation against
every matching budget (the fleet's decision with a fleet), and refused with a 429 in
Kling's shape when a budget has no room. When Kling accepts the task, a
``task_submitted`` line naming the reservation is fsynced to the exporter's journal
(the callbacks' file among the logs) before the producer hears of it, so the reader
counts the task like any logged one and the hold gives way to it; when Kling refuses or
cannot be reached, the hold is released. The hold's own record is written as it is
granted and not fsynced: it outlives the exporter's death, and should the machine lose
power before the task line is on disk, the producer was told nothing and the hold would
only have kept the budget for the request's timeout. Where the hold is the only record
of a task the producer is told of (the task line could not be written, or Kling's
answer names no task), the hold's record is fsynced before the answer goes back. A
query whose answer shows a finished task is journalled as its completion, once.

The work after the budget's decision runs shielded from the producer's connection: a
producer that goes away once its request was sent still has its task journalled.

One job, and long for it: a request's way through the gateway, whose steps share the
gateway's state (its client pool, holds, outcomes). Kling's wire format is
``kling.wire``, its endpoints and prices ``kling.endpoints``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NamedTuple, TypeVar

import aiohttp
from aiohttp import web
from multidict import CIMultiDictProxy
from yarl import URL

from kling_exporter.accounting.counters import Histogram
from kling_exporter.budgets import Ask
from kling_exporter.config import Config, GatewayConfig
from kling_exporter.events import MAX_LABEL_LEN
from kling_exporter.guard.fleet import Fleet
from kling_exporter.guard.reservations import Reservations, Terms, fingerprint
from kling_exporter.kling.endpoints import (
    CREATES,
    PathError,
    Priced,
    canonical,
    priced,
    route_of,
    split_target,
)
from kling_exporter.kling.tasks import completion, part_ids
from kling_exporter.kling.wire import (
    AUTO_HEADERS,
    CODE_BAD_PARAMETER,
    CODE_NO_AUTH,
    CODE_RATE_LIMITED,
    CODE_UNAVAILABLE,
    MAX_ANSWER,
    access_key,
    answer_headers,
    forwarded_headers,
    kling_data,
    kling_error,
    refusal,
    transport_error,
)
from kling_exporter.serving.bodies import BodyError, parse_json, read_body
from kling_exporter.serving.callbacks import Callbacks
from kling_exporter.streams import TooLarge, read_bounded
from kling_exporter.views import View

log = logging.getLogger(__name__)
T = TypeVar("T")

ROUTES = ("create", "query", "other")
OUTCOMES = (
    "forwarded",  # Kling answered with success
    "refused",  # a budget had no room: 429, nothing sent to Kling
    "bad_request",  # 4xx from the gateway itself: a body it cannot price, no project
    "upstream_error",  # Kling answered with an error (HTTP status, or a code other than 0)
    "transport_error",  # Kling could not be reached (502) or did not answer in time (504)
    "unavailable",  # no hold could be taken (503), or the task line not written
)
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


# A hold lives this much longer than Kling may take to answer, so the reader has time
# to read the submission that uses it.
HOLD_MARGIN = 120.0
# Task ids whose completion was journalled, remembered to journal each once.
REMEMBERED = 100_000


class Upstream(NamedTuple):
    """Kling's answer, read whole."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes


class Identity(NamedTuple):
    """Whose a create is: the project and user its budgets are matched by."""

    project: str
    user: str | None


class Gateway:
    """The gateway's state: its connection pools to Kling, what became of the requests,
    and the task ids whose completion it journalled. Settings are read from the config
    at each request, so a reload applies (but for ``enabled`` and ``path_prefix``).

    Invariant of the money path: Kling is sent a write only once it is priced from the
    very bytes Kling is sent (the canonical path, the body re-encoded from what was
    priced) and held against every matching budget, or refused; a task Kling made is on
    the journal (one line per task it makes) before the producer hears of it, and its
    hold is the gateway's own, which only the task's line, Kling's refusal or expiry
    ends."""

    def __init__(
        self,
        config: Callable[[], Config],
        view: Callable[[], View],
        reservations: Reservations,
        fleet: Fleet,
        callbacks: Callbacks,
        ready: Callable[[], bool] = lambda: True,
    ) -> None:
        self.config = config
        self.view = view
        self.reservations = reservations
        self.fleet = fleet
        self.callbacks = callbacks
        self.ready = ready
        self.outcomes = {(r, o): 0 for r in ROUTES for o in OUTCOMES}
        self.durations = {r: Histogram(BUCKETS) for r in ROUTES}  # Kling's answer times
        self.completed: OrderedDict[str, None] = OrderedDict()
        self.parts: OrderedDict[str, int] = OrderedDict()  # Kling's task id -> tasks it made
        self._session: aiohttp.ClientSession | None = None
        self._others: aiohttp.ClientSession | None = None
        self._work: set[asyncio.Task[Any]] = set()

    @property
    def settings(self) -> GatewayConfig:
        return self.config().gateway

    # -- life ------------------------------------------------------------------------

    async def pool(self, app: web.Application) -> AsyncIterator[None]:
        """An aiohttp cleanup context: two pools of connections to Kling for the
        application's life, one for creates and queries and one for everything else,
        so that slow pass-through requests cannot take the connections creates need;
        at its end, work under way is finished first."""

        def session() -> aiohttp.ClientSession:
            return aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=128, ttl_dns_cache=60),
                auto_decompress=False,  # answers go on as they came
                cookie_jar=aiohttp.DummyCookieJar(),  # one producer's are not another's
                timeout=aiohttp.ClientTimeout(total=None),
            )

        self._session, self._others = session(), session()
        try:
            yield
        finally:
            if self._work:
                await asyncio.wait(set(self._work), timeout=self.settings.timeout_seconds)
            await self._session.close()
            await self._others.close()
            self._session = self._others = None

    def _shielded(self, work: Awaitable[T]) -> Awaitable[T]:
        """``work`` run to its end whatever becomes of the producer's connection."""
        task = asyncio.ensure_future(work)
        self._work.add(task)
        task.add_done_callback(self._work.discard)
        return asyncio.shield(task)

    def _count(self, route: str, outcome: str) -> None:
        self.outcomes[route, outcome] += 1

    # -- requests --------------------------------------------------------------------

    def target(self, request: web.Request) -> tuple[str, str]:
        """The canonical path after the prefix and the query, as they are classified
        and forwarded; PathError for a path with no single meaning or one that leaves
        the prefix."""
        path, query = split_target(request.raw_path)
        path = canonical(path)
        prefix = self.settings.path_prefix
        if not path.startswith(prefix + "/"):
            raise PathError(f"path: resolves outside the gateway's prefix {prefix}")
        return path[len(prefix) :], query

    def _url(self, path: str, query: str) -> URL:
        tail = path + ("?" + query if query else "")
        return URL(self.settings.upstream.rstrip("/") + tail, encoded=True)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self._session is None:
            return kling_error(503, CODE_UNAVAILABLE, "gateway: not started")
        try:
            path, query = self.target(request)
        except PathError as e:
            route = "create" if request.method not in ("GET", "HEAD", "OPTIONS") else "other"
            self._count(route, "bad_request")
            return kling_error(400, CODE_BAD_PARAMETER, str(e))
        route = route_of(request.method, path)
        coding = request.headers.get("Content-Encoding", "").strip().lower()
        if coding not in ("", "identity"):
            # aiohttp would inflate it and pass it on still labelled as encoded.
            self._count(route, "bad_request")
            return kling_error(415, CODE_BAD_PARAMETER, "Content-Encoding: send the body unencoded")
        if route == "create":
            return await self._create(request, path, query)
        if route == "query":
            return await self._query(request, path, query)
        return await self._pass(request, path, query)

    async def _send(self, request: web.Request, url: URL, route: str, body: bytes) -> Upstream:
        """Send a buffered request to Kling and read its answer whole (bounded); raises
        TimeoutError, aiohttp.ClientError, OSError or TooLarge."""
        assert self._session is not None
        headers = forwarded_headers(request.headers, self._own_headers(), False)
        skip = [h for h in AUTO_HEADERS if h not in headers]
        start = time.perf_counter()
        try:
            async with asyncio.timeout(self.settings.timeout_seconds):
                async with self._session.request(
                    request.method,
                    url,
                    headers=headers,
                    data=body if body or request.body_exists else None,
                    skip_auto_headers=skip,
                    allow_redirects=False,
                ) as answer:
                    raw = await read_bounded(answer.content, MAX_ANSWER)
                    return Upstream(answer.status, answer.headers, raw)
        finally:
            self.durations[route].observe(time.perf_counter() - start)

    def _own_headers(self) -> frozenset[str]:
        settings = self.settings
        return frozenset((settings.project_header.lower(), settings.user_header.lower()))

    def identity(self, request: web.Request) -> Identity | str:
        """Whose a create is, or why that cannot be told. A mapped access key binds its
        project (and user): the headers choose only where the config trusts them."""
        settings = self.settings
        for header in (settings.project_header, settings.user_header, "Authorization"):
            if len(request.headers.getall(header, ())) > 1:
                return f"{header}: given more than once"
        key = access_key(request.headers.get("Authorization", ""))
        project = settings.projects_by_access_key.get(key) if key is not None else None
        if project is None and settings.trust_project_header:
            project = request.headers.get(settings.project_header, "").strip() or None
        project = project or settings.default_project or None
        if project is None:
            header = settings.project_header
            return (
                "project: none given; map your access key in gateway.projects_by_access_key, "
                f"or set gateway.default_project (or trust the {header} header with "
                "gateway.trust_project_header)"
            )
        if len(project) > MAX_LABEL_LEN or not project.isprintable():
            return f"project: expected 1 to {MAX_LABEL_LEN} printable characters"
        user = settings.users_by_access_key.get(key) if key is not None else None
        if user is None and settings.trust_user_header:
            user = request.headers.get(settings.user_header, "").strip() or None
        if user is not None and (len(user) > MAX_LABEL_LEN or not user.isprintable()):
            return f"user: expected 1 to {MAX_LABEL_LEN} printable characters"
        return Identity(project, user)

    def _refuse(self, status: int, code: int, message: str) -> web.Response:
        self._count("create", "bad_request" if status < 500 else "unavailable")
        return kling_error(status, code, message)

    def _unpriced(self, path: str) -> str | None:
        """Why a write to ``path`` cannot be priced, or None."""
        endpoint = CREATES.get(path)
        if endpoint is None:
            return f"path: {path} is not a create endpoint the gateway can price"
        if endpoint.kind != "audio":
            return None
        if any(rule.kind == "audio" for rule in self.config().pricing.rules):
            return None
        return f"path: {path} makes audio, and no pricing rule names kind: audio"

    def _gate(self, request: web.Request) -> web.Response | None:
        """The refusal of a create before its body is read, or None: not ready yet, no
        bearer token (Kling refuses it too, and no hold is taken meanwhile), or a
        journal that cannot be written (fail closed)."""
        if not self.ready():
            return self._refuse(
                503, CODE_UNAVAILABLE, "gateway: the exporter is still reading its logs"
            )
        if access_key(request.headers.get("Authorization", "")) is None:
            return self._refuse(401, CODE_NO_AUTH, "Authorization: expected Kling's bearer token")
        journal = self.callbacks.journal()
        try:
            if journal is None:
                raise OSError("no glob of logs.paths fits one")
            journal.check()
        except OSError as e:
            log.error("the gateway's journal cannot be written", extra={"err": str(e)})
            return self._refuse(
                503, CODE_UNAVAILABLE, "gateway: its journal cannot be written; no task is sent"
            )
        return None

    def _prepare(
        self, request: web.Request, path: str, raw: bytes
    ) -> tuple[Ask, Priced, bytes, str | None] | web.Response:
        """A create's ask, its price, the bytes Kling is sent (re-encoded from what was
        priced, with a callback URL of its own where one is injected) and that URL's
        nonce; or the 400 that says which field is wrong."""
        try:
            body = parse_json(raw, unique=True)
            asked = priced(body, CREATES[path])
        except ValueError as e:
            return self._refuse(400, CODE_BAD_PARAMETER, str(e))
        who = self.identity(request)
        if isinstance(who, str):
            return self._refuse(400, CODE_BAD_PARAMETER, who)
        nonce = None
        inject = self.settings.inject_callback_url
        if inject and not body.get("callback_url"):
            nonce, url = self.callbacks.task_url(inject, asked.tasks)
            body = {**body, "callback_url": url}
        try:
            sent = json.dumps(body, ensure_ascii=False, allow_nan=False).encode()
        except ValueError:
            return self._refuse(400, CODE_BAD_PARAMETER, "body: NaN and Infinity are not JSON")
        return Ask(asked.req, asked.tasks, who.project, who.user), asked, sent, nonce

    async def _create(self, request: web.Request, path: str, query: str) -> web.StreamResponse:
        refusal = self._gate(request)
        if refusal is not None:
            return refusal
        try:
            raw = await read_body(request)
        except BodyError as e:
            return self._refuse(e.status, CODE_BAD_PARAMETER, str(e))
        why = self._unpriced(path)
        if why is not None:
            if self.settings.unpriced != "allow":
                why += "; gateway.unpriced: allow forwards it unpriced"
                return self._refuse(400, CODE_BAD_PARAMETER, why)
            return await self._shielded(self._forward_unpriced(request, path, query, raw))
        prepared = self._prepare(request, path, raw)
        if isinstance(prepared, web.Response):
            return prepared
        ask, asked, sent, nonce = prepared
        work = self._hold_and_send(request, self._url(path, query), sent, ask, asked, nonce)
        return await self._shielded(work)

    async def _forward_unpriced(
        self, request: web.Request, path: str, query: str, raw: bytes
    ) -> web.StreamResponse:
        """A write the config lets through unpriced (``gateway.unpriced: allow``)."""
        try:
            answer = await self._send(request, self._url(path, query), "create", raw)
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError, TooLarge) as e:
            self._count("create", "transport_error")
            return transport_error(e)
        self._count("create", "forwarded" if answer.status < 400 else "upstream_error")
        return web.Response(
            body=answer.body, status=answer.status, headers=answer_headers(answer.headers)
        )

    async def _hold_and_send(
        self, request: web.Request, url: URL, raw: bytes, ask: Ask, asked: Priced, nonce: str | None
    ) -> web.StreamResponse:
        hold = None
        view = self.view()
        if view.budgets.matching(ask.project, ask.user):
            ttl = self.settings.timeout_seconds + HOLD_MARGIN
            # With a fleet, a create is decided by the fleet or refused: never on local
            # figures alone, whatever fleet.on_unavailable says for the API.
            decide = (
                functools.partial(self.fleet.decide, strict=True) if self.fleet.enabled else None
            )
            req = ask.req
            shape = {"project": ask.project, "count": ask.tasks, "request": list(req)}
            # The hold's record is written at once and not fsynced: what makes the task
            # count for good is its own line, on disk before the producer is told, and
            # one fsync on the way is enough (``_keep`` fsyncs the hold when it is the
            # only record). Its own trip to a thread and its fsync were a fifth of the
            # HTTP process's CPU per create in the gateway bench.
            status, granted = await self.reservations.reserve(
                view,
                ask,
                None,
                ttl,
                fingerprint(shape),
                Terms.for_gateway(self.config().reservations, decide),
            )
            if status == 200 and not granted.get("refused_by"):
                # No budget said no: the fleet could not decide (Redis unreachable,
                # instances not settled). Worth a retry, unlike a budget's refusal.
                self._count("create", "refused")
                reason = granted.get("reason", "")
                return self._refuse(
                    503, CODE_UNAVAILABLE, f"gateway: {reason}; nothing was sent, retry later"
                )
            if status == 200:
                self._count("create", "refused")
                return refusal(granted)
            if status == 429:  # a cap on live holds (reservations.max_live...)
                return self._refuse(429, CODE_RATE_LIMITED, str(granted.get("error", "")))
            if status != 201:
                return self._refuse(503, CODE_UNAVAILABLE, str(granted.get("error", "")))
            hold = str(granted["id"])
        try:
            answer = await self._send(request, url, "create", raw)
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError, TooLarge) as e:
            await self._release(hold)
            self._count("create", "transport_error")
            return transport_error(e)
        code, data = kling_data(answer.body, answer.headers.get("Content-Encoding", ""))
        task_id = data.get("task_id") if isinstance(data, dict) else None
        if answer.status < 300 and code == 0 and isinstance(task_id, str) and task_id:
            if nonce is not None:
                self.callbacks.bind(nonce, task_id)
            await self._submitted(task_id, ask, asked, hold)
            self._count("create", "forwarded")
        elif answer.status >= 400 or (code is not None and code != 0):
            await self._release(hold)
            self._count("create", "upstream_error")
        else:
            # Kling's answer does not say whether it made the task: the hold stays
            # until it expires, so the budget counts it meanwhile.
            log.warning("Kling's answer to a create request names no task; the hold is kept")
            await self._keep(hold)
            self._count("create", "upstream_error")
        return web.Response(
            body=answer.body, status=answer.status, headers=answer_headers(answer.headers)
        )

    async def _submitted(self, task_id: str, ask: Ask, asked: Priced, hold: str | None) -> None:
        """Journal Kling's new task (a line for each task it makes: ``n`` images are n)
        before the producer hears of it. The line's task id is Kling's: a producer's
        ``external_task_id`` rides beside it, so reusing one cannot hide a task."""
        req = ask.req
        event: dict[str, Any] = {
            "event": "task_submitted",
            "timestamp": time.time(),
            "task_id": task_id,
            "project": ask.project,
            "kind": req.kind,
            "source": "kling_gateway",
        }
        if ask.user is not None:
            event["user"] = ask.user
        if asked.external_task_id:
            event["external_task_id"] = asked.external_task_id
        for key, value in (("model", req.model), ("mode", req.mode), ("duration", req.duration)):
            if value is not None:
                event[key] = value
        if req.audio:
            event["audio"] = True
        if hold is not None:
            event["reservation_id"] = hold
        events = [{**event, "task_id": part} for part in part_ids(task_id, asked.tasks)]
        if asked.tasks > 1:
            self.parts[task_id] = asked.tasks
            if len(self.parts) > REMEMBERED:
                self.parts.popitem(last=False)
        if not await self._journal(*events):
            # Kling made the task: the producer is told so (a retry would pay twice),
            # and the hold counts it until it expires.
            await self._keep(hold)
            self._count("create", "unavailable")

    async def _journal(self, *events: dict[str, Any]) -> bool:
        """Whether ``events`` are on disk in the journal (the error is logged if not)."""
        journal = self.callbacks.journal()
        try:
            if journal is None:
                raise OSError("no journal")
            await journal.append(*events)
        except OSError as e:
            log.error("cannot write the gateway's journal line", extra={"err": str(e)})
            return False
        return True

    async def _keep(self, hold: str | None) -> None:
        """The hold is the only record of a task Kling may have made: on disk before the
        producer is answered (its record was written without an fsync)."""
        if hold is not None:
            await self.reservations.sync()

    async def _release(self, hold: str | None) -> None:
        if hold is not None and await self.reservations.release(hold):
            self.fleet.wake.set()

    async def _query(self, request: web.Request, path: str, query: str) -> web.StreamResponse:
        try:
            answer = await self._send(request, self._url(path, query), "query", b"")
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError, TooLarge) as e:
            self._count("query", "transport_error")
            return transport_error(e)
        code, data = kling_data(answer.body, answer.headers.get("Content-Encoding", ""))
        if answer.status >= 400 or (code is not None and code != 0):
            self._count("query", "upstream_error")
        else:
            self._count("query", "forwarded")
            if isinstance(data, dict):
                await self._shielded(self._completed(data))
        return web.Response(
            body=answer.body, status=answer.status, headers=answer_headers(answer.headers)
        )

    async def _completed(self, data: dict[str, Any]) -> None:
        """Journal a finished task's completion the first time a query shows it (for
        each task it made: the first carries Kling's charge, the others none)."""
        try:
            event = completion(data, by_kling_id=True)
        except ValueError:
            return  # not a task as Kling describes one: nothing to count
        kling_id = str(data.get("task_id"))
        if event is None or kling_id in self.completed:
            return
        event["source"] = "kling_gateway"
        parts = part_ids(kling_id, self.parts.get(kling_id, 1))
        events = [event] + [{**event, "task_id": part, "credits_used": 0} for part in parts[1:]]
        if not await self._journal(*events):
            return  # the next query showing it tries again
        self.completed[kling_id] = None
        if len(self.completed) > REMEMBERED:
            self.completed.popitem(last=False)

    async def _pass(self, request: web.Request, path: str, query: str) -> web.StreamResponse:
        """Anything else, streamed both ways without reading it whole, on a pool of its
        own."""
        assert self._others is not None
        headers = forwarded_headers(request.headers, self._own_headers(), True)
        skip = [h for h in AUTO_HEADERS if h not in headers]
        timeout = self.settings.timeout_seconds
        start = time.perf_counter()
        try:
            upstream = await self._others.request(
                request.method,
                self._url(path, query),
                headers=headers,
                data=request.content if request.body_exists else None,
                skip_auto_headers=skip,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(sock_connect=timeout, sock_read=timeout),
            )
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as e:
            self.durations["other"].observe(time.perf_counter() - start)
            self._count("other", "transport_error")
            return transport_error(e)
        self.durations["other"].observe(time.perf_counter() - start)
        self._count("other", "upstream_error" if upstream.status >= 400 else "forwarded")
        async with upstream:
            response = web.StreamResponse(
                status=upstream.status, headers=answer_headers(upstream.headers)
            )
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            # Kling stopping mid-answer, or the producer going away, ends the answer
            # where it is; the producer sees it cut short.
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, ConnectionResetError):
                await response.prepare(request)
                async for chunk in upstream.content.iter_chunked(1 << 16):
                    await response.write(chunk)
                await response.write_eof()
        return response
