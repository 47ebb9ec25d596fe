"""Which budgets a task counts against, found by index."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from kling_exporter.budgets import Budgets
from kling_exporter.config import parse_config

NAMES = st.sampled_from(["a", "b", "c"])


@given(
    scopes=st.lists(st.tuples(st.none() | NAMES, st.none() | NAMES), max_size=12),
    asks=st.lists(st.tuples(NAMES, st.none() | NAMES), min_size=1, max_size=6),
)
def test_the_budgets_a_task_matches_are_found_by_index_as_a_scan_would(
    scopes: list[tuple[str | None, str | None]], asks: list[tuple[str, str | None]]
) -> None:
    """Budgets are indexed by what they match, so a check reads only those: the same
    budgets, in config order, as a scan of every budget, asked any number of times."""
    budgets = [
        {"name": f"b{i}", "project": p, "user": u, "limit_credits": 1}
        for i, (p, u) in enumerate(scopes)
    ]
    config = parse_config({"budgets": budgets})
    index = Budgets(config)
    for project, user in asks * 2:
        scan = [
            b.name
            for b in config.budgets
            if b.project in (None, project) and b.user in (None, user)
        ]
        assert [b.name for b in index.matching(project, user)] == scan
