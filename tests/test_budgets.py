"""Which budgets a task counts against, found by index."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from kling_exporter.accounting.ledger import Ledger
from kling_exporter.budgets import Budgets
from kling_exporter.configfile import parse_config

from tests.helpers import NOW, feed, iso, line, saved_and_restored

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


def test_users_past_the_limit_fold_but_a_budgets_user_stays_exact() -> None:
    """Issue 44: usage is kept per project and user; past ``labels.max_users`` users
    fold into __other__ (counted), never one a budget names, across a restart too."""
    config = parse_config(
        {
            "labels": {"max_users": 2},
            "budgets": [{"name": "zed", "user": "zed", "limit_credits": 100}],
        }
    )
    ledger = Ledger(config)

    def task(i: int, user: str) -> list[str]:
        return [
            line(event="task_submitted", task_id=f"t{i}", user=user, timestamp=iso(NOW)),
            line(event="task_completed", task_id=f"t{i}", credits_used=10, timestamp=iso(NOW)),
        ]

    for i, user in enumerate(["u1", "u2", "u3", "u4", "zed"]):
        feed(ledger, *task(i, user))
    restored = saved_and_restored(ledger)
    feed(restored, *task(5, "u5"), *task(6, "zed"))
    for led, zed in ((ledger, 10), (restored, 20)):
        users = {u for day in led.usage.values() for (_, u) in day.by_pair}
        assert users <= {"u1", "__other__", "zed"}, users
        assert led.budget_statuses(NOW)[0].used_credits == zed
    # zed counts within the limit: u1 and zed; u2, u3, u4, then u5 fold.
    assert ledger.user_labels.overflow == 3 and restored.user_labels.overflow == 4
    assert sum(restored.credits.values()) == 70
