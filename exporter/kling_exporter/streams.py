"""Reading what a peer sends, whole and bounded: a request body or an answer from
Kling arrives in as many pieces as the network makes, and no peer decides how much
memory it takes."""

from __future__ import annotations

import aiohttp


class TooLarge(Exception):
    """The stream held more than the limit."""


async def read_bounded(stream: aiohttp.StreamReader, limit: int) -> bytes:
    """Everything ``stream`` holds until its end, or TooLarge past ``limit`` bytes.
    (``read(n)`` returns what has arrived so far, so it is called until the end.)"""
    data = bytearray()
    while True:
        chunk = await stream.read(limit + 1 - len(data))
        if not chunk:
            return bytes(data)
        data += chunk
        if len(data) > limit:
            raise TooLarge(f"more than {limit} bytes")
