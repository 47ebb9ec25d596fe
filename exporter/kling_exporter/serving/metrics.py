"""The HTTP process's own metrics, served beside the reader's scrape: the holds, the
callbacks, Kling's account, the fleet and the gateway. Each is read from plain figures
the server gathers at the scrape, so this module imports none of those services."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from kling_exporter.budgets import Reserved
from kling_exporter.collector import Family, Key, keyed
from kling_exporter.model import PACK_STATES

# The labels of a budget's families, as the reader's table has them.
BUDGET = ("budget", "period")


class PackFigures(NamedTuple):
    """One resource pack as Kling last reported it (expiry in seconds)."""

    id: str
    name: str
    type: str
    total: float
    remaining: float
    expiry: float
    status: str


class AccountFigures(NamedTuple):
    packs: Sequence[PackFigures]
    errors: Mapping[str, float]
    last_success: float


class FleetFigures(NamedTuple):
    up: bool
    instances: int
    last_publish: float
    conflict: bool


class GatewayFigures(NamedTuple):
    outcomes: Mapping[tuple[str, str], float]
    # By route: the histogram's cumulative buckets and its sum.
    durations: Mapping[str, tuple[list[tuple[str, int]], float]]


class Side(NamedTuple):
    """What the HTTP process's families are read from: each budget with what its
    holds keep, the outcomes of holds and callbacks, and the figures of each feature
    that is on (None when it is off: Kling's account without keys, the fleet without a
    Redis URL, the gateway disabled)."""

    budgets: Sequence[Reserved]
    reservations: Mapping[str, float]
    callbacks: Mapping[str, float]
    account: AccountFigures | None
    fleet: FleetFigures | None
    gateway: GatewayFigures | None


class SideSpec(NamedTuple):
    """One metric the HTTP process serves beside the reader's; ``shown`` says whether
    its feature is on."""

    name: str
    type: str
    doc: str
    labels: tuple[str, ...]
    read: Callable[[Side], Mapping[Any, Any]]
    shown: Callable[[Side], bool] = lambda side: True
    unit: str = ""


def _account(side: Side) -> AccountFigures:
    assert side.account is not None  # read only where shown
    return side.account


def _fleet(side: Side) -> FleetFigures:
    assert side.fleet is not None
    return side.fleet


def _gateway(side: Side) -> GatewayFigures:
    assert side.gateway is not None
    return side.gateway


def _account_on(side: Side) -> bool:
    return side.account is not None


def _fleet_on(side: Side) -> bool:
    return side.fleet is not None


def _gateway_on(side: Side) -> bool:
    return side.gateway is not None


def _packs(read: Callable[[PackFigures], float]) -> Callable[[Side], dict[Key, float]]:
    """One figure of every resource pack Kling last reported, by pack."""
    return lambda side: {(p.id, p.name, p.type): read(p) for p in _account(side).packs}


def _pack_states(side: Side) -> dict[Key, float]:
    return {
        (p.id, p.name, p.type, state): float(p.status == state)
        for p in _account(side).packs
        for state in PACK_STATES
    }


def _reserved(field: str) -> Callable[[Side], dict[Key, float]]:
    return lambda side: {(b.name, b.period): getattr(b, field) for b in side.budgets}


PACK = ("pack_id", "pack_name", "pack_type")


SIDE_METRICS: tuple[SideSpec, ...] = (
    SideSpec(
        "kling_budget_reserved_credits",
        "gauge",
        "Credits held by live reservations that the budget matches.",
        BUDGET,
        _reserved("reserved_credits"),
    ),
    SideSpec(
        "kling_budget_reserved_usd",
        "gauge",
        "US dollars held by live reservations that the budget matches.",
        BUDGET,
        _reserved("reserved_usd"),
    ),
    SideSpec(
        "kling_reservations",
        "counter",
        "Reservations granted, refused, released and expired; tasks that consumed a "
        "reservation, and tasks that named none live (unknown).",
        ("outcome",),
        lambda side: keyed(side.reservations),
    ),
    SideSpec(
        "kling_callbacks",
        "counter",
        "Kling task callbacks: recorded to the journal, acknowledged without a count "
        "(submitted, processing), refused (unauthorized, invalid) or not written "
        "(unavailable: answered 503, Kling calls again).",
        ("outcome",),
        lambda side: keyed(side.callbacks),
    ),
    SideSpec(
        "kling_account_resource_pack_total_units",
        "gauge",
        "Units a resource pack was bought with.",
        PACK,
        _packs(lambda p: p.total),
        _account_on,
    ),
    SideSpec(
        "kling_account_resource_pack_remaining_units",
        "gauge",
        "Units left in a resource pack, as Kling reports them (lagging up to 12 h).",
        PACK,
        _packs(lambda p: p.remaining),
        _account_on,
    ),
    SideSpec(
        "kling_account_resource_pack_expiry_timestamp_seconds",
        "gauge",
        "When a resource pack expires; units left then are forfeited.",
        PACK,
        _packs(lambda p: p.expiry),
        _account_on,
    ),
    SideSpec(
        "kling_account_resource_pack_status",
        "gauge",
        "A resource pack's status: 1 for the current one of toBeOnline, online, expired, runOut.",
        (*PACK, "status"),
        _pack_states,
        _account_on,
    ),
    SideSpec(
        "kling_account_poll_errors",
        "counter",
        "Failed polls of Kling's account API, by reason.",
        ("reason",),
        lambda side: keyed(_account(side).errors),
        _account_on,
    ),
    SideSpec(
        "kling_account_last_success_timestamp_seconds",
        "gauge",
        "When Kling's account API last answered (0 before it ever did).",
        (),
        lambda side: {(): _account(side).last_success},
        _account_on,
    ),
    SideSpec(
        "kling_fleet_up",
        "gauge",
        "Whether the fleet's Redis answered this exporter's last request (1) or not.",
        (),
        lambda side: {(): float(_fleet(side).up)},
        _fleet_on,
    ),
    SideSpec(
        "kling_fleet_instances",
        "gauge",
        "Exporters that published to the fleet's Redis lately, this one included.",
        (),
        lambda side: {(): float(_fleet(side).instances)},
        _fleet_on,
    ),
    SideSpec(
        "kling_fleet_last_publish_timestamp_seconds",
        "gauge",
        "When this exporter last published its usage to the fleet (0: never).",
        (),
        lambda side: {(): _fleet(side).last_publish},
        _fleet_on,
    ),
    SideSpec(
        "kling_fleet_instance_conflict",
        "gauge",
        "Whether another exporter holds this one's fleet.instance (1): this one "
        "then publishes nothing, grants nothing and is not ready.",
        (),
        lambda side: {(): float(_fleet(side).conflict)},
        _fleet_on,
    ),
    SideSpec(
        "kling_gateway_requests",
        "counter",
        "Requests through the gateway by route (create, query, other) and outcome: "
        "forwarded, refused by a budget, bad_request (answered by the gateway), "
        "upstream_error (Kling answered an error), transport_error (Kling not "
        "reached: 502, or too slow: 504), unavailable (not held or journalled: 503).",
        ("route", "outcome"),
        lambda side: keyed(_gateway(side).outcomes),
        _gateway_on,
    ),
    SideSpec(
        "kling_gateway_upstream_duration_seconds",
        "histogram",
        "Time from sending a request on to Kling until its answer's headers (its "
        "whole body, for create and query), by route.",
        ("route",),
        lambda side: {(r,): d for r, d in _gateway(side).durations.items()},
        _gateway_on,
        "seconds",
    ),
)


def side_families(side: Side, samples: bool = True) -> list[Family]:
    """The HTTP process's families of features that are on, read (or, for
    ``describe()``, without samples, which reads no budget)."""
    return [
        Family(
            spec.name,
            spec.type,
            spec.doc,
            spec.labels,
            spec.read(side) if samples else {},
            spec.unit,
        )
        for spec in SIDE_METRICS
        if spec.shown(side)
    ]
