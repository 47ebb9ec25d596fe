"""Scrapes rendered in blocks kept from one scrape to the next (``collector``): what is
served is always what a full render of the same instant gives, byte for byte, however
the values, the series and the families change between scrapes."""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kling_exporter.accounting.metrics import METRICS, declared, families
from kling_exporter.blocks import Block, Blocks, gzipped, joined, to_send
from kling_exporter.collector import BLOCK_SERIES, Family, FamilyCollector, Part, TextRenderer
from kling_exporter.configfile import parse_config
from kling_exporter.messages import (
    FromReader,
    Published,
    Pushed,
    Reload,
    Reloaded,
    Render,
    Rendered,
    Scraped,
    ToReader,
)
from kling_exporter.reading import reader as reader_module
from kling_exporter.reading.daemon import Daemon
from kling_exporter.serving import link as link_module
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from tests.helpers import (
    NOW,
    DaemonProcess,
    by_name,
    completed,
    line,
    parse_metrics,
    submitted,
    value,
    wait_until,
    write_lines,
)

DAY = 86400.0


def full_render(rows: list[Family]) -> bytes:
    """prometheus_client's own rendering of the same families: the reference."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FamilyCollector(lambda: rows))
    return generate_latest(registry)


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def scraped(daemon: Daemon) -> tuple[bytes, dict[str, bytes]]:
    """The daemon's plain-text scrape without its process metrics (they change between
    any two reads), and each family's text in it."""
    parts = [p for p in daemon.render_parts() if p.key != "process"]
    texts: dict[str, bytes] = {}
    for p in parts:
        name = p.key.rsplit("/", 1)[0]
        texts[name] = texts.get(name, b"") + p.text
    return joined([Block(p.text) for p in parts]), texts


def config(tmp_path: Path, **over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "logs": {"paths": [str(tmp_path / "logs" / "*.jsonl")]},
        "state": {"path": str(tmp_path / "k.state"), "interval": "1m"},
        "labels": {"max_projects": 3},
        "tasks": {"ttl": "1h", "max_tasks": 1000},
        "budgets": [
            {"name": "a", "project": "p0", "period": "daily", "limit_credits": 100},
            {"name": "all", "period": "monthly", "limit_usd": 50, "alert_threshold": 0.5},
        ],
    }
    base.update(over)
    return base


def test_every_family_served_in_blocks_matches_a_full_render_as_each_changes(  # noqa: PLR0915
    tmp_path: Path,
) -> None:
    """Values change between scrapes in every family (the test checks that they did);
    after each change the blocks served are byte for byte a full render."""
    logs = tmp_path / "logs"
    logs.mkdir()
    path = tmp_path / "config.yml"
    path.write_text(json.dumps(config(tmp_path)))
    clock = Clock()
    daemon = Daemon(parse_config(config(tmp_path)), str(path), clock=clock)
    seen: dict[str, set[bytes]] = {}
    log = logs / "kling-a.jsonl"

    def step(poll: bool = True) -> None:
        if poll:
            daemon.poll_once()
        served, texts = scraped(daemon)
        assert served == full_render(families(*daemon.snapshot()))
        ledger = daemon.ledger  # the statuses kept between scrapes, against new ones
        assert daemon.statuses.of(ledger, clock.now) == ledger.budget_statuses(clock.now)
        for name, text in texts.items():
            seen.setdefault(name, set()).add(text)

    def lines(*raw: str | dict[str, Any]) -> None:
        write_lines(log, raw)

    try:
        step()
        lines(
            submitted("t1", project="p0"),
            line(
                event="task_submitted",
                task_id="t2",
                project="p1",
                model="kling-v2-1",
                mode="pro",
                duration=10,
            ),
        )
        step()
        lines(
            completed("t1", credits_used=35),
            line(event="task_completed", task_id="t2", status="failed"),
            {"event": "task_error", "task_id": "t3", "project": "p0", "error_type": "timeout"},
        )
        step()
        daemon.ready.set()
        lines(submitted("t1", project="p0"), "not json", submitted("t4", project="p2"))
        step()
        lines(submitted("t5", project="p3"), submitted("t6", project="p4"))  # past 3 labels
        lines(completed("nobody", credits_used=5))  # waits for its submission
        lines(submitted("ahead", project="p0", timestamp=NOW + 10 * DAY))
        step()
        lines(submitted("unread", project="p0"))
        step(poll=False)
        daemon.save_state()
        clock.now += 2 * 3600  # past the ttl: expired and charged; a new day for "a"
        step()
        write_lines(logs / "kling-b.jsonl", [submitted("b1", project="p1")])
        step()
        clock.now += DAY
        path.write_text(
            json.dumps(
                config(
                    tmp_path,
                    logs={"paths": [str(logs / "*.jsonl"), str(tmp_path / "none" / "*.log")]},
                    state={"path": str(tmp_path / "k.state"), "interval": "2m"},
                    tasks={"ttl": "1h", "max_tasks": 2},
                    budgets=[
                        {"name": "a", "project": "p1", "period": "daily", "limit_credits": 70},
                        {"name": "all", "period": "weekly", "limit_usd": 20},
                    ],
                )
            )
        )
        assert daemon.reload() is None
        lines(*(submitted(f"m{i}", project="p1") for i in range(4)))  # evicts past 2
        step()
        path.write_text("logs: [")
        assert daemon.reload() is not None
        step()
        daemon.failed.set()
        step()
    finally:
        daemon.tailer.close()
    unchanged = {name for name, texts in seen.items() if len(texts) < 2}
    assert seen.keys() == {f"{s.name}" for s in METRICS}
    # The version is the one value no scrape can change.
    assert unchanged == {"kling_exporter_build_info"}


# -- the renderer, the blocks sent between processes, and the gzip answer --------------

LABELS = st.text(alphabet=st.sampled_from('ab"\\\nü'), max_size=3)
VALUES = st.one_of(
    st.integers(-5, 5),
    st.floats(allow_nan=False, width=32),
    st.sampled_from([0.0, -0.0, 1e6, 1.5e-7]),
)
SAMPLES = st.dictionaries(st.tuples(LABELS, LABELS), VALUES, max_size=40)


def family(samples: dict[Any, Any], changed: set[Any] | None) -> Family:
    return Family("x", "gauge", "X.", ("a", "b"), samples, "", changed)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(SAMPLES, st.booleans()), min_size=1, max_size=8), st.integers(1, 7))
def test_blocks_kept_between_renders_are_a_full_render_whatever_changes(
    steps: list[tuple[dict[Any, Any], bool]], block: int
) -> None:
    """One dict changed in place between renders, told which keys changed (or not told),
    against a renderer that starts from nothing each time."""
    renderer, live = TextRenderer(block), dict[Any, Any]()
    scalar = {(): 0.0}
    for samples, tell in steps:
        # What a tracker tells: the keys that came, went, or print otherwise.
        changed = set(live) ^ set(samples) | {
            k for k in samples if repr(live.get(k)) != repr(samples[k])
        }
        live.clear()
        live.update(samples)
        scalar = {(): float(len(samples))}
        rows = [
            family(live, changed if tell else None),
            Family("y", "counter", "Y.", (), scalar),
            Family("z", "histogram", "Z.", ("m",), {("m",): ([("1.0", 1), ("+Inf", 2)], 3.0)}),
        ]
        parts = renderer.parts(rows)
        assert b"".join(p.text for p in parts) == full_render(rows)
        assert b"".join(p.text for p in TextRenderer().parts(rows)) == full_render(rows)
    assert scalar


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.lists(st.binary(max_size=30), min_size=1, max_size=5), min_size=1, max_size=6),
    st.lists(st.sampled_from(["right", "stale", "other epoch", "none"]), min_size=6, max_size=6),
)
def test_what_the_reader_sends_rebuilds_its_render_on_the_other_side(
    renders: list[list[bytes]], holds: list[str]
) -> None:
    """Whatever render the receiver holds (the last one, an older one, another
    renderer's, none), it ends with the sender's text, or asks for all of it."""
    receiver = Blocks()
    sender_epoch, history, kept = 7, [], dict[str, Part]()
    for n, texts in enumerate(renders, start=1):
        parts = []
        for i, text in enumerate(texts):
            old = kept.get(f"f/{i}")
            part = old if old is not None and old.text == text else Part(f"f/{i}", n, text)
            kept[f"f/{i}"] = part
            parts.append(part)
        history.append(parts)
        how = holds[n - 1]
        epoch, since = receiver.epoch, receiver.version
        if how == "stale":
            since = max(0, since - 1)
        elif how == "other epoch":
            epoch = 99
        elif how == "none":
            epoch, since = 0, 0
        got = receiver.take(sender_epoch, n, to_send(parts, epoch, since, sender_epoch))
        if got is None:  # it asks again for everything
            got = receiver.take(sender_epoch, n, to_send(parts, 0, 0, sender_epoch))
        assert got is not None
        assert joined(got) == b"".join(texts)


def test_a_block_sent_without_its_text_that_is_not_kept_asks_for_all() -> None:
    receiver = Blocks()
    assert receiver.take(5, 3, [("f/0", 2, None)]) is None
    assert (receiver.epoch, receiver.version) == (0, 0)
    got = receiver.take(5, 3, [("f/0", 2, b"text")])
    assert got is not None and joined(got) == b"text"
    again = receiver.take(5, 4, [("f/0", 2, None)])
    assert again is not None and again[0] is got[0]  # the same block: compressed once


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=3000), max_size=8))
def test_blocks_compressed_on_their_own_join_into_one_gzip_member(texts: list[bytes]) -> None:
    blocks = [Block(text) for text in texts]
    body = gzipped(blocks)
    assert gzip.decompress(body) == b"".join(texts)
    one = zlib.decompressobj(wbits=31)
    assert one.decompress(body) == b"".join(texts)
    assert one.eof and one.unused_data == b""  # one member, as any client reads
    assert gzipped(blocks) == body  # again from the kept pieces


def test_a_large_family_is_cut_into_blocks_and_only_changed_ones_get_a_new_version() -> None:
    samples = {(f"p{i:05}", "m"): float(i) for i in range(3 * BLOCK_SERIES)}
    renderer = TextRenderer()
    rows = [Family("x", "gauge", "X.", ("a", "b"), samples, "", set(samples))]
    first = renderer.parts(rows)
    assert [p.key for p in first] == ["x/0", "x/1", "x/2"]
    key = (f"p{BLOCK_SERIES + 1:05}", "m")
    samples[key] = -1.0
    again = renderer.parts([rows[0]._replace(changed={key})])
    assert [p.version for p in again] == [1, 2, 1]
    assert again[0] is first[0] and again[2] is first[2]
    assert b"".join(p.text for p in again) == full_render(rows)


def test_declared_families_all_reach_the_blocks() -> None:
    assert [f.name for f in declared()] == [s.name for s in METRICS]


def test_the_exporter_serves_the_same_text_gzipped_and_plain_as_blocks_change(
    tmp_path: Path, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    """Over the reader process: each scrape after new lines sends only the blocks that
    changed, and the HTTP side joins them with those it kept, compressed or not."""
    log = tmp_path / "logs" / "kling-a.jsonl"
    write_lines(log, [submitted(f"w{i}", project=f"p{i % 40}") for i in range(400)])
    config = {"logs": {"paths": [str(tmp_path / "logs" / "*.jsonl")], "poll_interval": "100ms"}}
    d = daemon_factory(json.dumps(config))
    gz = {"Accept-Encoding": "gzip"}

    def reader_families(body: bytes) -> list[bytes]:
        return [
            raw
            for raw in body.splitlines()
            if raw.startswith(b"kling_") and not raw.startswith(b"kling_log_last_poll")
        ]

    written, done, credits = 400, 0, 0
    for round_ in range(4):
        batch = [completed(f"w{i}", credits_used=round_ + 1) for i in range(round_, 400, 7)]
        write_lines(log, batch)
        written += len(batch)

        def read_all(lines: int = written) -> bool:
            body = gzip.decompress(d.get("/metrics", gz)[1]).decode()
            return value(parse_metrics(body), "kling_log_lines_read_total") == lines

        wait_until(read_all)
        status, zipped = d.get("/metrics", gz)
        assert status == 200
        status, plain = d.get("/metrics")
        assert status == 200
        assert reader_families(gzip.decompress(zipped)) == reader_families(plain)
        done += len(batch)
        credits += len(batch) * (round_ + 1)
        series = parse_metrics(plain.decode())
        assert sum(by_name(series, "kling_tasks_completed_total").values()) == done
        assert sum(by_name(series, "kling_credits_used_total").values()) == credits


class Wire:
    """The reader's end of the link, as a list of the messages it sent."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send_bytes(self, data: bytes) -> None:
        self.sent.append(msgspec.msgpack.decode(data, type=FromReader))


def reader_end(tmp_path: Path) -> tuple[Daemon, Wire, Any]:
    """A daemon in process with the reader process's end of the link, as it is wired
    there, sending into a ``Wire``; logs under tmp_path/logs."""
    (tmp_path / "logs").mkdir()
    daemon = Daemon(parse_config(config(tmp_path)))
    wire = Wire()
    link = reader_module._Link(wire, daemon)  # type: ignore[arg-type]
    daemon.publish = link.publish
    daemon.after_read = link.ahead
    return daemon, wire, link


def served_whole(daemon: Daemon, got: list[Block], answer: Rendered) -> bool:
    """Whether the blocks taken from an answer, the process metrics left out, are a
    full render of the daemon as it stands."""
    assert answer.parts is not None
    served = joined([b for b, p in zip(got, answer.parts, strict=True) if p[0] != "process"])
    return served == full_render(families(*daemon.snapshot()))


def test_blocks_pushed_ahead_and_answered_rebuild_every_scrape_on_the_http_side(
    tmp_path: Path,
) -> None:
    """The reader's pushes and its answers, taken in the order sent by a receiver that
    sometimes misses an answer (a scrape that timed out): every scrape it serves is a
    full render of the same instant."""
    logs = tmp_path / "logs"
    daemon, wire, link = reader_end(tmp_path)
    receiver = Blocks()
    scrapes = pushes = 0

    def scrape(drop: bool = False) -> None:
        nonlocal scrapes
        for since in ((receiver.epoch, receiver.version), (0, 0)):
            link.answer(Render(scrapes, "", [], *since))
            answer = wire.sent.pop()
            assert isinstance(answer, Rendered) and answer.parts is not None
            take_pushes()
            if drop:
                return  # never taken: the HTTP side gave up on it
            got = receiver.take(answer.epoch, answer.version, answer.parts)
            if got is not None:
                break
        assert got is not None
        assert served_whole(daemon, got, answer)
        scrapes += 1

    def take_pushes() -> None:
        nonlocal pushes
        for message in [m for m in wire.sent if isinstance(m, Pushed)]:
            receiver.take(message.epoch, message.version, message.parts)
            pushes += 1
        wire.sent.clear()

    try:
        scrape()
        for round_ in range(12):
            write_lines(
                logs / "kling-a.jsonl",
                [submitted(f"t{round_}-{i}", project=f"p{i % 5}") for i in range(20)]
                + [completed(f"t{round_}-{i}", credits_used=i) for i in range(0, 20, 3)],
            )
            link.ahead_at = 0.0  # due at once
            daemon.poll_once()
            take_pushes()
            if round_ % 3 == 2:
                scrape(drop=round_ % 2 == 0)
        scrape()
    finally:
        daemon.tailer.close()
    assert pushes >= 10 and scrapes >= 4


def test_a_render_ahead_that_fails_stops_neither_the_reading_nor_the_next_scrape(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    logs = tmp_path / "logs"
    daemon, wire, link = reader_end(tmp_path)
    receiver = Blocks()
    rendered = daemon.rendered_parts

    def broken() -> list[Part]:
        raise MemoryError("a render that fails")

    try:
        link.answer(Render(1, "", [], 0, 0))  # a scrape: renders ahead from now on
        monkeypatch.setattr(daemon, "rendered_parts", broken)
        write_lines(logs / "kling-a.jsonl", [submitted("a", project="p0")])
        link.ahead_at = 0.0
        daemon.poll_once()  # the render ahead fails here
        assert daemon.reading.lines == 1 and daemon.reader_up
        assert not any(isinstance(m, Pushed) for m in wire.sent)
        monkeypatch.setattr(daemon, "rendered_parts", rendered)
        wire.sent.clear()
        link.answer(Render(2, "", [], 0, 0))
        answer = wire.sent.pop()
        assert isinstance(answer, Rendered) and answer.parts is not None
        got = receiver.take(answer.epoch, answer.version, answer.parts)
        assert got is not None
        assert served_whole(daemon, got, answer)
    finally:
        daemon.tailer.close()


def test_every_push_follows_a_publication_of_the_usage_it_shows(tmp_path: Path) -> None:
    """The HTTP side may answer a scrape from pushed blocks; the usage it answers checks
    from is published before them, so a check made after that scrape sees at least what
    it showed, even when the publication after the lines was put off as too soon."""
    logs = tmp_path / "logs"
    daemon, wire, link = reader_end(tmp_path)
    usage: dict[float, list[Any]] = {}
    pushes = 0
    try:
        link.answer(Render(1, "", [], 0, 0))  # a scrape: renders ahead from now on
        wire.sent.clear()
        for round_ in range(6):
            write_lines(
                logs / "kling-a.jsonl",
                [submitted(f"t{round_}-{i}", project=f"p{i % 3}") for i in range(10)]
                + [completed(f"t{round_}-{i}", credits_used=i + 1) for i in range(0, 10, 2)],
            )
            link.ahead_at = 0.0  # a render ahead is due
            link.last = time.monotonic()  # a publication was just made: the next is put off
            daemon.poll_once()
            for message in wire.sent:
                if isinstance(message, Published):
                    usage.update({start: sorted(rows) for start, rows in message.days.items()})
                    for start in message.dropped:
                        usage.pop(start, None)
                elif isinstance(message, Pushed):
                    pushes += 1
                    held = {
                        start: sorted((p, u, c, usd) for (p, u), (c, usd) in day.by_pair.items())
                        for start, day in daemon.ledger.usage.items()
                    }
                    assert usage == held
            wire.sent.clear()
    finally:
        daemon.tailer.close()
    assert pushes == 6


class Sent:
    """The HTTP process's end of the link, as a list of the messages it sent."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send_bytes(self, data: bytes) -> None:
        self.sent.append(msgspec.msgpack.decode(data, type=ToReader))


def test_a_scrape_soon_after_a_push_is_answered_from_it_and_a_later_one_asks(  # noqa: PLR0915
    tmp_path: Path,
) -> None:
    """The HTTP side answers a plain-text scrape from the blocks last pushed while they
    are fresh, telling the reader only that it was scraped; once they are older than
    ``PUSHED_FRESH``, during and after a reload, or once the reader says holds were
    consumed by tasks read after the push, it asks the reader again."""
    (tmp_path / "logs").mkdir()

    async def main() -> None:  # noqa: PLR0915 - one story, told in order
        side = link_module.ReaderProcess(parse_config(config(tmp_path)))
        side._loop = asyncio.get_running_loop()
        conn = side.conn = Sent()  # type: ignore[assignment]

        async def asked(answer: Callable[[Any], Any]) -> tuple[list[Block], str]:
            """A scrape that asks the reader, answered by ``answer(request)``."""
            task = asyncio.ensure_future(side.render_metrics("", []))
            await asyncio.sleep(0)
            request = conn.sent[-1]
            assert isinstance(request, Render)
            side._answer(request.id, answer(request))
            return await task

        side._pushed(Pushed(1, 1, [("a/0", 1, b"a 1\n"), ("b/0", 1, b"b 1\n")]))
        blocks, content_type = await side.render_metrics("", [])
        assert joined(blocks) == b"a 1\nb 1\n" and content_type == CONTENT_TYPE_LATEST
        assert [type(m) for m in conn.sent] == [Scraped]

        assert side._pushed_at is not None
        side._pushed_at -= link_module.PUSHED_FRESH + 0.01  # too old now

        def second(request: Render) -> Rendered:
            assert (request.epoch, request.since) == (1, 1)
            parts = [("a/0", 2, b"a 2\n"), ("b/0", 1, None)]
            return Rendered(request.id, b"", CONTENT_TYPE_LATEST, None, parts, 1, 2)

        blocks, _ = await asked(second)
        assert joined(blocks) == b"a 2\nb 1\n"

        # Pushed before a reload's answer, and fresh: shows the budgets before it.
        side._pushed(Pushed(1, 3, [("a/0", 3, b"a 3\n"), ("b/0", 1, None)]))
        reload = asyncio.ensure_future(side.reload_config())
        await asyncio.sleep(0)
        request = conn.sent[-1]
        assert isinstance(request, Reload)
        side._pushed(Pushed(1, 4, [("a/0", 4, b"a 4\n"), ("b/0", 1, None)]))
        reload_id = request.id

        def during_reload(request: Render) -> Rendered:
            # Not the push: it may show the new budgets before this process has them.
            assert (request.epoch, request.since) == (1, 4)
            parts: list[tuple[str, int, bytes | None]] = [("a/0", 4, None), ("b/0", 1, None)]
            return Rendered(request.id, b"", CONTENT_TYPE_LATEST, None, parts, 1, 4)

        blocks, _ = await asked(during_reload)
        assert joined(blocks) == b"a 4\nb 1\n"
        side._answer(reload_id, Reloaded(reload_id, None, parse_config(config(tmp_path))))
        assert await reload is None

        def after_reload(request: Render) -> Rendered:
            assert (request.epoch, request.since) == (1, 4)
            parts = [("a/0", 4, None), ("b/0", 5, b"b 5\n")]
            return Rendered(request.id, b"", CONTENT_TYPE_LATEST, None, parts, 1, 5)

        blocks, _ = await asked(after_reload)
        assert joined(blocks) == b"a 4\nb 5\n"

        # Holds released for tasks the push does not show yet: the reader is asked.
        side._pushed(Pushed(1, 6, [("a/0", 6, b"a 6\n"), ("b/0", 5, None)]))
        assert joined((await side.render_metrics("", []))[0]) == b"a 6\nb 5\n"
        side._apply(Published({}, [], True, True, None, {"hold-1": 1}))

        def after_consumed(request: Render) -> Rendered:
            assert (request.epoch, request.since) == (1, 6)
            parts = [("a/0", 6, None), ("b/0", 7, b"b 7\n")]
            return Rendered(request.id, b"", CONTENT_TYPE_LATEST, None, parts, 1, 7)

        blocks, _ = await asked(after_consumed)
        assert joined(blocks) == b"a 6\nb 7\n"

        # A push that does not match what is kept is not served: the reader is asked.
        side._pushed(Pushed(1, 8, [("a/0", 9, None)]))
        blocks, _ = await asked(
            lambda r: Rendered(r.id, b"", CONTENT_TYPE_LATEST, None, [("a/0", 7, b"a 7\n")], 2, 7)
        )
        assert joined(blocks) == b"a 7\n"

    asyncio.run(main())


def test_a_check_after_a_scrape_sees_at_least_what_it_showed_while_lines_come_in(
    tmp_path: Path, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    """Over the reader process, while tasks complete all the time (so that scrapes are
    answered from blocks rendered ahead): what a budget's used credits are in a scrape,
    the budgets API says at least right after it, and both reach the log's total."""
    log = tmp_path / "logs" / "kling-a.jsonl"
    write_lines(log, [submitted("first", project="p0"), completed("first", credits_used=1)])
    config = {
        "logs": {"paths": [str(tmp_path / "logs" / "*.jsonl")], "poll_interval": "50ms"},
        "budgets": [{"name": "all", "period": "monthly", "limit_credits": 10**9}],
    }
    d = daemon_factory(json.dumps(config))
    stop = threading.Event()
    total = [1]

    def write() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            write_lines(log, [submitted(f"w{i}", project="p0"), completed(f"w{i}", credits_used=3)])
            total[0] += 3
            time.sleep(0.005)

    def used() -> tuple[float, float]:
        status, body = d.get("/metrics")
        assert status == 200
        shown = value(
            parse_metrics(body.decode()),
            "kling_budget_used_credits",
            budget="all",
            period="monthly",
        )
        status, raw = d.get("/api/v1/budgets")
        assert status == 200
        return shown, json.loads(raw)["budgets"][0]["used_credits"]

    writer = threading.Thread(target=write)
    writer.start()
    try:
        scrapes = []
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            shown, checked = used()
            assert checked >= shown
            scrapes.append(shown)
    finally:
        stop.set()
        writer.join()
    assert scrapes == sorted(scrapes) and len(set(scrapes)) > 3  # moving, never back
    wait_until(lambda: used() == (total[0], total[0]))
