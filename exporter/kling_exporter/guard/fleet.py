"""Fleet budgets: one budget across many exporters, shared through Redis.

Each exporter keeps its own holds (journalled, as alone) and publishes, per budget and
period, one entry of absolute sums: what its logs say is used and in flight, and what
its live holds keep, with how long they last. Publishing the same totals again changes
nothing, so a restart or a Redis that lost everything is mended by publishing.

A reservation is decided by one server-side script that reads every instance's entry
of the matching budgets, adds this exporter's fresh entry and the request, and, when
every budget has room, writes this exporter's entry with the request held: two
exporters can never both take the last credits. An entry stays until its period is
over (a stopped exporter's spending still counts); its holds count until they expire.

A Redis that restarted empty knows no instance's spending until each has published
again: for two publish intervals after it first answers so (the ``epoch`` it keeps),
the fleet counts as unavailable. What an instance used in a period only grows, so every
exporter remembers the last entries it saw of the others and writes back, highest used
winning, those Redis lost or holds lower: a stopped instance's spending survives Redis
forgetting it as long as one peer runs.

Each exporter holds a lease on its instance name (a random token, renewed by every
write, lasting a few publish intervals). One that starts while another holds its name
waits out one lease, then refuses to start; one that finds its lease taken later writes
nothing more, is not ready and says so (``kling_fleet_instance_conflict``): two
exporters under one name would overwrite each other's spending and share ids.

Unavailable (unreachable, slow, or settling), pre-flight follows
``fleet.on_unavailable``: ``allow`` decides on this exporter's own usage plus the other
instances' last seen, ``refuse`` refuses. Ingestion and scrapes never wait for Redis.

All keys share one hash tag, so the script runs on a Redis Cluster too.

One job, and long for it: the exporter's side of one protocol with Redis (connect,
publish, decide, claim the instance name, fall back when Redis is gone); the other
side is ``fleet.lua``, which Redis runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from typing import Any, NamedTuple

import msgspec

from kling_exporter.budgets import Ask, CheckResult, Share
from kling_exporter.config import BudgetConfig, Config, FleetConfig
from kling_exporter.guard.reservations import Reservations
from kling_exporter.views import View

log = logging.getLogger(__name__)

FLEET_UNAVAILABLE = "fleet unavailable"
# An instance that has not published for this many intervals is not counted as one of
# the fleet's (its entries still count until their periods end).
STALE_INTERVALS = 5
# Entries are kept this long past their period's end, for clocks a little apart.
KEEP_AFTER_PERIOD = 86400
# An instance name's lease lasts this many publish intervals past its last renewal.
LEASE_INTERVALS = 5
# Ids of live holds written back per script call, after Redis started afresh.
IDS_PER_CALL = 1000

# The script run inside Redis: what its keys and arguments are is said at its head.
SCRIPT = (resources.files("kling_exporter.guard") / "fleet.lua").read_text(encoding="utf-8")


class Answer(msgspec.Struct):
    """What the script answers."""

    verdict: str  # ok | refused | settling | taken | conflict (the lease is another's)
    owner: str = ""  # of the id, when taken
    refused_by: int = 0  # the first budget that refused, from 1
    settled: bool = False
    epoch: str = ""
    instances: int = 0
    # Lua's cjson writes an empty list as {}.
    others: list[list[float]] | dict[str, Any] = []
    # Publishing: every other instance's entry of each budget, by instance.
    entries: list[dict[str, list[float]]] | dict[str, Any] = []


_decode = msgspec.json.Decoder(Answer).decode


class Claim(NamedTuple):
    """What a reservation claims of the fleet: credits and dollars, its id, its ttl."""

    needed: tuple[float, float] = (0.0, 0.0)
    rid: str | None = None
    ttl: float = 0.0


NO_CLAIM = Claim()


class Unavailable(Exception):
    """Redis did not answer in time, or answered with an error, or is settling."""


class InstanceTaken(Unavailable):
    """Another running exporter holds this exporter's ``fleet.instance``."""


def connect(url: str, timeout: float) -> Any:
    """A client for ``url``: ``redis://`` (``rediss://``, ``unix://``) for one server,
    ``redis+sentinel://[password@]host:port[,host:port...]/service[/db]`` for the
    master Sentinel names, ``redis+cluster://host:port`` for a Cluster."""
    # redis-py is loaded here, by an exporter of a fleet: it is a third of the start of
    # one that is not in any.
    from redis import asyncio as aioredis  # noqa: PLC0415
    from redis.asyncio.cluster import RedisCluster  # noqa: PLC0415
    from redis.asyncio.sentinel import Sentinel  # noqa: PLC0415

    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "decode_responses": True,
    }
    if url.startswith("redis+cluster://"):
        return RedisCluster.from_url("redis://" + url.removeprefix("redis+cluster://"), **options)
    if url.startswith("redis+sentinel://"):
        parts = urllib.parse.urlsplit(url)
        hosts = []
        for item in parts.netloc.rpartition("@")[2].split(","):
            host, _, port = item.rpartition(":")
            hosts.append((host or item, int(port) if host and port else 26379))
        path = [p for p in parts.path.split("/") if p]
        if not path:
            raise ValueError("redis_url: a Sentinel URL names its service: .../service[/db]")
        if parts.password:
            options["password"] = urllib.parse.unquote(parts.password)
        if len(path) > 1:
            options["db"] = int(path[1])
        sentinel = Sentinel(hosts, sentinel_kwargs={"socket_timeout": timeout}, **options)
        return sentinel.master_for(path[0])
    return aioredis.Redis.from_url(url, **options)


class Fleet:
    """This exporter's part in a fleet: what it publishes, what it last saw of the
    others, and the pre-flight answers and reservation decisions made with them."""

    def __init__(
        self,
        config: Callable[[], Config],
        reservations: Reservations,
        view: Callable[[], View],
        ready: Callable[[], bool],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.reservations = reservations
        # Read again after every wait for Redis (and a decision's, under the
        # reservations' lock): a view taken before a wait may predate tasks that have
        # since used holds, which the holds read after it no longer count.
        self.view = view
        self.ready = ready
        self.clock = clock
        self.up = False
        self.settled = False
        self.instances = 0
        self.last_publish = 0.0
        self.epoch = ""
        # The other instances' share of each budget's current period, as last seen.
        self.seen: dict[str, Share] = {}
        # Every other instance's entry of each budget's current period, as last seen
        # (with the highest used seen): what is written back when Redis lost it.
        self.remembered: dict[str, dict[str, list[float]]] = {}
        self.restores: list[list[Any]] = []  # [key, instance, entry] to write back
        self.token = secrets.token_hex(16)
        self.conflict = False
        # Whether the ids of this exporter's live holds may be missing from Redis (it
        # started afresh, or this exporter has not written them since it started).
        self.ids_lost = True
        self.wake = asyncio.Event()
        self._client: Any = None
        self._script: Any = None
        self._url = ""
        self._warned = 0.0

    @property
    def settings(self) -> FleetConfig:
        return self.config().fleet

    @property
    def enabled(self) -> bool:
        return bool(self.settings.redis_url)

    def _key(self, b: BudgetConfig, start: float) -> str:
        return f"{self.settings.key_prefix}{{fleet}}:usage:{b.period}:{int(start)}:{b.name}"

    @property
    def conflict_reason(self) -> str:
        return f"fleet.instance {self.settings.instance_name!r} is used by another exporter"

    # -- talking to Redis ------------------------------------------------------------

    async def _connected(self) -> Any:
        settings = self.settings
        if self._client is None or self._url != settings.redis_url:
            await self.close()  # the URL changed in a reload
            self._client = connect(settings.redis_url, settings.timeout_seconds)
            self._script = self._client.register_script(SCRIPT)
            self._url = settings.redis_url
        return self._script

    async def _run(
        self,
        mode: str,
        view: View | None = None,
        budgets: Sequence[BudgetConfig] = (),
        claim: Claim = NO_CLAIM,
        restores: list[list[Any]] = [],  # noqa: B006 - never changed
        ids: list[tuple[str, float]] = [],  # noqa: B006 - never changed
    ) -> Answer:
        """Run the script for ``budgets``; raise Unavailable when Redis does not answer,
        InstanceTaken when another exporter holds this one's lease."""
        from redis.exceptions import RedisError  # noqa: PLC0415 - loaded by connect()

        keys, args = self._script_input(mode, view, budgets, claim, restores, ids)
        try:
            script = await self._connected()
            async with asyncio.timeout(self.settings.timeout_seconds * 2):
                raw = await script(keys=keys, args=args)
            answer = _decode(raw)
        except (RedisError, OSError, TimeoutError, ValueError, msgspec.DecodeError) as e:
            self._down(e)
            raise Unavailable(str(e) or type(e).__name__) from None
        if answer.verdict == "conflict":
            if mode in ("publish", "claim"):
                self._taken()
            raise InstanceTaken(self.conflict_reason)
        if mode not in ("ids", "release"):
            self._heard(mode, answer, keys[4:])
        return answer

    def _script_input(
        self,
        mode: str,
        view: View | None,
        budgets: Sequence[BudgetConfig],
        claim: Claim,
        restores: list[list[Any]],
        ids: list[tuple[str, float]],
    ) -> tuple[list[str], list[Any]]:
        """The script's keys and arguments: the fleet's own keys, then one entry key
        and its arguments a budget, then the hold ids to write back."""
        settings = self.settings
        now = self.clock()
        prefix = f"{settings.key_prefix}{{fleet}}:"
        keys = [
            prefix + "epoch",
            prefix + "instances",
            prefix + f"id:{claim.rid or ''}",
            prefix + f"lease:{settings.instance_name}",
        ]
        held_for = max(self.reservations.max_expiry() - now, 0.0)
        args: list[Any] = [
            mode,
            settings.instance_name,
            self.token,
            int(LEASE_INTERVALS * settings.publish_seconds * 1000),
            2 * settings.publish_seconds + 1,
            STALE_INTERVALS * settings.publish_seconds,
            claim.needed[0],
            claim.needed[1],
            claim.ttl,
            "1" if claim.rid else "",
            msgspec.json.encode(restores).decode(),
        ]
        shares = (
            []
            if view is None
            else view.budgets.shares(budgets, view.usage, now, view.flight, self.reservations.held)
        )
        for b, (share, (start, end)) in zip(budgets, shares, strict=True):
            keys.append(self._key(b, start))
            limit_c = -1.0 if b.limit_credits is None else b.limit_credits
            limit_u = -1.0 if b.limit_usd is None else b.limit_usd
            entry = msgspec.json.encode([*share, held_for]).decode()
            args += [limit_c, limit_u, max(end - now, 0) + KEEP_AFTER_PERIOD, entry]
        for held_id, lasts in ids:
            keys.append(prefix + f"id:{held_id}")
            args.append(lasts)
        return keys, args

    def _heard(self, mode: str, answer: Answer, entry_keys: list[str]) -> None:
        """What an answer of Redis says of the fleet: up, settled, how many, a new epoch,
        and (once settled) what the other instances published."""
        if not self.up:
            log.info("the fleet's Redis answers", extra={"instances": answer.instances})
            # It may be another server now (a failover) that lacks the last writes:
            # this exporter's entries are mended by publishing them at once.
            self.wake.set()
        self.up = True
        self.settled = answer.settled
        self.instances = answer.instances
        if answer.epoch != self.epoch:
            if self.epoch:
                log.warning("the fleet's Redis started afresh; publishing again")
                self.wake.set()
            self.epoch = answer.epoch
            self.ids_lost = True
        if answer.settled:  # before, what others published may be missing
            others = answer.others if isinstance(answer.others, list) else []
            for key, o in zip(entry_keys, others, strict=True):
                self.seen[key] = Share(*o)
        if mode == "publish":
            self.restores = self._remember(entry_keys, answer.entries)

    def _taken(self) -> None:
        if not self.conflict:
            log.error(
                "this exporter's name is another's: it stops publishing and is not ready",
                extra={"err": self.conflict_reason},
            )
        self.conflict = True

    def _remember(self, keys: list[str], entries: Any) -> list[list[Any]]:
        """Keep the other instances' entries just read (the highest used seen of each,
        for the current periods only); answer those Redis lost or holds lower, to be
        written back."""
        me = self.settings.instance_name
        found: list[dict[str, list[float]]] = entries if isinstance(entries, list) else []
        remembered: dict[str, dict[str, list[float]]] = {}
        restores: list[list[Any]] = []
        for key, there in zip(keys, found, strict=False):
            before = self.remembered.get(key, {})
            kept = {}
            for who, entry in there.items():
                old = before.get(who)
                if old is not None and (old[0] > entry[0] or old[1] > entry[1]):
                    restores.append([key, who, old])
                    kept[who] = [max(old[0], entry[0]), max(old[1], entry[1]), *entry[2:]]
                else:
                    kept[who] = entry
            for who, old in before.items():
                if who not in there and who != me:
                    restores.append([key, who, old])
                    kept[who] = old
            remembered[key] = kept
        self.remembered = remembered
        return restores

    def _down(self, error: BaseException) -> None:
        if self.up or self.clock() - self._warned > 60:
            self._warned = self.clock()
            log.warning(
                "the fleet's Redis does not answer",
                extra={
                    "err": str(error) or type(error).__name__,
                    "on_unavailable": self.settings.on_unavailable,
                },
            )
        self.up = False

    def _last_seen(self, view: View, budgets: Sequence[BudgetConfig]) -> dict[str, Share]:
        """The other instances' share of these budgets as last seen, by budget name."""
        now = self.clock()
        out = {}
        for b in budgets:
            start = view.budgets.clock.bounds(b.period, now)[0]
            found = self.seen.get(self._key(b, start))
            if found is not None:
                out[b.name] = found
        return out

    async def _elsewhere(self, view: View, budgets: Sequence[BudgetConfig]) -> Mapping[str, Share]:
        """The other instances' share of these budgets: read now, or last seen when
        Redis does not answer (Unavailable raised then only for ``refuse``)."""
        if self.up and budgets:
            try:
                answer = await self._run("read", view, budgets)
                if answer.settled:
                    return self._last_seen(view, budgets)
            except Unavailable:
                pass
        if self.settings.on_unavailable == "refuse":
            raise Unavailable(FLEET_UNAVAILABLE)
        return self._last_seen(view, budgets)

    # -- the answers -----------------------------------------------------------------

    async def check(self, ask: Ask) -> CheckResult:
        """A pre-flight answer over the whole fleet."""
        view = self.view()
        budgets = view.budgets.matching(ask.project, ask.user)
        if self.conflict and budgets:
            return refused(self.reservations.check(view, ask), self.conflict_reason)
        try:
            elsewhere = await self._elsewhere(view, budgets)
        except Unavailable:
            return refused(self.reservations.check(self.view(), ask))
        return self.reservations.check(self.view(), ask, elsewhere)

    async def statuses(self) -> list[dict[str, Any]]:
        """Every budget with the fleet's totals, and this exporter's share as ``local``."""
        view = self.view()
        budgets = view.budgets.config.budgets
        try:
            elsewhere = await self._elsewhere(view, budgets)
        except Unavailable:
            elsewhere = self._last_seen(view, budgets)
        view = self.view()
        local = self.reservations.statuses(view)
        fleet = self.reservations.statuses(view, elsewhere)
        out = []
        for total, mine in zip(fleet, local, strict=True):
            row = msgspec.to_builtins(total)
            row["local"] = msgspec.to_builtins(mine)
            out.append(row)
        return out

    async def decide(
        self, ask: Ask, rid: str | None, ttl: float, strict: bool = False
    ) -> CheckResult | str:
        """A reservation's decision (``Reservations.reserve`` calls it, one at a time):
        granted by the script with this exporter's entry holding it, or refused; the
        reason an id is taken by another instance as text. ``strict`` (the gateway's
        creates) refuses when Redis cannot decide, whatever ``on_unavailable`` says."""
        view = self.view()
        budgets = view.budgets.matching(ask.project, ask.user)
        mine = self.reservations.check(view, ask)  # what is needed; the local view
        if not budgets:
            return mine
        if not self.ready():
            return refused(mine, "this exporter is still reading its logs")
        answer = None
        if self.up and not self.conflict:
            try:
                needed = (mine.credits_needed, mine.usd_needed)
                answer = await self._run("claim", view, budgets, Claim(needed, rid, ttl))
            except Unavailable:
                pass
        if self.conflict:  # it would hold what it cannot publish
            return refused(self.reservations.check(self.view(), ask), self.conflict_reason)
        view = self.view()  # tasks may have used holds while Redis was asked
        elsewhere = self._last_seen(view, budgets)
        if answer is not None and answer.verdict == "taken":
            return f"is held through the fleet's instance {answer.owner!r}"
        if answer is not None and answer.verdict in ("ok", "refused"):
            return self._verdict(answer, budgets, self.reservations.check(view, ask, elsewhere))
        if strict or self.settings.on_unavailable == "refuse":
            return refused(self.reservations.check(view, ask))
        return self.reservations.check(view, ask, elsewhere)

    @staticmethod
    def _verdict(
        answer: Answer, budgets: Sequence[BudgetConfig], result: CheckResult
    ) -> CheckResult:
        """The script's verdict, with the rows and words of a check made on what is here
        now (tasks that used holds meanwhile: the sum is the same)."""
        if answer.verdict == "ok" and not result.allowed:
            reason = "within every matching budget"
            return msgspec.structs.replace(result, allowed=True, reason=reason, refused_by=None)
        if answer.verdict == "refused" and result.allowed:
            name = budgets[answer.refused_by - 1].name
            reason = f"budget {name!r} has no room left in the fleet"
            return msgspec.structs.replace(result, allowed=False, reason=reason, refused_by=name)
        return result

    # -- publishing ------------------------------------------------------------------

    async def publish(self) -> None:
        """Publish this exporter's entry of every budget (under the reservations' lock,
        so that no decision is made between reading the holds and writing them)."""
        async with self.reservations.deciding:
            if self.ids_lost:
                await self._write_ids()
            view = self.view()
            budgets = view.budgets.config.budgets
            await self._run("publish", view, budgets)
            if self.restores:  # what Redis lost of the others, at once
                lost = {"entries": len(self.restores)}
                log.info("writing back the other instances' entries Redis lost", extra=lost)
                await self._run("publish", view, budgets, restores=self.restores)
        self.last_publish = self.clock()

    async def _write_ids(self) -> None:
        """Give Redis back the ids of this exporter's live holds decided by the fleet
        (those with a budget), so that each stays one hold fleet-wide."""
        now = self.clock()
        live = [
            (h.id, h.expires_at - now)
            for h in list(self.reservations.holds.values())
            if h.budgets and h.expires_at > now
        ]
        for i in range(0, len(live), IDS_PER_CALL):
            await self._run("ids", ids=live[i : i + IDS_PER_CALL])
        self.ids_lost = False

    async def start(self) -> None:
        """Take the lease on this exporter's instance name. A lease found taken may be
        this exporter's own before a crash: it is waited out once; still taken, another
        exporter runs under the name and InstanceTaken is raised. With Redis not
        answering, the lease is taken when it does."""
        if not self.enabled:
            return
        settings = self.settings
        deadline = time.monotonic() + (LEASE_INTERVALS + 1) * settings.publish_seconds
        while True:
            try:
                await self._run("lease")
                return
            except InstanceTaken:
                if time.monotonic() > deadline:
                    raise InstanceTaken(
                        f"{self.conflict_reason} (its lease in the fleet's Redis is held): "
                        "give every exporter its own fleet.instance"
                    ) from None
            except Unavailable:
                return
            await asyncio.sleep(settings.publish_seconds / 4)

    async def run(self) -> None:
        """Publish every ``publish_interval`` once the logs are read, and at once when
        Redis comes back or started afresh; until cancelled."""
        while True:
            self.wake.clear()
            if self.enabled and self.ready():
                try:
                    await self.publish()
                except Unavailable:
                    pass
                except RuntimeError:  # an in-process reader changed the usage read
                    continue
            if self.conflict:
                return  # another exporter publishes under this name
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.publish_seconds):
                    await self.wake.wait()

    async def stop(self) -> None:
        """Give the instance name back (a restart need not wait for it), and close."""
        if self.enabled and not self.conflict and self._client is not None:
            with contextlib.suppress(Unavailable):
                await self._run("release")
        await self.close()

    async def close(self) -> None:
        if self._client is not None:
            from redis.exceptions import RedisError  # noqa: PLC0415 - loaded by connect()

            with contextlib.suppress(RedisError, OSError):
                await self._client.aclose()
            self._client = None

    def describe(self) -> dict[str, Any]:
        """The fleet as ``/api/v1/budgets`` shows it."""
        return {
            "instance": self.settings.instance_name,
            "up": self.up,
            "settled": self.settled,
            "instances": self.instances,
            "on_unavailable": self.settings.on_unavailable,
            "instance_conflict": self.conflict,
        }


def refused(result: CheckResult, why: str = FLEET_UNAVAILABLE) -> CheckResult:
    """``result`` turned into a refusal for a reason of the fleet's."""
    return msgspec.structs.replace(result, allowed=False, reason=why, refused_by=None)
