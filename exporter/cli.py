"""Command line: flags in the Prometheus exporter style, one function per subcommand."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from aiohttp import web

from exporter import __version__
from exporter.config import Config, ConfigError, load_config
from exporter.daemon import Daemon
from exporter.logsetup import LEVELS, setup_logging
from exporter.server import build_app, parse_listen_address

log = logging.getLogger("exporter")

DEFAULT_LISTEN = ":10177"
COMMANDS = ("serve", "check-config")


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

    serve = sub.add_parser("serve", help="tail the logs and serve metrics and the budget API")
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

    check = sub.add_parser("check-config", help="validate a configuration file and exit")
    check.add_argument("file", help="the YAML configuration file")
    return parser


def _load(path: str | None) -> Config:
    try:
        return load_config(path)
    except ConfigError as e:
        print(f"kling-exporter: invalid config: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
    except ConfigError as e:
        print(f"{args.file}: {e}", file=sys.stderr)
        return 1
    print(
        f"{args.file}: OK ({len(config.budgets)} budgets, "
        f"{len(config.pricing.rules)} pricing rules, logs {', '.join(config.logs.paths)})"
    )
    return 0


async def _serve(daemon: Daemon, host: str | None, port: int, telemetry_path: str) -> None:
    app = build_app(daemon, telemetry_path)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, shutdown_timeout=10)
    await site.start()
    log.info("listening", extra={"address": f"{host or ''}:{port}", "version": __version__})
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.run_in_executor(None, daemon.reload))
    daemon.start()
    await done.wait()
    log.info("shutting down")
    await runner.cleanup()  # lets scrapes under way finish


def cmd_serve(args: argparse.Namespace) -> int:
    config = _load(args.config_file)
    try:
        host, port = parse_listen_address(args.listen)
    except ValueError as e:
        print(f"kling-exporter: {e}", file=sys.stderr)
        return 2
    if not args.telemetry_path.startswith("/"):
        print("kling-exporter: --web.telemetry-path must start with /", file=sys.stderr)
        return 2
    daemon = Daemon(config, args.config_file)
    try:
        asyncio.run(_serve(daemon, host, port, args.telemetry_path))
    except OSError as e:
        log.error("cannot serve", extra={"err": str(e)})
        return 1
    finally:
        daemon.stop()
        log.info("stopped", extra={"lines_read": daemon.ledger.lines_read})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version")):
        argv.insert(0, "serve")
    args = build_parser().parse_args(argv)
    setup_logging(getattr(args, "log_level", "info"), getattr(args, "log_format", "logfmt"))
    if args.command == "check-config":
        return cmd_check_config(args)
    return cmd_serve(args)
