"""Draws a PNG preview of each dashboard from real data (`make screenshots`).

Writes a few hours of the demo's traffic, replays it through the exporter's own ledger
as scrapes every 15 s of simulated time, turns those into Prometheus blocks (promtool's
OpenMetrics import, then the shipped recording rules evaluated over the same hours),
starts a real Prometheus on them, runs every panel's query against it and draws the
panels where the dashboard places them. There is no Grafana here; this shows what each
panel will hold over hours, not Grafana's exact look.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

import matplotlib
import msgspec

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import yaml
from matplotlib.axes import Axes

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "exporter"))  # the package, when not installed

from kling_exporter.accounting.ledger import Ledger  # noqa: E402
from kling_exporter.accounting.metrics import families  # noqa: E402
from kling_exporter.collector import TextRenderer  # noqa: E402
from kling_exporter.demo import DemoTraffic, demo_config, demo_gateway  # noqa: E402
from kling_exporter.events import Event, decode_line  # noqa: E402
from kling_exporter.flags import DEFAULT_SEED  # noqa: E402
from kling_exporter.guard.fleet import Fleet  # noqa: E402
from kling_exporter.guard.reservations import Reservations  # noqa: E402
from kling_exporter.kling.account import Account, Pack  # noqa: E402
from kling_exporter.kling.standin import demo_packs  # noqa: E402
from kling_exporter.model import ReadStats, Status  # noqa: E402
from kling_exporter.reading.ingest import ingest  # noqa: E402
from kling_exporter.serving.callbacks import Callbacks  # noqa: E402
from kling_exporter.serving.gateway import Gateway  # noqa: E402
from kling_exporter.serving.metrics import side_families  # noqa: E402
from kling_exporter.serving.server import side_of  # noqa: E402
from kling_exporter.views import View  # noqa: E402

from tests.helpers import free_port, require_binary  # noqa: E402
from tests.stack import Process  # noqa: E402

STEP = 15.0  # seconds between simulated scrapes
RULE_LEVELS = 3  # recording rules that read recording rules, this deep

VAR_RE = re.compile(r"\$(\w+)|\$\{(\w+)\}")
COLORS = {"green": "#56a64b", "orange": "#ff9830", "red": "#e02f44", "blue": "#3274d9"}


def substitute(expr: str) -> str:
    fixed = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h"}
    return VAR_RE.sub(lambda m: fixed.get(m.group(1) or m.group(2), ".*"), expr)


def api(prom: Process, path: str, **params: str) -> Any:
    return prom.api(f"{path}?{urllib.parse.urlencode(params)}")["data"]["result"]


def legend(fmt: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt) or str(labels)


def fmt_value(value: float, unit: str, decimals: int | None = None) -> str:
    if decimals is not None and unit in ("short", "none"):
        return f"{value:,.{decimals}f}"
    if unit == "percentunit":
        return f"{value:.1%}"
    if unit == "currencyUSD":
        return f"${value:,.2f}"
    if unit == "s":
        return f"{value:,.0f} s"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.2f}"


def draw_timeseries(
    ax: Axes, panel: dict[str, Any], prom: Process, start: float, end: float
) -> None:
    defaults = panel["fieldConfig"]["defaults"]
    for t in panel["targets"]:
        for series in api(
            prom,
            "/api/v1/query_range",
            query=substitute(t["expr"]),
            start=str(start),
            end=str(end),
            step="2",
        ):
            xs = [float(x) - end for x, _ in series["values"]]
            ys = [float(y) for _, y in series["values"]]
            ax.plot(xs, ys, linewidth=1.2, label=legend(t["legendFormat"], series["metric"]))
    if defaults.get("custom", {}).get("thresholdsStyle", {}).get("mode", "off") != "off":
        for step in defaults["thresholds"]["steps"][1:]:
            ax.axhline(step["value"], color=COLORS[step["color"]], linestyle="--", linewidth=1)
    if defaults["unit"] == "percentunit":
        ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.set_xlabel("seconds ago", fontsize=7)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6, loc="upper left", ncol=2)


def draw_stat(ax: Axes, panel: dict[str, Any], prom: Process) -> None:
    result = api(prom, "/api/v1/query", query=substitute(panel["targets"][0]["expr"]))
    value = float(result[0]["value"][1]) if result else float("nan")
    defaults = panel["fieldConfig"]["defaults"]
    ax.text(
        0.5,
        0.45,
        fmt_value(value, defaults["unit"], defaults.get("decimals")),
        ha="center",
        va="center",
        fontsize=20,
        color=COLORS["blue"],
        weight="bold",
    )
    ax.axis("off")


def draw_bargauge(ax: Axes, panel: dict[str, Any], prom: Process) -> None:
    t = panel["targets"][0]
    rows = sorted(
        (legend(t["legendFormat"], s["metric"]), float(s["value"][1]))
        for s in api(prom, "/api/v1/query", query=substitute(t["expr"]))
    )
    steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]

    def color(v: float) -> str:
        c = steps[0]["color"]
        for step in steps[1:]:
            if v >= step["value"]:
                c = step["color"]
        return COLORS[c]

    names = [r[0] for r in rows]
    ax.barh(names, [min(v, 1.2) for _, v in rows], color=[color(v) for _, v in rows])
    for i, (_, v) in enumerate(rows):
        ax.text(min(v, 1.2) + 0.01, i, f"{v:.0%}", va="center", fontsize=7)
    for step in steps[1:]:
        ax.axvline(step["value"], color=COLORS[step["color"]], linestyle="--", linewidth=1)
    ax.set_xlim(0, 1.35)
    ax.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.tick_params(labelsize=7)


def draw_barchart(ax: Axes, panel: dict[str, Any], prom: Process) -> None:
    """Stacked horizontal bars, one per budget, one part per query."""
    rename: dict[str, str] = {}
    for tr in panel.get("transformations", []):
        rename.update(tr.get("options", {}).get("renameByName", {}))
    bars: dict[str, dict[str, float]] = {}
    parts = []
    for t in panel["targets"]:
        part = rename.get(f"Value #{t['refId']}", t["refId"])
        parts.append(part)
        for s in api(prom, "/api/v1/query", query=substitute(t["expr"])):
            bars.setdefault(s["metric"].get("budget", ""), {})[part] = float(s["value"][1])
    names = sorted(bars)
    left = [0.0] * len(names)
    for part in parts:
        widths = [min(bars[n].get(part, 0.0), 1.2) for n in names]
        ax.barh(names, widths, left=left, label=part)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    for step in panel["fieldConfig"]["defaults"]["thresholds"]["steps"][1:]:
        ax.axvline(step["value"], color=COLORS[step["color"]], linestyle="--", linewidth=1)
    ax.set_xlim(0, 1.35)
    ax.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.tick_params(labelsize=7)
    if names:
        ax.legend(fontsize=6, loc="lower right")


def draw_table(ax: Axes, panel: dict[str, Any], prom: Process) -> None:
    """As Grafana joins instant queries: a column per label, then one per query."""
    rename = {}
    for tr in panel.get("transformations", []):
        rename.update(tr.get("options", {}).get("renameByName", {}))
    decimals = panel.get("fieldConfig", {}).get("defaults", {}).get("decimals")
    rows: dict[tuple[tuple[str, str], ...], dict[str, str]] = {}
    label_names: list[str] = []
    for t in panel["targets"]:
        name = rename.get(f"Value #{t['refId']}", "")
        for s in api(prom, "/api/v1/query", query=substitute(t["expr"])):
            labels = {k: v for k, v in s["metric"].items() if k not in ("__name__", "alertstate")}
            label_names += [k for k in sorted(labels) if k not in label_names]
            row = rows.setdefault(tuple(sorted(labels.items())), {})
            value = float(s["value"][1])
            if name in ("Period ends", "Expires"):
                text = time.strftime("%Y-%m-%d %H:%M", time.gmtime(value / 1000))
            elif name:
                money = "USD" in name
                text = fmt_value(
                    value, "currencyUSD" if money else "short", 2 if money else decimals
                )
            else:
                text = ""
            row[name or "alert"] = text
    headers = sorted(
        {h for row in rows.values() for h in row},
        key=list(rename.values()).index
        if all(h in rename.values() for row in rows.values() for h in row)
        else str,
    )
    cells = [
        [dict(key).get(n, "") for n in label_names] + [row.get(h, "") for h in headers]
        for key, row in list(rows.items())[:12]
    ]
    ax.axis("off")
    if cells:
        table = ax.table(
            cellText=cells, colLabels=[*label_names, *headers], loc="upper left", cellLoc="left"
        )
        table.auto_set_font_size(False)
        table.set_fontsize(7)
        # Columns as wide as their text, so names and amounts are read whole.
        table.auto_set_column_width(list(range(len(label_names) + len(headers))))
        table.scale(1, 1.4)


def render(dashboard: dict[str, Any], prom: Process, start: float, end: float, out: Path) -> None:
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    height = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in dashboard["panels"])
    fig = plt.figure(figsize=(16, height * 0.55))
    fig.suptitle(dashboard["title"], fontsize=14, x=0.01, ha="left")
    grid = fig.add_gridspec(height, 24, hspace=3.5, wspace=1.5, top=0.95)
    for panel in panels:
        g = panel["gridPos"]
        ax = fig.add_subplot(grid[g["y"] : g["y"] + g["h"], g["x"] : g["x"] + g["w"]])
        ax.set_title(panel["title"], fontsize=9, loc="left")
        ax.tick_params(labelsize=7)
        kind = panel["type"]
        if kind == "timeseries":
            draw_timeseries(ax, panel, prom, start, end)
        elif kind == "stat":
            draw_stat(ax, panel, prom)
        elif kind == "bargauge":
            draw_bargauge(ax, panel, prom)
        elif kind == "table":
            draw_table(ax, panel, prom)
        elif kind == "barchart":
            draw_barchart(ax, panel, prom)
        else:
            raise ValueError(f"no preview for {kind} panels ({panel['title']})")
    fig.savefig(out, dpi=80, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {out}")


def gateway_traffic(gateway: Gateway, rng: random.Random, seconds: float) -> None:
    """What the demo's producer through the gateway does in ``seconds`` (a create every
    2 s, then queries of each task until it has finished), counted as the gateway counts
    it, with Kling's answer times of a nearby region."""
    mean = seconds / 2
    for _ in range(rng.randint(round(mean * 0.6), round(mean * 1.4))):
        draw = rng.random()
        outcome = "forwarded" if draw < 0.92 else "refused" if draw < 0.97 else "upstream_error"
        gateway.outcomes["create", outcome] += 1
        if outcome == "refused":
            continue  # nothing reached Kling
        gateway.durations["create"].observe(rng.lognormvariate(-1.6, 0.4))
        for _ in range(rng.randint(1, 4) if outcome == "forwarded" else 0):
            gateway.outcomes["query", "forwarded"] += 1
            gateway.durations["query"].observe(rng.lognormvariate(-2.5, 0.4))


def history_as_openmetrics(logs: Path, start: float, end: float, step: float) -> str:
    """The exporter's /metrics every ``step`` seconds of simulated time over the demo's
    history, as OpenMetrics with timestamps, for promtool to turn into TSDB blocks."""
    # The gateway as the demo has it (nothing here calls its upstream).
    config = demo_config(logs, gateway=demo_gateway(10177))
    ledger, reading = Ledger(config), ReadStats()
    events: list[tuple[float, bytes]] = []
    for path in sorted(logs.glob("kling-*.jsonl")):
        for raw in path.read_bytes().splitlines():
            event = decode_line(raw)
            if isinstance(event, Event) and event.ts is not None:
                events.append((event.ts, raw))
    events.sort(key=lambda item: item[0])
    renderer = TextRenderer()
    # Kling's resource packs as the demo's stand-in reports them, the online ones spent
    # a unit a minute, so that the pack panels show something too.
    os.environ.setdefault("KLING_ACCESS_KEY", "preview")
    os.environ.setdefault("KLING_SECRET_KEY", "preview")
    account = Account(lambda: config)
    held = Reservations()
    # The HTTP side as the exporter has it (no fleet here: its families are not shown).
    fleet = Fleet(
        lambda: config, held, lambda: View(ledger.budgets, ledger.usage, ledger.flight), bool
    )
    callbacks = Callbacks(lambda: config)
    gateway = Gateway(lambda: config, fleet.view, held, fleet, callbacks)
    rng = random.Random(DEFAULT_SEED)
    packs = msgspec.convert(demo_packs(end), list[Pack])
    series: dict[str, list[str]] = {}  # metric name -> its samples, in time order
    i, t = 0, start
    while t <= end:
        batch = []
        while i < len(events) and events[i][0] <= t:
            batch.append(events[i][1])
            i += 1
        ingest(ledger, batch, t, stats=reading)
        ledger.expire(t)
        status = Status(
            files_watched=1,
            ready=True,
            reload_successful=True,
            reload_success_ts=start,
            state_save_ts=t,
            last_poll_ts=t,
        )
        account.packs = [
            msgspec.structs.replace(p, remaining_quantity=p.remaining_quantity + (end - t) / 60)
            if p.status == "online"
            else p
            for p in packs
        ]
        account.last_success = t
        gateway_traffic(gateway, rng, step)
        shown = ("kling_account_", "kling_gateway_")
        side = side_of([], held, callbacks, account, fleet, gateway)
        side_rows = [f for f in side_families(side) if f.name.startswith(shown)]
        text = renderer.render(families(ledger.snapshot(t, reading), status) + side_rows)
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name = line.split("{", 1)[0].split(" ", 1)[0]
                series.setdefault(name, []).append(f"{line} {t:.3f}")
        t += step
    body = "\n".join(line for lines in series.values() for line in lines)
    return body + "\n# EOF\n"


def backfilled_prometheus(work: Path, start: float, end: float) -> Process:
    """A Prometheus over the simulated history: raw samples from promtool's OpenMetrics
    import, then the recording rules evaluated over the same hours, level by level (a
    rule that reads another's output needs that output in the database first)."""
    promtool = require_binary("promtool")
    data = work / "prom-data"
    source = work / "history.om"
    source.write_text(history_as_openmetrics(work / "logs", start, end, STEP))
    subprocess.run(
        [promtool, "tsdb", "create-blocks-from", "openmetrics", "-q", str(source), str(data)],
        check=True,
    )
    rules = [str(ROOT / "alerts" / "kling.rules.yml")]
    for level in range(RULE_LEVELS + 1):
        prom = serve_tsdb(work, data, rules if level == RULE_LEVELS else [])
        if level == RULE_LEVELS:
            return prom
        try:
            out = work / f"rules-{level}"
            subprocess.run(
                [
                    promtool,
                    "tsdb",
                    "create-blocks-from",
                    "rules",
                    f"--start={start:.0f}",
                    f"--end={end:.0f}",
                    f"--url={prom.url}",
                    f"--output-dir={out}",
                    f"--eval-interval={STEP:.0f}s",
                    *rules,
                ],
                check=True,
                capture_output=True,
            )
        finally:
            prom.stop()
        for block in out.iterdir():
            if block.is_dir():
                shutil.move(str(block), data / f"{block.name}")
    raise AssertionError("unreachable")


def serve_tsdb(work: Path, data: Path, rule_files: list[str]) -> Process:
    config = work / "prometheus.yml"
    config.write_text(
        yaml.safe_dump({"global": {"evaluation_interval": "15s"}, "rule_files": rule_files})
    )
    port = free_port()
    prom = Process(
        "prometheus",
        [
            require_binary("prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={data}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=30d",
        ],
        work,
        port,
    )
    prom.wait_ready()
    return prom


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=2, help="hours of simulated history")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kling-preview-") as tmp:
        work = Path(tmp)
        end = float(int(time.time() // STEP * STEP))
        start = end - args.hours * 3600
        traffic = DemoTraffic(work / "logs", seed=3)  # the demo's own rate and budgets
        traffic.backfill(args.hours * 3600, now=end)
        prom = backfilled_prometheus(work, start, end)
        try:
            for path in sorted((ROOT / "grafana" / "dashboards").glob("*.json")):
                dashboard = json.loads(path.read_text())
                render(dashboard, prom, start, end, args.out / f"{path.stem}.png")
        finally:
            prom.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
