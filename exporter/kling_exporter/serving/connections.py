"""Connections: the listen address, and a TCP site that bounds how many connections are
open, how long a request's headers may take and how long a connection may idle."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, NamedTuple

from aiohttp import web

log = logging.getLogger(__name__)


def parse_listen_address(address: str) -> tuple[str | None, int]:
    """``:10177`` (all interfaces), ``127.0.0.1:10177`` or ``[::1]:10177``."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--web.listen-address: expected HOST:PORT, got {address!r}")
    host = host.strip("[]")
    return (host or None), int(port)


class Limits(NamedTuple):
    """What one client may hold: connections past ``max_connections`` get 503 at once; a
    connection whose first request has not sent its headers within ``header_timeout``
    seconds is closed; an idle keep-alive connection is closed after ``idle_timeout``."""

    max_connections: int = 512
    header_timeout: float = 10.0
    idle_timeout: float = 60.0


_BUSY_BODY = b'{"error": "too many connections at once, try again", "field": ""}'
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\nRetry-After: 1\r\nConnection: close\r\n\r\n%s"
    % (len(_BUSY_BODY), _BUSY_BODY)
)


class _Guarded(asyncio.Protocol):
    """aiohttp's protocol for one connection, counted against the cap and timed until
    the headers of its first request are in."""

    def __init__(self, inner: asyncio.Protocol, guard: ConnectionGuard) -> None:
        self.inner, self.guard = inner, guard
        self.counted = False
        self.timer: asyncio.TimerHandle | None = None
        self.head = b""
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        guard = self.guard
        if guard.open >= guard.limits.max_connections:
            transport.write(_BUSY)  # type: ignore[attr-defined]
            transport.close()
            return
        guard.open += 1
        self.counted = True
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(guard.limits.header_timeout, self._too_slow)
        self.inner.connection_made(transport)

    def _too_slow(self) -> None:
        self.timer = None
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if not self.counted:
            return
        if self.timer is not None:
            self.head = (self.head + data)[-8192:]
            if b"\r\n\r\n" in self.head:
                self.timer.cancel()
                self.timer, self.head = None, b""
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.counted else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.counted:
            self.counted = False
            self.guard.open -= 1
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class ConnectionGuard:
    """A protocol factory around aiohttp's that enforces ``Limits``."""

    def __init__(self, factory: Any, limits: Limits) -> None:
        self.factory, self.limits = factory, limits
        self.open = 0

    def __call__(self) -> asyncio.Protocol:
        return _Guarded(self.factory(), self)


class GuardedSite(web.TCPSite):
    """aiohttp's TCP site, its connections passed through a ConnectionGuard."""

    def __init__(self, runner: web.AppRunner, *args: Any, limits: Limits, **kw: Any) -> None:
        super().__init__(runner, *args, **kw)
        self.guard: ConnectionGuard | None = None
        self.limits = limits

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        self.guard = ConnectionGuard(server, self.limits)
        self._server = await asyncio.get_running_loop().create_server(
            self.guard,
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
