"""Kling's own numbers: the account's resource packs, polled from Kling's account API.

Budgets are what a team decides to spend; resource packs are what it has paid for, and
they expire. ``GET {api_base}/account/costs`` answers each pack's total and remaining
units, its times and its status, with Kling's documented JWT auth (HS256; ``iss`` the
access key, ``exp`` now + 30 min, ``nbf`` now - 5 s). The keys come from files or the
environment and appear nowhere else: not in logs, metrics, errors or the state.

Polled at most once per ``kling.account_poll_interval`` (never faster than Kling's one
query a second); a failure is counted by reason and retried after an exponential,
jittered, capped backoff; the last good answer stays exported, with the time it came.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import aiohttp
import jwt
import msgspec

from kling_exporter.config import Config, KlingConfig
from kling_exporter.streams import TooLarge, read_bounded

log = logging.getLogger(__name__)

REASONS = ("auth", "rate_limited", "server", "timeout", "bad_response")
TIMEOUT = 10.0  # seconds for one answer
# An account answer lists a few packs in a few KiB; a larger one is not Kling's.
MAX_ANSWER = 4 * 1024 * 1024
FIRST_RETRY = 1.0  # seconds after a first failure; doubles with each one after
TOKEN_LIFE = 1800  # exp = now + 30 min, as Kling documents
WINDOW_DAYS = 400  # packs bought this far back are asked for (they last 30 or 90 days)


class Pack(msgspec.Struct):
    """One resource pack as Kling's account API describes it (times in ms)."""

    resource_pack_id: str
    resource_pack_name: str
    resource_pack_type: str
    total_quantity: float
    remaining_quantity: float
    purchase_time: int
    effective_time: int
    invalid_time: int
    status: Literal["toBeOnline", "online", "expired", "runOut"]


class Data(msgspec.Struct):
    resource_pack_subscribe_infos: list[Pack] = []


class Answer(msgspec.Struct):
    code: int
    message: str = ""
    data: Data | None = None


_decode = msgspec.json.Decoder(Answer).decode


def read_keys(config: KlingConfig) -> tuple[str, str] | None:
    """(access key, secret key) from the configured files, else the environment; None
    when either is missing. Files are read with surrounding whitespace stripped."""

    def one(path: str, env: str) -> str:
        if path:
            return Path(path).read_text(encoding="utf-8").strip()
        return os.environ.get(env, "").strip()

    access = one(config.access_key_file, "KLING_ACCESS_KEY")
    secret = one(config.secret_key_file, "KLING_SECRET_KEY")
    return (access, secret) if access and secret else None


def key_file_problems(config: KlingConfig) -> tuple[list[str], list[str]]:
    """(errors, warnings) about the configured key files: a file that cannot be read is
    an error; one that group or others may read is a warning, as ssh gives for its keys.
    Each names the key and the file; none holds a key."""
    errors: list[str] = []
    warnings_: list[str] = []
    for key in ("access_key_file", "secret_key_file"):
        path = getattr(config, key)
        if not path:
            continue
        try:
            mode = os.stat(path).st_mode
            with open(path, "rb"):
                pass
        except OSError as e:
            errors.append(f"kling.{key}: cannot read {path}: {e.strerror or e}")
            continue
        if mode & 0o077:
            warnings_.append(
                f"kling.{key}: {path} is readable by group or others "
                f"(mode {mode & 0o777:o}); chmod 600 it"
            )
    return errors, warnings_


async def _ask(
    session: aiohttp.ClientSession, api_base: str, params: dict[str, str], headers: dict[str, str]
) -> tuple[int, bytes]:
    """Kling's HTTP status and answer (at most MAX_ANSWER bytes); PollError when there
    is none."""
    url = api_base.rstrip("/") + "/account/costs"
    try:
        async with session.get(
            url, params=params, headers=headers, timeout=aiohttp.ClientTimeout(total=TIMEOUT)
        ) as r:
            if r.content_length is not None and r.content_length > MAX_ANSWER:
                raise TooLarge
            return r.status, await read_bounded(r.content, MAX_ANSWER)
    except TooLarge:
        raise PollError("bad_response", f"larger than {MAX_ANSWER} bytes") from None
    except TimeoutError:
        raise PollError("timeout", f"no answer within {TIMEOUT:g} s") from None
    except aiohttp.ClientError as e:
        raise PollError("server", f"cannot reach {api_base}: {type(e).__name__}") from None


def _answer(status: int, raw: bytes) -> Answer:
    """Kling's answer if it is one of success; else PollError with the reason."""
    if status in (401, 403):
        raise PollError("auth", f"Kling answered {status}")
    if status == 429:
        raise PollError("rate_limited", "Kling answered 429")
    if status >= 500:
        raise PollError("server", f"Kling answered {status}")
    try:
        answer = _decode(raw)
    except msgspec.DecodeError:
        raise PollError("bad_response", f"not JSON (HTTP {status})") from None
    except msgspec.ValidationError as e:
        raise PollError("bad_response", f"unexpected shape: {e}") from None
    if answer.code != 0 or status != 200:
        reason = "auth" if 1000 <= answer.code < 1100 else "bad_response"
        if answer.code in (1302, 1303):
            reason = "rate_limited"
        raise PollError(reason, f"Kling answered code {answer.code}: {answer.message[:80]}")
    return answer


class PollError(Exception):
    """One failed poll; ``reason`` is one of REASONS. The message never holds a key."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class Account:
    """The packs Kling last reported, and how polling goes."""

    def __init__(self, config: Callable[[], Config], clock: Callable[[], float] = time.time):
        self.config = config
        self.clock = clock
        self.packs: list[Pack] = []
        self.errors = dict.fromkeys(REASONS, 0)
        self.last_success = 0.0
        self.failures = 0  # in a row
        self._token: tuple[str, str, float] | None = None  # access key, token, exp

    def enabled(self) -> bool:
        """Whether keys are configured (files named, or both variables set); reading
        them is the poll's business, so a scrape reads no file. A key file that cannot
        be read, or is empty, shows as ``auth`` errors."""
        kling = self.config().kling
        access = kling.access_key_file or os.environ.get("KLING_ACCESS_KEY", "").strip()
        secret = kling.secret_key_file or os.environ.get("KLING_SECRET_KEY", "").strip()
        return bool(access and secret)

    def token(self, access: str, secret: str) -> str:
        """A signed token, reused until a minute before it expires."""
        now = self.clock()
        if self._token is not None and self._token[0] == access and now < self._token[2] - 60:
            return self._token[1]
        exp = int(now) + TOKEN_LIFE
        claims = {"iss": access, "exp": exp, "nbf": int(now) - 5}
        with warnings.catch_warnings():  # the key's length is Kling's to choose, not ours
            warnings.simplefilter("ignore")
            signed = jwt.encode(claims, secret, algorithm="HS256", headers={"typ": "JWT"})
        self._token = (access, signed, exp)
        return signed

    async def poll(self, session: aiohttp.ClientSession) -> None:
        """Ask Kling once; keep the packs, or raise PollError."""
        kling = self.config().kling
        try:
            keys = read_keys(kling)
        except OSError as e:
            raise PollError("auth", f"cannot read a key file: {e.strerror}") from None
        if keys is None:
            raise PollError("auth", "no access or secret key")
        now_ms = int(self.clock() * 1000)
        params = {"start_time": str(now_ms - WINDOW_DAYS * 86_400_000), "end_time": str(now_ms)}
        headers = {"Authorization": f"Bearer {self.token(*keys)}"}
        status, raw = await _ask(session, kling.api_base, params, headers)
        answer = _answer(status, raw)
        self.packs = [] if answer.data is None else list(answer.data.resource_pack_subscribe_infos)
        self.last_success = self.clock()

    def next_delay(self) -> float:
        """The wait before the next poll: the interval after a success; after failures
        1 s, 2 s, 4 s ... with a fifth either way, never past the interval."""
        interval = self.config().kling.poll_seconds
        if not self.failures:
            return interval
        backoff: float = FIRST_RETRY * 2.0 ** min(self.failures - 1, 30)
        return max(1.0, min(interval, backoff) * random.uniform(0.8, 1.2))

    async def run(self) -> None:
        """Poll until cancelled."""
        async with aiohttp.ClientSession() as session:
            while True:
                if self.enabled():
                    try:
                        await self.poll(session)
                        if self.failures:
                            log.info("Kling account polling works again")
                        self.failures = 0
                    except PollError as e:
                        self.failures += 1
                        self.errors[e.reason] += 1
                        if self.failures in (1, 5) or self.failures % 50 == 0:
                            log.warning(
                                "cannot poll the Kling account",
                                extra={
                                    "reason": e.reason,
                                    "err": str(e),
                                    "in_a_row": self.failures,
                                },
                            )
                await asyncio.sleep(self.next_delay())
