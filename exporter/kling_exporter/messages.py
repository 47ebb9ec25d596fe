"""The messages between the HTTP process and the reader process, and their encoding:
msgpack frames on a socket pair, one tagged struct a message. The HTTP process sends
Start, then Render, Scraped, Reload and Stop; the reader answers with Published usage,
Rendered scrapes, Reloaded configs and Stopped, and sends Pushed blocks unasked."""

from __future__ import annotations

import msgspec

from kling_exporter.config import Config

Row = tuple[str, str | None, float, float]  # project, user, credits, usd


class Published(msgspec.Struct, tag="usage", array_like=True):
    """Days whose usage changed (all of each such day), days dropped, tasks in flight
    (when they changed), tasks counted per reservation id (those that changed), and
    health."""

    days: dict[float, list[Row]]
    dropped: list[float]
    ready: bool
    reader_up: bool
    flight: list[Row] | None = None
    consumed: dict[str, int] = {}
    first: bool = False


class Render(msgspec.Struct, tag="render", array_like=True):
    """A scrape. For the plain text format, the asker holds the blocks of render
    ``since`` of the reader's renderer ``epoch`` (0: none), and is sent the text of the
    blocks that changed after it."""

    id: int
    accept: str
    names: list[str]
    epoch: int = 0
    since: int = 0


class Rendered(msgspec.Struct, tag="rendered", array_like=True):
    """A scrape's answer: ``body`` whole, or for the plain text format ``parts`` (key,
    version, and text where the asker may not have it) of render ``version`` of
    renderer ``epoch``."""

    id: int
    body: bytes
    content_type: str
    error: str | None = None
    parts: list[tuple[str, int, bytes | None]] | None = None
    epoch: int = 0
    version: int = 0


class Pushed(msgspec.Struct, tag="pushed", array_like=True):
    """Blocks of a plain-text scrape rendered ahead by the reader, after the lines that
    changed them, unasked (see ``reading.reader``): as ``Rendered.parts``, relative to
    the last render the reader sent."""

    epoch: int
    version: int
    parts: list[tuple[str, int, bytes | None]]


class Scraped(msgspec.Struct, tag="scraped", array_like=True):
    """A plain-text scrape answered from blocks the reader pushed, without asking it:
    the reader goes on rendering ahead (no answer)."""


class Reload(msgspec.Struct, tag="reload", array_like=True):
    id: int


class Reloaded(msgspec.Struct, tag="reloaded", array_like=True):
    id: int
    error: str | None
    config: Config | None


class Stop(msgspec.Struct, tag="stop", array_like=True):
    pass


class Start(msgspec.Struct, tag="start", array_like=True):
    """The first message: what the reader runs on."""

    config: Config
    config_path: str | None
    parent: int
    log_level: str
    log_format: str


class Stopped(msgspec.Struct, tag="stopped", array_like=True):
    lines_read: int


ToReader = Render | Scraped | Reload | Stop


FromReader = Published | Pushed | Rendered | Reloaded | Stopped


encode = msgspec.msgpack.Encoder().encode
