"""Command line: flags in the Prometheus exporter style, one function per subcommand."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import difflib
import json
import logging
import os
import ssl
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import msgspec

from kling_exporter.config import Config
from kling_exporter.configfile import ConfigError, load_config
from kling_exporter.flags import COMMANDS, DEFAULT_LISTEN, HEALTH_URL_ENV, build_parser
from kling_exporter.kling.account import key_file_problems
from kling_exporter.logsetup import setup_logging
from kling_exporter.pricing import Pricing, Request
from kling_exporter.reading.listing import ListingError
from kling_exporter.serving.bodies import for_people
from kling_exporter.serving.connections import Limits, parse_listen_address
from kling_exporter.serving.link import ReaderProcess
from kling_exporter.serving.server import Serving, run
from kling_exporter.serving.webconfig import load_web_config
from kling_exporter.wording import counted

log = logging.getLogger("kling_exporter")

# The reports and the demo are imported by their own commands alone: the daemon's
# process loads only what it serves (the stand-in of Kling and the reports' ledger
# are no part of it).


def _today(config: Config) -> dt.date:
    return dt.datetime.now(config.tz).date()


def _path_error(flag: str, path: str, problem: str) -> int:
    """One line that names the flag, the path and what is wrong; exit status 2."""
    print(f"kling-exporter: {flag} {path}: {problem}", file=sys.stderr)
    return 2


def _unreadable(path: str) -> str | None:
    """What keeps ``path`` from being read as a file, or None."""
    p = Path(path)
    if not p.exists():
        return "no such file"
    if p.is_dir():
        return "is a directory, not a file"
    if not os.access(p, os.R_OK):
        return "cannot be read (permission denied)"
    return None


def _unwritable(path: str) -> str | None:
    """What keeps a file from being written at ``path``, or None."""
    p = Path(path)
    if p.is_dir():
        return "is a directory, not a file"
    parent = p.parent
    if not parent.exists():
        return f"no such directory: {parent}"
    if not parent.is_dir():
        return f"not a directory: {parent}"
    if not os.access(p if p.exists() else parent, os.W_OK):
        return "cannot be written (permission denied)"
    return None


def _log_folder(path: str) -> str | None:
    """Make the demo's log folder; what went wrong, or None."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        return "is not a directory"
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot create the folder: {e.strerror or e}"
    if not os.access(p, os.W_OK | os.X_OK):
        return "cannot be written (permission denied)"
    return None


def cmd_report(args: argparse.Namespace) -> int:
    from kling_exporter import report_text, reports  # noqa: PLC0415

    config = _load(args.config_file)
    day = args.date or _today(config)
    records = reports.read_records(config, sys.stderr)
    result = reports.daily_report(records, day, config)
    if args.format == "json":
        print(json.dumps(for_people(msgspec.to_builtins(result)), indent=2))
    elif args.format == "summary":
        print(json.dumps(for_people(report_text.summary(result, records, config)), indent=2))
    else:
        print(report_text.daily_text(result, config), end="")
    return 0


def cmd_costs(args: argparse.Namespace) -> int:
    from kling_exporter import report_text, reports  # noqa: PLC0415

    if args.days > reports.MAX_COST_DAYS:
        print(
            f"kling-exporter: --days {args.days}: at most {reports.MAX_COST_DAYS} "
            "(ten years, a row a day)",
            file=sys.stderr,
        )
        return 2
    config = _load(args.config_file)
    result = reports.cost_analysis(
        reports.read_records(config, sys.stderr), args.days, _today(config), config
    )
    if args.format == "json":
        print(json.dumps(for_people(msgspec.to_builtins(result)), indent=2))
    else:
        print(report_text.costs_text(result, config), end="")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from kling_exporter import export, reports  # noqa: PLC0415

    config = _load(args.config_file)
    if args.since and args.until and args.since > args.until:
        print("kling-exporter: --since is after --until", file=sys.stderr)
        return 2
    # Said before months of logs are read, not after.
    problem = None if args.output == "-" else _unwritable(args.output)
    if problem:
        return _path_error("--output", args.output, problem)
    records = reports.read_records(config, sys.stderr)
    if args.output == "-":
        count = export.export_csv(records, sys.stdout, config, args.since, args.until)
    else:
        try:
            with open(args.output, "w", encoding="utf-8", newline="") as out:
                count = export.export_csv(records, out, config, args.since, args.until)
        except OSError as e:
            return _path_error("--output", args.output, f"cannot be written: {e.strerror or e}")
    print(f"wrote {count} events to {args.output}", file=sys.stderr)
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    from kling_exporter import report_text  # noqa: PLC0415

    config = _load(args.config_file)
    if args.kind == "video":
        missing = [f"--{name}" for name in ("model", "mode", "duration") if not getattr(args, name)]
        if missing:
            print(f"kling-exporter estimate: a video needs {', '.join(missing)}", file=sys.stderr)
            return 2
    pricing = Pricing(config.pricing)
    each = pricing.credits(Request(args.model, args.mode, args.duration, args.audio, args.kind))
    result = {
        "model": args.model,
        "mode": args.mode,
        "duration": args.duration,
        "audio": args.audio,
        "kind": args.kind,
        "count": args.count,
        "credits_per_task": each,
        "credits": each * args.count,
        "usd": round(pricing.usd(each * args.count), 2),
    }
    if args.format == "json":
        print(json.dumps(for_people(result), indent=2))
        return 0
    audio = " with audio" if args.audio else ""
    if args.kind == "video":
        what = f"{args.model} {args.mode} {args.duration}s video{audio}"
    else:  # images and try-ons have no mode or clip length
        what = " ".join(x for x in (args.model, args.kind.replace("_", "-")) if x)
    print(
        f"{args.count} x {what}: "
        f"{report_text.credits(each)} each, {report_text.credits(each * args.count)}, "
        f"${result['usd']:,.2f}"
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from kling_exporter.demo import (  # noqa: PLC0415
        DEMO_KEYS,
        DemoTraffic,
        GatewayTraffic,
        StandInServer,
        demo_account,
        demo_config,
        demo_gateway,
    )
    from kling_exporter.kling.standin import KlingStandIn, demo_packs  # noqa: PLC0415

    if args.token:  # signed as a producer signs Kling's, with the stand-in's demo key
        print(KlingStandIn(*DEMO_KEYS, []).token())
        return 0
    try:
        host, port = parse_listen_address(args.listen)
    except ValueError as e:
        print(f"kling-exporter: {e}", file=sys.stderr)
        return 2
    if args.logs:
        problem = _log_folder(args.logs)
        if problem:
            return _path_error("--logs", args.logs, problem)
    # Everything made here is removed on the way out (callbacks run last-in, first-out:
    # the traffic stops writing before its temporary folder goes).
    with contextlib.ExitStack() as made:
        temporary = made.enter_context(tempfile.TemporaryDirectory(prefix="kling-demo-"))
        log_dir = Path(args.logs) if args.logs else Path(temporary) / "logs"
        traffic = DemoTraffic(log_dir, rate=args.rate, seed=args.seed)
        # A restarted demo (compose restarts it) goes on from the history it wrote before.
        written = 0 if traffic.has_history() else traffic.backfill(args.backfill * 3600)
        log.info(
            "demo traffic",
            extra={"logs": str(log_dir), "backfilled_events": written, "rate_per_s": args.rate},
        )
        # Kling's account: the demo's own stand-in, listening before the exporter polls it.
        kling = made.enter_context(StandInServer(KlingStandIn(*DEMO_KEYS, demo_packs(time.time()))))
        account = demo_account(kling.port, Path(temporary) / "keys")
        traffic.start()
        made.callback(traffic.close)
        # A producer that calls Kling through the exporter's gateway.
        config = demo_config(log_dir, account, demo_gateway(kling.port))
        producer = GatewayTraffic(f"http://127.0.0.1:{port}{config.gateway.path_prefix}")
        producer.start()
        made.callback(producer.close)
        reader = ReaderProcess(config, None, args.log_level, args.log_format)
        return run(reader, Serving(host, port))


def _load(path: str | None) -> Config:
    problem = None if path is None else _unreadable(path)
    if path is not None and problem:
        raise SystemExit(_path_error("--config.file", path, problem))
    try:
        return load_config(path)
    except ConfigError as e:
        print(f"kling-exporter: invalid config: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_healthcheck(args: argparse.Namespace) -> int:
    default = f"http://127.0.0.1:{DEFAULT_LISTEN.rsplit(':', 1)[1]}/-/healthy"
    url = args.url or os.environ.get(HEALTH_URL_ENV) or default
    if not url.startswith(("http://", "https://")):
        print(f"kling-exporter: healthcheck: not an http(s) URL: {url!r}", file=sys.stderr)
        return 2
    # The exporter on this host, reached by loopback: its certificate may name another
    # host, and trusting it is the point of asking.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=4, context=context) as answer:  # noqa: S310
            ok = answer.status == 200
    except (OSError, ValueError) as e:
        print(f"kling-exporter: healthcheck: {url}: {e}", file=sys.stderr)
        return 1
    return 0 if ok else 1


def cmd_check_config(args: argparse.Namespace) -> int:
    problem = _unreadable(args.file)
    if problem:
        return _path_error("check-config", args.file, problem)
    try:
        config = load_config(args.file)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    errors, warnings = key_file_problems(config.kling)
    for said in errors + warnings:
        print(f"{args.file}: {said}", file=sys.stderr)
    if errors:
        return 1
    print(
        f"{args.file}: OK ({counted(len(config.budgets), 'budget')}, "
        f"{counted(len(config.pricing.rules), 'pricing rule')}, "
        f"logs {', '.join(config.logs.paths)})"
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    config = _load(args.config_file)
    errors, warnings = key_file_problems(config.kling)
    for said in [*errors, *warnings]:  # a key file that cannot be read fails polls
        log.warning("Kling key file", extra={"problem": said})
    try:
        host, port = parse_listen_address(args.listen)
    except ValueError as e:
        print(f"kling-exporter: {e}", file=sys.stderr)
        return 2
    if not args.telemetry_path.startswith("/"):
        print("kling-exporter: --web.telemetry-path must start with /", file=sys.stderr)
        return 2
    web_config, tls = None, None
    if args.web_config_file:
        problem = _unreadable(args.web_config_file)
        if problem:
            return _path_error("--web.config.file", args.web_config_file, problem)
        try:
            web_config, tls = load_web_config(args.web_config_file)
        except ConfigError as e:
            print(f"kling-exporter: invalid web config: {e}", file=sys.stderr)
            return 2
    limits = Limits(args.max_connections, args.header_timeout, args.idle_timeout)
    reader = ReaderProcess(config, args.config_file, args.log_level, args.log_format)
    return run(reader, Serving(host, port, args.telemetry_path, web_config, tls, limits))


def _with_command_first(argv: list[str]) -> list[str]:
    """Flags may come before the subcommand (``--config.file F report``); no subcommand
    means serve. A word that is not a subcommand is refused with the closest one."""
    if not argv or argv[0] in ("-h", "--help", "--version"):
        return argv or ["serve"]
    commands = [i for i, word in enumerate(argv) if word in COMMANDS]
    if commands:
        i = commands[0]
        return [argv[i], *argv[:i], *argv[i + 1 :]]
    if not argv[0].startswith("-"):
        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(
            f"kling-exporter: unknown command {argv[0]!r}{hint} (commands: {', '.join(COMMANDS)})",
            file=sys.stderr,
        )
        raise SystemExit(2)
    return ["serve", *argv]


def main(argv: Sequence[str] | None = None) -> int:
    argv = _with_command_first(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    setup_logging(getattr(args, "log_level", "info"), getattr(args, "log_format", "logfmt"))
    commands = {
        "check-config": cmd_check_config,
        "healthcheck": cmd_healthcheck,
        "report": cmd_report,
        "costs": cmd_costs,
        "export": cmd_export,
        "estimate": cmd_estimate,
        "demo": cmd_demo,
    }
    try:
        return commands.get(args.command, cmd_serve)(args)
    except BrokenPipeError:
        # The reader went away (`report | head`): end quietly, and keep Python from
        # complaining again when it flushes standard output at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except ListingError as e:
        print(
            f"kling-exporter: {e}; totals would be incomplete, so none are shown", file=sys.stderr
        )
        return 1
