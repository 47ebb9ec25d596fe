"""Kling's API as the gateway reads it: the one canonical form of a request's path, the
table of the endpoints that create tasks, and a create body priced as Kling reads it.

What the gateway prices must be what Kling makes, so a path is classified in the form
it is forwarded in: the fragment gone, percent-escapes of unreserved characters decoded,
``;params`` dropped, empty and dot segments resolved. A path whose meaning depends on
how a server decodes it (an escaped ``/``, ``%00``, a backslash, bytes outside ASCII) is
refused rather than guessed at. The table is the one place that knows which endpoint
makes what kind of task and where its priced fields sit in the body; the pricing rules
then price it like any logged task.
"""

from __future__ import annotations

import string
from typing import Any, NamedTuple

from kling_exporter.events import MAX_ID, MAX_LABEL_LEN
from kling_exporter.pricing import Request
from kling_exporter.vocabulary import MODE_ALIASES

_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
# Characters a canonical path segment may hold as they are (RFC 3986's pchar less "%",
# which only the escapes above may use, and less ";", whose parameters are dropped).
_PCHAR = _UNRESERVED | frozenset("!$&'()*+,=:@")
_HEX = frozenset(string.hexdigits)
MAX_PATH = 2048


class PathError(ValueError):
    """A path with no single meaning; the message says why."""


def split_target(tail: str) -> tuple[str, str]:
    """A request target's path and query (without the ``?``), its fragment dropped."""
    tail = tail.split("#", 1)[0]
    path, _, query = tail.partition("?")
    return path, query


def canonical(path: str) -> str:
    """``path`` in the one form that is classified and forwarded; PathError for a path
    whose meaning a server could read another way."""
    if len(path) > MAX_PATH:
        raise PathError(f"path: longer than {MAX_PATH} characters")
    if not path.startswith("/"):
        raise PathError("path: expected to start with /")
    out: list[str] = []
    for raw in path.split("/")[1:]:
        segment = _decoded(raw.split(";", 1)[0])
        if segment in ("", "."):
            continue
        if segment == "..":
            if out:
                out.pop()
            continue
        out.append(segment)
    trailing = "/" if path.endswith("/") and out else ""
    return "/" + "/".join(out) + trailing


def _decoded(segment: str) -> str:
    """One segment with its unreserved escapes decoded; PathError for any other escape
    or character that is not a plain path character."""
    out: list[str] = []
    i, n = 0, len(segment)
    while i < n:
        ch = segment[i]
        if ch == "%":
            code = segment[i + 1 : i + 3]
            if len(code) < 2 or not set(code) <= _HEX:
                raise PathError("path: a % not followed by two hex digits")
            decoded = chr(int(code, 16))
            if decoded not in _UNRESERVED:
                raise PathError(
                    f"path: %{code.upper()} (an escaped {decoded!r}) has no single meaning; "
                    "send the path unescaped"
                )
            out.append(decoded)
            i += 3
            continue
        if ch not in _PCHAR:
            raise PathError(f"path: the character {ch!r} is not accepted in a path")
        out.append(ch)
        i += 1
    return "".join(out)


class Endpoint(NamedTuple):
    """A create endpoint: the kind of task it makes, where its priced fields sit in the
    body (``input`` for effects), and whether ``n`` says how many it makes."""

    kind: str
    nested: str | None = None
    counts_n: bool = False


# Kling's documented create endpoints (POST). A write to any other path under the
# gateway's prefix cannot be priced: refused unless ``gateway.unpriced: allow``.
CREATES: dict[str, Endpoint] = {
    "/v1/videos/text2video": Endpoint("video"),
    "/v1/videos/image2video": Endpoint("video"),
    "/v1/videos/multi-image2video": Endpoint("video"),
    "/v1/videos/video-extend": Endpoint("video"),
    "/v1/videos/lip-sync": Endpoint("video"),
    "/v1/videos/effects": Endpoint("video", nested="input"),
    "/v1/videos/omni-video": Endpoint("video"),
    "/v1/videos/avatar/image2video": Endpoint("video"),
    "/v1/images/generations": Endpoint("image", counts_n=True),
    "/v1/images/multi-image2image": Endpoint("image", counts_n=True),
    "/v1/images/omni-image": Endpoint("image", counts_n=True),
    "/v1/images/kolors-virtual-try-on": Endpoint("try_on"),
    "/v1/audio/text-to-audio": Endpoint("audio"),
    "/v1/audio/video-to-audio": Endpoint("audio"),
    "/v1/audio/tts": Endpoint("audio"),
}
# Writes known to cost nothing (none yet: Kling's POSTs all make tasks).
FREE_WRITES: frozenset[str] = frozenset()
# Methods that only read; every other method may make a task.
READS = frozenset(("GET", "HEAD", "OPTIONS"))
_QUERY_ROOTS = ("/v1/videos/", "/v1/images/", "/v1/audio/")


def route_of(method: str, path: str) -> str:
    """``create`` for any write that is not known to cost nothing (deny by default),
    ``query`` for a GET of one task (``/v1/videos/<endpoint>/<task_id>``), ``other``
    for the rest. ``path`` is canonical."""
    if method not in READS:
        return "other" if path in FREE_WRITES else "create"
    if method == "GET" and path.startswith(_QUERY_ROOTS) and path.count("/") >= 4:
        return "query"
    return "other"


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


def _label(body: dict[str, Any], field: str, longest: int) -> str | None:
    value = body.get(field)
    if value is not None and (
        not isinstance(value, str) or not 0 < len(value) <= longest or not value.isprintable()
    ):
        raise ValueError(f"{field}: expected 1 to {longest} printable characters")
    return value


def priced(body: Any, endpoint: Endpoint) -> Priced:
    """The pricing input of a create request's JSON body: ``model_name``, ``mode``
    (std, pro), ``duration`` (seconds, a string or a number), ``sound`` (on, off), for
    images ``n``; under ``input`` where the endpoint nests them. ValueError naming the
    field when one cannot be priced; fields the pricing does not read are Kling's."""
    if not isinstance(body, dict):
        raise ValueError("body: expected a JSON object")
    fields: Any = body
    if endpoint.nested is not None:
        fields = body.get(endpoint.nested, {})
        if not isinstance(fields, dict):
            raise ValueError(f"{endpoint.nested}: expected a JSON object")
        if "model_name" not in fields and "model_name" in body:
            fields = {**fields, "model_name": body["model_name"]}
    where = f"{endpoint.nested}." if endpoint.nested else ""
    model = _label(fields, "model_name", MAX_LABEL_LEN)
    mode = fields.get("mode")
    if mode is not None and (not isinstance(mode, str) or mode not in MODE_ALIASES):
        raise ValueError(f"{where}mode: expected one of std, pro, got {mode!r}")
    duration = fields.get("duration")
    seconds = None if duration is None else _whole(duration, f"{where}duration", 1, 3600)
    sound = fields.get("sound")
    if sound not in (None, "on", "off"):
        raise ValueError(f"{where}sound: expected one of on, off, got {sound!r}")
    n = body.get("n")
    count = _whole(n, "n", 1, 100) if n is not None and endpoint.counts_n else 1
    external = _label(body, "external_task_id", MAX_ID)
    callback = body.get("callback_url")
    if callback is not None and not isinstance(callback, str):
        raise ValueError("callback_url: expected a string")
    kind = endpoint.kind
    timed = kind in ("video", "audio")
    long_mode = None if mode is None or kind != "video" else MODE_ALIASES[mode]
    req = Request(model, long_mode, seconds if timed else None, sound == "on", kind)
    return Priced(req, count, external or None)
