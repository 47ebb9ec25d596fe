"""What the gateway adds to a producer's create call to Kling, against what a reverse
proxy's hop adds, measured on loopback in the same run.

The stand-in of Kling's API runs in a process of its own. In front of it: nginx (Debian's
package, installed by ``bench/setup`` when missing; one worker, kept-alive upstream
connections), a bare pass-through proxy of aiohttp's server and client (the libraries
the gateway is made of, with nothing of its own) and the same proxy journalling each
answer with the gateway's group commit before it answers, and the real exporter (its HTTP
process and its reader) serving the gateway, with a budget that matches every request,
so each create takes a reservation, written to its journal, and each task accepted is
fsynced to the exporter's journal before the producer is answered. An open-loop load
(requests sent at a fixed rate whatever the answers do; latency counted from when each
request was due, so a stall is not hidden) sends creates straight to the stand-in,
through nginx, through the bare aiohttp proxies and through the gateway, the arms
alternated and their order turned each round. Meanwhile a probe fsyncs a line beside
the journal every 10 ms: the disk's fsync p99 in the same seconds, the floor of any
proxy that journals a task before it answers. Each round gives the gateway's added p99
(over calling the stand-in) against that floor, nginx's added p99 plus the fsync p99;
the target is at most 2x, as the median of the rounds. The bare proxies' ratios say
how much of that the libraries take, and the libraries with a journal, before the
gateway does anything of its own.
The load, the stand-in and the probe freeze what their start-up made, so that no full
collection of theirs lands in a run as the gateway's time. The CPU the exporter's two
processes (and the bare proxy) used a create is read from /proc (Linux): a figure that
varies less than the latencies when the machine's speed does, and says where the added
time is spent.

    python bench/gateway_load.py                      # 500 creates/s, 10 s an arm, 5 rounds
    python bench/gateway_load.py --rounds 9 --json gateway.json
    python bench/gateway_load.py --rate 200 --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import jwt
from aiohttp import web
from kling_exporter.journals.durable import GroupCommit, write_all_and_sync
from kling_exporter.kling.standin import KlingStandIn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.web_load import ROOT, cpu_seconds, free_port, percentile, reader_pid

ACCESS = "AK-bench-access"
SECRET = "SK-bench-secret-0123456789abcdef"  # noqa: S105 - the stand-in's own key
BODY = {"model_name": "kling-v2-6", "mode": "std", "duration": "5", "prompt": "a fox in snow"}


def serve_standin(port: int) -> None:
    """The stand-in alone, until killed (run as ``--standin PORT``)."""
    standin = KlingStandIn(ACCESS, SECRET, [])
    app = web.Application()
    standin.routes(app)
    gc.freeze()  # see measure()
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


HOP_HEADERS = ("Authorization", "Content-Type")


def serve_bare(port: int, upstream: str, journal: str | None) -> None:
    """A pass-through proxy of aiohttp's server and client alone, with the gateway's
    pool settings and nothing else (no price, no hold): what the libraries the gateway
    is built on take for a hop, the floor of any gateway made of them (run as ``--bare
    PORT UPSTREAM [JOURNAL]``). With a journal, each answer's body is appended to it as
    a line and fsynced before the answer goes back, by the gateway's group commit: the
    floor of a gateway of these libraries that journals a task before it answers."""
    fd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600) if journal else -1
    commit = GroupCommit(lambda data: write_all_and_sync(fd, data))

    async def main() -> None:
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=128),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
        )

        async def hop(request: web.Request) -> web.Response:
            body = await request.read()
            headers = {k: request.headers[k] for k in HOP_HEADERS if k in request.headers}
            async with session.request(
                request.method, upstream + request.path_qs, headers=headers, data=body
            ) as answer:
                raw = await answer.read()
                if fd >= 0:
                    await commit.append(raw.replace(b"\n", b" ") + b"\n")
                kind = answer.headers.get("Content-Type", "application/json")
                return web.Response(body=raw, status=answer.status, headers={"Content-Type": kind})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", hop)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        gc.freeze()  # see measure()
        await asyncio.Event().wait()

    asyncio.run(main())


def wait_for(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):  # noqa: S310 - loopback
                return
        except OSError as e:
            if getattr(e, "code", None) is not None:
                return  # an HTTP answer, even an error: it serves
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def start(workdir: Path, upstream: str, port: int) -> subprocess.Popen[bytes]:
    config = {
        "logs": {"paths": [str(workdir / "logs" / "kling-*.jsonl")], "poll_interval": "100ms"},
        "state": {"path": str(workdir / "bench.state")},
        "budgets": [{"name": "bench", "project": "bench", "limit_credits": 1e11}],
        "gateway": {
            "enabled": True,
            "upstream": upstream,
            "projects_by_access_key": {ACCESS: "bench"},
        },
    }
    path = workdir / "config.yml"
    path.write_text(json.dumps(config))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "exporter")}
    cmd = [sys.executable, "-m", "kling_exporter", "serve", "--config.file", str(path)]
    cmd += ["--web.listen-address", f"127.0.0.1:{port}"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:  # ready: the gateway answers 503 until the logs are read
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2):
                return proc
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


async def open_loop(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    headers: dict[str, str],
    body: bytes | None,
    rate: float,
    duration: float,
) -> dict[str, Any]:
    """``rate`` requests a second for ``duration`` seconds, each sent when due; the
    latency of each from when it was due until its answer was read."""
    latencies: list[float] = []
    failures = 0

    async def one(due: float) -> None:
        nonlocal failures
        try:
            async with session.request(method, url, headers=headers, data=body) as answer:
                await answer.read()
                if answer.status != 200:
                    failures += 1
        except aiohttp.ClientError:
            failures += 1
        latencies.append(time.perf_counter() - due)

    start = time.perf_counter()
    tasks = []
    for i in range(int(rate * duration)):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(due)))
    await asyncio.gather(*tasks)
    return {
        "requests": len(latencies),
        "failures": failures,
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
    }


def probe_disk(folder: str) -> None:
    """Say ``ready``, append and fsync a line every 10 ms until standard input closes,
    then print the fsync times' p50 and p99 in ms as JSON (run as ``--probe FOLDER``)."""
    seconds: list[float] = []
    stop = threading.Event()

    def wait_for_eof() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=wait_for_eof, daemon=True).start()
    fd = os.open(Path(folder) / "fsync-probe", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    print("ready", flush=True)
    while not stop.wait(0.01):
        start = time.perf_counter()
        os.write(fd, b"x" * 200 + b"\n")
        os.fsync(fd)
        seconds.append(time.perf_counter() - start)
    os.close(fd)
    p50, p99 = (percentile(seconds, q) * 1000 for q in (0.50, 0.99))
    print(json.dumps({"p50_ms": p50, "p99_ms": p99}))


class CpuMeter:
    """The CPU the exporter's processes (the HTTP one and its reader) used meanwhile."""

    def __init__(self, pid: int, alone: bool = False) -> None:
        self.pids = {"http": pid} if alone else {"http": pid, "reader": reader_pid(pid)}
        self.used: dict[str, float] = {}

    def __enter__(self) -> CpuMeter:
        self._start = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        return self

    def __exit__(self, *exc: object) -> None:
        self.used = {n: cpu_seconds(p) - self._start[n] for n, p in self.pids.items()}


class DiskProbe:
    """What the disk under the exporter's journal takes over an fsync meanwhile, from
    a process of its own (so that it slows neither side). A create through the gateway
    waits for one fsync (its task line), so its p99 cannot be below the disk's."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.result: dict[str, float] = {}

    def __enter__(self) -> DiskProbe:
        self._proc = subprocess.Popen(
            [sys.executable, __file__, "--probe", str(self.folder)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self._proc.stdout is not None
        self._proc.stdout.readline()  # its start-up over before anything is timed
        return self

    def __exit__(self, *exc: object) -> None:
        out, _ = self._proc.communicate(b"", timeout=30)
        self.result = json.loads(out)


def nginx_config(folder: Path, port: int, upstream: int) -> Path:
    """A reverse proxy on ``port`` to the stand-in, as one would put in front of an API:
    one worker (the exporter serves from one process too), kept-alive upstream
    connections, no access log, everything it writes in ``folder``."""
    conf = folder / "nginx.conf"
    conf.write_text(
        f"""
daemon off;
worker_processes 1;
pid {folder}/nginx.pid;
error_log {folder}/nginx-error.log warn;
events {{ worker_connections 2048; }}
http {{
    access_log off;
    client_body_temp_path {folder}/body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
    upstream kling {{ server 127.0.0.1:{upstream}; keepalive 128; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://kling;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""
    )
    return conf


def start_nginx(folder: Path, port: int, upstream: int) -> subprocess.Popen[bytes]:
    """nginx from Debian's package, installed by ``bench/setup`` when missing."""
    path = shutil.which("nginx", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if path is None:
        subprocess.run([str(ROOT / "bench" / "setup"), "nginx"], check=True)
        path = shutil.which("nginx", path="/usr/sbin:/sbin:/usr/bin")
    if path is None:
        raise SystemExit("nginx is not installed (bench/setup nginx)")
    conf = nginx_config(folder, port, upstream)
    proc = subprocess.Popen(
        [path, "-p", str(folder), "-c", str(conf), "-e", str(folder / "nginx-error.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(f"http://127.0.0.1:{port}/v1/videos/text2video/none")
    return proc


ARMS = ("direct", "nginx", "aiohttp", "aiohttp+fsync", "gateway")
BARE = ("aiohttp", "aiohttp+fsync")  # the bare proxy, without and with a journal


async def measure(
    bases: dict[str, str],
    rate: float,
    duration: float,
    rounds: int,
    folder: Path,
    exporter: int,
    bare: dict[str, int],
) -> list[dict[str, Any]]:
    """Creates at ``rate`` a second: straight to the stand-in, through nginx, through
    the bare aiohttp proxy, through the gateway; the arms alternated, their order turned
    each round, the disk probed throughout each round."""
    now = int(time.time())
    token = jwt.encode({"iss": ACCESS, "exp": now + 1800, "nbf": now - 5}, SECRET, "HS256")
    headers = {
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/json",
        "X-Kling-Project": "bench",
    }
    body = json.dumps(BODY).encode()
    path = "/v1/videos/text2video"
    out = []
    # The load and the stand-in are the rig, not what is measured: a full collection of
    # their imports' objects took 20-50 ms, timed as the gateway's (or Kling's) own.
    gc.freeze()
    connector = aiohttp.TCPConnector(limit=512)
    async with aiohttp.ClientSession(connector=connector) as session:
        for n in range(rounds):
            order = ARMS[n % len(ARMS) :] + ARMS[: n % len(ARMS)]
            row: dict[str, Any] = {"order": order}
            # The probe runs beside every arm and starts before any: started with an
            # arm, its own start-up took that arm's slowest 1% by itself. A short
            # warm-up of each arm just before its run, so that none pays for starting.
            with DiskProbe(folder) as disk:
                for arm in order:
                    url = bases[arm] + path
                    await open_loop(session, "POST", url, headers, body, rate, 1.0)
                    hop_pid = bare.get(arm, exporter)
                    with CpuMeter(exporter) as cpu, CpuMeter(hop_pid, alone=True) as hop:
                        row[arm] = await open_loop(
                            session, "POST", url, headers, body, rate, duration
                        )
                    if arm == "gateway":
                        row["cpu_ms_per_create"] = {
                            name: seconds * 1000 / row[arm]["requests"]
                            for name, seconds in cpu.used.items()
                        }
                    elif arm in bare:
                        row[f"{arm}_cpu_ms_per_create"] = (
                            hop.used["http"] * 1000 / row[arm]["requests"]
                        )
            row["disk_fsync"] = disk.result
            out.append(judge(row))
            print(show_round(n, out[-1]), flush=True)
    return out


def judge(row: dict[str, Any]) -> dict[str, Any]:
    """What each proxy adds at p99 over calling the stand-in, and the gateway's added
    p99 against the floor of a proxy that journals a task: a hop plus an fsync."""
    direct = row["direct"]["p99_ms"]
    row["nginx_added_p99_ms"] = row["nginx"]["p99_ms"] - direct
    row["gateway_added_p99_ms"] = row["gateway"]["p99_ms"] - direct
    row["floor_ms"] = max(row["nginx_added_p99_ms"], 0.0) + row["disk_fsync"]["p99_ms"]
    row["ratio"] = row["gateway_added_p99_ms"] / row["floor_ms"]
    for arm in BARE:
        row[f"{arm}_added_p99_ms"] = row[arm]["p99_ms"] - direct
        row[f"{arm}_ratio"] = row[f"{arm}_added_p99_ms"] / row["floor_ms"]
    return row


def run(rate: float, duration: float, rounds: int) -> dict[str, Any]:
    standin_port, exporter_port, nginx_port, bare_port = (free_port() for _ in range(4))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "exporter")}
    standin = subprocess.Popen(
        [sys.executable, __file__, "--standin", str(standin_port)],
        env=env,
        stdout=subprocess.DEVNULL,
    )
    standin_url = f"http://127.0.0.1:{standin_port}"
    try:
        wait_for(standin_url + "/v1/videos/text2video/none")
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            nginx = start_nginx(folder, nginx_port, standin_port)
            exporter = start(folder, standin_url, exporter_port)
            bare, bases = {}, {"direct": standin_url, "nginx": f"http://127.0.0.1:{nginx_port}"}
            (folder / "logs").mkdir(exist_ok=True)
            for arm, port in zip(BARE, (bare_port, free_port()), strict=True):
                cmd = [sys.executable, __file__, "--bare", str(port), standin_url]
                if arm.endswith("fsync"):
                    cmd.append(str(folder / "logs" / "bare-journal.jsonl"))
                bare[arm] = subprocess.Popen(cmd, env=env)
                bases[arm] = f"http://127.0.0.1:{port}"
            bases["gateway"] = f"http://127.0.0.1:{exporter_port}/kling"
            try:
                for arm in BARE:
                    wait_for(bases[arm] + "/v1/videos/text2video/none")
                pids = {arm: proc.pid for arm, proc in bare.items()}
                result = asyncio.run(
                    measure(bases, rate, duration, rounds, folder, exporter.pid, pids)
                )
            finally:
                for proc in bare.values():
                    proc.terminate()
                    proc.wait(20)
                exporter.terminate()
                exporter.wait(20)
                nginx.terminate()
                nginx.wait(20)
    finally:
        standin.terminate()
        standin.wait(10)
    return {"rate": rate, "duration": duration, "cpus": os.cpu_count(), "rounds": result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=500, help="creates a second")
    parser.add_argument("--duration", type=float, default=10, help="seconds of each arm")
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="rounds of the three arms, their order turned each round (5); the machine's"
        " speed varies from minute to minute, so the median of several says more than one",
    )
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--standin", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--bare", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        probe_disk(args.probe)
        return
    if args.standin:
        serve_standin(args.standin)
        return
    if args.bare:
        serve_bare(int(args.bare[0]), args.bare[1], args.bare[2] if len(args.bare) > 2 else None)
        return
    result = run(args.rate, args.duration, args.rounds)
    print(summary(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


def show_round(n: int, row: dict[str, Any]) -> str:
    cpu = row["cpu_ms_per_create"]
    bare_added = ", ".join(f"{arm} {row[f'{arm}_added_p99_ms']:.2f}" for arm in BARE)
    bare_ratios = ", ".join(f"{arm} {row[f'{arm}_ratio']:.2f}" for arm in BARE)
    bare_cpu = ", ".join(f"{arm} {row[f'{arm}_cpu_ms_per_create']:.3f} ms" for arm in BARE)
    arms = ", ".join(f"{arm} p99 {row[arm]['p99_ms']:.2f} ms" for arm in ARMS)
    return (
        f"round {n + 1} ({' > '.join(row['order'])}): {arms}; added: nginx"
        f" {row['nginx_added_p99_ms']:.2f}, {bare_added}, gateway"
        f" {row['gateway_added_p99_ms']:.2f} ms; fsync p99 {row['disk_fsync']['p99_ms']:.2f} ms;"
        f" / (nginx + fsync): gateway {row['ratio']:.2f}, {bare_ratios}; CPU a create"
        f" {cpu['http']:.3f} ms HTTP + {cpu['reader']:.3f} ms reader, {bare_cpu}"
    )


def summary(result: dict[str, Any]) -> str:
    rows = result["rounds"]

    def med(values: list[float]) -> float:
        return statistics.median(values)

    failed = sum(row[arm]["failures"] for row in rows for arm in ARMS)
    lines = [
        f"{result['rate']:g} creates/s, {result['duration']:g} s an arm, {len(rows)} rounds,"
        f" {result['cpus']} CPUs; {failed} requests failed",
        f"median p99: direct {med([r['direct']['p99_ms'] for r in rows]):.2f} ms,"
        f" nginx {med([r['nginx']['p99_ms'] for r in rows]):.2f} ms,"
        + "".join(f" {a} {med([r[a]['p99_ms'] for r in rows]):.2f} ms," for a in BARE)
        + f" gateway {med([r['gateway']['p99_ms'] for r in rows]):.2f} ms",
        f"median added p99: nginx {med([r['nginx_added_p99_ms'] for r in rows]):.2f} ms,"
        + "".join(f" {a} {med([r[f'{a}_added_p99_ms'] for r in rows]):.2f} ms," for a in BARE)
        + f" gateway {med([r['gateway_added_p99_ms'] for r in rows]):.2f} ms;"
        f" fsync p99 {med([r['disk_fsync']['p99_ms'] for r in rows]):.2f} ms",
        "gateway / (nginx hop + fsync), round by round: "
        + ", ".join(f"{r['ratio']:.2f}" for r in rows)
        + f"; median {med([r['ratio'] for r in rows]):.2f} (target <= 2)",
        *(
            f"{a} / (nginx hop + fsync), round by round: "
            + ", ".join(f"{r[f'{a}_ratio']:.2f}" for r in rows)
            + f"; median {med([r[f'{a}_ratio'] for r in rows]):.2f}"
            for a in BARE
        ),
        f"CPU a create (median): {med([r['cpu_ms_per_create']['http'] for r in rows]):.3f} ms"
        f" HTTP process, {med([r['cpu_ms_per_create']['reader'] for r in rows]):.3f} ms reader;"
        + ",".join(f" {a} {med([r[f'{a}_cpu_ms_per_create'] for r in rows]):.3f} ms" for a in BARE),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
