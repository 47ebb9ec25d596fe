"""The reader's metrics, declared once: a table of specs (name, type, help, labels, how
to read the value from a snapshot), from which come the reader's scrape, ``describe()``,
and the metric list of docs/metrics.md (a test checks it). The HTTP process's own
families are in ``serving.metrics``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from kling_exporter import __version__
from kling_exporter.accounting.counters import Tracker
from kling_exporter.budgets import BudgetStatus
from kling_exporter.collector import Family, Key, keyed
from kling_exporter.model import Status
from kling_exporter.views import Snapshot


def _opt(value: str | None) -> str:
    return "" if value is None else value


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
        lambda s, st: keyed(s.in_flight),
    ),
    Spec(
        "kling_tasks_expired",
        "counter",
        "Unfinished tasks forgotten after tasks.ttl (or past tasks.max_tasks) without a "
        "completion; each is charged its estimate.",
        ("project",),
        lambda s, st: keyed(s.expired),
    ),
    Spec(
        "kling_tasks_expired_credits",
        "counter",
        "Credits charged to expired tasks at their estimate (their price, or their usage "
        "line's credits); part of kling_credits_used_total.",
        ("project",),
        lambda s, st: keyed(s.expired_credits),
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
        lambda s, st: keyed(s.invalid),
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
        lambda s, st: keyed(st.glob_files),
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
        lambda s, st: keyed(s.timestamps_clamped),
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
        lambda s, st: keyed(s.label_overflow),
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


# The families a scrape reads from a ``Tracker``'s views (by the view's name), with the
# keys that changed since the last scrape.
TRACKED_FAMILIES = {
    "kling_tasks_submitted": "submitted",
    "kling_tasks_completed": "completed",
    "kling_credits_used": "credits",
    "kling_cost_usd": "usd",
    "kling_video_seconds": "video_seconds",
    "kling_tasks_in_flight": "in_flight",
    "kling_tasks_expired": "expired",
    "kling_tasks_expired_credits": "expired_credits",
}
# The budget families, by the BudgetStatus field each reads (``BudgetViews``).
BUDGET_FAMILIES = {f"kling_budget_{name}": field for name, field, _ in BUDGET_FIELDS}
BUDGET_INFO = "kling_budget_info"


class BudgetViews:
    """The budget families' samples kept from one scrape to the next: each budget's
    status is compared with the last one (one comparison of two structs), and only a
    budget that changed has its samples set again, with its keys in ``changed``."""

    def __init__(self) -> None:
        self.last: list[BudgetStatus] = []
        self.views: dict[str, dict[Key, float]] = {}
        self.changed: dict[str, set[Key]] = {}
        self.reset()

    def reset(self) -> None:
        """Forget the last statuses: the next ``update`` fills new views."""
        self.last = []
        self.views = {name: {} for name in (*BUDGET_FAMILIES, BUDGET_INFO)}
        self.changed = {name: set() for name in self.views}

    def take(self) -> None:
        for keys in self.changed.values():
            keys.clear()

    def update(self, statuses: list[BudgetStatus]) -> None:
        last = self.last
        if [(b.name, b.period) for b in last] != [(b.name, b.period) for b in statuses]:
            self.reset()  # budgets came, went or moved: new views, read whole
            last = []
        views, changed = self.views, self.changed
        for i, b in enumerate(statuses):
            old = last[i] if last else None
            if b == old:
                continue
            key = (b.name, b.period)
            for name, field in BUDGET_FAMILIES.items():
                value = getattr(b, field)
                if old is None or value != getattr(old, field) or not value:
                    if value is None:
                        views[name].pop(key, None)
                    else:
                        views[name][key] = value
                    changed[name].add(key)
            info = (b.name, b.period, _opt(b.project), _opt(b.user))
            if old is not None:
                before = (old.name, old.period, _opt(old.project), _opt(old.user))
                if before != info:
                    views[BUDGET_INFO].pop(before, None)
                    changed[BUDGET_INFO].add(before)
            views[BUDGET_INFO][info] = 1
            changed[BUDGET_INFO].add(info)
        self.last = statuses


def families(
    s: Snapshot, st: Status, tracker: Tracker | None = None, budgets: BudgetViews | None = None
) -> list[Family]:
    """Every metric of a scrape, in exposition order: the table above, read; the
    counters from ``tracker``'s views and the budgets from ``budgets``' where given
    (the snapshot's are then not read)."""
    out = []
    for spec in METRICS:
        found: tuple[dict[Key, float], set[Key]] | None = None
        view = TRACKED_FAMILIES.get(spec.name)
        if tracker is not None and view is not None:
            found = tracker.views[view], tracker.changed[view]
        elif budgets is not None and spec.name in budgets.views:
            found = budgets.views[spec.name], budgets.changed[spec.name]
        if found is None:
            samples = spec.read(s, st)
            out.append(Family(spec.name, spec.type, spec.doc, spec.labels, samples, spec.unit))
        else:
            samples, changed = found
            out.append(
                Family(spec.name, spec.type, spec.doc, spec.labels, samples, spec.unit, changed)
            )
    return out
