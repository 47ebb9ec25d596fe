"""Rendering a ledger snapshot as Prometheus metric families.

A scrape copies the ledger's tables under the lock and renders outside it, so
it never waits on parsing and parsing never waits on it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from exporter import __version__
from exporter.daemon import Status
from exporter.ledger import Snapshot


def _counter(
    name: str, doc: str, labels: list[str], table: Mapping[Any, float], unit: str = ""
) -> Metric:
    family = CounterMetricFamily(name, doc, labels=labels, unit=unit)
    for key in sorted(table):
        family.add_metric(list(key) if isinstance(key, tuple) else [key], table[key])
    return family


def _gauge(name: str, doc: str, value: float, unit: str = "") -> Metric:
    return GaugeMetricFamily(name, doc, value=value, unit=unit)


def _opt(value: str | None) -> str:
    return "" if value is None else value


class KlingCollector(Collector):
    def __init__(self, source: Callable[[], tuple[Snapshot, Status]]) -> None:
        self.source = source

    def describe(self) -> list[Metric]:
        return []  # no collect() at registration time

    def collect(self) -> Iterator[Metric]:
        snap, status = self.source()
        yield from self._usage(snap)
        yield from self._budgets(snap)
        yield from self._self(snap, status)

    def _usage(self, s: Snapshot) -> Iterator[Metric]:
        yield _counter(
            "kling_tasks_submitted_total",
            "Tasks submitted to Kling.",
            ["project", "model", "mode"],
            s.submitted,
        )
        yield _counter(
            "kling_tasks_completed_total",
            "Tasks that reached a final Kling status (succeed or failed).",
            ["project", "model", "status"],
            s.completed,
        )
        yield _counter(
            "kling_task_errors_total",
            "Tasks that ended in an error before Kling returned a status.",
            ["project", "error_type"],
            s.errors,
        )
        yield _counter(
            "kling_credits_used_total",
            "Kling credits charged: credits_used where logged, else priced.",
            ["project", "model"],
            s.credits,
        )
        yield _counter(
            "kling_cost_usd_total",
            "Cost of the credits charged, in US dollars.",
            ["project", "model"],
            s.usd,
        )
        yield _counter(
            "kling_video_seconds_total",
            "Seconds of video requested.",
            ["project", "model"],
            s.video_seconds,
        )
        hist = HistogramMetricFamily(
            "kling_task_generation_seconds",
            "Time Kling took to generate a succeeded task.",
            labels=["model"],
            unit="seconds",
        )
        for model in sorted(s.generation):
            buckets, total = s.generation[model]
            hist.add_metric([model], buckets, total)
        yield hist
        inflight = GaugeMetricFamily(
            "kling_tasks_in_flight",
            "Tasks submitted and not yet completed or failed.",
            labels=["project"],
        )
        for project in sorted(s.in_flight):
            inflight.add_metric([project], s.in_flight[project])
        yield inflight
        yield _counter(
            "kling_tasks_expired_total",
            "Unfinished tasks forgotten after tasks.ttl without a completion.",
            ["project"],
            s.expired,
        )

    def _budgets(self, s: Snapshot) -> Iterator[Metric]:
        labels = ["budget", "period"]
        fams = {
            name: GaugeMetricFamily(f"kling_budget_{name}", doc, labels=labels)
            for name, doc in (
                ("limit_credits", "Configured budget limit in credits."),
                ("limit_usd", "Configured budget limit in US dollars."),
                ("used_credits", "Credits used in the budget's current period."),
                ("used_usd", "US dollars used in the budget's current period."),
                ("remaining_credits", "Credits left in the current period (never below 0)."),
                ("remaining_usd", "US dollars left in the current period (never below 0)."),
                (
                    "utilization_ratio",
                    "Share of the budget used: the larger of credits and dollars (1 = 100%).",
                ),
                ("alert_threshold_ratio", "Utilization at which the budget warns."),
                ("period_start_timestamp_seconds", "Start of the budget's current period."),
                ("period_end_timestamp_seconds", "End of the budget's current period."),
            )
        }
        info = GaugeMetricFamily(
            "kling_budget_info",
            "What each budget matches.",
            labels=["budget", "period", "project", "user"],
        )
        for b in sorted(s.budgets, key=lambda b: b.name):
            key = [b.name, b.period]
            values: dict[str, float | None] = {
                "limit_credits": b.limit_credits,
                "limit_usd": b.limit_usd,
                "used_credits": b.used_credits,
                "used_usd": b.used_usd,
                "remaining_credits": b.remaining_credits,
                "remaining_usd": b.remaining_usd,
                "utilization_ratio": b.utilization,
                "alert_threshold_ratio": b.alert_threshold,
                "period_start_timestamp_seconds": b.period_start,
                "period_end_timestamp_seconds": b.period_end,
            }
            for name, value in values.items():
                if value is not None:
                    fams[name].add_metric(key, value)
            info.add_metric([b.name, b.period, _opt(b.project), _opt(b.user)], 1)
        yield from fams.values()
        yield info

    def _self(self, s: Snapshot, st: Status) -> Iterator[Metric]:
        build = GaugeMetricFamily(
            "kling_exporter_build_info", "The exporter's version; always 1.", labels=["version"]
        )
        build.add_metric([__version__], 1)
        yield build
        yield CounterMetricFamily(
            "kling_log_lines_read_total", "Log lines read.", value=s.lines_read
        )
        yield _counter(
            "kling_log_lines_invalid_total",
            "Log lines skipped as invalid, by reason.",
            ["reason"],
            s.invalid,
        )
        yield CounterMetricFamily(
            "kling_log_read_bytes_total", "Bytes of complete log lines read.", value=s.bytes_read
        )
        yield _gauge(
            "kling_log_files_watched", "Log files matching the configured globs.", st.files_watched
        )
        yield CounterMetricFamily(
            "kling_events_duplicate_total",
            "Events seen again for a task and counted once.",
            value=s.duplicates,
        )
        yield _gauge(
            "kling_last_event_timestamp_seconds",
            "Time of the newest event read (0 before any).",
            s.last_event_ts,
        )
        yield _counter(
            "kling_label_overflow_total",
            "Events whose label value was folded into __other__ past the limit.",
            ["label"],
            s.label_overflow,
        )
        yield _gauge(
            "kling_tasks_tracked", "Tasks held in the index for joins and dedup.", s.tasks_tracked
        )
        yield _gauge(
            "kling_exporter_ready",
            "1 once the initial read of the logs is done.",
            1 if st.ready else 0,
        )
        yield _gauge(
            "kling_config_last_reload_successful",
            "1 if the last config (re)load succeeded.",
            1 if st.reload_successful else 0,
        )
        yield _gauge(
            "kling_config_last_reload_success_timestamp_seconds",
            "Time of the last successful config (re)load.",
            st.reload_success_ts,
        )
        yield _gauge(
            "kling_state_last_save_timestamp_seconds",
            "Time the state was last saved (0 before any).",
            st.state_save_ts,
        )
