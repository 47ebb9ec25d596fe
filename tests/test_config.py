from __future__ import annotations

from pathlib import Path

import pytest
from kling_exporter.cli import main
from kling_exporter.config import Config, ConfigError, load_config, parse_config


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
    assert "OK (1 budgets" in capsys.readouterr().out


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
