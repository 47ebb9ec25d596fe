"""--web.config.file: real TLS (certificates made here), client certificates, basic auth,
headers, and Prometheus itself scraping over TLS with basic auth."""

from __future__ import annotations

import base64
import datetime as dt
import gzip
import ipaddress
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bcrypt
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from kling_exporter.flags import HEALTH_URL_ENV
from kling_exporter.serving.webconfig import BasicAuth, FailureLimit

from tests.helpers import ROOT, DaemonProcess, free_port, require_binary, wait_until, write_lines
from tests.stack import Process

Factory = Callable[..., DaemonProcess]
PASSWORD = "s3cret-pass"  # noqa: S105 - a test password


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def make_certs(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, in PEM files."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("kling test CA"))
        .issuer_name(_name("kling test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    out = {"ca": directory / "ca.crt"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for role, usage in (
        ("server", ExtendedKeyUsageOID.SERVER_AUTH),
        ("client", ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(f"kling {role}"))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if role == "server":
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
                ),
                critical=False,
            )
        cert = builder.sign(ca_key, hashes.SHA256())
        out[role] = directory / f"{role}.crt"
        out[role].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[f"{role}_key"] = directory / f"{role}.key"
        _write_key(key, out[f"{role}_key"])
    return out


def web_config(
    tmp_path: Path,
    certs: dict[str, Path],
    client_certs: bool = False,
    users: bool = True,
    cost: int = 4,
) -> Path:
    config: dict[str, object] = {
        "tls_server_config": {
            "cert_file": certs["server"].name,
            "key_file": certs["server_key"].name,
        },
        "http_server_config": {"headers": {"X-Frame-Options": "deny"}},
    }
    if client_certs:
        config["tls_server_config"].update(  # type: ignore[attr-defined]
            client_auth_type="RequireAndVerifyClientCert", client_ca_file=certs["ca"].name
        )
    if users:
        hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(cost)).decode()
        config["basic_auth_users"] = {"prometheus": hashed.replace("$2b$", "$2y$", 1)}
    path = tmp_path / "web.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def get(
    url: str, ctx: ssl.SSLContext, user: str | None = None, password: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    headers = {}
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    req = urllib.request.Request(url, headers=headers)  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=10, context=ctx) as resp:  # noqa: S310
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def client_ctx(
    ca: Path | None, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


@pytest.fixture
def certs(tmp_path: Path) -> dict[str, Path]:
    return make_certs(tmp_path)


def start(factory: Factory, tmp_path: Path, web: Path) -> DaemonProcess:
    write_lines(
        tmp_path / "logs" / "kling-x.jsonl", ['{"task_id": "u1", "credits": 5, "project": "p"}']
    )
    d = factory("state: {path: ''}\n", extra=["--web.config.file", str(web)], wait_ready=False)
    wait_until(lambda: "listening" in d.output(), timeout=20)
    return d


def test_tls_with_and_without_the_ca(
    tmp_path: Path, certs: dict[str, Path], daemon_factory: Factory
) -> None:
    d = start(daemon_factory, tmp_path, web_config(tmp_path, certs, users=False))
    url = f"https://127.0.0.1:{d.port}/metrics"
    status, headers, body = wait_until(lambda: get(url, client_ctx(certs["ca"])))
    assert status == 200 and b"kling_credits_used_total" in body
    assert headers["X-Frame-Options"] == "deny"
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        get(url, client_ctx(None))
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # plain HTTP: no answer
        urllib.request.urlopen(f"http://127.0.0.1:{d.port}/metrics", timeout=5)


def test_client_certificates_required(
    tmp_path: Path, certs: dict[str, Path], daemon_factory: Factory
) -> None:
    d = start(daemon_factory, tmp_path, web_config(tmp_path, certs, client_certs=True, users=False))
    url = f"https://127.0.0.1:{d.port}/metrics"
    with_cert = client_ctx(certs["ca"], certs["client"], certs["client_key"])
    assert wait_until(lambda: get(url, with_cert))[0] == 200
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
        get(url, client_ctx(certs["ca"]))


def test_basic_auth(tmp_path: Path, certs: dict[str, Path], daemon_factory: Factory) -> None:
    d = start(daemon_factory, tmp_path, web_config(tmp_path, certs))
    base = f"https://127.0.0.1:{d.port}"
    ctx = client_ctx(certs["ca"])
    assert wait_until(lambda: get(base + "/metrics", ctx, "prometheus", PASSWORD))[0] == 200
    for user, password in (("prometheus", "wrong"), ("nobody", PASSWORD), (None, None)):
        status, headers, _ = get(base + "/metrics", ctx, user, password)
        assert status == 401, (user, password)
        assert headers["WWW-Authenticate"] == 'Basic realm="kling-exporter"'
    assert get(base + "/api/v1/budgets", ctx)[0] == 401
    assert get(base + "/", ctx)[0] == 401
    assert get(base + "/-/healthy", ctx)[0] == 200  # the one open path
    assert get(base + "/api/v1/budgets", ctx, "prometheus", PASSWORD)[0] == 200


def test_a_wrong_password_flood_neither_delays_a_verified_scrape_nor_queues_unbounded(
    tmp_path: Path, certs: dict[str, Path], daemon_factory: Factory
) -> None:
    """300 concurrent wrong passwords against bcrypt cost 10 (about 50 ms of CPU each):
    a scraper whose credentials were verified before is answered while they are still
    arriving, and the flood is refused (429 past the failure burst, 503 past the pending
    bound) instead of queueing for 300 bcrypt checks."""
    d = start(daemon_factory, tmp_path, web_config(tmp_path, certs, cost=10))
    url = f"https://127.0.0.1:{d.port}/metrics"
    ctx = client_ctx(certs["ca"])
    assert wait_until(lambda: get(url, ctx, "prometheus", PASSWORD))[0] == 200
    statuses: list[int] = []
    with ThreadPoolExecutor(300) as pool:
        flood = [pool.submit(get, url, ctx, "prometheus", f"wrong-{i}") for i in range(300)]
        time.sleep(0.3)  # the flood is under way
        status, _, body = get(url, ctx, "prometheus", PASSWORD)
        still_flooding = sum(not f.done() for f in flood)
        statuses = [f.result()[0] for f in flood]
    assert status == 200 and b"kling_log_lines_read_total" in body
    assert still_flooding > 0  # answered while the flood was in flight, not after it
    assert set(statuses) <= {401, 429, 503}
    # bcrypt ran for a bounded number only; the rest were refused without a check (503
    # past the pending bound, 429 past the failure burst: which, depends on timing).
    assert statuses.count(401) <= 10 + 32
    assert statuses.count(429) + statuses.count(503) >= 300 - (10 + 32)


def test_a_client_past_its_failure_burst_is_refused_until_the_window_ends() -> None:
    limit = FailureLimit(burst=3, window=60)
    for _ in range(3):
        assert not limit.blocked("10.0.0.1", 100.0)
        limit.failed("10.0.0.1", 100.0)
    assert limit.blocked("10.0.0.1", 130.0)
    assert not limit.blocked("10.0.0.2", 130.0)  # per client
    assert not limit.blocked("10.0.0.1", 161.0)  # the window is over


def test_unknown_user_is_checked_against_a_hash_of_the_same_cost() -> None:
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(5)).decode()
    auth = BasicAuth({"a": hashed})
    assert auth._dummy[4:6] == b"05"
    assert auth.check("a", "pw") and not auth.check("a", "nope") and not auth.check("b", "pw")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("tls_server_config: {cert_file: a.crt}\n", "tls_server_config.key_file: missing"),
        (
            "tls_server_config: {cert_file: a.crt, key_file: a.key, min_version: TLS9}\n",
            "tls_server_config.min_version: expected one of",
        ),
        (
            "tls_server_config: {cert_file: nope.crt, key_file: nope.key}\n",
            "tls_server_config.cert_file: cannot load",
        ),
        ("basic_auth_users: {bob: plaintext}\n", "basic_auth_users.bob: expected a bcrypt hash"),
        (
            "http_server_config: {headers: {X-Powered-By: me}}\n",
            "http_server_config.headers.X-Powered-By: not one of the allowed headers",
        ),
        ("tls_config: {}\n", "tls_config: unknown key"),
    ],
)
def test_a_bad_web_config_refuses_to_start(
    tmp_path: Path, daemon_factory: Factory, content: str, message: str
) -> None:
    path = tmp_path / "web.yml"
    path.write_text(content)
    d = daemon_factory(extra=["--web.config.file", str(path)], wait_ready=False)
    assert d.proc is not None and d.proc.wait(timeout=20) == 2
    assert message in d.output()


def test_example_web_config_passes_promtool(tmp_path: Path, certs: dict[str, Path]) -> None:
    example = yaml.safe_load((ROOT / "examples" / "web-config.yml").read_text())
    tls = example["tls_server_config"]
    (tmp_path / "tls").mkdir()
    for field, source in (("cert_file", "server"), ("key_file", "server_key")):
        (tmp_path / tls[field]).write_bytes(certs[source].read_bytes())
    path = tmp_path / "web-config.yml"
    path.write_text((ROOT / "examples" / "web-config.yml").read_text())
    result = subprocess.run(
        [require_binary("promtool"), "check", "web-config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert bcrypt.checkpw(b"change-me", example["basic_auth_users"]["prometheus"].encode())


def test_prometheus_scrapes_over_tls_with_basic_auth(
    tmp_path: Path, certs: dict[str, Path], daemon_factory: Factory
) -> None:
    d = start(daemon_factory, tmp_path, web_config(tmp_path, certs))
    config = yaml.safe_load((ROOT / "examples" / "compose" / "prometheus-tls.yml").read_text())
    job = config["scrape_configs"][0]
    job["tls_config"]["ca_file"] = str(certs["ca"])
    (tmp_path / "password").write_text(PASSWORD)
    job["basic_auth"]["password_file"] = str(tmp_path / "password")
    job["static_configs"] = [{"targets": [f"127.0.0.1:{d.port}"]}]
    job["scrape_interval"] = "1s"
    config["rule_files"] = [str(ROOT / "alerts" / "kling.rules.yml")]
    config.pop("alerting")
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    prom = Process(
        "prometheus",
        [
            require_binary("prometheus"),
            f"--config.file={path}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        tmp_path,
        port,
    )
    try:
        prom.wait_ready()

        def scraped() -> bool:
            result = prom.api("/api/v1/query?query=kling_credits_used_total")["data"]["result"]
            return bool(result) and result[0]["value"][1] == "5"

        wait_until(scraped, timeout=30)
        up = prom.api("/api/v1/query?query=up")["data"]["result"]
        assert up[0]["value"][1] == "1" and up[0]["metric"]["job"] == "kling-exporter"
    finally:
        prom.stop()


def test_healthcheck_command_reaches_a_tls_exporter_on_another_port(
    tmp_path: Path, certs: dict[str, Path], daemon_factory: Factory
) -> None:
    d = start(daemon_factory, tmp_path, web_config(tmp_path, certs))
    url = f"https://127.0.0.1:{d.port}/-/healthy"

    def health(*args: str, env: dict[str, str] | None = None) -> int:
        cmd = [sys.executable, "-m", "kling_exporter", "healthcheck", *args]
        environ = {**os.environ, "PYTHONPATH": str(ROOT / "exporter")}
        environ.pop(HEALTH_URL_ENV, None)
        environ.update(env or {})
        done = subprocess.run(cmd, env=environ, capture_output=True, timeout=30, check=False)
        return done.returncode

    assert wait_until(lambda: health("--url", url) == 0, timeout=20)
    assert health(env={HEALTH_URL_ENV: url}) == 0
    assert health("--url", f"http://127.0.0.1:{free_port()}/-/healthy") == 1


def test_make_certs_lets_the_example_web_config_run_as_shipped(tmp_path: Path) -> None:
    """`make certs` writes the pair the example names, so promtool accepts the example
    unchanged (and the exporter would start with it)."""
    require_binary("openssl")
    shutil.copy(ROOT / "examples" / "web-config.yml", tmp_path / "web-config.yml")
    subprocess.run(
        ["make", "-s", "-C", str(ROOT), "certs", f"CERTS_DIR={tmp_path / 'tls'}"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    result = subprocess.run(
        [require_binary("promtool"), "check", "web-config", str(tmp_path / "web-config.yml")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "tls" / "exporter.key").stat().st_mode & 0o777 == 0o600


def test_a_body_in_separate_tls_records_is_read_whole(
    tmp_path: Path, certs: dict[str, Path], daemon_factory: Factory
) -> None:
    d = start(daemon_factory, tmp_path, web_config(tmp_path, certs, users=False))
    body = json.dumps({"project": "p", "mode": "std", "duration": 5, "count": 2}).encode()
    head = (
        f"POST /api/v1/check HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(body)}\r\n"
        "Content-Type: application/json\r\nConnection: close\r\n\r\n"
    ).encode()
    ctx = client_ctx(certs["ca"])
    wait_until(lambda: get(f"https://127.0.0.1:{d.port}/-/healthy", ctx)[0] == 200)
    with (
        socket.create_connection(("127.0.0.1", d.port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(head)
        for piece in (body[:7], body[7:30], body[30:]):  # each its own TLS record
            time.sleep(0.05)
            tls.sendall(piece)
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.split()[1] == b"200", answer
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["allowed"] is True


def test_a_large_scrape_reaches_a_slow_tls_reader_whole_and_one_that_leaves_harms_none(
    tmp_path: Path, certs: dict[str, Path], daemon_factory: Factory
) -> None:
    """A /metrics answer past ``SENT_WHOLE`` goes out a piece at a time: over TLS, to a
    scraper that reads 4 KiB at a time, it arrives whole with its length and the
    configured headers, plain and gzipped; a scraper that leaves half way through stops
    nothing, and the next scrape is whole."""
    projects = 9000
    write_lines(
        tmp_path / "logs" / "kling-x.jsonl",
        [
            {"event": "task_submitted", "task_id": f"t{i}", "project": f"p{i}"}
            for i in range(projects)
        ],
    )
    config = f"state: {{path: ''}}\nlabels: {{max_projects: {projects + 10}}}\n"
    web = web_config(tmp_path, certs, users=False)
    d = daemon_factory(config, extra=["--web.config.file", str(web)], wait_ready=False)
    ctx = client_ctx(certs["ca"])
    url = f"https://127.0.0.1:{d.port}"
    wait_until(lambda: get(url + "/-/ready", ctx)[0] == 200, timeout=60)

    def scrape(gz: bool, leave_after: int | None = None) -> tuple[dict[str, str], bytes]:
        head = "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
        head += "Accept-Encoding: gzip\r\n\r\n" if gz else "\r\n"
        with (
            socket.create_connection(("127.0.0.1", d.port), timeout=30) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.sendall(head.encode())
            answer = b""
            while chunk := tls.recv(4096):
                answer += chunk
                if leave_after is not None and len(answer) > leave_after:
                    return {}, b""
                time.sleep(0.0005)
        top, _, body = answer.partition(b"\r\n\r\n")
        lines = top.decode().split("\r\n")
        assert lines[0].split()[1] == "200", lines[0]
        headers = dict(line.split(": ", 1) for line in lines[1:])
        assert int(headers["Content-Length"]) == len(body)
        assert headers["X-Frame-Options"] == "deny"
        return headers, body

    headers, plain = scrape(gz=False)
    assert len(plain) > 1 << 20  # sent in pieces
    assert plain.count(b"\nkling_tasks_submitted_total{") == projects
    scrape(gz=False, leave_after=200_000)
    headers, zipped = scrape(gz=True)
    assert headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(zipped).count(b"\nkling_tasks_submitted_total{") == projects
    assert scrape(gz=False)[1].count(b"kling_tasks_submitted_total{") == projects
