from __future__ import annotations

import pytest
from kling_exporter.config import ConfigError, PriceRule, PricingConfig, load_config, parse_config
from kling_exporter.pricing import Pricing, Request

from tests.helpers import ROOT

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


TRACKER = ROOT / "examples" / "pricing" / "cost-tracker.yml"


@pytest.mark.parametrize(
    ("model", "mode", "duration", "audio", "credits"),
    [
        ("kling-v1", "standard", 5, False, 10),
        ("kling-v2-6", "professional", 5, False, 10),  # the tracker ignores the mode
        ("kling-v1", "standard", 10, False, 20),
        ("kling-v1", "standard", 7, False, 14),  # 2 a second otherwise
        ("kling-pro", "standard", 5, False, 20),  # kling-pro: twice
        ("kling-pro-v2", "professional", 10, False, 40),
        ("kling-pro", "standard", 7, False, 28),
        ("kling-v2-6", "standard", 5, True, 10),  # audio is not priced by it
    ],
)
def test_the_cost_trackers_pricing_comes_out_exactly(
    model: str, mode: str, duration: int, audio: bool, credits: float
) -> None:
    pricing = Pricing(load_config(TRACKER).pricing)
    got = pricing.credits(Request(model, mode, duration, audio, "video"))
    assert got == credits
    assert pricing.usd(got) == pytest.approx(credits * 0.07)


def test_a_model_multiplier_applies_to_the_first_matching_pattern() -> None:
    config = parse_config(
        {
            "pricing": {
                "model_multipliers": [
                    {"model": "kling-v2-6*", "multiplier": 1.5},
                    {"model": "kling-*", "multiplier": 3},
                ]
            }
        }
    )
    pricing = Pricing(config.pricing)
    assert pricing.credits(Request("kling-v2-6", "standard", 5)) == 15
    assert pricing.credits(Request("kling-v1", "standard", 5)) == 30
    assert pricing.credits(Request("other", "standard", 5)) == 10


def test_a_negative_multiplier_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"pricing.model_multipliers\[0\].multiplier"):
        parse_config({"pricing": {"model_multipliers": [{"model": "x", "multiplier": -1}]}})
