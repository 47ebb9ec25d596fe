from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from kling_exporter import configfile
from kling_exporter.cli import main
from kling_exporter.config import Config
from kling_exporter.configfile import ConfigError, load_config, parse_config, read_yaml
from kling_exporter.globs import glob_matches
from kling_exporter.reading.daemon import Daemon
from kling_exporter.reading.listing import expand_glob
from kling_exporter.validation import keys_at

from tests.helpers import ROOT


def test_no_file_means_defaults() -> None:
    config = load_config(None)
    assert config == Config()
    assert config.logs.paths == ["logs/kling-*.jsonl"]
    assert config.pricing.usd_per_credit == 0.14
    assert config.state.interval_seconds == 10


def test_example_from_the_spec_is_valid() -> None:
    config = parse_config(
        {
            "logs": {"paths": ["logs/kling-*.jsonl"], "start_at": "beginning"},
            "state": {"path": "kling-exporter.state", "interval": "10s"},
            "timezone": "Europe/Berlin",
            "pricing": {
                "usd_per_credit": 0.14,
                "rules": [{"kind": "image", "credits": 1}],
                "credits_per_second": 2,
                "audio_multiplier": 5,
            },
            "budgets": [
                {
                    "name": "marketing",
                    "project": "marketing",
                    "period": "monthly",
                    "limit_credits": 10000,
                    "limit_usd": 600,
                    "alert_threshold": 0.8,
                }
            ],
            "labels": {"max_projects": 1000},
        }
    )
    assert config.budgets[0].limit_usd == 600
    assert config.tz.key == "Europe/Berlin"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {
                "budgets": [
                    {"name": "a", "limit_credits": 1},
                    {"name": "b", "limit_credits": 1},
                    {"name": "c", "limit_credits": 1, "period": "montly"},
                ]
            },
            "budgets[2].period: expected one of daily, weekly, monthly, got 'montly'",
        ),
        ({"budgts": []}, "budgts: unknown key"),
        ({"logs": {"pathz": []}}, "logs.pathz: unknown key"),
        (
            {"budgets": [{"name": "a"}]},
            "budgets[0].limit_credits: a budget needs limit_credits, limit_usd or both",
        ),
        ({"budgets": [{"limit_credits": 5}]}, "budgets[0]: Object missing required field `name`"),
        (
            {"budgets": [{"name": "a", "limit_credits": "lots"}]},
            "budgets[0].limit_credits: expected a number, got text",
        ),
        (
            {"budgets": [{"name": "a", "limit_credits": 1, "alert_threshold": 80}]},
            "budgets[0].alert_threshold: expected a ratio in (0, 1], got 80",
        ),
        (
            {"budgets": [{"name": "a", "limit_credits": 1}, {"name": "a", "limit_credits": 2}]},
            "budgets[1].name: duplicate budget name 'a'",
        ),
        ({"timezone": "Mars/Olympus"}, "timezone: unknown time zone 'Mars/Olympus'"),
        ({"state": {"interval": "often"}}, "state.interval: expected a duration"),
        (
            {"logs": {"start_at": "middle"}},
            "logs.start_at: expected one of beginning, end, got 'middle'",
        ),
        (
            {"pricing": {"rules": [{"mode": "turbo", "credits": 1}]}},
            "pricing.rules[0].mode: expected one of standard, professional, got 'turbo'",
        ),
        ({"labels": {"max_projects": 0}}, "labels.max_projects: must be at least 1, got 0"),
        ([1, 2], "(top level): expected a mapping, got list"),
    ],
)
def test_errors_name_the_key(data: object, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert str(err.value).startswith(message), str(err.value)


def test_durations() -> None:
    config = parse_config({"state": {"interval": "1m30s"}, "logs": {"poll_interval": "250ms"}})
    assert config.state.interval_seconds == 90
    assert config.logs.poll_seconds == 0.25


def test_check_config_accepts_a_good_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "ok.yml"
    path.write_text("budgets:\n  - {name: all, limit_credits: 100}\n")
    assert main(["check-config", str(path)]) == 0
    assert "OK (1 budget, " in capsys.readouterr().out


def test_check_config_refuses_a_bad_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yml"
    path.write_text("budgets:\n  - {name: all, limit_credits: 100, period: montly}\n")
    assert main(["check-config", str(path)]) == 1
    assert "budgets[0].period: expected one of daily, weekly, monthly" in capsys.readouterr().err


def test_check_config_refuses_invalid_yaml(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yml"
    path.write_text("budgets: [\n")
    assert main(["check-config", str(path)]) == 1
    assert "invalid YAML" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"budgets": [{"name": "a", "limit_credit": 5}]},
            "budgets[0].limit_credit: unknown key (did you mean 'limit_credits'?)",
        ),
        ({"budgts": []}, "budgts: unknown key (did you mean 'budgets'?)"),
        ({"logs": {"path": ["x"]}}, "logs.path: unknown key (did you mean 'paths'?)"),
        ({"fleet": {"redis": "x"}}, "fleet.redis: unknown key"),
        ({"zzz": 1}, "zzz: unknown key"),
        ({"labels": {"max_projects": "many"}}, "labels.max_projects: expected a whole number"),
        ({"logs": {"follow_symlinks": "yes"}}, "logs.follow_symlinks: expected true or false"),
    ],
)
def test_errors_say_what_to_do(data: object, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert str(err.value) == message or str(err.value).startswith(message + ","), str(err.value)


def test_invalid_yaml_names_the_file_once_and_the_place(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yml"
    path.write_text("budgets: [\n")
    assert main(["check-config", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        f"{path}: invalid YAML at line 2, column 1: expected the node content, "
        "but found the end of the file"
    )
    assert "<unicode string>" not in err and err.count(str(path)) == 1


def test_a_misspelt_key_is_matched_against_its_own_sections_keys() -> None:
    """Every key of every section, one letter short: the suggestion, if any, is a key
    of that section and never the key refused."""
    checked = 0
    for prefix in ("", *[f"{f}." for f in keys_at(Config, "") if keys_at(Config, f)]):
        path = prefix.rstrip(".")
        own = keys_at(Config, path)
        for key in own:
            wrong = key[:-1]
            if len(wrong) < 4 or wrong in own:
                continue
            data: dict[str, Any] = {wrong: None}
            if path == "budgets":
                data = {"budgets": [{"name": "b", "limit_credits": 1, wrong: None}]}
            elif path:
                data = {path: {wrong: None}}
            with pytest.raises(ConfigError) as err:
                parse_config(data)
            hint = re.search(r"did you mean '([^']+)'", str(err.value))
            assert hint is None or (hint.group(1) in own and hint.group(1) != wrong), err.value
            checked += 1
    assert checked > 50


def test_a_key_given_twice_is_refused_with_both_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A budget written above the sample's own ``budgets: []`` was dropped in silence."""
    path = tmp_path / "kling.yml"
    budget = "budgets:\n  - {name: a, project: a, limit_credits: 10}\n"
    path.write_text(budget + (ROOT / "kling.example.yml").read_text())
    assert main(["check-config", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    second = 3 + next(
        i
        for i, text in enumerate((ROOT / "kling.example.yml").read_text().splitlines())
        if text.startswith("budgets:")
    )
    assert err == (
        f"{path}: invalid YAML at line {second}, column 1: 'budgets' given a second time "
        "(first at line 1); the second would silently replace the first"
    )
    path.write_text("budgets: [{name: a, name: b, limit_credits: 1}]\n")
    with pytest.raises(ConfigError, match=r"line 1, column 21: 'name' given a second time"):
        load_config(path)
    # Spelled otherwise, the same key: the first is where it was first given.
    path.write_text("1: a\n0x1: b\n")
    with pytest.raises(ConfigError, match=r"line 2, .*1 given a second time \(first at line 1\)"):
        load_config(path)


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000 + "]" * 100_000,
        '{"budgets": ' + '{"a": ' * 5000 + "1" + "}" * 5000 + "}",
        "budgets:\n" + "".join("  " * i + "- \n" for i in range(1, 3000)),
    ],
    ids=["flow", "json", "block"],
)
def test_a_config_nested_too_deeply_is_refused_and_a_reload_keeps_the_running_one(
    tmp_path: Path, text: str
) -> None:
    """The parsers recurse as deep as the nesting: a file nested past the interpreter's
    limit is a bad config like any other, not a crash of the reader at its reload."""
    path = tmp_path / "kling.yml"
    path.write_text(f"logs: {{paths: ['{tmp_path}/*.jsonl']}}\n")
    daemon = Daemon(load_config(path), str(path))
    try:
        path.write_text(text)
        with pytest.raises(ConfigError, match="nested too deeply"):
            load_config(path)
        assert daemon.reload() == "invalid YAML: nested too deeply"
        assert daemon.config.logs.paths == [f"{tmp_path}/*.jsonl"]
    finally:
        daemon.tailer.close()


def test_merge_keys_may_still_be_overridden() -> None:
    data = {"budgets": [{"name": "x", "limit_credits": 7}]}
    text = "x: &b {period: monthly, limit_credits: 5}\n"
    text += "budgets:\n  - {<<: *b, name: x, limit_credits: 7}\n"
    assert yaml_of(text)["budgets"] == [{**data["budgets"][0], "period": "monthly"}]


@given(
    keys=st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=1, max_size=6),
    nested=st.booleans(),
)
def test_any_mapping_with_a_repeated_key_is_refused_and_any_other_reads_as_yaml_does(
    keys: list[str], nested: bool
) -> None:
    body = "".join(f"{k}: {i}\n" for i, k in enumerate(keys))
    if nested:
        body = "top:\n" + "".join(f"  {line}\n" for line in body.splitlines())
    if len(set(keys)) == len(keys):
        assert yaml_of(body) == yaml.safe_load(body)
        return
    repeated = next(k for i, k in enumerate(keys) if k in keys[:i])
    with pytest.raises(ConfigError, match=f"'{repeated}' given a second time"):
        yaml_of(body)


SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    # Strings YAML 1.1 reads as something else when plain: dumped quoted.
    st.sampled_from(["010", "0x1F", "1_000", "+5", "-0", "1:30", "yes", "~", "2026-12-06"]),
)
DOCUMENTS = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300)
@given(data=DOCUMENTS, flow=st.sampled_from([None, True, False]))
def test_any_document_reads_as_pyyaml_reads_it(data: Any, flow: bool | None) -> None:
    """The quick build of strings, integers, lists and mappings gives what PyYAML's own
    constructor gives, whatever the document and its style."""
    text = yaml.safe_dump(data, default_flow_style=flow, allow_unicode=True)
    assert yaml_of(text) == yaml.safe_load(text)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=200)
@given(data=st.dictionaries(st.text(max_size=4), JSON_VALUES, max_size=4), indent=st.booleans())
def test_a_json_config_reads_as_json_says(data: dict[str, Any], indent: bool) -> None:
    """JSON is YAML: a config written as JSON means what JSON says (1e+16 a number, where
    YAML 1.1 would read a string), read by Python's JSON parser."""
    text = json.dumps(data, indent=2 if indent else None)
    assert yaml_of(text) == json.loads(text)


def test_json_that_yaml_should_judge_is_read_as_yaml() -> None:
    """A key given twice is refused with its lines, NaN is YAML's string, and YAML's
    own flow mappings are YAML."""
    with pytest.raises(ConfigError, match=r"line 1, column 10: 'a' given a second time"):
        yaml_of('{"a": 1, "a": 2}')
    assert yaml_of('{"a": NaN}') == {"a": "NaN"}
    assert yaml_of("{a: 1, b: [x, y]}") == {"a": 1, "b": ["x", "y"]}
    assert yaml_of('  {"limit_usd": 1e3}') == {"limit_usd": 1000.0}


def quick(text: str) -> Any:
    """``text`` built by the quick build alone (``_Unusual`` if it cannot)."""
    loader = configfile._FastLoader(text)
    try:
        return loader._built(loader.get_single_node(), {}, 0)
    finally:
        loader.dispose()


def test_plain_scalars_of_every_kind_and_aliases_read_as_pyyaml_reads_them() -> None:
    text = (
        "a: 010\nb: 0x1F\nc: 1_000\nd: +5\ne: -5\ng: 1:30\nh: ~\ni: yes\nj: 1.5e3\n"
        "k: .inf\nl: '007'\nm: !!str 5\nn: 0\no: 12345678901234567890\n"
        "p: &p [1, {q: 2}]\nr: *p\n"
    )
    got = quick(text)
    assert got == yaml.safe_load(text) == yaml_of(text)
    assert got["a"] == 8 and got["b"] == 31 and got["c"] == 1000 and got["g"] == 90
    assert got["r"] is got["p"]  # an alias is the same object, as PyYAML makes it
    # What it leaves to PyYAML: a timestamp, another tag, an alias inside itself.
    for unusual in ("f: 2026-12-06\n", "t: !!binary aGk=\n", "s: &s [1, *s]\n"):
        with pytest.raises(configfile._Unusual):
            quick(unusual)
    got = yaml_of("f: 2026-12-06\nt: !!binary aGk=\ns: &s [1, *s]\n")
    assert got["f"] == yaml.safe_load("f: 2026-12-06")["f"] and got["t"] == b"hi"
    assert got["s"][0] == 1 and got["s"][1] is got["s"]


def test_what_pyyaml_reads_deep_and_json_that_is_no_plain_number_read_as_before() -> None:
    """Nesting past the quick build's depth is PyYAML's to build, as deep as it reaches;
    a JSON number past a float's range is YAML's text, as it was (a limit refused)."""
    deep = "a: " + "[" * 600 + "]" * 600 + "\n"
    assert yaml_of(deep) == yaml.load(deep, Loader=yaml.CSafeLoader)
    with pytest.raises(configfile._Unusual):
        quick(deep)
    assert yaml_of('{"limit_credits": 1E400}') == {"limit_credits": "1E400"}
    for text in ("limit: " + "9" * 5000, '{"limit": ' + "9" * 5000 + "}"):
        with pytest.raises(ConfigError, match="invalid YAML: Exceeds the limit"):
            yaml_of(text)


def test_the_sample_config_is_built_without_pyyamls_constructor() -> None:
    """What the quick build leaves to PyYAML is what is unusual in a config: the sample
    has none of it."""
    text = (ROOT / "kling.example.yml").read_text()
    assert quick(text) == yaml.safe_load(text)


def yaml_of(text: str) -> Any:
    with tempfile.NamedTemporaryFile("w", suffix=".yml") as f:
        f.write(text)
        f.flush()
        return read_yaml(f.name)


NAMES = st.sampled_from(["a.jsonl", ".h.jsonl", "b.txt", "kling-x.jsonl"])
FOLDERS = st.sampled_from(["", "d/", ".hid/", "d/e/"])
PATTERNS = ["*.jsonl", "*", ".*", "**/*.jsonl", "d/*.jsonl", "*/kling-*.jsonl", "**/.*"]


@settings(max_examples=30, deadline=None)
@given(files=st.sets(st.tuples(FOLDERS, NAMES), min_size=1, max_size=8))
def test_logs_journal_is_checked_by_the_rules_the_listing_reads_by(
    files: set[tuple[str, str]],
) -> None:
    """``logs.journal`` is refused unless a glob finds it: the check and the listing
    agree on hidden names, ``**`` and folders, for any tree."""
    with tempfile.TemporaryDirectory() as name:
        root = Path(name)
        paths = []
        for folder, file in files:
            made = root / folder / file
            made.parent.mkdir(parents=True, exist_ok=True)
            made.write_text("")
            paths.append(str(made))
        for pattern in PATTERNS:
            found = set(expand_glob(str(root / pattern)))
            for path in paths:
                assert glob_matches(path, str(root / pattern)) == (path in found), (
                    path,
                    pattern,
                )
    with pytest.raises(ConfigError, match=re.escape("logs.journal: 'logs/.j.jsonl' is matched")):
        parse_config({"logs": {"paths": ["logs/*.jsonl"], "journal": "logs/.j.jsonl"}})
    parse_config({"logs": {"paths": ["logs/**/*.jsonl"], "journal": "logs/a/b/j.jsonl"}})
