"""The metrics the exporter serves, declared once: a table of specs (name, type, help,
labels, how to read the value from a snapshot), from which come the reader's scrape,
``describe()``, and the metric list of docs/metrics.md (a test checks it); and the families the
HTTP process keeps for reservations.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from kling_exporter import __version__
from kling_exporter.budgets import BudgetStatus
from kling_exporter.collector import Family, Key
from kling_exporter.model import PACK_STATES, Snapshot, Status

if TYPE_CHECKING:
    from kling_exporter.account import Account, Pack
    from kling_exporter.callbacks import Callbacks
    from kling_exporter.fleet import Fleet
    from kling_exporter.gateway import Gateway
    from kling_exporter.reservations import Reservations


def _opt(value: str | None) -> str:
    return "" if value is None else value


def _keyed(table: Mapping[Any, float]) -> dict[Key, float]:
    return {k if isinstance(k, tuple) else (k,): v for k, v in table.items()}


Read = Callable[[Snapshot, Status], Mapping[Any, Any]]


class Spec(NamedTuple):
    """One metric as the exporter declares it: from these rows come the exposition, the
    collector's ``describe`` and docs/metrics.md (checked by a test)."""

    name: str  # counters without the _total suffix
    type: str  # counter | gauge | histogram
    doc: str
    labels: tuple[str, ...]
    read: Read  # the samples, keyed by tuples of label values
    unit: str = ""


def _one(read: Callable[[Snapshot, Status], float]) -> Read:
    return lambda s, st: {(): read(s, st)}


def _budget(field: str) -> Read:
    """One BudgetStatus field of every budget that has it (a limit may be absent)."""

    def read(s: Snapshot, st: Status) -> dict[Key, float]:
        out: dict[Key, float] = {}
        for b in s.budgets:
            value = getattr(b, field)
            if value is not None:
                out[(b.name, b.period)] = value
        return out

    return read


def _budget_info(s: Snapshot, st: Status) -> dict[Key, float]:
    return {(b.name, b.period, _opt(b.project), _opt(b.user)): 1 for b in s.budgets}


BUDGET = ("budget", "period")
BUDGET_FIELDS = (  # metric name after kling_budget_, BudgetStatus field, help
    ("limit_credits", "limit_credits", "Configured budget limit in credits."),
    ("limit_usd", "limit_usd", "Configured budget limit in US dollars."),
    ("used_credits", "used_credits", "Credits used in the budget's current period."),
    ("used_usd", "used_usd", "US dollars used in the budget's current period."),
    (
        "remaining_credits",
        "remaining_credits",
        "Credits left in the current period: limit minus used, negative once over.",
    ),
    (
        "remaining_usd",
        "remaining_usd",
        "US dollars left in the current period: limit minus used, negative once over.",
    ),
    (
        "utilization_ratio",
        "utilization",
        "Share of the budget used: the larger of credits and dollars (1 = 100%).",
    ),
    ("alert_threshold_ratio", "alert_threshold", "Utilization at which the budget warns."),
    ("period_start_timestamp_seconds", "period_start", "Start of the budget's current period."),
    ("period_end_timestamp_seconds", "period_end", "End of the budget's current period."),
    (
        "in_flight_credits",
        "in_flight_credits",
        "Estimated credits of tasks submitted and not yet finished that the budget "
        "matches; pre-flight answers count them beside what is used.",
    ),
    ("in_flight_usd", "in_flight_usd", "US dollars of the same tasks in flight."),
)

METRICS: tuple[Spec, ...] = (
    Spec(
        "kling_tasks_submitted",
        "counter",
        "Tasks submitted to Kling.",
        ("project", "model", "mode"),
        lambda s, st: s.submitted,
    ),
    Spec(
        "kling_tasks_completed",
        "counter",
        "Tasks that reached a final Kling status (succeed or failed).",
        ("project", "model", "status"),
        lambda s, st: s.completed,
    ),
    Spec(
        "kling_task_errors",
        "counter",
        "Tasks that ended in an error before Kling returned a status.",
        ("project", "error_type"),
        lambda s, st: s.errors,
    ),
    Spec(
        "kling_credits_used",
        "counter",
        "Kling credits charged: credits_used where logged, else priced.",
        ("project", "model"),
        lambda s, st: s.credits,
    ),
    Spec(
        "kling_cost_usd",
        "counter",
        "Cost of the credits charged, in US dollars.",
        ("project", "model"),
        lambda s, st: s.usd,
    ),
    Spec(
        "kling_video_seconds",
        "counter",
        "Seconds of video generated: succeeded video tasks' clip length.",
        ("project", "model"),
        lambda s, st: s.video_seconds,
    ),
    Spec(
        "kling_task_generation_seconds",
        "histogram",
        "Time Kling took to generate a succeeded task.",
        ("model",),
        lambda s, st: {(m,): v for m, v in s.generation.items()},
        unit="seconds",
    ),
    Spec(
        "kling_tasks_in_flight",
        "gauge",
        "Tasks submitted and not yet completed or failed.",
        ("project",),
        lambda s, st: _keyed(s.in_flight),
    ),
    Spec(
        "kling_tasks_expired",
        "counter",
        "Unfinished tasks forgotten after tasks.ttl (or past tasks.max_tasks) without a "
        "completion; each is charged its estimate.",
        ("project",),
        lambda s, st: _keyed(s.expired),
    ),
    Spec(
        "kling_tasks_expired_credits",
        "counter",
        "Credits charged to expired tasks at their estimate (their price, or their usage "
        "line's credits); part of kling_credits_used_total.",
        ("project",),
        lambda s, st: _keyed(s.expired_credits),
    ),
    *(
        Spec(f"kling_budget_{name}", "gauge", doc, BUDGET, _budget(field))
        for name, field, doc in BUDGET_FIELDS
    ),
    Spec(
        "kling_budget_info",
        "gauge",
        "What each budget matches.",
        ("budget", "period", "project", "user"),
        _budget_info,
    ),
    Spec(
        "kling_exporter_build_info",
        "gauge",
        "The exporter's version; always 1.",
        ("version",),
        lambda s, st: {(__version__,): 1},
    ),
    Spec(
        "kling_log_lines_read", "counter", "Log lines read.", (), _one(lambda s, st: s.lines_read)
    ),
    Spec(
        "kling_log_lines_invalid",
        "counter",
        "Log lines skipped as invalid, by reason.",
        ("reason",),
        lambda s, st: _keyed(s.invalid),
    ),
    Spec(
        "kling_log_read_bytes",
        "counter",
        "Bytes of complete log lines read.",
        (),
        _one(lambda s, st: s.bytes_read),
    ),
    Spec(
        "kling_log_files_watched",
        "gauge",
        "Log files matching the configured globs.",
        (),
        _one(lambda s, st: st.files_watched),
    ),
    Spec(
        "kling_log_glob_files",
        "gauge",
        "Files each configured log glob matches (0: the glob finds nothing, a likely "
        "mistake in logs.paths).",
        ("glob",),
        lambda s, st: _keyed(st.glob_files),
    ),
    Spec(
        "kling_events_duplicate",
        "counter",
        "Events seen again for a task and counted once.",
        (),
        _one(lambda s, st: s.duplicates),
    ),
    Spec(
        "kling_events_orphaned",
        "counter",
        "Completions and errors counted without their submission, after waiting for it.",
        (),
        _one(lambda s, st: s.orphaned),
    ),
    Spec(
        "kling_events_awaiting_submission",
        "gauge",
        "Completions, errors and usage lines read before their submission, waiting for it.",
        (),
        _one(lambda s, st: s.awaiting_submission),
    ),
    Spec(
        "kling_log_timestamps_clamped",
        "counter",
        "Event times replaced by the time of reading: too far ahead, or before 2000.",
        ("reason",),
        lambda s, st: _keyed(s.timestamps_clamped),
    ),
    Spec(
        "kling_last_event_timestamp_seconds",
        "gauge",
        "Time of the newest event read (0 before any).",
        (),
        _one(lambda s, st: s.last_event_ts),
    ),
    Spec(
        "kling_label_overflow",
        "counter",
        "Events whose label value was folded into __other__ past the limit.",
        ("label",),
        lambda s, st: _keyed(s.label_overflow),
    ),
    Spec(
        "kling_tasks_tracked",
        "gauge",
        "Tasks held in the index for joins and dedup.",
        (),
        _one(lambda s, st: s.tasks_tracked),
    ),
    Spec(
        "kling_tasks_tracked_limit",
        "gauge",
        "The most tasks the index holds (tasks.max_tasks).",
        (),
        _one(lambda s, st: s.tasks_limit),
    ),
    Spec(
        "kling_tasks_evicted",
        "counter",
        "Tasks pushed out of the index by tasks.max_tasks before tasks.ttl (an unfinished "
        "one is charged its estimate; a late event of one is still joined, from a brief "
        "record).",
        (),
        _one(lambda s, st: s.tasks_evicted),
    ),
    Spec(
        "kling_exporter_ready",
        "gauge",
        "1 once the initial read of the logs is done.",
        (),
        _one(lambda s, st: 1 if st.ready else 0),
    ),
    Spec(
        "kling_config_last_reload_successful",
        "gauge",
        "1 if the last config (re)load succeeded.",
        (),
        _one(lambda s, st: 1 if st.reload_successful else 0),
    ),
    Spec(
        "kling_config_last_reload_success_timestamp_seconds",
        "gauge",
        "Time of the last successful config (re)load.",
        (),
        _one(lambda s, st: st.reload_success_ts),
    ),
    Spec(
        "kling_state_last_save_timestamp_seconds",
        "gauge",
        "Time the state was last saved (0 before any).",
        (),
        _one(lambda s, st: st.state_save_ts),
    ),
    Spec(
        "kling_state_save_interval_seconds",
        "gauge",
        "How often the state is saved (0 when no state is kept).",
        (),
        _one(lambda s, st: st.state_save_interval),
    ),
    Spec(
        "kling_log_reader_up",
        "gauge",
        "1 while the log reader runs; 0 once it has failed (the process needs a restart).",
        (),
        _one(lambda s, st: 1 if st.reader_up else 0),
    ),
    Spec(
        "kling_log_last_poll_timestamp_seconds",
        "gauge",
        "Time the reader last finished looking at every log file.",
        (),
        _one(lambda s, st: st.last_poll_ts),
    ),
    Spec(
        "kling_log_unread_bytes",
        "gauge",
        "Bytes in the followed log files beyond what has been read.",
        (),
        _one(lambda s, st: st.unread_bytes),
    ),
    Spec(
        "kling_log_open_files",
        "gauge",
        "Log files held open; idle ones are closed and opened again when they grow.",
        (),
        _one(lambda s, st: st.open_files),
    ),
)


def declared() -> list[Family]:
    """The table's families, without samples."""
    return [Family(spec.name, spec.type, spec.doc, spec.labels, {}, spec.unit) for spec in METRICS]


def families(s: Snapshot, st: Status) -> list[Family]:
    """Every metric of a scrape, in exposition order: the table above, read."""
    return [
        Family(spec.name, spec.type, spec.doc, spec.labels, spec.read(s, st), spec.unit)
        for spec in METRICS
    ]


# -- the HTTP process's own families ---------------------------------------------------


class Side(NamedTuple):
    """What the HTTP process's families are read from: the holds and what they keep of
    each budget, the callbacks, Kling's account and the fleet."""

    reservations: Reservations
    budgets: list[BudgetStatus]
    callbacks: Callbacks
    account: Account
    fleet: Fleet
    gateway: Gateway


class SideSpec(NamedTuple):
    """One metric the HTTP process serves beside the reader's; ``shown`` says whether
    its feature is on (Kling's account with keys, the fleet with a Redis URL)."""

    name: str
    type: str
    doc: str
    labels: tuple[str, ...]
    read: Callable[[Side], Mapping[Any, Any]]
    shown: Callable[[Side], bool] = lambda side: True
    unit: str = ""


def _account_on(side: Side) -> bool:
    return side.account.enabled()


def _fleet_on(side: Side) -> bool:
    return side.fleet.enabled


def _gateway_on(side: Side) -> bool:
    return side.gateway.settings.enabled


def _packs(read: Callable[[Pack], float]) -> Callable[[Side], dict[Key, float]]:
    """One figure of every resource pack Kling last reported, by pack."""
    return lambda side: {
        (p.resource_pack_id, p.resource_pack_name, p.resource_pack_type): read(p)
        for p in side.account.packs
    }


def _pack_states(side: Side) -> dict[Key, float]:
    return {
        (p.resource_pack_id, p.resource_pack_name, p.resource_pack_type, state): float(
            p.status == state
        )
        for p in side.account.packs
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
        lambda side: _keyed(side.reservations.outcomes),
    ),
    SideSpec(
        "kling_callbacks",
        "counter",
        "Kling task callbacks: recorded to the journal, acknowledged without a count "
        "(submitted, processing), refused (unauthorized, invalid) or not written "
        "(unavailable: answered 503, Kling calls again).",
        ("outcome",),
        lambda side: _keyed(side.callbacks.outcomes),
    ),
    SideSpec(
        "kling_account_resource_pack_total_units",
        "gauge",
        "Units a resource pack was bought with.",
        PACK,
        _packs(lambda p: p.total_quantity),
        _account_on,
    ),
    SideSpec(
        "kling_account_resource_pack_remaining_units",
        "gauge",
        "Units left in a resource pack, as Kling reports them (lagging up to 12 h).",
        PACK,
        _packs(lambda p: p.remaining_quantity),
        _account_on,
    ),
    SideSpec(
        "kling_account_resource_pack_expiry_timestamp_seconds",
        "gauge",
        "When a resource pack expires; units left then are forfeited.",
        PACK,
        _packs(lambda p: p.invalid_time / 1000),
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
        lambda side: _keyed(side.account.errors),
        _account_on,
    ),
    SideSpec(
        "kling_account_last_success_timestamp_seconds",
        "gauge",
        "When Kling's account API last answered (0 before it ever did).",
        (),
        lambda side: {(): side.account.last_success},
        _account_on,
    ),
    SideSpec(
        "kling_fleet_up",
        "gauge",
        "Whether the fleet's Redis answered this exporter's last request (1) or not.",
        (),
        lambda side: {(): float(side.fleet.up)},
        _fleet_on,
    ),
    SideSpec(
        "kling_fleet_instances",
        "gauge",
        "Exporters that published to the fleet's Redis lately, this one included.",
        (),
        lambda side: {(): float(side.fleet.instances)},
        _fleet_on,
    ),
    SideSpec(
        "kling_fleet_last_publish_timestamp_seconds",
        "gauge",
        "When this exporter last published its usage to the fleet (0: never).",
        (),
        lambda side: {(): side.fleet.last_publish},
        _fleet_on,
    ),
    SideSpec(
        "kling_fleet_instance_conflict",
        "gauge",
        "Whether another exporter holds this one's fleet.instance (1): this one "
        "then publishes nothing, grants nothing and is not ready.",
        (),
        lambda side: {(): float(side.fleet.conflict)},
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
        lambda side: _keyed(side.gateway.outcomes),
        _gateway_on,
    ),
    SideSpec(
        "kling_gateway_upstream_duration_seconds",
        "histogram",
        "Time from sending a request on to Kling until its answer's headers (its "
        "whole body, for create and query), by route.",
        ("route",),
        lambda side: {(r,): (h.cumulative(), h.sum) for r, h in side.gateway.durations.items()},
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
