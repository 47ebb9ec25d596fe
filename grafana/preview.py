"""Draws a PNG preview of each dashboard from real data (`make screenshots`).

Starts the exporter on demo traffic, a real Prometheus with the shipped rules scraping it
every second, lets data gather for a while, then runs every panel's query against
Prometheus and draws the panels where the dashboard places them. There is no Grafana
here; this shows what each panel will hold, not Grafana's exact look.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from exporter.demo import DemoTraffic, demo_config  # noqa: E402
from tests.stack import InProcessExporter, Process, prometheus  # noqa: E402

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


def draw_table(ax: Axes, panel: dict[str, Any], prom: Process) -> None:
    rename = {}
    for tr in panel.get("transformations", []):
        rename.update(tr.get("options", {}).get("renameByName", {}))
    columns: dict[str, dict[str, str]] = {}
    keys: list[str] = []
    for t in panel["targets"]:
        name = rename.get(f"Value #{t['refId']}", "")
        for s in api(prom, "/api/v1/query", query=substitute(t["expr"])):
            labels = {k: v for k, v in s["metric"].items() if k not in ("__name__", "alertstate")}
            key = " ".join(f"{v}" for _, v in sorted(labels.items()))
            if key not in columns:
                columns[key] = {}
                keys.append(key)
            value = float(s["value"][1])
            if name == "Period ends":
                text = time.strftime("%Y-%m-%d %H:%M", time.gmtime(value / 1000))
            elif name:
                text = fmt_value(value, "currencyUSD" if "USD" in name else "short")
            else:
                text = ""
            columns[key][name or "alert"] = text
    headers = sorted(
        {h for row in columns.values() for h in row},
        key=list(rename.values()).index
        if all(h in rename.values() for row in columns.values() for h in row)
        else str,
    )
    cells = [[k, *[columns[k].get(h, "") for h in headers]] for k in keys[:12]]
    ax.axis("off")
    if cells:
        table = ax.table(
            cellText=cells, colLabels=["", *headers], loc="upper center", cellLoc="left"
        )
        table.auto_set_font_size(False)
        table.set_fontsize(6)
        table.scale(1, 1.2)


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
    fig.savefig(out, dpi=80, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {out}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120, help="how long data gathers")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kling-preview-") as tmp:
        work = Path(tmp)
        traffic = DemoTraffic(work / "logs", seed=3)  # the demo's own rate and budgets
        traffic.backfill(3600)
        traffic.rate = 1.0  # livelier while the data gathers
        traffic.start()
        exporter = InProcessExporter(demo_config(work / "logs")).start()
        try:
            with prometheus(work, [f"127.0.0.1:{exporter.port}"]) as prom:
                start = time.time()
                print(f"gathering data for {args.seconds:.0f} s ...")
                time.sleep(args.seconds)
                end = time.time()
                for path in sorted((ROOT / "grafana" / "dashboards").glob("*.json")):
                    dashboard = json.loads(path.read_text())
                    render(dashboard, prom, start, end, args.out / f"{path.stem}.png")
        finally:
            traffic.stop.set()
            exporter.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
