"""What the task index's size cap pushed out (``tasks.max_tasks``), remembered in a
fraction of the index's memory, so that a late event of such a task is still counted
once and charged to its owner.

The index keeps a task under its id, a few hundred bytes apiece. Once it holds
``max_tasks`` tasks, the oldest goes, well before ``tasks.ttl`` under a heavy load: an
unfinished one is charged its estimate. A completion read after that must charge only
what it says beyond the estimate, under the task's project and user, and a repeat of
one that had finished must count as a repeat. For that, this record keeps, by a 64-bit
digest of the id: whose the task was (an index into a table of project, user and
model) and its flags with the estimate it was charged. Two generations of half the
capacity each: when the newer fills, the older is dropped whole (no per-entry
bookkeeping, no slow deletes from the front of a dict).

Digests are stable across restarts (the record is saved with the state); two ids
sharing one is a chance of about one in 2^64 per pair.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

# Above the flags (and the estimate ``book.with_estimate`` keeps in them): the owner.
OWNER_SHIFT = 48
FLAGS_MASK = (1 << OWNER_SHIFT) - 1
Owner = tuple[str, str | None, str]  # project, user, model


def digest(task_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(task_id.encode(), digest_size=8).digest(), "little")


class Evicted:
    """Tasks pushed out of the index by its size cap: digest -> owner and flags."""

    __slots__ = ("half", "newer", "older", "owner_ids", "owners", "total")

    def __init__(self, capacity: int) -> None:
        self.half = max(1, capacity // 2)
        self.newer: dict[int, int] = {}
        self.older: dict[int, int] = {}
        self.owners: list[Owner | None] = [None]  # 0: a finished task; its owner is moot
        self.owner_ids: dict[Owner, int] = {}
        self.total = 0  # tasks ever pushed out, for kling_tasks_evicted_total

    def __len__(self) -> int:
        return len(self.newer) + len(self.older)

    def resize(self, capacity: int) -> None:
        self.half = max(1, capacity // 2)

    def add(self, task_id: str, owner: Owner | None, flags: int, by_cap: bool = True) -> None:
        """Remember a task taken out of the index, with its flags (and estimate); one the
        cap pushed out (not one aged out unfinished) is counted in ``total``."""
        if len(self.newer) >= self.half:
            self.older, self.newer = self.newer, {}
            self._forget_owners()
        if owner is None:
            index = 0
        else:
            index = self.owner_ids.get(owner, 0)
            if not index:
                index = self.owner_ids[owner] = len(self.owners)
                self.owners.append(owner)
        self.newer[digest(task_id)] = index << OWNER_SHIFT | (flags & FLAGS_MASK)
        self.total += by_cap

    def get(self, task_id: str) -> tuple[Owner | None, int] | None:
        """The owner (None for a finished task) and flags of a task pushed out, or None."""
        key = digest(task_id)
        value = self.newer.get(key)
        if value is None:
            value = self.older.get(key)
            if value is None:
                return None
        return self.owners[value >> OWNER_SHIFT], value & FLAGS_MASK

    def discard(self, task_id: str) -> None:
        """Forget a task that is back in the index."""
        key = digest(task_id)
        self.newer.pop(key, None)
        self.older.pop(key, None)

    def _forget_owners(self) -> None:
        """Owners no remembered task refers to any more (the table stays small when
        projects and users come and go)."""
        if len(self.owners) < 2 * len(self.older) + 64:  # as many as entries, at most
            return
        used = {v >> OWNER_SHIFT for v in self.older.values()}
        kept: list[Owner | None] = [None]
        remap = {0: 0}
        for i in sorted(used - {0}):
            remap[i] = len(kept)
            kept.append(self.owners[i])
        self.older = {
            k: remap[v >> OWNER_SHIFT] << OWNER_SHIFT | v & FLAGS_MASK
            for k, v in self.older.items()
        }
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
        self.owners = [None, *((p, u, m) for p, u, m in owners)]
        self.owner_ids = {o: i for i, o in enumerate(self.owners) if o is not None}
        for generation in (older, newer):
            if any(v >> OWNER_SHIFT >= len(self.owners) for v in generation.values()):
                raise ValueError("state does not fit: evicted: an owner that is not listed")
        self.older, self.newer, self.total = dict(older), dict(newer), total
