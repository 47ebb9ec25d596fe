"""For programs that call Kling: write the event log, and ask before spending.

from exporter.client import BudgetClient, EventLogger, generate_within_budget

log = EventLogger("logs", project="marketing", user="ann")
budget = BudgetClient("http://127.0.0.1:10177")
task_id = generate_within_budget(
    budget, log, submit=lambda: kling.text_to_video(prompt, mode="pro", duration=10),
    model="kling-v2-6", mode="pro", duration=10,
)
...
log.completed(task_id, status="succeed", elapsed_sec=95.2, credits_used=70)
"""

from __future__ import annotations

import datetime as dt
import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any


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

    def _write(self, fields: dict[str, Any]) -> None:
        now = dt.datetime.now(dt.UTC)
        fields = {
            "timestamp": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            **{k: v for k, v in fields.items() if v is not None},
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
    ) -> None:
        self._write(
            {
                "event": "task_submitted",
                "task_id": task_id,
                "project": project,
                "user": user,
                "model": model,
                "mode": mode,
                "duration": duration,
                "audio": audio,
                "kind": kind,
                "prompt_len": prompt_len,
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
        task_id: str,
        error_type: str,
        message: str | None = None,
        project: str | None = None,
        user: str | None = None,
    ) -> None:
        self._write(
            {
                "event": "task_error",
                "task_id": task_id,
                "error_type": error_type,
                "message": message,
                "project": project,
                "user": user,
            }
        )


class BudgetClient:
    """Asks a kling-exporter whether a generation fits every matching budget."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:10177",
        timeout: float = 5.0,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json", **(headers or {})}

    def check(self, **request: Any) -> dict[str, Any]:
        """The exporter's answer; raises BudgetExceededError when it is not allowed and
        ValueError when the exporter refuses the request as malformed."""
        body = json.dumps({k: v for k, v in request.items() if v is not None}).encode()
        req = urllib.request.Request(  # noqa: S310 - the exporter's http(s) URL
            self.url + "/api/v1/check",
            data=body,
            headers=self.headers,
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310
                result: dict[str, Any] = json.loads(resp.read())
        except urllib.error.HTTPError as e:
            if e.code == 400:
                raise ValueError(json.loads(e.read()).get("error", "bad request")) from None
            raise
        if not result["allowed"]:
            raise BudgetExceededError(result["reason"], result)
        return result


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
    """Check the budget, call ``submit`` (which returns Kling's task id) and log the
    submission; an exception from ``submit`` is logged as a task error and re-raised."""
    budget.check(
        project=project or log.project,
        user=user or log.user,
        model=model,
        mode=mode,
        duration=duration,
        audio=audio,
        kind=kind,
    )
    try:
        task_id = submit()
    except Exception as e:
        log.error(
            f"failed-{os.getpid()}-{id(e)}",
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
    )
    return task_id
