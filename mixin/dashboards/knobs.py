"""What the dashboards take from the mixin's config (mixin/config.yml), which the rules
in alerts/ come from too: `make mixin` rewrites both."""

from __future__ import annotations

from mixin.config import config, values

MIXIN = values(config())
WARNING_RATIO = float(MIXIN["budget_warning_ratio"])  # the dashboards' warning line
WARNING_PERCENT = MIXIN["budget_warning_ratio_percent"]
BURN_WINDOW = MIXIN["budget_burn_window"]  # the window of the burn rate recording rules
BURN_SPAN = MIXIN["budget_burn_window_span"]
