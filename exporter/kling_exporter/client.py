"""For programs that call Kling: write the event log, and ask before spending.

from kling_exporter.client import BudgetClient, EventLogger, generate_within_budget

log = EventLogger("logs", project="marketing", user="ann")
budget = BudgetClient("http://127.0.0.1:10177")
task_id = generate_within_budget(
    budget, log, submit=lambda: kling.text_to_video(prompt, mode="pro", duration=10),
    model="kling-v2-6", mode="pro", duration=10,
)
...
log.completed(task_id, status="succeed", elapsed_sec=95.2, credits_used=70)

A program written against the hand-rolled ``KlingEventLogger`` changes its import and
nothing else: ``KlingEventLogger(log_dir)``, ``log_submission(task_id, prompt, model,
duration, mode)``, ``log_completion(task_id, status, elapsed_sec, credits_used)`` and
``log_error(task_id, error_type, message)`` are theirs, name for name and in their order:

from kling_exporter.client import KlingEventLogger

or, holding credits for several tasks before any is submitted:

with budget.reserve(model="kling-v2-6", mode="pro", duration=10, count=3) as held:
    for prompt in prompts:
        task_id = kling.text_to_video(prompt, mode="pro", duration=10)
        log.submitted(task_id, "kling-v2-6", "pro", 10, reservation_id=held.id)
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Never

log = logging.getLogger(__name__)

MESSAGE_CHARS = 200  # of an error message, as the hand-rolled logger keeps


class BudgetUnavailableError(RuntimeError):
    """The exporter could not be asked (down, unreachable, or answering 5xx)."""


class BudgetExceededError(RuntimeError):
    """A matching budget would go over its limit; ``result`` is the full answer."""

    def __init__(self, reason: str, result: dict[str, Any]) -> None:
        super().__init__(reason)
        self.reason = reason
        self.result = result


class EventLogger:
    """Appends events to ``DIR/kling-YYYY-MM-DD.jsonl`` (UTC day).

    Each event is one ``write`` of one whole line to a file opened with O_APPEND, so
    threads and processes can log to the same file without tearing lines apart."""

    def __init__(
        self, directory: str | Path = "logs", project: str | None = None, user: str | None = None
    ) -> None:
        self.directory = Path(directory)
        self.project = project
        self.user = user
        self.directory.mkdir(parents=True, exist_ok=True)

    def _now(self) -> dt.datetime:
        """The time of an event and the day of its file (UTC); tests set it."""
        return dt.datetime.now(dt.UTC)

    def _write(self, fields: dict[str, Any], keep_null: str | None = None) -> None:
        """One line of ``fields``, leaving out those that are None (but ``keep_null``,
        written as null: a field whose null means something)."""
        now = self._now()
        fields = {
            "timestamp": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            **{k: v for k, v in fields.items() if v is not None or k == keep_null},
        }
        if self.project is not None:
            fields.setdefault("project", self.project)
        if self.user is not None:
            fields.setdefault("user", self.user)
        data = (json.dumps(fields, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        path = self.directory / f"kling-{now:%Y-%m-%d}.jsonl"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, data)
            if written != len(data):  # only on a full disk or similar: say so
                raise OSError(f"short write to {path}: {written} of {len(data)} bytes")
        finally:
            os.close(fd)

    def submitted(
        self,
        task_id: str,
        model: str,
        mode: str = "standard",
        duration: int = 5,
        audio: bool = False,
        kind: str = "video",
        prompt_len: int | None = None,
        project: str | None = None,
        user: str | None = None,
        reservation_id: str | None = None,
    ) -> None:
        """A submission; ``reservation_id`` names the reservation it uses (one task of
        the hold is then counted as in flight instead)."""
        self._write(
            {
                "event": "task_submitted",
                "task_id": task_id,
                "project": project,
                "user": user,
                "model": model,
                "mode": mode,
                "duration": int(duration),  # "10" is 10, as their logger writes it
                "audio": audio,
                "kind": kind,
                "prompt_len": prompt_len,
                "reservation_id": reservation_id,
            }
        )

    def completed(
        self,
        task_id: str,
        status: str = "succeed",
        elapsed_sec: float | None = None,
        credits_used: float | None = None,
    ) -> None:
        self._write(
            {
                "event": "task_completed",
                "task_id": task_id,
                "status": status,
                "elapsed_sec": elapsed_sec,
                "credits_used": credits_used,
            }
        )

    def error(
        self,
        task_id: str | None,
        error_type: str,
        message: str | None = None,
        project: str | None = None,
        user: str | None = None,
    ) -> None:
        """An error; ``task_id`` None (written as null) when the submission failed before
        Kling gave the task an id (a rate limit, a refused key): still counted."""
        self._write(
            {
                "event": "task_error",
                "task_id": task_id,
                "error_type": error_type,
                "message": message,
                "project": project,
                "user": user,
            },
            keep_null="task_id",
        )

    # The hand-rolled KlingEventLogger's methods: its names, parameters, order and
    # defaults, and the fields it writes, so that its callers switch by changing the
    # import alone. The prompt is never written: its length is, as theirs writes it.

    def log_submission(
        self, task_id: str, prompt: str, model: str, duration: int | float | str, mode: str
    ) -> None:
        """Theirs: ``duration`` written as ``int(duration)`` (``"10"`` is 10), the
        prompt's length as ``prompt_len``."""
        self._write(
            {
                "event": "task_submitted",
                "task_id": task_id,
                "model": model,
                "duration": int(duration),
                "mode": mode,
                "prompt_len": len(prompt),
            }
        )

    def log_completion(
        self,
        task_id: str,
        status: str,
        elapsed_sec: float | None,
        credits_used: float | None,
    ) -> None:
        """Theirs: elapsed seconds before credits."""
        self.completed(task_id, status, elapsed_sec=elapsed_sec, credits_used=credits_used)

    def log_error(self, task_id: str | None, error_type: str, message: str) -> None:
        """Theirs: the message cut to 200 characters; ``task_id`` None (written as null)
        for an error before Kling gave the task an id."""
        self.error(task_id, error_type, message[:MESSAGE_CHARS])

    # Names an earlier version of this module gave their methods. Kept for programs that
    # use them; the seconds and credits of a completion are taken by keyword only, since
    # these names once took them in the other order.

    def log_task_submitted(
        self,
        task_id: str,
        prompt: str,
        model: str,
        duration: int | float | str = 5,
        mode: str = "standard",
        **more: Any,
    ) -> None:
        """``submitted`` in their order; ``more`` takes ours (``audio``, ``project``...)."""
        more.setdefault("prompt_len", len(prompt))
        self.submitted(task_id, model, mode, int(duration), **more)

    def log_task_completed(
        self,
        task_id: str,
        status: str,
        *misplaced: Never,
        credits_used: float | None = None,
        elapsed_sec: float | None = None,
    ) -> None:
        """``completed`` with ``credits_used=`` and ``elapsed_sec=`` by name: two numbers
        in a row are read one way by this method and the other by ``log_completion``, so
        a positional call is refused rather than guessed."""
        if misplaced:
            raise TypeError(
                "log_task_completed() takes credits_used and elapsed_sec by keyword only "
                f"(got {len(misplaced)} more positional argument"
                f"{'s' * (len(misplaced) != 1)}): write log_task_completed(task_id, status, "
                "credits_used=..., elapsed_sec=...), or use the script's own "
                "log_completion(task_id, status, elapsed_sec, credits_used)"
            )
        self.completed(task_id, status, elapsed_sec=elapsed_sec, credits_used=credits_used)


class KlingEventLogger(EventLogger):
    """The hand-rolled logger's class: ``KlingEventLogger(log_dir)`` as theirs (with
    ``project`` and ``user`` besides), writing where and what theirs writes."""

    def __init__(
        self, log_dir: str | Path = "logs", project: str | None = None, user: str | None = None
    ) -> None:
        super().__init__(log_dir, project, user)
        self.log_dir = self.directory


class Reservation:
    """A hold granted by the exporter (``BudgetClient.reserve``). As a context manager
    it releases the hold when the block raises; otherwise each submission logged with
    ``reservation_id=held.id`` uses one task of it, and what is left expires at
    ``expires_at`` (or call ``release``)."""

    def __init__(self, client: BudgetClient | None, answer: dict[str, Any]) -> None:
        self.client = client
        self.answer = answer
        self.id: str | None = answer.get("id")
        self.expires_at: str | None = answer.get("expires_at")
        self.count: int = answer.get("count", 0)

    def release(self) -> bool:
        """Release what is left; False if nothing was (used up, expired, or unavailable)."""
        if self.client is None or self.id is None:
            return False
        return self.client.release(self.id)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if error is not None:
            try:
                self.release()
            except (BudgetUnavailableError, ValueError) as e:
                log.warning("could not release reservation %s: %s", self.id, e)


class BudgetClient:
    """Asks a kling-exporter whether a generation fits every matching budget.

    When the exporter cannot be reached (or answers 5xx), ``check`` and ``reserve``
    raise BudgetUnavailableError; constructed with ``fail_open=True`` they allow
    instead and log a warning, for producers that would rather overspend than stop."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:10177",
        timeout: float = 5.0,
        headers: dict[str, str] | None = None,
        fail_open: bool = False,
    ) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self.fail_open = fail_open

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """(status, decoded JSON or None); 400 and 409 raise ValueError with the
        exporter's words; an unreachable exporter raises BudgetUnavailableError."""
        data = None
        if body is not None:
            data = json.dumps({k: v for k, v in body.items() if v is not None}).encode()
        req = urllib.request.Request(  # noqa: S310 - the exporter's http(s) URL
            self.url + path, data=data, headers=self.headers, method=method
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310
                raw = resp.read()
                return resp.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as e:
            raw = e.read()
            if e.code in (400, 409):
                raise ValueError(json.loads(raw).get("error", "bad request")) from None
            if e.code == 404:
                return 404, None
            raise BudgetUnavailableError(f"{self.url} answered {e.code}") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise BudgetUnavailableError(f"cannot ask {self.url}: {e}") from None

    def _unavailable(self, e: BudgetUnavailableError) -> dict[str, Any]:
        if not self.fail_open:
            raise e
        log.warning("budget exporter unavailable, allowing (fail_open): %s", e)
        return {"allowed": True, "unavailable": True, "reason": str(e)}

    def check(self, **request: Any) -> dict[str, Any]:
        """The exporter's answer; raises BudgetExceededError when it is not allowed and
        ValueError when the exporter refuses the request as malformed."""
        try:
            _, result = self._call("POST", "/api/v1/check", request)
        except BudgetUnavailableError as e:
            return self._unavailable(e)
        if not result["allowed"]:
            raise BudgetExceededError(result["reason"], result)
        assert isinstance(result, dict)
        return result

    def reserve(
        self, count: int = 1, ttl: str | float | None = None, id: str | None = None, **request: Any
    ) -> Reservation:
        """Hold what ``count`` tasks like ``request`` cost, against every matching budget,
        until they are submitted or ``ttl`` passes (default 15m). ``id`` makes a retried
        call the same reservation. Raises BudgetExceededError when a budget has no room."""
        body = {**request, "count": count, "ttl": ttl, "id": id}
        try:
            _, answer = self._call("POST", "/api/v1/reservations", body)
        except BudgetUnavailableError as e:
            return Reservation(None, self._unavailable(e))
        if not answer["allowed"]:
            raise BudgetExceededError(answer["reason"], answer)
        return Reservation(self, answer)

    def release(self, reservation_id: str) -> bool:
        status, _ = self._call("DELETE", f"/api/v1/reservations/{reservation_id}")
        return bool(status == 204)


def generate_within_budget(
    budget: BudgetClient,
    log: EventLogger,
    submit: Callable[[], str],
    model: str,
    mode: str = "standard",
    duration: int = 5,
    audio: bool = False,
    kind: str = "video",
    project: str | None = None,
    user: str | None = None,
    prompt_len: int | None = None,
) -> str:
    """Reserve what one task costs, call ``submit`` (which returns Kling's task id) and
    log the submission under the reservation; an exception from ``submit`` releases the
    reservation, is logged as a task error and re-raised. Concurrent callers can never
    together go over a budget: each holds its share before it submits."""
    with budget.reserve(
        project=project or log.project,
        user=user or log.user,
        model=model,
        mode=mode,
        duration=duration,
        audio=audio,
        kind=kind,
    ) as held:
        try:
            task_id = submit()
        except Exception as e:
            log.error(
                None,  # Kling gave no task id: counted at once, with nothing to join
                error_type=type(e).__name__,
                message=str(e),
                project=project,
                user=user,
            )
            raise
        log.submitted(
            task_id,
            model=model,
            mode=mode,
            duration=duration,
            audio=audio,
            kind=kind,
            prompt_len=prompt_len,
            project=project,
            user=user,
            reservation_id=held.id,
        )
    return task_id
