"""Request bodies and error answers, one rule for every endpoint that reads JSON: the
budget API, the gateway and Kling's callbacks. A body is read whole however the
network splits it, within a size and a time; its JSON is refused by field when it is
not text, nests too deep, or gives a key twice; every error answers in one shape."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from typing import Any

import aiohttp
from aiohttp import web

from kling_exporter.streams import TooLarge, read_bounded
from kling_exporter.wording import amount_for_people

# A body not received within this long is refused.
BODY_TIMEOUT = 10.0


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


MAX_BODY = 64 * 1024


class RepeatedKey(Exception):
    """A key an object of the body gives twice (its first)."""


def unique_keys(items: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object of a body, refused when it repeats a key: which one counts is
    ambiguous (a parser that keeps the first reads another request than one that keeps
    the last), so such a body is refused."""
    value = dict(items)
    if len(value) != len(items):
        seen: set[str] = set()
        for key, _ in items:  # the first repeated, in one pass (a body has 64 KiB of keys)
            if key in seen:
                raise RepeatedKey(key)
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


def bad_request(message: str) -> web.Response:
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
        value = json.loads(body, object_pairs_hook=unique_keys if unique else None)
    except RepeatedKey as e:
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
