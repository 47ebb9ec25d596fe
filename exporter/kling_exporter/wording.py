"""msgspec's validation errors in a person's words: the key path first
(``budgets[2].period: ...``), types as people call them, a suggestion for a misspelt
key. The config, the web config, the log decoder and the API all say it this way. And
amounts as people read them."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable

import msgspec

_AT_RE = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_UNKNOWN_RE = re.compile(r"^Object contains unknown field `(?P<field>[^`]*)`$")


_TYPE_WORDS = {
    "float": "a number",
    "int": "a whole number",
    "str": "text",
    "bool": "true or false",
    "array": "a list",
    "object": "a mapping",
    "null": "nothing",
}
_EXPECTED_RE = re.compile(r"Expected `(?P<want>[^`]*)`, got `(?P<got>[^`]*)`")


def _in_words(types: str) -> str:
    """``float | null`` -> ``a number``: what a person would call the types."""
    words = [_TYPE_WORDS.get(t.strip(), t.strip()) for t in types.split("|")]
    words = [w for w in words if w != "nothing"] or ["nothing"]
    return " or ".join(dict.fromkeys(words))


def describe(
    error: msgspec.ValidationError, known: Callable[[str], Iterable[str]] = lambda path: ()
) -> str:
    """Turn msgspec's ``message - at `$.a[0]` `` into ``a[0].key: message``, with types
    in words and a suggestion among ``known(path)``, the keys accepted where a misspelt
    key stands."""
    match = _AT_RE.match(str(error))
    assert match is not None
    msg, path = match.group("msg"), (match.group("path") or "").lstrip(".")
    unknown = _UNKNOWN_RE.match(msg)
    if unknown:
        key = unknown.group("field")
        close = difflib.get_close_matches(key, sorted(known(path)), n=1, cutoff=0.75)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{_join(path, key)}: unknown key{hint}"
    expected = _EXPECTED_RE.search(msg)
    if expected:
        want, got = _in_words(expected.group("want")), _in_words(expected.group("got"))
        msg = f"{msg[: expected.start()]}expected {want}, got {got}{msg[expected.end() :]}"
    field, sep, rest = msg.partition(": ")
    if sep and re.fullmatch(r"[A-Za-z_][\w\[\].-]*", field):
        return f"{_join(path, field)}: {rest}"
    msg = msg.replace("Expected", "expected")
    return f"{path or '(top level)'}: {msg}"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def amount_for_people(key: str, value: float) -> float:
    """Dollars (a key naming usd) to the cent, whole credits as integers, other
    numbers as they are: as a person reads them. Metrics keep full precision."""
    if "usd" in key:
        return round(value, 2)
    if "credits" in key:
        return int(value) if float(value).is_integer() else round(value, 4)
    return value


def counted(n: int, noun: str) -> str:
    """``1 budget``, ``2 budgets``: a count as a person writes it (nouns taking -s)."""
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"
