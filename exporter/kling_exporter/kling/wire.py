"""Kling's wire format, as the gateway speaks it: the error codes and the shape of an
answer Kling would make, which headers go on to Kling and come back, the access key a
bearer token names, and the data of an answer however it was encoded."""

from __future__ import annotations

import json
import uuid
import zlib
from typing import Any
from urllib.parse import quote

import jwt
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

# Kling's error codes, for the answers the gateway makes itself.
CODE_NO_AUTH = 1004
CODE_BAD_PARAMETER = 1201
CODE_RATE_LIMITED = 1302
CODE_NO_BALANCE = 1102  # what Kling says when the account cannot pay: not worth a retry
CODE_UNAVAILABLE = 5001
CODE_TIMEOUT = 5002

# A create request's answer, and a query's whose task is journalled, are read up to
# this; a larger query answer is passed on as it streams, and not journalled.
MAX_ANSWER = 4 << 20
# Headers that belong to one connection, not to the request (RFC 9110, 7.6.1), and the
# ones the gateway sets itself.
HOP_BY_HOP = frozenset(
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
AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")


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
    headers: CIMultiDictProxy[str], drop: frozenset[str], keep_length: bool
) -> CIMultiDict[str]:
    """A request's headers as they go on: without hop-by-hop ones (those the
    ``Connection`` header names too) and ``drop`` (the gateway's own identity headers,
    lower case)."""
    named = {t.strip().lower() for v in headers.getall("Connection", []) for t in v.split(",")}
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in headers.items():
        low = key.lower()
        if low in HOP_BY_HOP or low in named or low in drop:
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
        if low in HOP_BY_HOP or low in named or low == "content-length":
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


def transport_error(e: BaseException) -> web.Response:
    if isinstance(e, TimeoutError):
        return kling_error(504, CODE_TIMEOUT, "gateway: Kling did not answer in time")
    return kling_error(502, CODE_UNAVAILABLE, "gateway: Kling could not be reached")


def refusal(result: dict[str, Any]) -> web.Response:
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
