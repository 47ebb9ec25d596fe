"""The shipped rules and Alertmanager config: checked by promtool and amtool, and proven
end to end from a log line to a webhook through real Prometheus and Alertmanager."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import yaml
from kling_exporter.configfile import parse_config

from tests.helpers import ROOT, line, require_binary, wait_until, write_lines
from tests.stack import ALERTS, Clock, InProcessExporter, Webhook, alertmanager, prometheus

RULE_FILES = sorted(ALERTS.glob("*.rules.yml")) + sorted(ALERTS.glob("*.alerts.yml"))


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=60, check=False
    )


def test_promtool_check_rules() -> None:
    result = run(require_binary("promtool"), "check", "rules", *RULE_FILES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rule_unit_tests() -> None:
    tests = sorted((ALERTS / "tests").glob("*.yml"))
    assert tests
    result = run(require_binary("promtool"), "test", "rules", *tests)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_severity_summary_description_and_runbook() -> None:
    runbook = (ROOT / "docs" / "runbook.md").read_text().lower()
    alerts = [
        rule
        for path in ALERTS.glob("*.alerts.yml")
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
    ]
    assert len(alerts) >= 9
    for rule in alerts:
        name = rule["alert"]
        assert name.startswith("Kling")
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert {"summary", "description", "runbook_url"} <= rule["annotations"].keys(), name
        anchor = rule["annotations"]["runbook_url"].split("#")[1]
        assert anchor == name.lower() and f"## {name.lower()}" in runbook, name


def test_amtool_check_config() -> None:
    result = run(require_binary("amtool"), "check-config", ALERTS / "alertmanager.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_notification_template_names_budget_utilization_and_remaining(tmp_path: Path) -> None:
    data = {
        "status": "firing",
        "commonLabels": {"alertname": "KlingBudgetWarning", "budget": "marketing"},
        "alerts": [
            {
                "status": "firing",
                "labels": {
                    "alertname": "KlingBudgetWarning",
                    "budget": "marketing",
                    "period": "monthly",
                    "severity": "warning",
                },
                "annotations": {
                    "summary": "Kling budget marketing is at 85%",
                    "description": "The monthly budget marketing has used "
                    "85% of its limit. 1500 credits remain.",
                    "runbook_url": "https://example/runbook",
                },
            }
        ],
    }
    path = tmp_path / "data.json"
    path.write_text(json.dumps(data))
    result = run(
        require_binary("amtool"),
        "template",
        "render",
        f"--template.glob={ALERTS / 'templates' / '*.tmpl'}",
        "--template.text",
        '{{ template "kling.title" . }}\n{{ template "kling.text" . }}',
        f"--template.data={path}",
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "[FIRING:1] KlingBudgetWarning marketing" in out
    assert "Budget marketing (monthly): Kling budget marketing is at 85%" in out
    assert "1500 credits remain" in out and "Severity: warning" in out


def test_example_prometheus_config_is_valid(tmp_path: Path) -> None:
    config = yaml.safe_load((ROOT / "examples" / "prometheus.yml").read_text())
    config["rule_files"] = [str(p) for p in RULE_FILES]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    result = run(require_binary("promtool"), "check", "config", path)
    assert result.returncode == 0, result.stdout + result.stderr


def _completion(task_id: str, credits: float) -> str:
    return line(
        event="task_completed",
        task_id=task_id,
        project="marketing",
        model="kling-v2-6",
        status="succeed",
        credits_used=credits,
        timestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


def test_budget_alerts_reach_a_webhook_through_prometheus_and_alertmanager(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "kling-today.jsonl"
    write_lines(log, [_completion("t0", 70)])  # 70%: nothing yet
    config = parse_config(
        {
            "logs": {"paths": [str(tmp_path / "logs" / "kling-*.jsonl")], "poll_interval": "200ms"},
            "state": {"path": ""},
            "budgets": [
                {"name": "mk", "project": "marketing", "period": "monthly", "limit_credits": 100}
            ],
        }
    )
    clock = Clock()
    exporter = InProcessExporter(config, clock).start()
    webhook = Webhook()
    try:
        with (
            alertmanager(tmp_path, webhook) as am,
            prometheus(tmp_path, [f"127.0.0.1:{exporter.port}"], am.port) as prom,
        ):
            wait_until(
                lambda: prom.api("/api/v1/query?query=kling:budget_utilization:ratio")["data"][
                    "result"
                ],
                timeout=30,
            )
            time.sleep(3)
            assert not webhook.alerts(), "nothing should fire at 70%"

            crossed = time.time()
            write_lines(log, [_completion("t1", 15)])  # 85%: past the 80% threshold
            warning = wait_until(
                lambda: webhook.alerts("/warning", "KlingBudgetWarning", "firing"),
                timeout=60,
            )[0]
            assert warning[2]["labels"]["budget"] == "mk"
            assert "85%" in warning[2]["annotations"]["summary"]
            assert "15 credits remain" in warning[2]["annotations"]["description"]
            warn_latency = warning[0] - crossed

            crossed = time.time()
            write_lines(log, [_completion("t2", 20)])  # 105%: exhausted
            critical = wait_until(
                lambda: webhook.alerts("/critical", "KlingBudgetExhausted", "firing"),
                timeout=60,
            )[0]
            crit_latency = critical[0] - crossed
            assert critical[2]["labels"]["severity"] == "critical"

            def warning_inhibited() -> bool:
                alerts = am.api("/api/v2/alerts?filter=alertname%3D%22KlingBudgetWarning%22")
                return bool(alerts) and all(
                    a["status"]["state"] == "suppressed" and a["status"]["inhibitedBy"]
                    for a in alerts
                )

            wait_until(warning_inhibited, timeout=30)

            # The clock reaches the next month: usage is 0 again and both alerts resolve.
            end = exporter.daemon.snapshot()[0].budgets[0].period_end
            clock.offset = end - time.time() + 2
            wait_until(
                lambda: webhook.alerts("/critical", "KlingBudgetExhausted", "resolved"),
                timeout=90,
            )
            print(
                f"\nthreshold crossed -> webhook: warning {warn_latency:.2f}s, "
                f"critical {crit_latency:.2f}s"
            )
            (tmp_path / "latency.json").write_text(
                json.dumps({"warning_s": warn_latency, "critical_s": crit_latency})
            )
    finally:
        webhook.close()
        exporter.stop()
