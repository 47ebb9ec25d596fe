"""The producer's request path under load, measured against the real daemon on loopback.

One daemon with 1,000 projects x 5 models in its log (about 31,600 series) and 500
budgets, a state file beside its reservation journal, and every row below in one run:

- idle: pre-flight checks (POST /api/v1/check), reservations (POST
  /api/v1/reservations, a new id each, so a grant journalled and fsynced each), and
  scrapes back to back;
- live writes: a writer process appends 1,000 tasks/s (a submission and a completion
  each) to a log the daemon tails, and /metrics is scraped every second, while checks
  and then reservations are sent; the scrapes made meanwhile are the scrape row;
- backlog: a generated log (bench/generate.py) appears under the globs and is read from
  its start, scraped every second, while checks are sent (cut short when it is read).

The floods use wrk (16 connections on 2 threads, a Lua script for the bodies and the
ids) when it is installed, and an aiohttp client otherwise. With ``--profile DIR`` each
row is also sampled with py-spy in the HTTP process and the top frames are printed.
An authenticated scrape under a flood of wrong passwords is measured after the table.

    python bench/web_load.py                 # 15 s a row, 1,500,000 lines: about 2 minutes
    python bench/web_load.py --quick         # 5 s a row, 500,000 lines: under a minute
    python bench/web_load.py --json web.json --profile DIR

bench/run.py calls ``run`` for its HTTP rows; bench/fleet_load.py uses ``checks``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gzip
import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt

ROOT = Path(__file__).resolve().parent.parent
PROJECTS, MODELS, BUDGETS = 1000, 5, 500
PASSWORD = "bench-password"  # noqa: S105 - a benchmark's own user
TASK = {"project": "p7", "model": "kling-v2-6", "mode": "std", "duration": 5}
# Holds expire within seconds, and the cap on live holds is raised, so that a flood of
# thousands of grants a second is never refused (a refusal is a cheaper answer).
RESERVE_TTL = "5s"
MAX_LIVE = 200_000
CONNECTIONS, THREADS = 16, 2
LIVE_TASKS_PER_S = 1000

# wrk's script: a fixed body for checks; for reservations a new id per request (the
# thread's number and a counter) and a count of answers other than 201. done() prints
# one JSON line the benchmark reads.
WRK_SCRIPT = """
local threads = {}
local count = 0
unexpected = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '%(body)s'

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

if %(reserve)s then
  function request()
    count = count + 1
    return wrk.format(nil, nil, nil, string.format('%(reserve_body)s', tid, count))
  end
  function response(status, headers, body)
    if status ~= 201 then unexpected = unexpected + 1 end
  end
end

function done(summary, latency, requests)
  local bad = 0
  for _, t in ipairs(threads) do bad = bad + t:get("unexpected") end
  local e = summary.errors
  io.write(string.format(
    'WRK {"requests": %%d, "seconds": %%f, "p50_ms": %%f, "p99_ms": %%f, "max_ms": %%f, '
    .. '"socket_errors": %%d, "non_2xx": %%d, "unexpected": %%d}\\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1e3,
    latency:percentile(99) / 1e3, latency.max / 1e3,
    e.connect + e.read + e.write + e.timeout, e.status, bad))
end
"""


@dataclass(frozen=True)
class Target:
    text: str
    min_per_s: float | None = None
    max_p99_ms: float | None = None

    def met(self, r: dict[str, float]) -> bool:
        fast = self.min_per_s is None or r["per_s"] >= self.min_per_s
        return fast and (self.max_p99_ms is None or r["p99_ms"] < self.max_p99_ms)


# The rows of issue 28, in its order: key, label, target. "keep" is the worst idle
# figure measured before (3,300/s, p99 6.1 ms).
ROWS = [
    ("check_idle", "check, idle", Target("keep: >= 3,300/s, p99 <= 6.1 ms", 3300, 6.1)),
    (
        "check_live",
        "check, live writes + a scrape every second",
        Target(">= 3,000/s, p99 < 10 ms", 3000, 10),
    ),
    ("check_backlog", "check, while a backlog is read", Target("p99 < 25 ms", None, 25)),
    (
        "reserve_idle",
        "reservations (new id each, journalled), idle",
        Target(">= 2,000/s, p99 < 10 ms", 2000, 10),
    ),
    (
        "reserve_live",
        "reservations, live writes + scrapes",
        Target(">= 2,000/s, p99 < 15 ms", 2000, 15),
    ),
    ("scrape_idle", "scrape, idle", Target("p99 < 50 ms", None, 50)),
    ("scrape_live", "scrape, live writes (with the floods)", Target("p99 < 100 ms", None, 100)),
    ("scrape_backlog", "scrape, while a backlog is read", Target("p99 < 100 ms", None, 100)),
]


def reader_pid(pid: int) -> int:
    """The exporter's reader process (it holds the ledger)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    if len(children) != 1:
        raise RuntimeError(f"expected one reader process, found {children}")
    return int(children[0])


def cpu_seconds(pid: int) -> float:
    """The CPU time process ``pid`` (all its threads) has used (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def summary(latencies: list[float], seconds: float) -> dict[str, float]:
    return {
        "per_s": len(latencies) / seconds if seconds else float("nan"),
        "p50_ms": percentile(latencies, 0.5),
        "p99_ms": percentile(latencies, 0.99),
        "max_ms": max(latencies, default=float("nan")),
        "samples": len(latencies),
    }


def task_lines(tid: str, project: str, model: str) -> str:
    submitted = {
        "event": "task_submitted",
        "task_id": tid,
        "project": project,
        "model": model,
        "mode": "std",
        "duration": 5,
    }
    completed = {"event": "task_completed", "task_id": tid}
    return json.dumps(submitted) + "\n" + json.dumps(completed) + "\n"


def wide_log(path: Path) -> None:
    """One finished task per project and model: 5,000 series in every usage family."""
    with open(path, "w") as f:
        for p in range(PROJECTS):
            for m in range(MODELS):
                f.write(task_lines(f"w-{p}-{m}", f"p{p}", f"kling-m{m}"))


def write_live(path: Path, tasks_per_s: int, stop: Any) -> None:
    """Append ``tasks_per_s`` finished tasks a second (in batches every 10 ms) over the
    projects and models already in the log, so that the series stay the same."""
    start = time.perf_counter()
    written = 0
    with open(path, "a") as f:
        while not stop.is_set():
            due = int((time.perf_counter() - start) * tasks_per_s)
            batch = []
            for n in range(written, due):
                p, m = n % PROJECTS, (n // PROJECTS) % MODELS
                batch.append(task_lines(f"live-{n}", f"p{p}", f"kling-m{m}"))
            if batch:
                f.write("".join(batch))
                f.flush()
                written = due
            time.sleep(0.01)


def start(
    workdir: Path, port: int, web_config: Path | None = None, package: Path = ROOT / "exporter"
) -> subprocess.Popen[bytes]:
    config = {
        "logs": {"paths": [str(workdir / "logs" / "*.jsonl")], "poll_interval": "100ms"},
        # A state file, so that reservations are journalled and fsynced as in production.
        "state": {"path": str(workdir / "state" / "bench.state")},
        "labels": {"max_projects": PROJECTS + 100},
        "reservations": {"max_live": MAX_LIVE, "max_live_per_project": MAX_LIVE},
        "budgets": [
            {"name": f"b{i}", "project": f"p{i}", "period": "monthly", "limit_credits": 10**9}
            for i in range(BUDGETS)
        ],
    }
    (workdir / "state").mkdir(exist_ok=True)
    path = workdir / "bench-http.yml"
    path.write_text(json.dumps(config))
    given = os.environ.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "kling_exporter", "serve", "--config.file", str(path)]
    cmd += ["--web.listen-address", f"127.0.0.1:{port}", "--log.level", "warn"]
    if web_config is not None:
        cmd += ["--web.config.file", str(web_config)]
    return subprocess.Popen(
        cmd,
        cwd=workdir,
        # The build's package first; a PYTHONPATH given to the benchmark after it.
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(package), given]))},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def lines_in(body: bytes) -> float:
    at = body.find(b"\nkling_log_lines_read_total ")
    if at < 0:
        return 0.0
    return float(body[at:].split(maxsplit=2)[1])


async def scrape(session: aiohttp.ClientSession, url: str, **kw: Any) -> tuple[float, bytes]:
    """Milliseconds until the whole (gzipped, as Prometheus asks) answer is read."""
    start = time.perf_counter()
    async with session.get(url, **kw) as r:
        body = await r.read()
        if r.status != 200:
            raise RuntimeError(f"scrape answered {r.status}")
    return (time.perf_counter() - start) * 1000, body


async def timed_scrape(session: aiohttp.ClientSession, url: str, **kw: Any) -> float:
    return (await scrape(session, url, **kw))[0]


async def wait_for(session: aiohttp.ClientSession, base: str, lines: float, limit: float) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            if lines_in((await scrape(session, base + "/metrics"))[1]) >= lines:
                return
        except (aiohttp.ClientError, RuntimeError):
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"the daemon did not read {lines:.0f} lines in {limit:.0f} s")


async def checks(
    base: str,
    connections: int,
    seconds: float,
    path: str = "/api/v1/check",
    ids: str = "bench",
    latencies: list[float] | None = None,
    stop: asyncio.Event | None = None,
) -> dict[str, float]:
    """The aiohttp client: requests per second answered 200 (201 for reservations), and
    their latency (each also added to ``latencies``), for ``seconds`` or until ``stop``.
    A reservation names a new id each time (``ids`` and a number), so every one is a
    grant written to the journal and fsynced; ``ids`` may end in ``@TTL`` (``x@5s``)
    for holds shorter than a minute."""
    ids, _, ttl = ids.partition("@")
    ttl = ttl or "1m"
    ok = 201 if path.endswith("reservations") else 200
    latencies = [] if latencies is None else latencies
    mine = len(latencies)
    refused = 0
    sent = 0
    began = time.monotonic()
    deadline = began + seconds
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal refused, sent
            while time.monotonic() < deadline and not (stop and stop.is_set()):
                sent += 1
                body = json.dumps(
                    {**TASK, "id": f"{ids}-{connections}-{sent}", "ttl": ttl} if ok == 201 else TASK
                )
                start = time.perf_counter()
                async with session.post(base + path, data=body) as r:
                    await r.read()
                    if r.status != ok:
                        refused += 1
                        continue
                latencies.append((time.perf_counter() - start) * 1000)

        await asyncio.gather(*(worker() for _ in range(connections)))
    result = summary(latencies[mine:], time.monotonic() - began)
    result["seconds"] = time.monotonic() - began
    result["refused"] = refused
    return result


async def wrk(
    wrk_path: str,
    base: str,
    workdir: Path,
    reserve: bool,
    seconds: float,
    stop: asyncio.Event | None = None,
) -> dict[str, float]:
    """The same flood from wrk; ``stop`` interrupts it (wrk then reports what it did)."""
    tag = "reserve" if reserve else "check"
    body = json.dumps(TASK)
    reserve_body = json.dumps({**TASK, "ttl": RESERVE_TTL, "id": "@"}).replace(
        '"@"', f'"{tag}-{time.monotonic_ns()}-%d-%d"'
    )
    script = workdir / f"{tag}.lua"
    script.write_text(
        WRK_SCRIPT % {"body": body, "reserve": str(reserve).lower(), "reserve_body": reserve_body}
    )
    path = "/api/v1/reservations" if reserve else "/api/v1/check"
    cmd = [wrk_path, f"-t{THREADS}", f"-c{CONNECTIONS}", f"-d{max(1, round(seconds))}s"]
    cmd += ["--latency", "-s", str(script), base + path]
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    waiting = asyncio.ensure_future(proc.communicate())
    if stop is not None:
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait([waiting, stopping], return_when=asyncio.FIRST_COMPLETED)
        if not waiting.done():
            proc.send_signal(signal.SIGINT)
        stopping.cancel()
    out, err = await waiting
    for raw in out.decode().splitlines():
        if raw.startswith("WRK "):
            r: dict[str, float] = json.loads(raw[4:])
            # Answered as asked, a second (200 for a check, 201 for a grant: "unexpected"
            # counts every other answer to a reservation, non-2xx ones included).
            r["per_s"] = (r["requests"] - max(r["non_2xx"], r["unexpected"])) / r["seconds"]
            r["samples"] = r["requests"]
            return r
    raise RuntimeError(f"wrk gave no summary: {out.decode()} {err.decode()}")


class Profiler:
    """Each row's span (wall-clock times, to line up with what the daemon logs), and
    py-spy sampling the HTTP process over it when asked (--profile DIR)."""

    def __init__(self, folder: Path | None, pid: int) -> None:
        self.folder, self.pid = folder, pid
        self.spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self.spans: dict[str, tuple[float, float]] = {}

    async def during(self, name: str, work: Awaitable[Any]) -> Any:
        began = time.time()
        try:
            return await self._sampled(name, work)
        finally:
            self.spans[name] = (began, time.time())

    async def _sampled(self, name: str, work: Awaitable[Any]) -> Any:
        if self.folder is None:
            return await work
        self.folder.mkdir(parents=True, exist_ok=True)
        out = self.folder / f"{name}.txt"
        cmd = [self.spy, "record", "--pid", str(self.pid), "--format", "raw", "--rate", "250"]
        cmd += ["--threads", "--nonblocking", "-o", str(out)]
        spy = await asyncio.create_subprocess_exec(
            *cmd, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        try:
            return await work
        finally:
            spy.send_signal(signal.SIGINT)
            await spy.wait()


FRAME = re.compile(r"^(?P<name>.*) \((?P<file>[^()]*?):\d+\)$")


def top_frames(path: Path, most: int = 12) -> str:
    """Where a py-spy raw file's samples are: each thread's share; then, for the busiest
    threads, the functions most often on the stack below the event loop's own frames
    (inclusive) and at its top (self), as shares of all the samples."""
    threads: Counter[str] = Counter()
    inclusive: dict[str, Counter[str]] = {}
    own: dict[str, Counter[str]] = {}
    total = 0
    for raw in path.read_text().splitlines():
        stack, _, count = raw.rpartition(" ")
        if not count.isdigit():
            continue
        thread, *frames = stack.split(";")
        n = int(count)
        total += n
        threads[thread] += n
        names = []
        for frame in frames:
            m = FRAME.match(frame)
            if m:
                names.append(f"{m['name']} ({m['file'].split('/site-packages/')[-1]})")
        for name in set(names):
            inclusive.setdefault(thread, Counter())[name] += n
        if names:
            own.setdefault(thread, Counter())[names[-1]] += n
    lines = [f"{path.stem}: {total} samples"]
    for thread, n in threads.most_common(3):
        lines.append(f"  {n / total:6.1%}  {thread}")
        # Frames on (nearly) every stack of the thread say nothing: the loop, the runner.
        below = [(name, k) for name, k in inclusive.get(thread, Counter()).items() if k < 0.9 * n]
        below.sort(key=lambda item: -item[1])
        for title, rows in (
            ("inclusive", below[:most]),
            ("self", own.get(thread, Counter()).most_common(most // 2)),
        ):
            lines.append(f"    {title}:")
            lines += [f"      {k / total:6.1%}  {name}" for name, k in rows]
    return "\n".join(lines)


class Bench:
    def __init__(self, workdir: Path, base: str, rows_s: float, client: str | None) -> None:
        self.workdir, self.base, self.rows_s, self.wrk = workdir, base, rows_s, client
        self.scrapes: list[float] = []
        self.lines = 0.0

    async def flood(self, reserve: bool, stop: asyncio.Event | None = None) -> dict[str, float]:
        if self.wrk is not None:
            return await wrk(self.wrk, self.base, self.workdir, reserve, self.rows_s, stop)
        path = "/api/v1/reservations" if reserve else "/api/v1/check"
        ids = f"py-{time.monotonic_ns()}@{RESERVE_TTL}"
        return await checks(self.base, CONNECTIONS, self.rows_s, path, ids, stop=stop)

    async def scraper(self, session: aiohttp.ClientSession, until: asyncio.Event) -> None:
        """A scrape every second into ``self.scrapes``, noting the lines read."""
        while not until.is_set():
            began = time.monotonic()
            ms, body = await scrape(session, self.base + "/metrics")
            self.scrapes.append(ms)
            self.lines = lines_in(body)
            with_rest = 1 - (time.monotonic() - began)
            if with_rest > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(until.wait(), with_rest)


async def measure(
    workdir: Path,
    backlog: Path,
    backlog_lines: int,
    rows_s: float,
    client: str | None,
    profile: Path | None,
) -> dict[str, Any]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start(workdir, port)
    run = Run(workdir, base, Profiler(profile, proc.pid), Bench(workdir, base, rows_s, client))
    out: dict[str, Any] = {"client": "wrk" if client else "aiohttp", "row_seconds": rows_s}
    try:
        async with aiohttp.ClientSession() as session:
            run.session = session
            wide = 2 * PROJECTS * MODELS
            await wait_for(session, base, wide, 120)
            body = (await scrape(session, base + "/metrics"))[1]
            out["series"] = sum(1 for raw in body.splitlines() if raw and not raw.startswith(b"#"))
            out["load_before"] = os.getloadavg()
            await run.idle(out)
            await run.live(out)
            out["live_lines_read"] = lines_in((await scrape(session, base + "/metrics"))[1]) - wide
            await run.backlog(out, backlog, backlog_lines)
            out["load_after"] = os.getloadavg()
            out["spans"] = run.spy.spans
    finally:
        if run.writer is not None:
            run.writer.kill()
        proc.terminate()
        proc.wait(timeout=30)
    return out


class Run:
    """One run's rows, a phase at a time: idle, under live writes, while a backlog is
    read."""

    def __init__(self, workdir: Path, base: str, spy: Profiler, bench: Bench) -> None:
        self.workdir, self.base, self.spy, self.bench = workdir, base, spy, bench
        self.session: aiohttp.ClientSession | None = None
        self.writer: multiprocessing.Process | None = None

    async def idle(self, out: dict[str, Any]) -> None:
        spy, bench = self.spy, self.bench
        out["check_idle"] = await spy.during("check_idle", bench.flood(False))
        out["reserve_idle"] = await spy.during("reserve_idle", bench.flood(True))
        out["scrape_idle"] = await spy.during("scrape_idle", self.back_to_back(bench.rows_s / 2))

    async def back_to_back(self, seconds: float) -> dict[str, float]:
        assert self.session is not None
        began, times = time.monotonic(), []
        while time.monotonic() - began < seconds:
            times.append(await timed_scrape(self.session, self.base + "/metrics"))
        return summary(times, time.monotonic() - began)

    async def live(self, out: dict[str, Any]) -> None:
        """Live writes and a scrape every second."""
        assert self.session is not None
        spy, bench = self.spy, self.bench
        live = self.workdir / "logs" / "live.jsonl"
        live.touch()
        halt = multiprocessing.Event()
        self.writer = multiprocessing.Process(
            target=write_live, args=(live, LIVE_TASKS_PER_S, halt), daemon=True
        )
        self.writer.start()
        await asyncio.sleep(2)
        done = asyncio.Event()
        bench.scrapes = []
        scraping = asyncio.create_task(bench.scraper(self.session, done))
        out["check_live"] = await spy.during("check_live", bench.flood(False))
        out["reserve_live"] = await spy.during("reserve_live", bench.flood(True))
        done.set()
        await scraping
        out["scrape_live"] = summary(bench.scrapes, 2 * bench.rows_s)
        halt.set()
        self.writer.join(10)
        self.writer = None

    async def backlog(self, out: dict[str, Any], backlog: Path, backlog_lines: int) -> None:
        """The backlog appears under the globs and is read from its start; the check
        flood is cut short once it is read."""
        assert self.session is not None
        bench = self.bench
        before = lines_in((await scrape(self.session, self.base + "/metrics"))[1])
        os.rename(backlog, self.workdir / "logs" / "backlog.jsonl")
        total = before + backlog_lines
        read, stopped = asyncio.Event(), asyncio.Event()
        bench.scrapes = []
        began = time.monotonic()

        async def watch() -> None:
            while bench.lines < total and not stopped.is_set():
                await asyncio.sleep(0.05)
            read.set()

        watching = asyncio.create_task(watch())
        scraping = asyncio.create_task(bench.scraper(self.session, read))
        result = await self.spy.during("check_backlog", bench.flood(False, read))
        result["backlog_read"] = read.is_set()
        out["check_backlog"] = result
        try:
            await asyncio.wait_for(read.wait(), 300)
        finally:
            stopped.set()
            await watching
            await scraping
        out["backlog_seconds"] = time.monotonic() - began
        out["scrape_backlog"] = summary(bench.scrapes, out["backlog_seconds"])


async def measure_auth_flood(workdir: Path) -> dict[str, float]:
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(10)).decode()
    web = workdir / "web.yml"
    web.write_text(json.dumps({"basic_auth_users": {"bench": hashed}}))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    good = {"Authorization": "Basic " + base64.b64encode(f"bench:{PASSWORD}".encode()).decode()}
    bad = {"Authorization": "Basic " + base64.b64encode(b"bench:wrong").decode()}
    proc = start(workdir, port, web)
    try:
        async with aiohttp.ClientSession(headers=good) as session:
            deadline = time.monotonic() + 60
            while True:
                try:
                    await timed_scrape(session, base + "/metrics")
                    break
                except (aiohttp.ClientError, RuntimeError):
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
            connector = aiohttp.TCPConnector(limit=300)
            async with aiohttp.ClientSession(connector=connector, headers=bad) as attackers:

                async def attack() -> None:
                    async with attackers.get(base + "/metrics") as r:
                        await r.read()

                flood = asyncio.gather(*(attack() for _ in range(300)))
                await asyncio.sleep(0.1)
                during = [await timed_scrape(session, base + "/metrics") for _ in range(10)]
                await flood
        return {"p50_ms": percentile(during, 0.5), "max_ms": max(during)}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def run(
    backlog_lines: int = 1_500_000,
    rows_s: float = 15,
    client: str | None = shutil.which("wrk"),
    profile: Path | None = None,
    auth_flood: bool = True,
) -> dict[str, Any]:
    """Every row, with ``client`` (wrk's path) or the aiohttp client (None)."""
    with tempfile.TemporaryDirectory(prefix="kling-bench-http-") as tmp:
        workdir = Path(tmp)
        (workdir / "logs").mkdir()
        wide_log(workdir / "logs" / "wide.jsonl")
        backlog = workdir / "backlog.jsonl"
        generate = [sys.executable, str(ROOT / "bench" / "generate.py"), "--out", str(backlog)]
        subprocess.run(
            [*generate, "--lines", str(backlog_lines), "--open-tasks", str(backlog_lines // 10)],
            check=True,
            capture_output=True,
        )
        result = asyncio.run(measure(workdir, backlog, backlog_lines, rows_s, client, profile))
        result["backlog_lines"] = backlog_lines
        if auth_flood:
            result["auth_flood"] = asyncio.run(measure_auth_flood(workdir))
        return result


# -- scrapes alone, this build against another, alternated (--scrapes) -----------------


async def scrape_only(session: aiohttp.ClientSession, url: str) -> tuple[float, bytes]:
    """Milliseconds until the last byte of the gzipped answer (what the exporter takes;
    the client's own inflating is left out), and the text."""
    start = time.perf_counter()
    async with session.get(url, headers={"Accept-Encoding": "gzip"}) as r:
        body = await r.read()
        if r.status != 200:
            raise RuntimeError(f"scrape answered {r.status}")
    ms = (time.perf_counter() - start) * 1000
    return ms, gzip.decompress(body) if r.headers.get("Content-Encoding") == "gzip" else body


async def idle_scrapes(session: aiohttp.ClientSession, url: str, seconds: float) -> Any:
    """Once the log is read, scrapes back to back for ``seconds``."""
    deadline = time.monotonic() + 120
    while True:
        try:
            if lines_in((await scrape_only(session, url))[1]) >= 2 * PROJECTS * MODELS:
                break
        except (aiohttp.ClientError, RuntimeError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the daemon did not read its log in 120 s")
        await asyncio.sleep(0.1)
    for _ in range(3):  # the first scrapes make every block
        await scrape_only(session, url)
    began, idle = time.monotonic(), []
    while time.monotonic() - began < seconds:
        idle.append((await scrape_only(session, url))[0])
    return summary(idle, seconds)


async def scrape_phases(
    workdir: Path, package: Path, seconds: float, backlog: Path, backlog_lines: int
) -> dict[str, Any]:
    """One build's scrapes: back to back while idle, every second under live writes,
    every second while a backlog is read; nothing else is sent meanwhile."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start(workdir, port, package=package)
    writer: multiprocessing.Process | None = None
    out: dict[str, Any] = {}
    try:
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
            url = base + "/metrics"
            out["idle"] = await idle_scrapes(session, url, seconds)

            async def every_second(until: Callable[[bytes], bool], limit: float) -> list[float]:
                times, began = [], time.monotonic()
                while time.monotonic() - began < limit:
                    tick = time.monotonic()
                    ms, body = await scrape_only(session, url)
                    times.append(ms)
                    if until(body):
                        break
                    await asyncio.sleep(max(0.0, 1 - (time.monotonic() - tick)))
                return times

            live = workdir / "logs" / "live.jsonl"
            live.touch()
            halt = multiprocessing.Event()
            writer = multiprocessing.Process(
                target=write_live, args=(live, LIVE_TASKS_PER_S, halt), daemon=True
            )
            writer.start()
            await asyncio.sleep(2)
            pids = (proc.pid, reader_pid(proc.pid))
            cpu = [cpu_seconds(pid) for pid in pids]
            out["live"] = summary(await every_second(lambda body: False, seconds), seconds)
            # The exporter's share of a core meanwhile: both processes, scrapes included.
            out["live"]["cpu_share"] = sum(map(cpu_seconds, pids)) - sum(cpu)
            out["live"]["cpu_share"] /= seconds
            halt.set()
            writer.join(10)
            writer = None
            await asyncio.sleep(1)
            before = lines_in((await scrape_only(session, url))[1])
            os.rename(backlog, workdir / "logs" / "backlog.jsonl")
            began = time.monotonic()
            times = await every_second(lambda body: lines_in(body) >= before + backlog_lines, 300)
            out["backlog_seconds"] = time.monotonic() - began
            out["backlog"] = summary(times, out["backlog_seconds"])
    finally:
        if writer is not None:
            writer.kill()
        proc.terminate()
        proc.wait(timeout=30)
    return out


def run_scrapes(
    builds: list[tuple[str, Path]], rounds: int, seconds: float, backlog_lines: int
) -> dict[str, Any]:
    """Each build's scrape phases, the builds alternated round by round."""
    result: dict[str, Any] = {"rounds": [], "backlog_lines": backlog_lines, "seconds": seconds}
    with tempfile.TemporaryDirectory(prefix="kling-bench-scrapes-") as tmp:
        backlog = Path(tmp) / "backlog.jsonl"
        generate = [sys.executable, str(ROOT / "bench" / "generate.py"), "--out", str(backlog)]
        subprocess.run(
            [*generate, "--lines", str(backlog_lines), "--open-tasks", str(backlog_lines // 10)],
            check=True,
            capture_output=True,
        )
        for n in range(rounds):
            order = builds if n % 2 == 0 else builds[::-1]
            row: dict[str, Any] = {"load": os.getloadavg()[0]}
            for name, package in order:
                workdir = Path(tmp) / f"{name}-{n}"
                (workdir / "logs").mkdir(parents=True)
                wide_log(workdir / "logs" / "wide.jsonl")
                copy = workdir / "backlog.jsonl"
                shutil.copyfile(backlog, copy)
                row[name] = asyncio.run(
                    scrape_phases(workdir, package, seconds, copy, backlog_lines)
                )
                shutil.rmtree(workdir)
            result["rounds"].append(row)
            print(scrape_round(n, row, [b for b, _ in builds]), flush=True)
    return result


def scrape_round(n: int, row: dict[str, Any], names: list[str]) -> str:
    cells = []
    for name in names:
        r = row[name]
        idle, live, back = r["idle"], r["live"], r["backlog"]
        cells.append(
            f"{name}: idle p50 {idle['p50_ms']:.1f} p99 {idle['p99_ms']:.1f} ms "
            f"({idle['samples']}), live p99 {live['p99_ms']:.1f} "
            f"({live['p99_ms'] / idle['p99_ms']:.2f}x idle), backlog p99 "
            f"{back['p99_ms']:.1f} ({back['p99_ms'] / idle['p99_ms']:.2f}x idle, "
            f"{back['samples']} scrapes in {r['backlog_seconds']:.1f} s; "
            f"{live['cpu_share']:.0%} of a core under live writes)"
        )
    return f"round {n + 1} (load {row['load']:.2f}): " + "; ".join(cells)


def scrape_table(result: dict[str, Any], names: list[str]) -> str:
    """The median over rounds of each figure, and each round's ratios."""

    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    head = ("build", "idle p50", "idle p99", "live p99", "live/idle", "backlog p99")
    rows: list[tuple[str, ...]] = [(*head, "backlog/idle", "CPU, live")]
    for name in names:
        rs = [row[name] for row in result["rounds"]]
        idle = median([r["idle"]["p99_ms"] for r in rs])
        rows.append(
            (
                name,
                f"{median([r['idle']['p50_ms'] for r in rs]):.1f} ms",
                f"{idle:.1f} ms",
                f"{median([r['live']['p99_ms'] for r in rs]):.1f} ms",
                f"{median([r['live']['p99_ms'] / r['idle']['p99_ms'] for r in rs]):.2f}x",
                f"{median([r['backlog']['p99_ms'] for r in rs]):.1f} ms",
                f"{median([r['backlog']['p99_ms'] / r['idle']['p99_ms'] for r in rs]):.2f}x",
                f"{median([r['live']['cpu_share'] for r in rs]):.0%}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    out.insert(1, "  ".join("-" * w for w in widths))
    if len(names) == 2:
        a, b = names
        ratios = [row[b]["idle"]["p99_ms"] / row[a]["idle"]["p99_ms"] for row in result["rounds"]]
        out.append(
            f"\nidle p99, {b} / {a}, round by round: "
            + ", ".join(f"{x:.2f}" for x in ratios)
            + f" (median {median(ratios):.2f})"
        )
    return "\n".join(out)


def table(r: dict[str, Any]) -> str:
    head = ("row", "requests/s", "p50", "p99", "max", "target", "met")
    rows = [head]
    for key, label, target in ROWS:
        v = r.get(key)
        if v is None:
            continue
        rate = f"({v['samples']} scrapes)" if key.startswith("scrape") else f"{v['per_s']:,.0f}"
        if key == "check_backlog" and v.get("backlog_read"):
            label = f"{label} (cut at {v['seconds']:.0f} s)"  # noqa: PLW2901
        cells = (f"{v['p50_ms']:.1f} ms", f"{v['p99_ms']:.1f} ms", f"{v['max_ms']:.1f} ms")
        rows.append((label, rate, *cells, target.text, "yes" if target.met(v) else "no"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    out.insert(1, "  ".join("-" * w for w in widths))
    notes = [
        f"{r.get('series', 0):,} series; client {r['client']}, "
        f"{CONNECTIONS} connections, {r['row_seconds']:.0f} s a flood row",
    ]
    if "backlog_seconds" in r:
        notes.append(
            f"backlog of {r['backlog_lines']:,} lines read in {r['backlog_seconds']:.1f} s; "
            f"live writer: {r['live_lines_read']:,.0f} lines read"
        )
    if "load_before" in r:
        a, b = r["load_before"], r["load_after"]
        notes.append(f"load average before {a[0]:.2f} {a[1]:.2f}, after {b[0]:.2f} {b[1]:.2f}")
    for key in ("check_idle", "check_live", "check_backlog", "reserve_idle", "reserve_live"):
        v = r.get(key, {})
        wrong = {k: v[k] for k in ("socket_errors", "non_2xx", "unexpected", "refused") if v.get(k)}
        if wrong:
            notes.append(f"{key}: {wrong}")
    v = r.get("auth_flood")
    if v:
        label = "verified scrape under 300 wrong passwords"
        notes.append(f"{label}: p50 {v['p50_ms']:.0f} ms, max {v['max_ms']:.0f} ms")
    return "\n".join([*out, "", *notes])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 s rows, 500,000-line backlog")
    parser.add_argument("--backlog", type=int, help="lines read under load (1,500,000)")
    parser.add_argument("--seconds", type=float, help="seconds a flood row (15)")
    parser.add_argument("--client", choices=["wrk", "python"], help="default: wrk if installed")
    parser.add_argument("--profile", type=Path, help="py-spy each row into this folder")
    parser.add_argument("--no-auth-flood", action="store_true", help="skip the password flood")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument(
        "--scrapes", action="store_true", help="scrapes alone: idle, live writes, backlog"
    )
    parser.add_argument("--old", type=Path, help="with --scrapes: another checkout, alternated")
    parser.add_argument("--rounds", type=int, default=3, help="with --scrapes: rounds (3)")
    args = parser.parse_args()
    if args.scrapes:
        builds = [("this", ROOT / "exporter")]
        if args.old:
            builds.append(("old", args.old.resolve() / "exporter"))
        lines = args.backlog or 500_000
        result = run_scrapes(builds, args.rounds, args.seconds or 15, lines)
        print(scrape_table(result, [name for name, _ in builds]))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        return
    backlog = args.backlog or (500_000 if args.quick else 1_500_000)
    seconds = args.seconds or (5 if args.quick else 15)
    if backlog < 1000:
        parser.error("--backlog must be at least 1000")
    client = None if args.client == "python" else shutil.which("wrk")
    if args.client == "wrk" and client is None:
        parser.error("wrk is not installed")
    result = run(backlog, seconds, client, args.profile, not args.no_auth_flood)
    print(table(result))
    if args.profile:
        for path in sorted(args.profile.glob("*.txt")):
            print("\n" + top_frames(path))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
