"""The HTTP face against real transports and hostile clients: bodies split across TCP
segments, bodies that stop half-way, any bytes at any endpoint, one error shape."""

from __future__ import annotations

import json
import socket
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kling_exporter.configfile import parse_config
from kling_exporter.model import ReaderUnavailable
from kling_exporter.serving import bodies

from tests.stack import InProcessExporter

TOKEN = "callback-token-of-the-tests"  # noqa: S105 - a test's own token
CONFIG = f"""
state: {{path: ""}}
logs: {{paths: ["{{logs}}/kling-*.jsonl"], poll_interval: 200ms}}
kling: {{callback_token: {TOKEN}}}
budgets:
  - {{name: team, project: team, period: monthly, limit_credits: 1000}}
"""

CHECK = json.dumps({"project": "team", "mode": "std", "duration": 5, "count": 2}).encode()
RESERVE = json.dumps({"project": "team", "kind": "image", "count": 3}).encode()
CALLBACK = json.dumps(
    {
        "task_id": "kling-1",
        "task_status": "succeed",
        "final_unit_deduction": "10",
        "task_info": {"external_task_id": "ours-1"},
        "updated_at": 1_764_000_000_000,
    }
).encode()

# Every POST endpoint, with a body it takes and what it answers for it.
POSTS = [
    ("/api/v1/check", CHECK, 200),
    ("/api/v1/reservations", RESERVE, 201),
    (f"/api/v1/kling/callback?token={TOKEN}", CALLBACK, 200),
]


@pytest.fixture(scope="module")
def exporter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessExporter]:
    logs = tmp_path_factory.mktemp("logs")
    config_file = logs / "kling.yml"
    config_file.write_text(CONFIG.replace("{logs}", str(logs)))
    served = InProcessExporter(parse_config(yaml.safe_load(config_file.read_text()))).start()
    served.daemon.config_path = str(config_file)  # so /-/reload reads the same config
    yield served
    served.stop()


def send_raw(
    port: int,
    head: bytes,
    pieces: list[bytes],
    pause: float = 0.05,
    timeout: float = 15,
) -> tuple[int, dict[str, str], bytes]:
    """Send ``head`` and then each piece in its own segment (TCP_NODELAY, a pause
    between), read the whole answer (the server closes), and split it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(head)
        for piece in pieces:
            time.sleep(pause)
            s.sendall(piece)
        return read_answer(s)


def read_answer(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before an answer: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body[:length]


def post_head(path: str, length: int | None, extra: str = "") -> bytes:
    size = f"Content-Length: {length}\r\n" if length is not None else ""
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"{size}{extra}Connection: close\r\n\r\n"
    ).encode()


def split(body: bytes, parts: int) -> list[bytes]:
    step = -(-len(body) // parts)
    return [body[i : i + step] for i in range(0, len(body), step)]


def callback_body(task: str) -> bytes:
    return CALLBACK.replace(b"ours-1", task.encode())


@pytest.mark.parametrize("parts", [2, 5])
@pytest.mark.parametrize(("path", "body", "expected"), POSTS)
def test_a_body_split_across_segments_is_read_whole(
    exporter: InProcessExporter, path: str, body: bytes, expected: int, parts: int
) -> None:
    if "callback" in path:
        body = callback_body(f"split-{parts}")
    status, _, answer = send_raw(exporter.port, post_head(path, len(body)), split(body, parts))
    assert status == expected, answer
    json.loads(answer)


@pytest.mark.parametrize(("path", "body", "expected"), POSTS)
def test_a_chunked_body_in_pauses_is_read_whole(
    exporter: InProcessExporter, path: str, body: bytes, expected: int
) -> None:
    if "callback" in path:
        body = callback_body("chunked")
    chunks = [b"%x\r\n%s\r\n" % (len(p), p) for p in split(body, 4)] + [b"0\r\n\r\n"]
    head = post_head(path, None, "Transfer-Encoding: chunked\r\n")
    status, _, answer = send_raw(exporter.port, head, chunks)
    assert status == expected, answer


def test_a_body_that_stops_half_way_gets_408_and_frees_the_connection(
    exporter: InProcessExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bodies, "BODY_TIMEOUT", 0.5)
    started = time.monotonic()
    status, _, answer = send_raw(
        exporter.port, post_head("/api/v1/check", len(CHECK)), [CHECK[:10]], timeout=5
    )
    assert status == 408
    assert json.loads(answer)["field"] == "body"
    assert time.monotonic() - started < 4
    health, _, _ = send_raw(exporter.port, b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n", [])
    assert health == 200


def test_a_body_over_64_kib_is_413_whatever_its_length_header_says(
    exporter: InProcessExporter,
) -> None:
    big = b'{"project": "' + b"x" * (70 * 1024) + b'"}'
    for path, _, _ in POSTS:
        status, _, answer = send_raw(exporter.port, post_head(path, len(big)), split(big, 3))
        assert status == 413, (path, answer)
        chunks = [b"%x\r\n%s\r\n" % (len(p), p) for p in split(big, 8)] + [b"0\r\n\r\n"]
        head = post_head(path, None, "Transfer-Encoding: chunked\r\n")
        status, _, answer = send_raw(exporter.port, head, chunks, pause=0.01)
        assert status == 413, (path, answer)
        assert json.loads(answer)["field"] == "body"


def error_of(status: int, headers: dict[str, str], body: bytes) -> dict[str, Any]:
    assert 400 <= status < 600
    assert headers["content-type"].startswith("application/json"), (status, body)
    answer: dict[str, Any] = json.loads(body)
    assert set(answer) == {"error", "field"}, answer
    assert isinstance(answer["error"], str) and answer["error"]
    assert isinstance(answer["field"], str)
    return answer


@pytest.mark.parametrize(
    ("request_line", "status"),
    [
        ("GET /nowhere", 404),
        ("DELETE /metrics", 405),
        ("GET /api/v1/check", 405),
        ("DELETE /api/v1/reservations/none-such", 404),
        ("POST /api/v1/kling/callback?token=wrong", 401),
    ],
)
def test_every_error_has_the_one_json_shape(
    exporter: InProcessExporter, request_line: str, status: int
) -> None:
    head = f"{request_line} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    got, headers, body = send_raw(exporter.port, head.encode(), [])
    assert got == status
    error_of(got, headers, body)


@pytest.mark.parametrize("field", ["task_id", "task_status", "task_info"])
def test_a_lone_surrogate_in_a_callback_is_a_400_naming_the_field(
    exporter: InProcessExporter, field: str
) -> None:
    body = json.loads(CALLBACK)
    if field == "task_info":
        body["task_info"]["external_task_id"] = "k-\ud800"
        named = "task_info.external_task_id"
    else:
        body[field] = "k-\ud800"
        named = field
    raw = json.dumps(body).encode()  # ensure_ascii: the surrogate travels as \ud800
    path = POSTS[2][0]
    status, headers, answer = send_raw(exporter.port, post_head(path, len(raw)), [raw])
    assert status == 400
    assert error_of(status, headers, answer)["field"] == named


@pytest.mark.parametrize("path", ["/api/v1/check", "/api/v1/reservations"])
def test_a_lone_surrogate_in_a_request_is_a_400_naming_the_field(
    exporter: InProcessExporter, path: str
) -> None:
    raw = b'{"project": "k-\\ud800"}'
    status, headers, answer = send_raw(exporter.port, post_head(path, len(raw)), [raw])
    assert status == 400
    assert error_of(status, headers, answer)["field"] == "project"


def test_a_failed_reload_names_no_path_on_disk(tmp_path: Path) -> None:
    config_file = tmp_path / "kling.yml"
    config_file.write_text(CONFIG.replace("{logs}", str(tmp_path)))
    config = parse_config(yaml.safe_load(config_file.read_text()))
    config_path = str(config_file)
    served = InProcessExporter(config).start()
    try:
        served.daemon.config_path = str(config_file)
        config_file.write_text("budgets: [{name: x, period: montly, limit_credits: 1}]\n")
        head = b"POST /-/reload HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
        status, headers, body = send_raw(served.port, head, [])
        answer = error_of(status, headers, body)
        assert "budgets[0].period" in answer["error"]
        config_file.unlink()
        status, headers, body = send_raw(served.port, head, [])
        answer = error_of(status, headers, body)
        assert str(tmp_path) not in body.decode() and config_path not in body.decode()
    finally:
        served.stop()


# -- any bytes, any JSON, at every endpoint ---------------------------------------------

ENDPOINTS = [
    ("POST", "/api/v1/check"),
    ("POST", "/api/v1/reservations"),
    ("POST", f"/api/v1/kling/callback?token={TOKEN}"),
    ("POST", "/-/reload"),
    ("GET", "/api/v1/budgets"),
]
# Text with lone surrogates among ordinary characters: json.dumps writes them as \udXXX.
ANY_TEXT = st.text(
    st.characters(codec=None, categories=None) | st.sampled_from("\ud800\udfff\x00\u2028"),
    max_size=20,
)
NAMES = ["project", "user", "model", "mode", "duration", "audio", "kind", "count", "ttl"]
NAMES += ["id", "task_id", "task_status", "task_info", "final_unit_deduction", "updated_at"]
KEYS = st.sampled_from(NAMES) | ANY_TEXT
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(10**40), 10**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | ANY_TEXT
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=5),
    max_leaves=12,
)


@st.composite
def json_bodies(draw: st.DrawFn) -> bytes:
    """JSON texts a hostile client might send: odd types and surrogates, objects with
    repeated keys, nesting thousands deep, numbers of hundreds of digits."""
    shape = draw(st.sampled_from(["value", "object", "duplicates", "deep", "huge"]))
    if shape == "value":
        return json.dumps(draw(VALUES)).encode()
    if shape == "object":
        return json.dumps(draw(st.dictionaries(KEYS, VALUES, max_size=6))).encode()
    if shape == "duplicates":
        key = json.dumps(draw(KEYS))
        values = draw(st.lists(VALUES, min_size=2, max_size=3))
        return ("{" + ",".join(f"{key}:{json.dumps(v)}" for v in values) + "}").encode()
    if shape == "deep":
        depth = draw(st.integers(100, 20_000))
        return b'{"project":' * 1 + b"[" * depth + b"]" * depth + b"}"
    digits = draw(st.integers(300, 5000))
    return b'{"count": 1' + b"0" * digits + b', "duration": 1e' + b"9" * 5 + b"}"


def exchange(port: int, method: str, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
        "Content-Type: application/json\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head + body)
        return read_answer(s)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    endpoint=st.sampled_from(ENDPOINTS),
    body=st.binary(max_size=300) | json_bodies(),
)
def test_any_bytes_at_any_endpoint_answer_below_500_in_the_one_shape(
    exporter: InProcessExporter, endpoint: tuple[str, str], body: bytes
) -> None:
    method, path = endpoint
    status, headers, answer = exchange(exporter.port, method, path, body)
    assert status < 500, (status, answer)
    if status >= 400:
        error_of(status, headers, answer)
    assert exchange(exporter.port, "GET", "/-/healthy", b"")[0] == 200


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rid=st.text(st.characters(codec="utf-8"), min_size=1, max_size=300))
def test_any_reservation_id_in_a_path_answers_below_500(
    exporter: InProcessExporter, rid: str
) -> None:
    path = "/api/v1/reservations/" + urllib.parse.quote(rid, safe="")
    status, headers, answer = exchange(exporter.port, "DELETE", path, b"")
    assert status in (400, 404), (status, answer)
    error_of(status, headers, answer)


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/api/v1/check", CHECK),
        ("POST", "/api/v1/reservations", RESERVE),
        ("GET", "/api/v1/budgets", b""),
    ],
)
def test_a_reader_that_cannot_answer_is_a_503_that_says_so(
    exporter: InProcessExporter,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    path: str,
    body: bytes,
) -> None:
    def gone() -> Any:
        raise ReaderUnavailable("the reader process has ended")

    monkeypatch.setattr(exporter.daemon, "view", gone)
    status, headers, answer = exchange(exporter.port, method, path, body)
    assert status == 503
    assert error_of(status, headers, answer)["error"] == "reader: the reader process has ended"


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=12,
)


@given(value=st.dictionaries(st.text(max_size=3), JSON_VALUES, max_size=4), key=st.text(max_size=3))
def test_a_key_given_twice_anywhere_is_refused_by_name_and_a_unique_body_reads_as_json(
    value: dict[str, Any], key: str
) -> None:
    """One parse serves the budget API and the gateway: a body with unique keys reads as
    ``json.loads`` reads it; one that repeats a key in any object is refused naming it
    (a first-wins parser and a last-wins one would read two requests)."""
    text = json.dumps(value)
    assert bodies.parse_json(text.encode(), unique=True) == json.loads(text)
    inner = json.dumps(key)
    repeated = f'{{"x": [1, {{{inner}: 1, {inner}: 2}}]}}'
    with pytest.raises(ValueError, match=r": given twice$") as e:
        bodies.parse_json(repeated.encode(), unique=True)
    assert str(e.value) == f"{key}: given twice"
