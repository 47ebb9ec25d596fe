"""The config file read: YAML as data (JSON by Python's parser, other YAML by libyaml
where PyYAML has it; a key given twice in one mapping refused, as for the web config),
then validated into a ``Config``; every failure a ConfigError that names the key, and
the file when read from one."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

import msgspec
import msgspec.inspect
import yaml

from kling_exporter.config import Config
from kling_exporter.validation import describe_validation_error


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key (and the file,
    when read from one); ``detail`` is the message without the file's path."""

    def __init__(self, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.detail = message if detail is None else detail


class _UniqueKeys:
    """YAML's safe loading with a key given twice in one mapping refused: YAML says keys
    are unique, and PyYAML keeps the last silently, dropping a section written above it
    (the sample config ends with ``budgets: []``)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Any:
        firsts: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # a merge key's mappings may be overridden: that is its use
            key = self.construct_object(key_node, deep=True)  # type: ignore[attr-defined]
            try:
                first = firsts.setdefault(key, key_node)
            except TypeError:
                continue  # an unhashable key: the constructor says what is wrong
            if first is not key_node:
                _twice(first, key, key_node)
        return super().construct_mapping(node, deep=deep)  # type: ignore[misc]


def _twice(first: yaml.Node, key: Any, again: yaml.Node) -> None:
    """Refuse ``key`` given a second time in one mapping (at ``again``, first at
    ``first``)."""
    raise yaml.constructor.ConstructorError(
        problem=f"{key!r} given a second time (first at line {first.start_mark.line + 1}); "
        "the second would silently replace the first",
        problem_mark=again.start_mark,
    )


_STR, _INT, _SEQ, _MAP = (f"tag:yaml.org,2002:{t}" for t in ("str", "int", "seq", "map"))
_OTHER_SCALARS = frozenset(f"tag:yaml.org,2002:{t}" for t in ("bool", "null", "float"))


# Mappings and lists within one another the quick build goes into; a document nested
# deeper is left to PyYAML's constructor, which reaches about as deep as libyaml reads.
QUICK_DEPTH = 100


class _Unusual(Exception):
    """A node the quick build leaves to PyYAML's constructor."""


class _QuickBuild:
    """The document built straight from its nodes: strings, plain integers, lists and
    mappings by a walk of our own, other scalars by PyYAML's constructor. PyYAML's own
    build, a generator and a call or more a node, took two thirds of loading 10,000
    budgets. A document with merge keys, timestamps, other tags, unhashable keys or an
    alias inside itself is built by PyYAML's constructor instead."""

    def construct_document(self, node: yaml.Node) -> Any:
        try:
            return self._built(node, {}, 0)
        except _Unusual:
            return super().construct_document(node)  # type: ignore[misc]

    def _built(self, node: Any, made: dict[int, Any], depth: int) -> Any:
        kind, tag = type(node), node.tag
        if kind is yaml.ScalarNode:
            return self._scalar(node)
        if id(node) in made:  # an alias: the same object, as PyYAML makes it
            if made[id(node)] is None:
                raise _Unusual  # inside itself
            return made[id(node)]
        if depth > QUICK_DEPTH:
            raise _Unusual  # PyYAML's constructor reaches deeper
        made[id(node)] = None
        if kind is yaml.SequenceNode and tag == _SEQ:
            built: Any = []
            for item in node.value:
                built.append(self._built(item, made, depth + 1))
        elif kind is yaml.MappingNode and tag == _MAP:
            built = self._mapping(node, made, depth + 1)
        else:
            raise _Unusual
        made[id(node)] = built
        return built

    def _scalar(self, node: yaml.ScalarNode) -> Any:
        value, tag = node.value, node.tag
        if tag == _STR:
            return value
        # Decimal digits alone; 010 is octal in YAML 1.1, and PyYAML's to make.
        if tag == _INT and value.isascii() and value.isdigit() and value[:1] != "0":
            return int(value)
        if tag == _INT or tag in _OTHER_SCALARS:
            return self.construct_object(node)  # type: ignore[attr-defined]
        raise _Unusual

    def _mapping(self, node: yaml.MappingNode, made: dict[int, Any], depth: int) -> Any:
        built: dict[Any, Any] = {}
        firsts: dict[Any, yaml.Node] = {}
        for key_node, value_node in node.value:
            key = self._built(key_node, made, depth)
            try:
                first = firsts.setdefault(key, key_node)
            except TypeError:
                raise _Unusual from None  # unhashable: PyYAML says what is wrong
            if first is not key_node:
                _twice(first, key, key_node)
            built[key] = self._built(value_node, made, depth)
        return built


class _PythonLoader(_QuickBuild, _UniqueKeys, yaml.SafeLoader):
    """PyYAML's own parser: its messages say what it expected in words."""


# libyaml's parser where PyYAML was built with it: a tenth of the time, which 10,000
# budgets make two seconds of every start and reload. Its errors are terse, so a file it
# refuses is read again by the Python parser for the message.
_FastLoader: Any = (
    type("_FastLoader", (_QuickBuild, _UniqueKeys, yaml.CSafeLoader), {})
    if getattr(yaml, "__with_libyaml__", False)
    else _PythonLoader
)


class _NotPlainJson(ValueError):
    """A JSON document that YAML's reading should refuse or tell about."""


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        raise _NotPlainJson("a key given twice")  # YAML's reading names it, and its lines
    return found


def _no_constant(name: str) -> Any:
    raise _NotPlainJson(name)  # NaN and Infinity are not JSON


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotPlainJson(text)  # 1E400: YAML's reading says it is no number
    return value


def _load_yaml(text: str) -> Any:
    # JSON is YAML (1.2), and a config written by a program (jsonnet, a template of
    # 10,000 budgets) often is JSON: Python's parser reads it forty times as fast.
    if text.lstrip()[:1] == "{":
        with contextlib.suppress(ValueError):
            return json.loads(
                text, object_pairs_hook=_unique, parse_constant=_no_constant, parse_float=_finite
            )
    try:
        return yaml.load(text, Loader=_FastLoader)  # noqa: S506 - a safe loader
    except yaml.YAMLError:
        if _FastLoader is _PythonLoader:
            raise
    return yaml.load(text, Loader=_PythonLoader)  # noqa: S506 - a safe loader


def read_yaml(path: str | Path) -> Any:
    """A YAML file's data; ConfigError (without the path, which the caller adds) if it
    cannot be read or parsed."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError("not UTF-8 text") from None
    try:
        return _load_yaml(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = (e.problem or str(e)).replace("'<stream end>'", "the end of the file")
        raise ConfigError(f"invalid YAML at {where}{problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid YAML: {e}") from None
    except RecursionError:  # the parsers and builders recurse as deep as the nesting
        raise ConfigError("invalid YAML: nested too deeply") from None
    except ValueError as e:  # an integer past Python's 4,300 digits, say
        raise ConfigError(f"invalid YAML: {e}") from None


def parse_config(data: Any) -> Config:
    """Validate already-parsed YAML data; raise ConfigError naming the key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"(top level): expected a mapping, got {type(data).__name__}")
    try:
        return msgspec.convert(data, Config, strict=True)
    except msgspec.ValidationError as e:
        raise ConfigError(describe_validation_error(e, Config)) from None


def load_config(path: str | Path | None, allow_empty: bool = True) -> Config:
    """Read and validate a config file; no path means the built-in defaults. An empty
    file (or one of only comments) means the defaults too, unless ``allow_empty`` is
    False: a reload refuses it, since a deploy cut short would drop every budget."""
    if path is None:
        return Config()
    try:
        data = read_yaml(path)
        if data is None and not allow_empty:
            raise ConfigError("empty; refusing to replace the running config with none")
        return parse_config(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}", e.detail) from None
