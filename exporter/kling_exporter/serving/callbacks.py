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
import hashlib
import hmac
import logging
import secrets
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from aiohttp import web

from kling_exporter.config import Config, LogsConfig
from kling_exporter.journals.tasklog import EventJournal, journal_for
from kling_exporter.kling.tasks import completion, part_ids
from kling_exporter.serving.bodies import BodyError, error_answer, parse_json, read_body

log = logging.getLogger(__name__)

OUTCOMES = ("recorded", "acknowledged", "unauthorized", "invalid", "unavailable")


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
