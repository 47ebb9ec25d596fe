"""What a task costs in credits and dollars, from the configured pricing rules."""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import NamedTuple

from kling_exporter.config import PriceRule, PricingConfig
from kling_exporter.vocabulary import KINDS

# Kling's own API defaults for a request that leaves these out.
DEFAULT_MODE = "standard"
DEFAULT_DURATION = 5
DEFAULT_KIND = "video"


class Request(NamedTuple):
    """The priced properties of one task."""

    model: str | None = None
    mode: str | None = None
    duration: int | None = None
    audio: bool = False
    kind: str | None = None


def _matches(rule: PriceRule, req: Request, audio: bool) -> bool:
    if rule.kind is not None and rule.kind != (req.kind or DEFAULT_KIND):
        return False
    if rule.mode is not None and rule.mode != (req.mode or DEFAULT_MODE):
        return False
    if rule.duration is not None and rule.duration != (req.duration or DEFAULT_DURATION):
        return False
    # A rule that names no audio prices silent tasks only.
    if bool(rule.audio) != audio:
        return False
    return rule.model is None or (req.model is not None and fnmatchcase(req.model, rule.model))


class Pricing:
    """Prices requests by the first matching rule; results are memoised per request."""

    def __init__(self, config: PricingConfig) -> None:
        self.config = config
        self.usd_per_credit = config.usd_per_credit
        # Request is a tuple, so a plain (model, mode, duration, audio, kind) finds it too.
        self.cache: dict[tuple[object, ...], float] = {}

    def credits(self, req: Request) -> float:
        cached = self.cache.get(req)
        if cached is not None:
            return cached
        value = self._price(req)
        if len(self.cache) < 10_000:
            self.cache[req] = value
        return value

    def usd(self, credits: float) -> float:
        return credits * self.usd_per_credit

    def _price(self, req: Request) -> float:
        base, rule = self._base_price(req)
        # A rule that names the mode has priced it; the fallback and other rules have not.
        if rule is None or rule.mode is None:
            base *= self.config.mode_multiplier(req.mode)
        if req.model is not None:
            for m in self.config.model_multipliers:
                if fnmatchcase(req.model, m.model):
                    return base * m.multiplier
        return base

    def _base_price(self, req: Request) -> tuple[float, PriceRule | None]:
        """The credits before the model and mode multipliers, and the rule that gave
        them (None: the per-second fallback)."""
        cfg = self.config
        # A kind the rules cannot name (an unknown spelling) is priced by the fallback.
        rules = cfg.rules if req.kind is None or req.kind in KINDS else ()
        for rule in rules:
            if _matches(rule, req, req.audio):
                return rule.credits, rule
        multiplier = cfg.audio_multiplier if req.audio else 1.0
        if req.audio:
            for rule in rules:
                if _matches(rule, req, False):
                    return rule.credits * multiplier, rule
        duration = req.duration if req.duration is not None else DEFAULT_DURATION
        return cfg.credits_per_second * duration * multiplier, None
