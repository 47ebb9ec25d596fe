"""Writes the Grafana dashboards in grafana/dashboards/ from their source in
mixin/dashboards/ and the thresholds and windows of mixin/config.yml (which the rules
in alerts/ come from too; `make mixin` rewrites both).

    python grafana/build_dashboards.py          # rewrite the JSON files
    python grafana/build_dashboards.py --check  # exit 1 if they differ from the source

The JSON files are committed so Grafana can load them as they are; a test checks that
they are exactly what this script writes.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "exporter"))  # the package, when not installed

from mixin.dashboards.files import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
