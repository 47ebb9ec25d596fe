"""What was taken out of the task index, remembered in a fraction of the index's
memory, so that a late event of such a task is still counted once and charged to its
owner.

The index keeps a task under its id, a few hundred bytes apiece. A task leaves it when
``tasks.max_tasks`` is reached (the oldest goes, well before ``tasks.ttl`` under a heavy
load) or, unfinished, at its TTL: either way an unfinished one is charged its estimate.
A completion or usage line read after that must charge only what it says beyond the
estimate, under the task's project and user, and a repeat of one that had finished must
count as a repeat. For that, this record keeps, by a 64-bit digest of the id: the task's
fields (an index into a table of them: project, user, model, mode, duration, audio,
kind) and its flags with the estimate it was charged. Two generations of half the
capacity each: when the newer fills, the older is dropped whole (no per-entry
bookkeeping, no slow deletes from the front of a dict).

An entry is one unsigned 64-bit integer, as the saved state (msgpack) holds it: the
flags and estimate in the low 43 bits (``book.with_estimate`` bounds an estimate to
fit), the fields' index in the 21 above. Past 2^21 distinct fields at once (more than
two million remembered tasks all different), a task is remembered without them, as
charged, and a late event of it is counted under ``__other__``.

Digests are stable across restarts (the record is saved with the state); two ids
sharing one is a chance of about one in 2^64 per pair.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

OWNER_SHIFT = 43
FLAGS_MASK = (1 << OWNER_SHIFT) - 1
MAX_OWNERS = 1 << (64 - OWNER_SHIFT)
# project, user, model, mode, duration, audio, kind: a task's fields but its time
Owner = tuple[str, str | None, str, str, int, bool, str]


def digest(task_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(task_id.encode(), digest_size=8).digest(), "little")


class Evicted:
    """Tasks taken out of the index: digest -> the index of their fields, and flags."""

    __slots__ = ("half", "newer", "older", "owner_ids", "owners", "total")

    def __init__(self, capacity: int) -> None:
        self.half = max(1, capacity // 2)
        self.newer: dict[int, int] = {}
        self.older: dict[int, int] = {}
        # 0: no fields kept (a finished task's are moot; or the table was full)
        self.owners: list[Owner | None] = [None]
        self.owner_ids: dict[Owner, int] = {}
        self.total = 0  # tasks the cap pushed out, ever: kling_tasks_evicted_total

    def __len__(self) -> int:
        return len(self.newer) + len(self.older)

    def resize(self, capacity: int) -> None:
        self.half = max(1, capacity // 2)

    def add(self, task_id: str, owner: Owner | None, flags: int, by_cap: bool = True) -> None:
        """Remember a task taken out of the index, with its flags (and estimate); one the
        cap pushed out (not one aged out unfinished) is counted in ``total``."""
        if len(self.newer) >= self.half:
            self.older, self.newer = self.newer, {}
            if len(self.owners) > 2 * len(self.older) + 64:
                self._forget_owners()
        index = 0 if owner is None else self._index(owner)
        self.newer[digest(task_id)] = index << OWNER_SHIFT | (flags & FLAGS_MASK)
        self.total += by_cap

    def _index(self, owner: Owner) -> int:
        index = self.owner_ids.get(owner)
        if index is None:
            if len(self.owners) >= MAX_OWNERS:
                self._forget_owners()
                if len(self.owners) >= MAX_OWNERS:
                    return 0
            index = self.owner_ids[owner] = len(self.owners)
            self.owners.append(owner)
        return index

    def get(self, task_id: str) -> tuple[Owner | None, int] | None:
        """The fields (None if not kept) and flags of a task taken out, or None."""
        key = digest(task_id)
        value = self.newer.get(key)
        if value is None:
            value = self.older.get(key)
            if value is None:
                return None
        return self.owners[value >> OWNER_SHIFT], value & FLAGS_MASK

    def take(self, task_id: str) -> tuple[Owner | None, int] | None:
        """What ``get`` says of a task, forgotten here as it goes back to the index."""
        key = digest(task_id)
        value = self.newer.pop(key, None)
        if value is None:
            value = self.older.pop(key, None)
            if value is None:
                return None
        return self.owners[value >> OWNER_SHIFT], value & FLAGS_MASK

    def _forget_owners(self) -> None:
        """Fields no remembered task refers to any more (the table stays small when
        projects and users come and go)."""
        used = {v >> OWNER_SHIFT for gen in (self.older, self.newer) for v in gen.values()}
        kept: list[Owner | None] = [None]
        remap = {0: 0}
        for i in sorted(used - {0}):
            remap[i] = len(kept)
            kept.append(self.owners[i])
        for gen in (self.older, self.newer):
            for k, v in gen.items():
                gen[k] = remap[v >> OWNER_SHIFT] << OWNER_SHIFT | v & FLAGS_MASK
        self.owners = kept
        self.owner_ids = {o: i for i, o in enumerate(kept) if o is not None}

    # -- the saved state (the two generations are handed over as they are) -----------

    def restore(
        self,
        owners: Iterable[Owner],
        older: dict[int, int],
        newer: dict[int, int],
        total: int,
    ) -> None:
        """What ``state`` saved; ValueError naming what does not fit."""
        self.owners = [None, *owners]
        if len(self.owners) > MAX_OWNERS:
            raise ValueError("state does not fit: evicted: too many owners")
        self.owner_ids = {o: i for i, o in enumerate(self.owners) if o is not None}
        for generation in (older, newer):
            for k, v in generation.items():
                if not (0 <= k < 1 << 64 and 0 <= v < 1 << 64) or v >> OWNER_SHIFT >= len(
                    self.owners
                ):
                    raise ValueError("state does not fit: evicted: an entry out of range")
        self.older, self.newer, self.total = dict(older), dict(newer), total
