"""The budget API against the running daemon."""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from kling_exporter.serving.api import _with_state

from tests.helpers import DaemonProcess, line, write_lines

Factory = Callable[..., DaemonProcess]

CONFIG = """
state: {path: ""}
logs: {poll_interval: 200ms}
budgets:
  - {name: mk-month, project: marketing, period: monthly, limit_credits: 100}
  - {name: mk-day, project: marketing, period: daily, limit_credits: 1000, limit_usd: 10}
  - {name: ann, user: ann, period: weekly, limit_credits: 500}
  - {name: sales, project: sales, period: monthly, limit_credits: 50}
"""


@pytest.fixture(scope="module")
def daemon(module_daemon_factory: Factory) -> DaemonProcess:
    """One exporter for the module: these tests only ask it."""
    d = module_daemon_factory(CONFIG, wait_ready=False)
    write_lines(
        d.workdir / "logs" / "kling-today.jsonl",
        [
            line(
                event="task_completed",
                task_id="a",
                project="marketing",
                user="ann",
                credits_used=60,
            ),
        ],
    )
    d.wait_metric("kling_budget_used_credits", 60, budget="mk-month", period="monthly")
    return d


def check(d: DaemonProcess, body: object) -> tuple[int, dict[str, Any]]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, answer = d.post("/api/v1/check", raw, {"Content-Type": "application/json"})
    return status, json.loads(answer)


def test_allowed_within_every_matching_budget(daemon: DaemonProcess) -> None:
    status, answer = check(daemon, {"project": "marketing", "mode": "std", "duration": 5})
    assert status == 200
    assert answer["allowed"] is True
    assert answer["credits_needed"] == 10
    assert answer["usd_needed"] == pytest.approx(1.4)
    budgets = {b["name"]: b for b in answer["budgets"]}
    assert set(budgets) == {"mk-month", "mk-day"}
    assert budgets["mk-month"]["credits_remaining"] == 40
    assert budgets["mk-month"]["utilization_after"] == pytest.approx(0.7)
    # mk-day: 60 credits are 8.40 of its 10 USD; 1.40 more is 9.80.
    assert budgets["mk-day"]["usd_remaining"] == pytest.approx(1.6)
    assert budgets["mk-day"]["utilization_after"] == pytest.approx(0.98)


def test_exactly_at_the_limit_is_allowed_and_one_credit_over_is_not(daemon: DaemonProcess) -> None:
    # sales: 50 credits, none used; an image costs 1 credit.
    status, answer = check(daemon, {"project": "sales", "kind": "image", "count": 50})
    assert (status, answer["allowed"]) == (200, True)
    status, answer = check(daemon, {"project": "sales", "kind": "image", "count": 51})
    assert (status, answer["allowed"]) == (200, False)
    assert "budget 'sales' (monthly)" in str(answer["reason"])
    assert answer["budgets"][0]["utilization_after"] == pytest.approx(51 / 50)


def test_several_budgets_one_over_names_it(daemon: DaemonProcess) -> None:
    _, answer = check(daemon, {"project": "marketing", "user": "ann", "kind": "image", "count": 41})
    assert answer["allowed"] is False
    reason = str(answer["reason"])
    # 101 of 100 credits, and 14.14 of 10 USD; ann's weekly 500 credits still hold.
    assert "'mk-month'" in reason and "'mk-day'" in reason and "'ann'" not in reason
    assert {b["name"] for b in answer["budgets"]} == {"mk-month", "mk-day", "ann"}


def test_dollar_limit_refuses_too(daemon: DaemonProcess) -> None:
    # mk-day allows 10 USD = 71.4 credits at 0.14; 60 are used, so 12 more go over.
    _, answer = check(daemon, {"project": "marketing", "kind": "image", "count": 11})
    assert answer["allowed"] is True
    _, answer = check(daemon, {"project": "marketing", "kind": "image", "count": 12})
    assert answer["allowed"] is False
    assert "'mk-day'" in str(answer["reason"]) and "'mk-month'" not in str(answer["reason"])


def test_user_matched_budget(daemon: DaemonProcess) -> None:
    # ann: 60 of 500 credits used; a professional 10 s video is 70 credits.
    _, answer = check(daemon, {"user": "ann", "mode": "pro", "duration": 10, "count": 6})
    assert [b["name"] for b in answer["budgets"]] == ["ann"]
    assert answer["allowed"] is True
    _, answer = check(daemon, {"user": "ann", "mode": "pro", "duration": 10, "count": 7})
    assert answer["allowed"] is False


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"count": 0}, "count"),
        ({"count": "two"}, "count"),
        ({"mode": "turbo"}, "mode"),
        ({"kind": ""}, "kind"),
        ({"duration": -5}, "duration"),
        ({"duration": 3601}, "duration"),
        ({"audio": "yes"}, "audio"),
        ({"project": True}, "project"),
        ({"user_id": ""}, "user_id"),
        ({"cuont": 1}, "cuont"),
        (b"not json", "body"),
        (b"[1, 2]", "body"),
        (b"", "body"),
        (b"  \n", "body"),
        (b'{"count": 1, "count": 1000}', "count"),
        (b'{"project": "a", "model": "m", "project": "b"}', "project"),
    ],
)
def test_malformed_bodies_get_400_naming_the_field(
    daemon: DaemonProcess, body: object, field: str
) -> None:
    status, answer = check(daemon, body)
    assert status == 400
    assert answer["field"] == field
    assert str(answer["error"]).startswith(field)


def test_a_concurrent_burst_is_answered_correctly(daemon: DaemonProcess) -> None:
    bodies: list[dict[str, Any]] = [
        {"project": "sales", "kind": "image", "count": n} for n in range(1, 101)
    ]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda b: check(daemon, b), bodies))
    for body, (status, answer) in zip(bodies, answers, strict=True):
        assert status == 200
        assert answer["allowed"] is (int(body["count"]) <= 50)


def test_answers_read_as_a_person_would(daemon: DaemonProcess) -> None:
    """Money to the cent, whole credits as integers, period bounds also as RFC 3339."""
    status, answer = check(daemon, {"project": "sales", "mode": "pro", "duration": 10, "count": 40})
    assert status == 200
    raw = json.dumps(answer)
    assert '"usd_needed": 392.0' in raw and '"credits_needed": 2800' in raw
    status, body = daemon.get("/api/v1/budgets")
    budgets = {b["name"]: b for b in json.loads(body)["budgets"]}
    mk = budgets["mk-day"]
    assert mk["used_usd"] == 8.4  # 60 x 0.14 is 8.400000000000002 in floating point
    assert mk["used_credits"] == 60 and isinstance(mk["used_credits"], int)
    assert mk["period_start_rfc3339"].endswith("T00:00:00Z")
    # $8.40 of $10 is past mk-day's 80% threshold; a caller need not compare it itself.
    states = {name: b["state"] for name, b in budgets.items()}
    assert states == {"mk-month": "ok", "mk-day": "warning", "ann": "ok", "sales": "ok"}


@pytest.mark.parametrize(
    ("utilization", "state"), [(0.0, "ok"), (0.79, "ok"), (0.8, "warning"), (1.0, "exhausted")]
)
def test_a_budgets_state_is_what_its_alerts_say(utilization: float, state: str) -> None:
    row = {"utilization": utilization, "alert_threshold": 0.8}
    assert _with_state([row])[0]["state"] == state


def test_the_api_reads_task_fields_as_the_log_does(daemon: DaemonProcess) -> None:
    """``user_id`` and a duration written as text, as producers log them: the check
    matches ann's weekly budget and prices ten seconds of pro video (70 credits)."""
    status, answer = check(daemon, {"user_id": "ann", "mode": "pro", "duration": "10"})
    assert status == 200, answer
    assert answer["credits_needed"] == 70
    assert [b["name"] for b in answer["budgets"]] == ["ann"]
