from __future__ import annotations

import pytest
from kling_exporter.config import PriceRule, PricingConfig
from kling_exporter.configfile import ConfigError, load_config, parse_config
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
        ("kling-pro", "standard", 5, False, 20),  # kling-pro: twice, at any length
        ("kling-pro", "professional", 10, False, 40),
        ("kling-pro", "standard", 3, False, 12),
        ("kling-pro", "standard", 7, False, 28),
        ("kling-pro", "professional", 15, False, 60),
        ("kling-pro-v2", "professional", 10, False, 20),  # their table names kling-pro only
        ("kling-v2-6", "standard", 5, True, 10),  # audio is not priced by it
    ],
)
def test_the_cost_trackers_pricing_comes_out_exactly(
    model: str, mode: str, duration: int, audio: bool, credits: float
) -> None:
    pricing = Pricing(load_config(TRACKER).pricing)
    got = pricing.credits(Request(model, mode, duration, audio, "video"))
    assert got == credits
    assert pricing.usd(got) == pytest.approx(credits * 0.06)


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


def test_without_multipliers_the_default_prices_are_unchanged() -> None:
    pricing = Pricing(parse_config({"pricing": {"mode_multipliers": {}}}).pricing)
    for req in (Request(mode="professional", duration=7), Request(mode="standard", duration=15)):
        assert pricing.credits(req) == DEFAULT.credits(req) == 2 * (req.duration or 0)


def test_a_mode_multiplier_prices_the_fallback_so_longer_costs_more() -> None:
    config = parse_config({"pricing": {"mode_multipliers": {"professional": 3.5}}})
    pricing = Pricing(config.pricing)
    assert pricing.credits(Request("kling-v2-6", "professional", 7)) == 49
    assert pricing.credits(Request("kling-v2-6", "professional", 5)) == 35  # its rule names it
    assert pricing.credits(Request("kling-v2-6", "professional", 15)) == 105
    assert pricing.credits(Request("kling-v2-6", "standard", 7)) == 14
    assert pricing.credits(Request("kling-v2-6", "professional", 7, audio=True)) == 49 * 5


def test_a_mode_multiplier_applies_to_rules_that_name_no_mode_and_takes_kling_spellings() -> None:
    config = parse_config(
        {
            "pricing": {
                "rules": [{"duration": 5, "credits": 10}],
                "mode_multipliers": {"pro": 3},
                "model_multipliers": [{"model": "kling-pro", "multiplier": 2}],
            }
        }
    )
    pricing = Pricing(config.pricing)
    assert pricing.credits(Request("kling-v1", "professional", 5)) == 30
    assert pricing.credits(Request("kling-pro", "professional", 5)) == 60  # both multiply
    assert pricing.credits(Request("kling-pro", "standard", 7)) == 28
    assert pricing.credits(Request("kling-pro", None, 5)) == 20  # Kling's default: standard


@pytest.mark.parametrize(
    ("multipliers", "error"),
    [
        ({"profesional": 2}, r"pricing.mode_multipliers.profesional: expected one of"),
        ({"pro": -1}, r"pricing.mode_multipliers.pro: must not be negative"),
        ({"pro": 2, "professional": 3}, r"pricing.mode_multipliers: a mode is named twice"),
        ({"pro": "x"}, r"pricing.mode_multipliers.*expected a number"),
    ],
)
def test_a_wrong_mode_multiplier_is_refused_by_key(
    multipliers: dict[str, object], error: str
) -> None:
    with pytest.raises(ConfigError, match=error):
        parse_config({"pricing": {"mode_multipliers": multipliers}})
