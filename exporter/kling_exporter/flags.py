"""The command line's flags: every subcommand and option, and how their values are read."""

from __future__ import annotations

import argparse
import datetime as dt
from collections.abc import Callable

from kling_exporter import __version__
from kling_exporter.logsetup import LEVELS
from kling_exporter.serving.connections import Limits
from kling_exporter.vocabulary import KINDS, normalize_mode, parse_duration

DEFAULT_LISTEN = ":10177"
# The demo's defaults, which the demo's budgets are sized for (a test holds them to the
# README's promise): with an hour of history at 0.2 tasks/s, research-daily warns at
# once and marketing-daily crosses 80% and then 100% within about half an hour.
DEFAULT_RATE = 0.2
DEFAULT_BACKFILL_HOURS = 1.0
DEFAULT_SEED = 0
COMMANDS = (
    "serve",
    "report",
    "costs",
    "export",
    "estimate",
    "check-config",
    "demo",
    "healthcheck",
)
# The container's health check asks this (set it where TLS or another port is used).
HEALTH_URL_ENV = "KLING_EXPORTER_HEALTH_URL"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config.file",
        dest="config_file",
        metavar="FILE",
        help="YAML configuration file (default: built-in defaults)",
    )
    p.add_argument(
        "--log.level",
        dest="log_level",
        choices=LEVELS,
        default="info",
        help="only log messages at or above this level (default: info)",
    )
    p.add_argument(
        "--log.format",
        dest="log_format",
        choices=("logfmt", "json"),
        default="logfmt",
        help="log line format (default: logfmt)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kling-exporter",
        description="Prometheus exporter and budget guard for Kling AI video generation. "
        "Without a subcommand it serves.",
    )
    parser.add_argument("--version", action="version", version=f"kling-exporter {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _serve(sub.add_parser("serve", help="tail the logs and serve metrics and the budget API"))
    _reports(sub)
    _demo(sub.add_parser("demo", help="write realistic synthetic events and serve them"))
    return parser


Subparsers = argparse._SubParsersAction


def _serve(serve: argparse.ArgumentParser) -> None:
    _common(serve)
    serve.add_argument(
        "--web.listen-address",
        dest="listen",
        default=DEFAULT_LISTEN,
        metavar="ADDR",
        help=f"address to listen on, HOST:PORT (default: {DEFAULT_LISTEN})",
    )
    serve.add_argument(
        "--web.telemetry-path",
        dest="telemetry_path",
        default="/metrics",
        metavar="PATH",
        help="path of the metrics (default: /metrics)",
    )
    serve.add_argument(
        "--web.config.file",
        dest="web_config_file",
        metavar="FILE",
        help="exporter-toolkit web configuration: TLS, basic auth, response headers",
    )
    serve.add_argument(
        "--web.max-connections",
        dest="max_connections",
        type=_positive,
        default=Limits().max_connections,
        metavar="N",
        help="connections open at once; more get 503 (default: %(default)s)",
    )
    serve.add_argument(
        "--web.read-header-timeout",
        dest="header_timeout",
        type=_seconds,
        default=Limits().header_timeout,
        metavar="DURATION",
        help="close a connection whose request headers take longer (default: 10s)",
    )
    serve.add_argument(
        "--web.idle-timeout",
        dest="idle_timeout",
        type=_seconds,
        default=Limits().idle_timeout,
        metavar="DURATION",
        help="close a keep-alive connection idle this long (default: 60s)",
    )


def _reports(sub: Subparsers[argparse.ArgumentParser]) -> None:
    """The subcommands that read the logs once, and the two that check."""
    report = sub.add_parser("report", help="daily summary of the logs")
    _common(report)
    report.add_argument("--date", type=_date, help="YYYY-MM-DD (default: today)")
    report.add_argument(
        "--format",
        choices=("text", "json", "summary"),
        default="text",
        help="text: tables; json: every figure; summary: JSON with the keys and values "
        "of the usage scripts' daily_summary (default: text)",
    )

    costs = sub.add_parser("costs", help="credits, videos and dollars per day")
    _common(costs)
    costs.add_argument("--days", type=_positive, default=7, help="days back (default: 7)")
    costs.add_argument("--format", choices=("text", "json"), default="text")

    export = sub.add_parser("export", help="write the events as CSV")
    _common(export)
    export.add_argument("--output", required=True, metavar="FILE", help="CSV file, - for stdout")
    export.add_argument("--since", type=_date, metavar="DATE", help="first day (YYYY-MM-DD)")
    export.add_argument("--until", type=_date, metavar="DATE", help="last day (YYYY-MM-DD)")

    estimate = sub.add_parser("estimate", help="credits and dollars for a request")
    _common(estimate)
    estimate.add_argument("--model", help="e.g. kling-v2-6 (needed for videos)")
    estimate.add_argument("--mode", type=_mode, help="standard|professional (videos)")
    estimate.add_argument("--duration", type=_positive, help="seconds (videos)")
    estimate.add_argument("--audio", action="store_true", help="with generated audio")
    estimate.add_argument("--kind", choices=KINDS, default="video")
    estimate.add_argument("--count", type=_positive, default=1, help="number of tasks")
    estimate.add_argument("--format", choices=("text", "json"), default="text")

    check = sub.add_parser("check-config", help="validate a configuration file and exit")
    check.add_argument("file", help="the YAML configuration file")

    health = sub.add_parser(
        "healthcheck",
        help="exit 0 if the exporter on this host answers /-/healthy (for HEALTHCHECK)",
    )
    health.add_argument(
        "--url",
        default=None,
        help=f"health URL (default: ${HEALTH_URL_ENV}, else http://127.0.0.1:10177/-/healthy);"
        " an https URL is not checked against a CA: this asks the local process",
    )


def _demo(demo: argparse.ArgumentParser) -> None:
    demo.add_argument(
        "--web.listen-address",
        dest="listen",
        default=DEFAULT_LISTEN,
        metavar="ADDR",
        help=f"address to listen on (default: {DEFAULT_LISTEN})",
    )
    demo.add_argument("--logs", metavar="DIR", help="log folder (default: a temporary one)")
    demo.add_argument(
        "--token",
        action="store_true",
        help="print a bearer token the demo's Kling stand-in accepts for 30 minutes (to try "
        "the gateway with curl) and exit",
    )
    demo.add_argument(
        "--rate",
        type=_bounded(0.0, 100.0, low_open=True),
        default=DEFAULT_RATE,
        help="new tasks per second on average, up to 100 (default: %(default)s)",
    )
    demo.add_argument(
        "--backfill",
        type=_bounded(0.0, 24.0 * 31),
        default=DEFAULT_BACKFILL_HOURS,
        help="hours of history written at start, up to a month (default: %(default)s)",
    )
    demo.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        help="random seed of the synthetic traffic (default: %(default)s)",
    )
    demo.add_argument("--log.level", dest="log_level", choices=LEVELS, default="info")
    demo.add_argument(
        "--log.format", dest="log_format", choices=("logfmt", "json"), default="logfmt"
    )


def _date(value: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected YYYY-MM-DD, got {value!r}") from None


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {value!r}")
    return int(value)


def _bounded(low: float, high: float, low_open: bool = False) -> Callable[[str], float]:
    """A number flag between ``low`` and ``high`` (``low`` itself excluded if open)."""

    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
        if not (low < number <= high if low_open else low <= number <= high):
            side = "above" if low_open else "at least"
            raise argparse.ArgumentTypeError(
                f"expected a number {side} {low:g} and at most {high:g}, got {value}"
            )
        return number

    return parse


def _seconds(value: str) -> float:
    """A duration flag: ``10s``, ``1m30s`` or plain seconds, greater than 0."""
    try:
        seconds = parse_duration(value, "duration")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("duration: ")) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"expected a duration greater than 0, got {value!r}")
    return seconds


def _mode(value: str) -> str:
    mode = normalize_mode(value)
    if mode is None:
        raise argparse.ArgumentTypeError(
            f"expected standard, professional, std or pro, got {value!r}"
        )
    return mode
