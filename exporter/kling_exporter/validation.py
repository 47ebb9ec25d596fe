"""What a value msgspec refused is told as: the key named (``budgets[2].period``), a
misspelt key matched against its own section's keys, the accepted values of an enum,
and a bound as a person says it."""

from __future__ import annotations

import functools
import re
from typing import Any

import msgspec
import msgspec.inspect

from kling_exporter.periods import PERIOD_KINDS
from kling_exporter.vocabulary import KINDS, MODES, START_AT
from kling_exporter.wording import describe


def keys_at(root: type, path: str) -> list[str]:
    """The keys a mapping at ``path`` (``budgets[2]``, ``gateway``) of a ``root``
    struct accepts: a misspelt key is matched against its own section's keys only."""
    info: Any = msgspec.inspect.type_info(root)
    for part in filter(None, re.split(r"\.|\[\d+\]", path)):
        fields = {f.encode_name: f.type for f in getattr(info, "fields", ())}
        info = fields.get(part)
        while info is not None and not isinstance(info, msgspec.inspect.StructType):
            if isinstance(info, msgspec.inspect.UnionType):
                info = next((t for t in info.types if not isinstance(t, _LEAVES)), None)
            else:
                info = getattr(info, "item_type", None) or getattr(info, "value_type", None)
    return sorted(f.encode_name for f in getattr(info, "fields", ()))


_LEAVES = (msgspec.inspect.NoneType, msgspec.inspect.StrType, msgspec.inspect.FloatType)


# What each key of the vocabulary accepts, for errors that list it: msgspec names only
# the value it got. Kling's spellings (std, pro) are accepted too but not offered.
ACCEPTED: dict[str, tuple[str, ...]] = {
    "mode": MODES,
    "period": PERIOD_KINDS,
    "kind": KINDS,
    "start_at": START_AT,
    "on_unavailable": ("allow", "refuse"),
}


_ENUM_RE = re.compile(r"^(?P<key>.*?): Invalid enum value (?P<got>.+)$", re.S)


_BOUND_RE = re.compile(
    r"^(?P<key>.*?): expected `(?:int|float|str)`(?P<length> of length)? "
    r"(?P<op>[<>]=?) (?P<n>\S+)$"
)


_BOUND_WORDS = {
    ">=": "must be at least",
    "<=": "must be at most",
    ">": "must be greater than",
    "<": "must be less than",
}


def describe_validation_error(error: msgspec.ValidationError, root: type) -> str:
    """msgspec's error in words, naming the key (``budgets[2].period: ...``), with a
    suggestion among the keys its section of ``root`` accepts for a misspelt one, the
    accepted values of an enum and a bound as a person says it (``count: must be at
    least 1``)."""
    text = describe(error, functools.partial(keys_at, root))
    enum = _ENUM_RE.match(text)
    if enum:
        key, got = enum.group("key"), enum.group("got")
        accepted = ACCEPTED.get(key.rsplit(".", 1)[-1].split("[", 1)[0])
        if accepted:
            return f"{key}: expected one of {', '.join(accepted)}, got {got}"
        return f"{key}: not an accepted value: {got}"
    bound = _BOUND_RE.match(text)
    if bound:
        key, words, n = bound.group("key"), _BOUND_WORDS[bound.group("op")], bound.group("n")
        if not bound.group("length"):
            return f"{key}: {words} {n}"
        if (words, n) == ("must be at least", "1"):
            return f"{key}: must not be empty"
        return f"{key}: {words} {n} characters long"
    return text
