from __future__ import annotations

import pytest

from exporter.config import PriceRule, PricingConfig
from exporter.pricing import Pricing, Request

DEFAULT = Pricing(PricingConfig())


@pytest.mark.parametrize(
    ("req", "credits"),
    [
        (Request(mode="standard", duration=5), 10),
        (Request(mode="professional", duration=5), 35),
        (Request(mode="standard", duration=10), 20),
        (Request(mode="professional", duration=10), 70),
        (Request(mode="standard", duration=5, audio=True), 50),
        (Request(mode="professional", duration=10, audio=True), 200),
        (Request(kind="image"), 1),
        (Request(kind="try_on"), 5),
        (Request(), 10),  # Kling's defaults: standard, 5 s
    ],
)
def test_default_rules(req: Request, credits: float) -> None:
    assert DEFAULT.credits(req) == credits


def test_audio_task_without_audio_rule_costs_silent_rule_times_multiplier() -> None:
    assert DEFAULT.credits(Request(mode="professional", duration=5, audio=True)) == 35 * 5
    assert DEFAULT.credits(Request(mode="standard", duration=10, audio=True)) == 20 * 5


def test_no_rule_falls_back_to_credits_per_second() -> None:
    assert DEFAULT.credits(Request(mode="standard", duration=7)) == 14
    assert DEFAULT.credits(Request(mode="standard", duration=7, audio=True)) == 70


def test_model_pattern_and_first_match_wins() -> None:
    pricing = Pricing(
        PricingConfig(
            rules=[
                PriceRule(model="kling-v2-6*", mode="professional", duration=5, credits=50),
                PriceRule(mode="professional", duration=5, credits=35),
            ]
        )
    )
    assert pricing.credits(Request("kling-v2-6", "professional", 5)) == 50
    assert pricing.credits(Request("kling-v2-6-pro", "professional", 5)) == 50
    assert pricing.credits(Request("kling-v1", "professional", 5)) == 35
    assert pricing.credits(Request(None, "professional", 5)) == 35


def test_usd_uses_the_configured_rate() -> None:
    assert Pricing(PricingConfig(usd_per_credit=0.5)).usd(10) == 5
