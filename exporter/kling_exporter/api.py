"""The budget API: budgets, pre-flight checks and reservations, and what they ask of
the log reader (the reader process's link, or a daemon in process in tests)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from typing import Annotated, Any, Protocol

import aiohttp
import msgspec
from aiohttp import web

from kling_exporter.budgets import Ask, BudgetStatus
from kling_exporter.config import (
    MODE_ALIASES,
    Config,
    describe_validation_error,
    parse_duration,
)
from kling_exporter.events import (
    DEFAULT_PROJECT,
    MAX_ID,
    Duration,
    Label,
    LabelOrNumber,
    Mode,
    kind_of,
    name_of,
)
from kling_exporter.fleet import Fleet
from kling_exporter.model import Consumed, View
from kling_exporter.pricing import Request
from kling_exporter.reservations import (
    API,
    DEFAULT_TTL,
    MAX_TTL,
    Reservations,
    Terms,
    fingerprint,
    valid_id,
)
from kling_exporter.streams import TooLarge, read_bounded
from kling_exporter.wording import amount_for_people

# A body not received within this long is refused.
BODY_TIMEOUT = 10.0


class Reader(Protocol):
    """What the server asks of the log reader: the reader process's link in the exporter
    (``kling_exporter.reader.ReaderProcess``), or a daemon in process in tests."""

    @property
    def reader_up(self) -> bool: ...

    @property
    def config(self) -> Config: ...

    def is_ready(self) -> bool: ...

    def view(self) -> View: ...

    def listen(self, consumed: Consumed) -> None: ...

    async def render_metrics(self, accept: str, names: list[str]) -> tuple[bytes, str]: ...

    async def reload_config(self) -> str | None: ...


READER: web.AppKey[Reader] = web.AppKey("reader", Reader)
RESERVATIONS = web.AppKey("reservations", Reservations)
FLEET = web.AppKey("fleet", Fleet)


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


def statuses(reader: Reader, reservations: Reservations) -> list[BudgetStatus]:
    return reservations.statuses(reader.view())


async def budgets(request: web.Request) -> web.Response:
    reader, fleet = request.app[READER], request.app[FLEET]
    if not fleet.enabled:
        rows = msgspec.to_builtins(statuses(reader, request.app[RESERVATIONS]))
        return web.json_response({"budgets": for_people(_with_state(rows))})
    rows = await fleet.statuses()
    return _json({"budgets": _with_state(rows), "fleet": fleet.describe()})


def _with_state(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each budget with its ``state`` as the alerts see it: ``exhausted`` at 100% of a
    limit, ``warning`` from its ``alert_threshold``, else ``ok``."""
    for row in rows:
        used = row["utilization"]
        row["state"] = (
            "exhausted" if used >= 1 else "warning" if used >= row["alert_threshold"] else "ok"
        )
    return rows


MAX_BODY = 64 * 1024


class CheckRequest(msgspec.Struct, forbid_unknown_fields=True):
    """The body of ``POST /api/v1/check``: every field optional, count at least 1. Each
    task field takes exactly what a log line's field of the same name takes."""

    project: LabelOrNumber | None = None
    project_id: LabelOrNumber | None = None
    user: LabelOrNumber | None = None
    user_id: LabelOrNumber | None = None
    model: Label | None = None
    mode: Mode | None = None
    duration: Duration | None = None
    audio: bool | None = None
    kind: Label | None = None
    count: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 1

    def __post_init__(self) -> None:
        self.project = name_of(self.project, self.project_id)
        self.user = name_of(self.user, self.user_id)
        if self.mode is not None:
            self.mode = MODE_ALIASES[self.mode]
        self.kind = kind_of(self.kind)


class _Repeated(Exception):
    """A key an object of the body gives twice (its first)."""


def _unique_keys(items: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object of a body, refused when it repeats a key: which one counts is
    ambiguous (a parser that keeps the first reads another request than one that keeps
    the last), so such a body is refused."""
    value = dict(items)
    if len(value) != len(items):
        seen: set[str] = set()
        for key, _ in items:  # the first repeated, in one pass (a body has 64 KiB of keys)
            if key in seen:
                raise _Repeated(key)
            seen.add(key)
    return value


def error_answer(
    status: int, message: str, field: str | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    """The one shape of every error answer: ``{"error", "field"}``. The field is the
    part of ``message`` before its first colon unless given (``""`` when none fits)."""
    message = message.replace("(top level)", "body", 1)
    if field is None:
        field = message.split(":", 1)[0] if ":" in message else ""
    body = json.dumps({"error": message, "field": field}, ensure_ascii=True)
    return web.Response(text=body, status=status, content_type="application/json", headers=headers)


def _bad_request(message: str) -> web.Response:
    return error_answer(400, message, None if ":" in message else "body")


class BodyError(Exception):
    """A request body too large (413), not received whole in time (408), or broken off
    (400); ``status`` says which."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status

    def answer(self) -> web.Response:
        return error_answer(self.status, str(self), "body")


async def read_body(request: web.Request) -> bytes:
    """The request's whole body, however the network splits it: at most MAX_BODY bytes,
    within BODY_TIMEOUT; BodyError else."""
    too_large = BodyError(f"body: larger than {MAX_BODY} bytes", 413)
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise too_large
    try:
        async with asyncio.timeout(BODY_TIMEOUT):
            body = await read_bounded(request.content, MAX_BODY)
    except TooLarge:
        raise too_large from None
    except TimeoutError:
        raise BodyError(f"body: not received within {BODY_TIMEOUT:g} s", 408) from None
    except (OSError, web.HTTPException, aiohttp.ClientPayloadError):
        raise BodyError("body: could not be read") from None
    if request.content_length is not None and len(body) != request.content_length:
        raise BodyError("body: shorter than its Content-Length")
    return body


def _unicode_fault(value: Any, path: str = "") -> str | None:
    """The field (``task_info.external_task_id``) of the first key or string in a
    decoded JSON value that is not Unicode text (a lone surrogate), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if not isinstance(value, dict | list):
        return None
    items: Any = value.items() if isinstance(value, dict) else enumerate(value)
    for key, item in items:
        where = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else key
        if isinstance(key, str) and _unicode_fault(key) is not None:
            return path or "body"
        found = _unicode_fault(item, where)
        if found is not None:
            return found
    return None


def parse_json(body: bytes, unique: bool = False) -> Any:
    """A body's JSON value; ValueError naming the field when it is not JSON, nests too
    deep, holds a string that is not Unicode text (a lone surrogate, ``"\\ud800"``), or
    (``unique``) gives a key twice in one object."""
    try:
        value = json.loads(body, object_pairs_hook=_unique_keys if unique else None)
    except _Repeated as e:
        raise ValueError(f"{e.args[0]}: given twice") from None
    except RecursionError:
        raise ValueError("body: nested too deeply") from None
    except UnicodeDecodeError:
        raise ValueError("body: not UTF-8 text") from None
    except ValueError as e:
        raise ValueError(f"body: not JSON ({e})") from None
    try:
        field = _unicode_fault(value)
    except RecursionError:
        raise ValueError("body: nested too deeply") from None
    if field is not None:
        raise ValueError(f"{field}: not Unicode text (a lone surrogate)")
    return value


async def _body(request: web.Request, kind: type[CheckRequest]) -> Any:
    """The request's JSON body decoded as ``kind``, or the 4xx that says what is wrong."""
    try:
        body = await read_body(request)
    except BodyError as e:
        return e.answer()
    if not body.strip():
        return _bad_request("body: empty; send a JSON object ({} asks with the defaults)")
    try:
        # Keys given twice first (msgspec keeps the last without a word); then msgspec,
        # a third faster than building the value and converting it.
        json.loads(body, object_pairs_hook=_unique_keys)
    except _Repeated as e:
        return _bad_request(f"{e.args[0]}: given twice")
    except (ValueError, RecursionError):
        pass  # not JSON: said below
    try:
        return msgspec.json.decode(body, type=kind, strict=False)  # as the log is read
    except msgspec.ValidationError as e:
        return _bad_request(describe_validation_error(e, kind))
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        pass
    # Not JSON msgspec reads: the slower decoder finds the field at fault.
    try:
        parse_json(body)
    except ValueError as e:
        return _bad_request(str(e))
    return _bad_request("body: not a JSON object")


def _json(answer: Any, status: int = 200) -> web.Response:
    body = msgspec.json.encode(for_people(answer))
    return web.Response(body=body, status=status, content_type="application/json")


def _asked(req: CheckRequest) -> Ask:
    project, user = req.project, req.user
    assert not isinstance(project, int) and not isinstance(user, int)  # name_of made them str
    return Ask(
        Request(req.model, req.mode, req.duration, bool(req.audio), req.kind),
        req.count,
        project or DEFAULT_PROJECT,
        user,
    )


async def check(request: web.Request) -> web.Response:
    req = await _body(request, CheckRequest)
    if isinstance(req, web.Response):
        return req
    reader, reservations = request.app[READER], request.app[RESERVATIONS]
    fleet = request.app[FLEET]
    if fleet.enabled:
        result = await fleet.check(_asked(req))
    else:
        result = reservations.check(reader.view(), _asked(req))
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
    reader, reservations = request.app[READER], request.app[RESERVATIONS]
    fleet = request.app[FLEET]
    decide = fleet.decide if fleet.enabled else None
    assert isinstance(req.ttl, float)
    asked = msgspec.to_builtins(req)
    try:
        status, answer = await reservations.reserve(
            reader.view(),
            _asked(req),
            req.id,
            req.ttl,
            fingerprint(asked),
            Terms.for_api(reader.config.reservations, decide),
        )
    except OSError:
        return error_answer(503, "reservations: cannot be saved; try again")
    return _json(answer, status)


# Holds listed on one page: by default, and at most.
PAGE_DEFAULT = 1_000
PAGE_MAX = 10_000


async def reservations_list(request: web.Request) -> web.Response:
    """The API's live holds a page at a time (``?limit=``, ``?after=<id>``); ``next``
    is the ``after`` of the following page while more remain. The gateway's holds are
    not listed: they are its own, and the API cannot release them."""
    raw_limit = request.query.get("limit", str(PAGE_DEFAULT))
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= PAGE_MAX:
        return _bad_request(f"limit: expected a whole number from 1 to {PAGE_MAX}")
    after = request.query.get("after")
    if after is not None and not valid_id(after):
        return _bad_request(f"after: expected 1 to {MAX_ID} printable ASCII characters")
    rows, following = await request.app[RESERVATIONS].page(after, int(raw_limit))
    more = b"" if following is None else b',"next":' + msgspec.json.encode(following)
    body = b'{"reservations":' + rows + more + b"}"
    return web.Response(body=body, content_type="application/json")


async def release(request: web.Request) -> web.Response:
    rid = request.match_info["id"]
    if not valid_id(rid):
        return _bad_request(f"id: expected 1 to {MAX_ID} printable ASCII characters")
    # The gateway's holds are not the API's to release: answered as an unknown id.
    if await request.app[RESERVATIONS].release(rid, owner=API):
        request.app[FLEET].wake.set()  # the fleet sees the room at once
        return web.Response(status=204)
    error = f"id: no live reservation {rid!r} (unknown, used up, expired or released)"
    return error_answer(404, error, "id")
