"""The pieces a plain-text scrape is made of, as they travel: blocks of text kept by
key and version, so that what did not change since the last scrape is neither sent from
the reader again nor compressed again in the HTTP process, and the gzip answer joined
from each block's own deflated form. ``collector.TextRenderer`` makes the parts."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence

from kling_exporter.collector import Part

# gzip's level for /metrics: a third of the time of the default for a page a quarter
# larger; a scrape of 30,000 series spent half its time in gzip at level 6.
GZIP_LEVEL = 1
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # deflate, no name, no time
_DEFLATE_END = b"\x03\x00"  # an empty last block


class Block:
    """A piece of an exposition's text and, once asked for, that text deflated on its
    own: a raw deflate stream of its own flushed to a byte boundary, with no reference
    to the text before it. Such pieces joined, an empty last block after them, make one
    deflate stream; so a gzip answer is put together from the pieces kept from the last
    scrape and the few compressed again, one gzip member as any client reads."""

    __slots__ = ("_deflated", "text")

    def __init__(self, text: bytes) -> None:
        self.text = text
        self._deflated: bytes | None = None

    @property
    def packed(self) -> bool:
        """Whether the deflated form is made already."""
        return self._deflated is not None

    def deflated(self) -> bytes:
        found = self._deflated
        if found is None:
            packer = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
            found = self._deflated = packer.compress(self.text) + packer.flush(zlib.Z_SYNC_FLUSH)
        return found


def pack(blocks: Sequence[Block]) -> None:
    """Make the deflated form of each block (zlib lets other threads run meanwhile)."""
    for block in blocks:
        block.deflated()


def joined(blocks: Sequence[Block]) -> bytes:
    return b"".join([block.text for block in blocks])


def gzipped(blocks: Sequence[Block]) -> bytes:
    """The blocks' text as one gzip member (RFC 1952), from each block's deflated form."""
    crc, size, out = 0, 0, [_GZIP_HEADER]
    for block in blocks:
        out.append(block.deflated())
        crc = zlib.crc32(block.text, crc)
        size += len(block.text)
    out += [_DEFLATE_END, struct.pack("<II", crc, size & 0xFFFFFFFF)]
    return b"".join(out)


# A block of a render as sent between processes: its key, its version, and its text
# when the receiver may not have that version.
Sent = tuple[str, int, "bytes | None"]


class Blocks:
    """Blocks kept by key and version, so that what did not change since the last
    scrape is neither sent nor compressed again."""

    def __init__(self) -> None:
        self.epoch = 0  # of the renderer the blocks came from (0: none)
        self.version = 0  # the newest render of it taken in
        self._kept: dict[str, tuple[int, Block]] = {}

    def take(self, epoch: int, version: int, sent: Sequence[Sent]) -> list[Block] | None:
        """The blocks of a render, in order; None when one was sent without its text
        and is not kept here (the sender then sends them all, from ``epoch`` 0)."""
        kept = self._kept if epoch == self.epoch else {}
        new: dict[str, tuple[int, Block]] = {}
        out = []
        for key, made, text in sent:
            if text is None:
                found = kept.get(key)
                if found is None or found[0] != made:
                    self.epoch, self.version, self._kept = 0, 0, {}
                    return None
                block = found[1]
            else:
                block = Block(text)
            new[key] = (made, block)
            out.append(block)
        self.epoch, self.version, self._kept = epoch, version, new
        return out

    def current(self) -> list[Block]:
        """The blocks of the newest render taken in, in order."""
        return [block for _, block in self._kept.values()]

    def of(self, parts: Sequence[Part]) -> list[Block]:
        """Blocks of a render in this process: a block kept at the same version is
        used again."""
        kept, new, out = self._kept, {}, []
        for key, made, text in parts:
            found = kept.get(key)
            block = found[1] if found is not None and found[0] == made else Block(text)
            new[key] = (made, block)
            out.append(block)
        self._kept = new
        return out


def to_send(parts: Sequence[Part], epoch: int, since: int, mine: int) -> list[Sent]:
    """``parts`` for a receiver that holds the blocks of render ``since`` of renderer
    ``epoch``: the text of those it may not have."""
    fresh = epoch != mine
    return [(p.key, p.version, p.text if fresh or p.version > since else None) for p in parts]
