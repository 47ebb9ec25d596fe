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
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
import zlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NamedTuple, TypeVar
from urllib.parse import quote

import aiohttp
import jwt
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from kling_exporter.api import BodyError, parse_json, read_body
from kling_exporter.budgets import Ask
from kling_exporter.callbacks import Callbacks, completion
from kling_exporter.config import MODE_ALIASES, Config, GatewayConfig
from kling_exporter.counters import Histogram
from kling_exporter.events import MAX_ID, MAX_LABEL_LEN
from kling_exporter.fleet import Fleet
from kling_exporter.model import View
from kling_exporter.pricing import Request
from kling_exporter.reservations import Reservations, Terms, fingerprint
from kling_exporter.streams import TooLarge, read_bounded

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

# Kling's error codes, for the answers the gateway makes itself.
CODE_BAD_PARAMETER = 1201
CODE_NO_BALANCE = 1102  # what Kling says when the account cannot pay: not worth a retry
CODE_UNAVAILABLE = 5001
CODE_TIMEOUT = 5002

# A create request's answer, and a query's whose task is journalled, are read up to
# this; a larger query answer is passed on as it streams, and not journalled.
MAX_ANSWER = 4 << 20
# A hold lives this much longer than Kling may take to answer, so the reader has time
# to read the submission that uses it.
HOLD_MARGIN = 120.0
# Task ids whose completion was journalled, remembered to journal each once.
REMEMBERED = 100_000

# Headers that belong to one connection, not to the request (RFC 9110, 7.6.1), and the
# ones the gateway sets itself.
_HOP_BY_HOP = frozenset(
    (
        "connection",
        "expect",  # 100-continue is between the producer and the gateway
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
    )
)
# aiohttp's client adds these when a request has none; the producer's request goes on
# without those it did not send.
_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
_SEGMENT = r"[A-Za-z0-9._~-]+"
_TASK_PATH = re.compile(rf"^/v1/(videos|images)(?:/{_SEGMENT})+/?$")


def route_of(method: str, path: str) -> str:
    """``create`` for a POST to a video or image endpoint, ``query`` for a GET under
    one, ``other`` for anything else (the account, audio, unknown paths)."""
    if _TASK_PATH.match(path):
        if method == "POST":
            return "create"
        if method == "GET":
            return "query"
    return "other"


def kind_of_path(path: str) -> str:
    if path.startswith("/v1/images/"):
        return "try_on" if "try-on" in path else "image"
    return "video"


class Priced(NamedTuple):
    """What a create request asks for, as the budgets price it."""

    req: Request
    tasks: int
    external_task_id: str | None


def _whole(value: Any, field: str, low: int, high: int) -> int:
    """A whole number Kling may send as a string ("5") or a number (5, 5.0)."""
    number: Any = value
    if isinstance(value, str) and value.strip().isdigit():
        number = int(value.strip())
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    if isinstance(number, bool) or not isinstance(number, int) or not low <= number <= high:
        raise ValueError(f"{field}: expected a whole number from {low} to {high}, got {value!r}")
    return number


def priced(body: Any, kind: str) -> Priced:
    """The pricing input of a create request's JSON body: ``model_name``, ``mode``
    (std, pro), ``duration`` (seconds, a string or a number), ``sound`` (on, off) and,
    for images, ``n``. ValueError naming the field when one cannot be priced; fields
    the pricing does not read are Kling's to judge."""
    if not isinstance(body, dict):
        raise ValueError("body: expected a JSON object")
    model = body.get("model_name")
    if model is not None and (
        not isinstance(model, str) or not 0 < len(model) <= MAX_LABEL_LEN or not model.isprintable()
    ):
        raise ValueError(f"model_name: expected 1 to {MAX_LABEL_LEN} printable characters")
    mode = body.get("mode")
    if mode is not None and (not isinstance(mode, str) or mode not in MODE_ALIASES):
        raise ValueError(f"mode: expected one of std, pro, got {mode!r}")
    duration = body.get("duration")
    seconds = None if duration is None else _whole(duration, "duration", 1, 3600)
    sound = body.get("sound")
    if sound not in (None, "on", "off"):
        raise ValueError(f"sound: expected one of on, off, got {sound!r}")
    n = body.get("n")
    count = 1 if n is None or kind == "video" else _whole(n, "n", 1, 100)
    external = body.get("external_task_id")
    if external is not None and (
        not isinstance(external, str)
        or not 0 < len(external) <= MAX_ID
        or not external.isprintable()
    ):
        raise ValueError(f"external_task_id: expected 1 to {MAX_ID} printable characters")
    callback = body.get("callback_url")
    if callback is not None and not isinstance(callback, str):
        raise ValueError("callback_url: expected a string")
    long_mode = None if mode is None or kind != "video" else MODE_ALIASES[mode]
    req = Request(model, long_mode, seconds if kind == "video" else None, sound == "on", kind)
    return Priced(req, count, external or None)


def access_key(authorization: str) -> str | None:
    """The ``iss`` of a bearer JWT, read without verifying it (Kling verifies it): the
    producer's access key, used only to find its project and never logged."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return None
    try:
        claims = jwt.decode(token.strip(), options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    iss = claims.get("iss") if isinstance(claims, dict) else None
    return iss if isinstance(iss, str) else None


def kling_error(
    status: int, code: int, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """An answer the gateway makes itself, in Kling's shape, so a producer's Kling SDK
    reads it as it reads Kling's own."""
    body = {"code": code, "message": message, "request_id": f"gateway-{uuid.uuid4()}"}
    return web.Response(
        text=json.dumps(body, ensure_ascii=True),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def forwarded_headers(
    headers: CIMultiDictProxy[str], drop: str, keep_length: bool
) -> CIMultiDict[str]:
    """A request's headers as they go on: without hop-by-hop ones (those the
    ``Connection`` header names too) and ``drop`` (the gateway's own project header)."""
    named = {t.strip().lower() for v in headers.getall("Connection", []) for t in v.split(",")}
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in headers.items():
        low = key.lower()
        if low in _HOP_BY_HOP or low in named or low == drop:
            continue
        if low == "content-length" and not keep_length:
            continue
        out.add(key, value)
    return out


def answer_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    named = {t.strip().lower() for v in headers.getall("Connection", []) for t in v.split(",")}
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in headers.items():
        low = key.lower()
        if low in _HOP_BY_HOP or low in named or low == "content-length":
            continue
        out.add(key, value)
    return out


def decoded(body: bytes, encoding: str) -> bytes | None:
    """An answer's bytes without their content coding (the gateway passes answers on
    encoded, as they came, and reads them itself); None for a coding it does not know."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding in ("gzip", "x-gzip", "deflate"):
        try:
            inflater = zlib.decompressobj(47)  # gzip or zlib, told by the header
            out = inflater.decompress(body, MAX_ANSWER + 1)
        except zlib.error:
            return None
        return out if len(out) <= MAX_ANSWER else None
    return None


def kling_data(body: bytes, encoding: str) -> tuple[int | None, Any]:
    """Kling's ``code`` and ``data`` in an answer (None, None when it is not Kling's
    envelope)."""
    raw = decoded(body, encoding)
    if raw is None:
        return None, None
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return None, None
    if not isinstance(value, dict):
        return None, None
    code = value.get("code")
    if isinstance(code, bool) or not isinstance(code, int):
        return None, None
    return code, value.get("data")


class Upstream(NamedTuple):
    """Kling's answer, read whole."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes


class Gateway:
    """The gateway's state: its connection pool to Kling, what became of the requests,
    and the task ids whose completion it journalled. Settings are read from the config
    at each request, so a reload applies (but for ``enabled`` and ``path_prefix``)."""

    def __init__(
        self,
        config: Callable[[], Config],
        view: Callable[[], View],
        reservations: Reservations,
        fleet: Fleet,
        callbacks: Callbacks,
    ) -> None:
        self.config = config
        self.view = view
        self.reservations = reservations
        self.fleet = fleet
        self.callbacks = callbacks
        self.outcomes = {(r, o): 0 for r in ROUTES for o in OUTCOMES}
        self.durations = {r: Histogram(BUCKETS) for r in ROUTES}  # Kling's answer times
        self.completed: OrderedDict[str, None] = OrderedDict()
        self._session: aiohttp.ClientSession | None = None
        self._work: set[asyncio.Task[Any]] = set()

    @property
    def settings(self) -> GatewayConfig:
        return self.config().gateway

    # -- life ------------------------------------------------------------------------

    async def pool(self, app: web.Application) -> AsyncIterator[None]:
        """An aiohttp cleanup context: one pool of connections to Kling for the
        application's life; at its end, work under way is finished first."""
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256, ttl_dns_cache=60),
            auto_decompress=False,  # answers go on as they came
            cookie_jar=aiohttp.DummyCookieJar(),  # one producer's cookies are not another's
            timeout=aiohttp.ClientTimeout(total=None),
        )
        try:
            yield
        finally:
            if self._work:
                await asyncio.wait(set(self._work), timeout=self.settings.timeout_seconds)
            await self._session.close()
            self._session = None

    def _shielded(self, work: Awaitable[T]) -> Awaitable[T]:
        """``work`` run to its end whatever becomes of the producer's connection."""
        task = asyncio.ensure_future(work)
        self._work.add(task)
        task.add_done_callback(self._work.discard)
        return asyncio.shield(task)

    def _count(self, route: str, outcome: str) -> None:
        self.outcomes[route, outcome] += 1

    # -- requests --------------------------------------------------------------------

    def path(self, request: web.Request) -> str:
        """The request's path and query after the prefix, as sent: always from its
        ``/`` on, so nothing a producer sends can touch the upstream's host."""
        prefix = self.settings.path_prefix
        raw = request.raw_path
        if raw.startswith(prefix + "/"):
            return raw[len(prefix) :]
        # The prefix itself came percent-encoded (/%6Bling/...): the rest, encoded again.
        tail = URL.build(path="/" + request.match_info["tail"]).raw_path
        return tail + ("?" + request.query_string if request.query_string else "")

    def _url(self, tail: str) -> URL:
        return URL(self.settings.upstream.rstrip("/") + tail, encoded=True)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        tail = self.path(request)
        route = route_of(request.method, tail.split("?", 1)[0])
        if self._session is None:
            return kling_error(503, CODE_UNAVAILABLE, "gateway: not started")
        if route == "create":
            return await self._create(request, tail)
        if route == "query":
            return await self._query(request, tail)
        return await self._pass(request, tail)

    async def _send(self, request: web.Request, tail: str, route: str, body: bytes) -> Upstream:
        """Send a buffered request to Kling and read its answer whole (bounded); raises
        TimeoutError, aiohttp.ClientError, OSError or TooLarge."""
        assert self._session is not None
        headers = forwarded_headers(request.headers, self.settings.project_header.lower(), False)
        skip = [h for h in _AUTO_HEADERS if h not in headers]
        start = time.perf_counter()
        try:
            async with asyncio.timeout(self.settings.timeout_seconds):
                async with self._session.request(
                    request.method,
                    self._url(tail),
                    headers=headers,
                    data=body if body or request.body_exists else None,
                    skip_auto_headers=skip,
                    allow_redirects=False,
                ) as answer:
                    raw = await read_bounded(answer.content, MAX_ANSWER)
                    return Upstream(answer.status, answer.headers, raw)
        finally:
            self.durations[route].observe(time.perf_counter() - start)

    def _project(self, request: web.Request) -> str | None:
        settings = self.settings
        given = request.headers.get(settings.project_header, "").strip()
        if given:
            return given
        key = access_key(request.headers.get("Authorization", ""))
        if key is not None and key in settings.projects_by_access_key:
            return settings.projects_by_access_key[key]
        return settings.default_project or None

    def _refuse(self, status: int, code: int, message: str) -> web.Response:
        self._count("create", "bad_request" if status < 500 else "unavailable")
        return kling_error(status, code, message)

    async def _create(self, request: web.Request, tail: str) -> web.StreamResponse:
        try:
            raw = await read_body(request)
        except BodyError as e:
            return self._refuse(e.status, CODE_BAD_PARAMETER, str(e))
        try:
            body = parse_json(raw)
            asked = priced(body, kind_of_path(tail.split("?", 1)[0]))
        except ValueError as e:
            return self._refuse(400, CODE_BAD_PARAMETER, str(e))
        project = self._project(request)
        if project is None:
            header = self.settings.project_header
            return self._refuse(
                400,
                CODE_BAD_PARAMETER,
                f"project: none given; send the {header} header, or map your access key "
                "in gateway.projects_by_access_key, or set gateway.default_project",
            )
        if len(project) > MAX_LABEL_LEN or not project.isprintable():
            return self._refuse(
                400, CODE_BAD_PARAMETER, f"project: expected 1 to {MAX_LABEL_LEN} characters"
            )
        inject = self.settings.inject_callback_url
        if inject and not body.get("callback_url"):
            raw = json.dumps({**body, "callback_url": inject}, ensure_ascii=False).encode()
        journal = self.callbacks.journal()
        if journal is None:
            return self._refuse(
                503, CODE_UNAVAILABLE, "gateway: no journal (no glob of logs.paths fits one)"
            )
        ask = Ask(asked.req, asked.tasks, project, None)
        return await self._shielded(self._hold_and_send(request, tail, raw, ask, asked))

    async def _hold_and_send(
        self, request: web.Request, tail: str, raw: bytes, ask: Ask, asked: Priced
    ) -> web.StreamResponse:
        hold = None
        view = self.view()
        if view.budgets.matching(ask.project, None):
            ttl = self.settings.timeout_seconds + HOLD_MARGIN
            decide = self.fleet.decide if self.fleet.enabled else None
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
                Terms(decide, self.config().reservations.max_live, durable=False),
            )
            if status == 200:
                self._count("create", "refused")
                return _refusal(granted)
            if status != 201:
                return self._refuse(503, CODE_UNAVAILABLE, str(granted.get("error", "")))
            hold = str(granted["id"])
        try:
            answer = await self._send(request, tail, "create", raw)
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError, TooLarge) as e:
            await self._release(hold)
            self._count("create", "transport_error")
            if isinstance(e, TimeoutError):
                return kling_error(504, CODE_TIMEOUT, "gateway: Kling did not answer in time")
            return kling_error(502, CODE_UNAVAILABLE, "gateway: Kling could not be reached")
        code, data = kling_data(answer.body, answer.headers.get("Content-Encoding", ""))
        task_id = data.get("task_id") if isinstance(data, dict) else None
        if answer.status < 300 and code == 0 and isinstance(task_id, str) and task_id:
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
        """Journal Kling's new task before the producer hears of it."""
        req = ask.req
        event: dict[str, Any] = {
            "event": "task_submitted",
            "timestamp": time.time(),
            "task_id": (asked.external_task_id or task_id)[:MAX_ID],
            "kling_task_id": task_id[:MAX_ID],
            "project": ask.project,
            "kind": req.kind,
            "source": "kling_gateway",
        }
        if asked.external_task_id:
            event["external_task_id"] = asked.external_task_id
        for key, value in (("model", req.model), ("mode", req.mode), ("duration", req.duration)):
            if value is not None:
                event[key] = value
        if req.audio:
            event["audio"] = True
        if hold is not None:
            event["reservation_id"] = hold
        if not await self._journal(event):
            # Kling made the task: the producer is told so (a retry would pay twice),
            # and the hold counts it until it expires.
            await self._keep(hold)
            self._count("create", "unavailable")

    async def _journal(self, event: dict[str, Any]) -> bool:
        """Whether ``event`` is on disk in the journal (the error is logged if not)."""
        journal = self.callbacks.journal()
        try:
            if journal is None:
                raise OSError("no journal")
            await journal.append(event)
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

    async def _query(self, request: web.Request, tail: str) -> web.StreamResponse:
        try:
            answer = await self._send(request, tail, "query", b"")
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError, TooLarge) as e:
            self._count("query", "transport_error")
            if isinstance(e, TimeoutError):
                return kling_error(504, CODE_TIMEOUT, "gateway: Kling did not answer in time")
            return kling_error(502, CODE_UNAVAILABLE, "gateway: Kling could not be reached")
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
        """Journal a finished task's completion the first time a query shows it."""
        try:
            event = completion(data)
        except ValueError:
            return  # not a task as Kling describes one: nothing to count
        kling_id = str(data.get("task_id"))
        if event is None or kling_id in self.completed:
            return
        event["source"] = "kling_gateway"
        if not await self._journal(event):
            return  # the next query showing it tries again
        self.completed[kling_id] = None
        if len(self.completed) > REMEMBERED:
            self.completed.popitem(last=False)

    async def _pass(self, request: web.Request, tail: str) -> web.StreamResponse:
        """Anything else, streamed both ways without reading it whole."""
        assert self._session is not None
        headers = forwarded_headers(request.headers, self.settings.project_header.lower(), True)
        skip = [h for h in _AUTO_HEADERS if h not in headers]
        timeout = self.settings.timeout_seconds
        start = time.perf_counter()
        try:
            upstream = await self._session.request(
                request.method,
                self._url(tail),
                headers=headers,
                data=request.content if request.body_exists else None,
                skip_auto_headers=skip,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(sock_connect=timeout, sock_read=timeout),
            )
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as e:
            self.durations["other"].observe(time.perf_counter() - start)
            self._count("other", "transport_error")
            if isinstance(e, TimeoutError):
                return kling_error(504, CODE_TIMEOUT, "gateway: Kling did not answer in time")
            return kling_error(502, CODE_UNAVAILABLE, "gateway: Kling could not be reached")
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

    # -- metrics ---------------------------------------------------------------------


def _refusal(result: dict[str, Any]) -> web.Response:
    """429 in Kling's shape, naming the budget that refused and its utilization after."""
    name = result.get("refused_by") or ""
    reason = str(result.get("reason", ""))
    rows = [b for b in result.get("budgets", []) if b.get("name") == name]
    if rows and "would reach" not in reason:
        reason += f" (utilization after: {rows[0]['utilization_after']:.0%})"
    headers = {"X-Budget-Refused-By": quote(name, safe=" !#$&'()*+,/:;=?@[]~") or "fleet"}
    return kling_error(
        429, CODE_NO_BALANCE, f"refused by the exporter's budgets: {reason}", headers
    )
