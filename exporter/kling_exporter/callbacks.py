"""Kling's task callbacks, written to the exporter's own journal among the logs.

Kling calls ``callback_url`` when a task changes status. A ``succeed`` or ``failed``
callback becomes a ``task_completed`` line (``credits_used`` from
``final_unit_deduction``), appended to a journal file that the configured log globs
match, and fsynced before the 200: the tailer then counts it like any other line, once
(a callback repeated or retried after a restart is a duplicate completion), and a
restart loses nothing that was answered. ``submitted`` and ``processing`` callbacks
are acknowledged and written nowhere.

The gateway gives each create it forwards a callback URL of that task's own: its token
is an HMAC (keyed by ``kling.callback_token``) of a nonce and of how many tasks the
create makes, so no shared token is handed to producers, and once Kling has named the
task, the URL settles that task and no other. Such a callback is journalled under
Kling's task id, as the gateway's own lines are.
"""

from __future__ import annotations

import asyncio
import errno
import glob
import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import stat
from collections import OrderedDict
from collections.abc import Callable
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from aiohttp import web

from kling_exporter.bodies import BodyError, error_answer, parse_json, read_body
from kling_exporter.config import Config, LogsConfig
from kling_exporter.durable import GroupCommit, write_all_and_sync
from kling_exporter.events import MAX_ID

log = logging.getLogger(__name__)

STATUSES = ("submitted", "processing", "succeed", "failed")
OUTCOMES = ("recorded", "acknowledged", "unauthorized", "invalid", "unavailable")
JOURNAL_NAME = "callbacks"  # put where the glob's file name has its first wildcard


def journal_for(logs: LogsConfig) -> Path | None:
    """A file the first fitting log glob matches, in a folder without wildcards, where
    the journal is written: ``logs/kling-*.jsonl`` gives ``logs/kling-callbacks.jsonl``;
    ``logs.journal`` where it is given."""
    if logs.journal:
        return Path(logs.journal)
    for pattern in logs.paths:
        folder, name = os.path.split(pattern)
        if glob.has_magic(folder) or "*" not in name:
            continue
        candidate = name.replace("*", JOURNAL_NAME, 1).replace("*", "")
        if not glob.has_magic(candidate) and fnmatchcase(candidate, name):
            return Path(folder or ".") / candidate
    return None


class CallbackError(ValueError):
    """A body that is not a Kling callback; the message names the field."""


def part_ids(task_id: str, tasks: int) -> list[str]:
    """The journal's ids for the ``tasks`` tasks one create made (``n`` images): Kling's
    id for the first, ``<id>#2``... for the others."""
    stem = task_id[: MAX_ID - 4]
    return [task_id] + [f"{stem}#{k}" for k in range(2, tasks + 1)]


def completion(body: Any, by_kling_id: bool = False) -> dict[str, Any] | None:
    """The log event a callback body stands for (None for a status that changes no
    count); CallbackError naming the field when it is not a callback. Its task id is
    the producer's ``external_task_id`` when present, else Kling's; Kling's alone
    ``by_kling_id`` (the gateway's tasks, journalled by Kling's id)."""
    if not isinstance(body, dict):
        raise CallbackError("body: expected a JSON object")
    task_id = body.get("task_id")
    if not isinstance(task_id, str) or not 0 < len(task_id) <= MAX_ID:
        raise CallbackError(f"task_id: expected 1 to {MAX_ID} characters")
    status = body.get("task_status")
    if status not in STATUSES:
        raise CallbackError(f"task_status: expected one of {', '.join(STATUSES)}")
    info = body.get("task_info")
    if info is not None and not isinstance(info, dict):
        raise CallbackError("task_info: expected an object")
    external = (info or {}).get("external_task_id")
    if external is not None and (not isinstance(external, str) or not 0 < len(external) <= MAX_ID):
        raise CallbackError(f"task_info.external_task_id: expected 1 to {MAX_ID} characters")
    credits = _number(body.get("final_unit_deduction"), "final_unit_deduction", 1e12)
    updated = _number(body.get("updated_at"), "updated_at", 1e15)
    if status in ("submitted", "processing"):
        return None
    event: dict[str, Any] = {
        "event": "task_completed",
        "task_id": task_id if by_kling_id else external or task_id,
        "status": status,
        "source": "kling_callback",
        "kling_task_id": task_id,
    }
    if updated is not None:
        event["timestamp"] = updated  # Unix milliseconds, which the log reads as such
    if credits is not None:
        event["credits_used"] = credits
    if by_kling_id and external is not None:
        event["external_task_id"] = external
    return event


def _number(value: Any, field: str, below: float) -> float | None:
    """A number Kling may send as a string ("10" or "10.5"), or None when absent."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise CallbackError(f"{field}: expected a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise CallbackError(f"{field}: expected a number, got {value!r}") from None
    if not math.isfinite(number) or not 0 <= number < below:
        raise CallbackError(f"{field}: out of range: {value!r}")
    return number


class EventJournal:
    """The exporter's own event log among the logs (Kling's callbacks and the
    gateway's tasks): appends lines, each on disk before its caller is answered;
    concurrent appends share one fsync.

    The file stays open from one write to the next, while its path still names it (one
    ``lstat`` a write tells): opening, checking and closing it each time took four more
    calls, each a wait for the interpreter on a busy event loop's process, and put
    milliseconds on the gateway's p99. Renamed, removed or replaced, it is opened again
    with every check ``open_journal`` makes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1
        self._file: tuple[int, int] | None = None  # (device, inode) of what _fd is
        self._commit = GroupCommit(self._write)
        self._torn: tuple[int, int] | None = None  # the file that may end mid-line

    async def append(self, *events: dict[str, Any]) -> None:
        """Return once the lines are on disk (written at once); OSError if they cannot
        be."""
        lines = "".join(
            json.dumps(event, separators=(",", ":"), ensure_ascii=False) + "\n" for event in events
        )
        await self._commit.append(lines.encode())

    def check(self) -> None:
        """OSError when the journal plainly cannot be written (a link or another
        file planted at its path, or its folder not writable): one look, no open."""
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            folder = self.path.parent
            if folder.is_dir() and not os.access(folder, os.W_OK):
                raise OSError(errno.EACCES, "its folder is not writable") from None
            return
        if stat.S_ISLNK(info.st_mode):
            raise OSError(errno.ELOOP, "a symbolic link; refusing to follow it")
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            raise OSError(errno.EPERM, "not a regular file of this user")

    async def close(self) -> None:
        """Close the file once the lines queued so far are written."""
        await self._commit.settle()
        self._close()

    def _write(self, data: bytes) -> None:
        """Append lines. A file left mid-line (a write a full disk took half of, a crash
        during one) has that line ended first, so that the torn part is one bad line
        the reader counts and skips, not glued to the next good one; a newline too many
        is a blank line, which it skips. (Cutting the torn part off instead could take
        back bytes the reader has read.)"""
        fd = self._open()
        if self._torn == self._file:  # _file is set by _open
            data = b"\n" + data
        try:
            write_all_and_sync(fd, data)
        except OSError:
            self._torn = self._file
            raise
        self._torn = None

    def _open(self) -> int:
        try:
            info = os.lstat(self.path)
            if (info.st_dev, info.st_ino) == self._file:
                return self._fd
        except FileNotFoundError:
            pass
        self._close()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = open_journal(self.path)
        info = os.fstat(fd)
        self._fd, self._file = fd, (info.st_dev, info.st_ino)
        if info.st_size and os.pread(fd, 1, info.st_size - 1) != b"\n":
            self._torn = self._file  # left mid-line by a crash or a full disk
        return fd

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._file = -1, None


def open_journal(path: Path) -> int:
    """A descriptor to append to ``path`` (and read its end), created if missing. A
    symlink planted at the path is not followed (``O_NOFOLLOW``), and anything but a
    regular file this process owns is refused with OSError, so no callback is written
    outside the log folder."""
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OSError(e.errno, "a symbolic link; refusing to follow it") from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
        os.close(fd)
        what = "not a regular file" if not stat.S_ISREG(info.st_mode) else "owned by another user"
        raise OSError(errno.EPERM, f"{what}; refusing to write to it")
    return fd


PATH = "/api/v1/kling/callback"


# A task's own callback token: t1.<nonce>.<tasks>.<mac>
_TASK_TOKEN = "t1"  # noqa: S105 - the version of the format, not a secret
BOUND = 100_000  # nonces whose task Kling has named, remembered to refuse others


def _mac(key: str, nonce: str, tasks: int) -> str:
    message = f"{_TASK_TOKEN}|{nonce}|{tasks}".encode()
    return hmac.new(key.encode(), message, hashlib.sha256).hexdigest()[:32]


class Callbacks:
    """The endpoint's state: the config it reads its token and journal from (so a
    reload applies), the journal, what became of the callbacks, and which task each
    of the gateway's callback URLs was given to."""

    def __init__(self, config: Callable[[], Config]) -> None:
        self.config = config
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        self.bound: OrderedDict[str, str] = OrderedDict()  # nonce -> Kling's task id
        self._journal: EventJournal | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._logs: LogsConfig | None = None
        self._path: Path | None = None

    def journal(self) -> EventJournal | None:
        logs = self.config().logs
        if logs is not self._logs:  # worked out once a config (a reload makes a new one)
            self._logs, self._path = logs, journal_for(logs)
        path = self._path
        if path is None:
            return None
        if self._journal is None or self._journal.path != path:
            if self._journal is not None:  # the logs moved at a reload
                self._closing.add(task := asyncio.ensure_future(self._journal.close()))
                task.add_done_callback(self._closing.discard)
            self._journal = EventJournal(path)
        return self._journal

    def task_url(self, base: str, tasks: int) -> tuple[str, str]:
        """A callback URL of one create's own (``base`` with its ``token`` replaced),
        and its nonce, which ``bind`` ties to Kling's task once Kling names it."""
        nonce = secrets.token_urlsafe(12)
        mac = _mac(self.config().kling.callback_token, nonce, tasks)
        token = f"{_TASK_TOKEN}.{nonce}.{tasks}.{mac}"
        parts = urlsplit(base)
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        query = [(k, v) for k, v in pairs if k != "token"]
        query.append(("token", token))
        return nonce, urlunsplit(parts._replace(query=urlencode(query)))

    def bind(self, nonce: str, task_id: str) -> None:
        self.bound[nonce] = task_id
        if len(self.bound) > BOUND:
            self.bound.popitem(last=False)

    def _task_token(self, given: str, secret: str) -> tuple[str, int] | None:
        """The nonce and task count of a task's own token whose MAC is right, or None."""
        parts = given.split(".")
        if len(parts) != 4 or parts[0] != _TASK_TOKEN or not parts[2].isdigit():
            return None
        nonce, tasks = parts[1], int(parts[2])
        if not 1 <= tasks <= 100 or not hmac.compare_digest(parts[3], _mac(secret, nonce, tasks)):
            return None
        return nonce, tasks

    async def close(self, app: web.Application | None = None) -> None:
        """Close the journal once what was queued is written (an aiohttp cleanup)."""
        if self._closing:
            await asyncio.wait(set(self._closing))
        if self._journal is not None:
            await self._journal.close()

    def _refuse(self, outcome: str, status: int, error: str, field: str) -> web.Response:
        self.outcomes[outcome] += 1
        return error_answer(status, error, field)

    async def handle(self, request: web.Request) -> web.Response:
        token = self.config().kling.callback_token
        journal = self.journal()
        if not token or journal is None:
            return error_answer(
                404, "path: Kling callbacks are not enabled (kling.callback_token)", "path"
            )
        given = request.query.get("token", "")
        own = self._task_token(given, token)
        if own is None and not hmac.compare_digest(given.encode(), token.encode()):
            return self._refuse("unauthorized", 401, "token: missing or wrong", "token")
        try:
            raw = await read_body(request)
        except BodyError as e:
            return self._refuse("invalid", e.status, str(e), "body")
        try:
            body = parse_json(raw)
            event = completion(body, by_kling_id=own is not None)
        except ValueError as e:  # CallbackError is a ValueError
            message = str(e)
            return self._refuse("invalid", 400, message, message.split(":", 1)[0])
        events = [event] if event is not None else []
        if own is not None:
            nonce, tasks = own
            named = self.bound.get(nonce)
            if named is not None and named != body["task_id"]:
                return self._refuse("unauthorized", 401, "token: given for another task", "token")
            if event is not None:
                events += [
                    {**event, "task_id": part, "credits_used": 0}
                    for part in part_ids(event["task_id"], tasks)[1:]
                ]
        if event is None:
            self.outcomes["acknowledged"] += 1
            return web.json_response({"recorded": False})
        try:
            await journal.append(*events)
        except OSError as e:
            # Not on disk, so not a 200: Kling calls again.
            log.error(
                "cannot write the callback journal",
                extra={"path": str(journal.path), "err": e.strerror},
            )
            self.outcomes["unavailable"] += 1
            return error_answer(503, "journal: cannot be written (see the exporter's log)")
        self.outcomes["recorded"] += 1
        return web.json_response({"recorded": True})
