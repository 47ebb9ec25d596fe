"""Deployment files agree with the program: Dockerfile, compose stack, systemd unit.
(There is no Docker engine here; the files are parsed and their configs checked by the
tools that read them.)"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path, PurePosixPath

import yaml
from kling_exporter.config import Config
from kling_exporter.flags import DEFAULT_LISTEN, HEALTH_URL_ENV, build_parser

from tests.helpers import ROOT, require_binary

COMPOSE = ROOT / "examples" / "compose"


def dockerfile() -> dict[str, list[str]]:
    """The final stage's instructions, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    stages = re.split(r"^FROM ", text, flags=re.M)
    out: dict[str, list[str]] = {}
    for raw in stages[-1].splitlines()[1:]:
        line = raw.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.setdefault(word.upper(), []).append(rest.strip())
    return out


def test_dockerfile_agrees_with_the_cli_defaults() -> None:
    d = dockerfile()
    port = DEFAULT_LISTEN.rsplit(":", 1)[1]
    assert d["EXPOSE"] == [port]
    assert yaml.safe_load(d["ENTRYPOINT"][0]) == ["kling-exporter"]
    assert yaml.safe_load(d["CMD"][0]) == ["serve"]
    assert yaml.safe_load(d["HEALTHCHECK"][0].split("CMD", 1)[1]) == [
        "kling-exporter",
        "healthcheck",
    ]
    env = dict(item.split("=", 1) for item in d["ENV"][-1].split())
    assert env[HEALTH_URL_ENV] == f"http://127.0.0.1:{port}/-/healthy"
    user = d["USER"][0]
    assert user not in ("root", "0")
    workdir = PurePosixPath(d["WORKDIR"][-1])
    volumes = yaml.safe_load(d["VOLUME"][0])
    defaults = Config()
    state_dir = (workdir / defaults.state.path).parent
    logs_dir = (workdir / defaults.logs.paths[0]).parent
    assert str(state_dir) in volumes and str(logs_dir) in volumes
    assert len(re.findall(r"^FROM ", (ROOT / "Dockerfile").read_text(), re.M)) >= 2  # multi-stage


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "tests"):
        assert entry in ignored
    for needed in ("pyproject.toml", "exporter", "README.md"):
        assert needed not in ignored


def test_compose_stack_is_wired_together() -> None:
    compose = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"exporter", "prometheus", "alertmanager", "grafana"} <= services.keys()
    assert services["exporter"]["command"][0] == "demo"
    assert services["exporter"]["ports"] == [f"{DEFAULT_LISTEN.rsplit(':', 1)[1]}:10177"]
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert (COMPOSE / source).exists(), f"{name}: {source} does not exist"
    prom = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    assert prom["scrape_configs"][0]["static_configs"][0]["targets"] == ["exporter:10177"]
    assert prom["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == [
        "alertmanager:9093"
    ]
    # Grafana's provider path is where compose mounts the dashboards.
    provider = yaml.safe_load(
        (ROOT / "grafana" / "provisioning" / "dashboards" / "kling.yml").read_text()
    )["providers"][0]
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    assert mounts["../../grafana/dashboards"] == provider["options"]["path"]
    datasource = yaml.safe_load(
        (ROOT / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"][0]
    # The URL comes from Grafana's environment, which compose gives the Prometheus it runs.
    assert datasource["url"] == "${PROMETHEUS_URL}"
    prometheus = services["grafana"]["environment"]["PROMETHEUS_URL"]
    assert prometheus == "http://prometheus:9090" and "9090:9090" in services["prometheus"]["ports"]
    am = yaml.safe_load((ROOT / "alerts" / "alertmanager.yml").read_text())
    hosts = {
        hook["url"].split("/")[2].split(":")[0]
        for r in am["receivers"]
        for hook in r.get("webhook_configs", [])
    }
    assert hosts <= services.keys()


def _rooted(config_path: Path, tmp_path: Path) -> Path:
    """The compose Prometheus config with its container paths pointed into the repo."""
    text = config_path.read_text().replace("/etc/prometheus/kling/", f"{ROOT / 'alerts'}/")
    config = yaml.safe_load(text)
    for job in config["scrape_configs"]:
        if "tls_config" in job:
            ca = tmp_path / "ca.crt"
            ca.write_text("")
            job["tls_config"]["ca_file"] = str(ca)
        if "basic_auth" in job:
            job["basic_auth"]["password_file"] = str(tmp_path / "password")
            (tmp_path / "password").write_text("x")
    out = tmp_path / config_path.name
    out.write_text(yaml.safe_dump(config))
    return out


def test_compose_prometheus_configs_pass_promtool(tmp_path: Path) -> None:
    promtool = require_binary("promtool")
    for name in ("prometheus.yml", "prometheus-tls.yml"):
        path = _rooted(COMPOSE / name, tmp_path)
        result = subprocess.run(
            [promtool, "check", "config", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, name + result.stdout + result.stderr


def test_systemd_unit_runs_real_flags() -> None:
    unit = (ROOT / "examples" / "systemd" / "kling-exporter.service").read_text()
    exec_start = re.search(r"^ExecStart=(.+?)(?<!\\)$", unit.replace("\\\n", " "), re.M)
    assert exec_start
    args = shlex.split(exec_start.group(1))
    assert args[0].endswith("/kling-exporter") and args[1] == "serve"
    parsed = build_parser().parse_args(args[1:])
    assert parsed.config_file == "/etc/kling-exporter/config.yml"
    # Install steps that work (no index serves the package), the group it needs, and
    # the log folder it is granted named as logs.paths.
    assert "pip install kling-exporter" not in unit and "groupadd --system kling-logs" in unit
    read_only = re.search(r"^ReadOnlyPaths=(.+)$", unit, re.M)
    assert read_only and all(p.startswith("-") for p in read_only.group(1).split())
    assert 'logs: {paths: ["/var/log/kling/kling-*.jsonl"]}' in unit
    for hardening in (
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "DynamicUser=yes",
        "CapabilityBoundingSet=",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ):
        assert hardening in unit


def test_the_image_installs_from_the_lock_and_ships_the_license() -> None:
    """The build stage resolves nothing: uv at its hashed version, then uv.lock as it is."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    build, final = re.split(r"^FROM ", text, flags=re.M)[1:]
    runs = [line.strip()[4:] for line in build.splitlines() if line.strip().startswith("RUN ")]
    assert runs == [
        "pip install --no-cache-dir --require-hashes -r /tmp/uv-requirements.txt",
        "uv sync --locked --no-editable --python /usr/local/bin/python3",
    ]
    copies = [line.split()[1:-1] for line in text.splitlines() if line.startswith("COPY ")]
    sources = [s for words in copies for s in words if not s.startswith("--")]
    assert "uv.lock" in sources and "LICENSE" in sources
    ignored = (ROOT / ".dockerignore").read_text().split()
    for source in sources:
        if not source.startswith("/opt/"):
            assert (ROOT / source).exists() and source not in ignored, source
    assert "COPY LICENSE /usr/share/doc/kling-exporter/LICENSE" in final
