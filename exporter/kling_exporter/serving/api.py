"""The budget API: budgets, pre-flight checks and reservations, and what they ask of
the log reader (the reader process's link, or a daemon in process in tests)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Protocol

import msgspec
from aiohttp import web

from kling_exporter.blocks import Block
from kling_exporter.budgets import Ask, BudgetStatus
from kling_exporter.config import Config
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
from kling_exporter.guard.fleet import Fleet
from kling_exporter.guard.reservations import (
    DEFAULT_TTL,
    MAX_TTL,
    Reservations,
    Terms,
    fingerprint,
    valid_id,
)
from kling_exporter.journals.holds import API
from kling_exporter.pricing import Request
from kling_exporter.serving.bodies import (
    BodyError,
    RepeatedKey,
    bad_request,
    error_answer,
    for_people,
    parse_json,
    read_body,
    unique_keys,
)
from kling_exporter.validation import describe_validation_error
from kling_exporter.views import Consumed, View
from kling_exporter.vocabulary import MODE_ALIASES, parse_duration


class Reader(Protocol):
    """What the server asks of the log reader: the reader process's link in the exporter
    (``kling_exporter.serving.link.ReaderProcess``), or a daemon in process in tests."""

    @property
    def reader_up(self) -> bool: ...

    @property
    def config(self) -> Config: ...

    def is_ready(self) -> bool: ...

    def view(self) -> View: ...

    def listen(self, consumed: Consumed) -> None: ...

    async def render_metrics(self, accept: str, names: list[str]) -> tuple[list[Block], str]:
        """A scrape's text in blocks (one block for OpenMetrics and ``name[]``)."""
        ...

    async def reload_config(self) -> str | None: ...


READER: web.AppKey[Reader] = web.AppKey("reader", Reader)
RESERVATIONS = web.AppKey("reservations", Reservations)
FLEET = web.AppKey("fleet", Fleet)


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


async def _body(request: web.Request, kind: type[CheckRequest]) -> Any:
    """The request's JSON body decoded as ``kind``, or the 4xx that says what is wrong."""
    try:
        body = await read_body(request)
    except BodyError as e:
        return e.answer()
    if not body.strip():
        return bad_request("body: empty; send a JSON object ({} asks with the defaults)")
    try:
        # Keys given twice first (msgspec keeps the last without a word); then msgspec,
        # a third faster than building the value and converting it.
        json.loads(body, object_pairs_hook=unique_keys)
    except RepeatedKey as e:
        return bad_request(f"{e.args[0]}: given twice")
    except (ValueError, RecursionError):
        pass  # not JSON: said below
    try:
        return msgspec.json.decode(body, type=kind, strict=False)  # as the log is read
    except msgspec.ValidationError as e:
        return bad_request(describe_validation_error(e, kind))
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        pass
    # Not JSON msgspec reads: the slower decoder finds the field at fault.
    try:
        parse_json(body)
    except ValueError as e:
        return bad_request(str(e))
    return bad_request("body: not a JSON object")


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
        return bad_request(f"limit: expected a whole number from 1 to {PAGE_MAX}")
    after = request.query.get("after")
    if after is not None and not valid_id(after):
        return bad_request(f"after: expected 1 to {MAX_ID} printable ASCII characters")
    rows, following = await request.app[RESERVATIONS].page(after, int(raw_limit))
    more = b"" if following is None else b',"next":' + msgspec.json.encode(following)
    body = b'{"reservations":' + rows + more + b"}"
    return web.Response(body=body, content_type="application/json")


async def release(request: web.Request) -> web.Response:
    rid = request.match_info["id"]
    if not valid_id(rid):
        return bad_request(f"id: expected 1 to {MAX_ID} printable ASCII characters")
    # The gateway's holds are not the API's to release: answered as an unknown id.
    if await request.app[RESERVATIONS].release(rid, owner=API):
        request.app[FLEET].wake.set()  # the fleet sees the room at once
        return web.Response(status=204)
    error = f"id: no live reservation {rid!r} (unknown, used up, expired or released)"
    return error_answer(404, error, "id")
