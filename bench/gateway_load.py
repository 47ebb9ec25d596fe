"""What the gateway adds to a producer's call to Kling, measured on loopback.

The stand-in of Kling's API runs in a process of its own; the real exporter (its HTTP
process and its reader) serves the gateway in front of it, with a budget that matches
every request, so each create request takes a reservation, written to its journal, and
each task accepted is fsynced to the exporter's journal before the producer is answered.
An open-loop load (requests sent at a fixed rate whatever the answers do; latency counted
from when each request was due, so a stall is not hidden) calls the stand-in directly,
then through the gateway, for create requests and then for queries. Meanwhile a probe
fsyncs a line beside the journal every 10 ms: a create waits for one fsync, so the disk's
p99 in the same seconds says how much of the added p99 is the disk's. The load, the
stand-in and the probe freeze what their start-up made, so that no full collection of
theirs lands in a run as the gateway's time. The CPU the exporter's two processes used
in each run is read from /proc (Linux), per request: a figure that varies less than the
latencies when the machine's speed does, and says where the added time is spent.

    python bench/gateway_load.py                      # 500 requests/s for 10 s each
    python bench/gateway_load.py --repeat 8           # eight runs, and their spread
    python bench/gateway_load.py --rate 200 --duration 5 --json gateway.json
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
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
from kling_exporter.kling.standin import KlingStandIn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.web_load import ROOT, cpu_seconds, free_port, percentile, reader_pid

ACCESS = "AK-bench-access"
SECRET = "SK-bench-secret-0123456789abcdef"  # noqa: S105 - the stand-in's own key
TARGET_MS = 5  # what a create may add at p99 (the gateway's promise)
BODY = {"model_name": "kling-v2-6", "mode": "std", "duration": "5", "prompt": "a fox in snow"}


def serve_standin(port: int) -> None:
    """The stand-in alone, until killed (run as ``--standin PORT``)."""
    standin = KlingStandIn(ACCESS, SECRET, [])
    app = web.Application()
    standin.routes(app)
    gc.freeze()  # see measure()
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


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
        "gateway": {"enabled": True, "upstream": upstream},
    }
    path = workdir / "config.yml"
    path.write_text(json.dumps(config))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "exporter")}
    cmd = [sys.executable, "-m", "kling_exporter", "serve", "--config.file", str(path)]
    cmd += ["--web.listen-address", f"127.0.0.1:{port}"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(f"http://127.0.0.1:{port}/-/ready")
    return proc


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

    def __init__(self, pid: int) -> None:
        self.pids = {"http": pid, "reader": reader_pid(pid)}
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


async def measure(
    standin: str, gateway: str, rate: float, duration: float, folder: Path, exporter: int
) -> dict[str, Any]:
    now = int(time.time())
    token = jwt.encode({"iss": ACCESS, "exp": now + 1800, "nbf": now - 5}, SECRET, "HS256")
    headers = {
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/json",
        "X-Kling-Project": "bench",
    }
    body = json.dumps(BODY).encode()
    out: dict[str, Any] = {}
    # The load and the stand-in are the rig, not what is measured: a full collection of
    # their imports' objects took 20-50 ms, timed as the gateway's (or Kling's) own.
    gc.freeze()
    connector = aiohttp.TCPConnector(limit=512)
    async with aiohttp.ClientSession(connector=connector) as session:
        # One task to query, finished at once by the stand-in.
        async with session.post(f"{standin}/v1/videos/text2video", headers=headers, data=body) as r:
            task_id = (await r.json())["data"]["task_id"]
        for route, method, path, data in (
            ("create", "POST", "/v1/videos/text2video", body),
            ("query", "GET", f"/v1/videos/text2video/{task_id}", None),
        ):
            # The probe runs beside both sides, and starts before either: started with the
            # gateway's run, its own start-up (a Python process) took the gateway's slowest
            # 1% by itself. A short warm-up of each side just before its run, so that
            # neither pays for starting up: warmed 10 s before its run, the gateway had a
            # third of its slowest 1% in the run's first 250 ms.
            with DiskProbe(folder) as disk:
                await open_loop(session, method, standin + path, headers, data, rate, 1.0)
                direct = await open_loop(
                    session, method, standin + path, headers, data, rate, duration
                )
                await open_loop(session, method, gateway + path, headers, data, rate, 1.0)
                with CpuMeter(exporter) as cpu:
                    through = await open_loop(
                        session, method, gateway + path, headers, data, rate, duration
                    )
            out[route] = {
                "direct": direct,
                "gateway": through,
                "disk_fsync": disk.result,
                "added_p50_ms": through["p50_ms"] - direct["p50_ms"],
                "added_p99_ms": through["p99_ms"] - direct["p99_ms"],
                "cpu_ms_per_request": {
                    name: seconds * 1000 / through["requests"] for name, seconds in cpu.used.items()
                },
            }
    return out


def run(rate: float = 500, duration: float = 10) -> dict[str, Any]:
    standin_port, exporter_port = free_port(), free_port()
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
            exporter = start(Path(tmp), standin_url, exporter_port)
            try:
                gateway = f"http://127.0.0.1:{exporter_port}/kling"
                result = asyncio.run(
                    measure(standin_url, gateway, rate, duration, Path(tmp), exporter.pid)
                )
            finally:
                exporter.terminate()
                exporter.wait(20)
    finally:
        standin.terminate()
        standin.wait(10)
    return {"rate": rate, "duration": duration, "cpus": os.cpu_count(), **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=500, help="requests a second")
    parser.add_argument("--duration", type=float, default=10, help="seconds of each run")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs, each with a fresh exporter and stand-in; the machine's speed varies"
        " from minute to minute, so the spread of several says more than one",
    )
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--standin", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        probe_disk(args.probe)
        return
    if args.standin:
        serve_standin(args.standin)
        return
    results = []
    for i in range(args.repeat):
        result = run(args.rate, args.duration)
        results.append(result)
        if args.repeat > 1:
            print(f"run {i + 1} of {args.repeat}, load average {os.getloadavg()[0]:.2f} after")
        show(result)
    if args.repeat > 1:
        for route in ("create", "query"):
            added = sorted(r[route]["added_p99_ms"] for r in results)
            under = sum(a < TARGET_MS for a in added)
            print(
                f"{route:6} added p99 over {len(added)} runs: {added[0]:.2f} to {added[-1]:.2f}"
                f" ms, median {statistics.median(added):.2f} ms,"
                f" under {TARGET_MS:g} ms in {under}"
            )
            cpu = sorted(r[route]["cpu_ms_per_request"]["http"] for r in results)
            print(
                f"{route:6} HTTP process CPU a request: {cpu[0]:.3f} to {cpu[-1]:.3f} ms,"
                f" median {statistics.median(cpu):.3f} ms"
            )
    if args.json:
        out = results[0] if args.repeat == 1 else {"runs": results}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


def show(result: dict[str, Any]) -> None:
    print(f"{result['rate']:g} requests/s for {result['duration']:g} s, {result['cpus']} CPUs")
    for route in ("create", "query"):
        row = result[route]
        for side in ("direct", "gateway"):
            r = row[side]
            print(
                f"{route:6} {side:8} p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms"
                f"  ({r['requests']} requests, {r['failures']} failed)"
            )
        added = f"p50 {row['added_p50_ms']:7.2f} ms  p99 {row['added_p99_ms']:7.2f} ms"
        print(f"{route:6} added    {added}")
        disk = row["disk_fsync"]
        fsync = f"p50 {disk['p50_ms']:7.2f} ms  p99 {disk['p99_ms']:7.2f} ms"
        print(f"{route:6} fsync    {fsync}  (the disk, meanwhile)")
        cpu = row["cpu_ms_per_request"]
        print(
            f"{route:6} CPU      {cpu['http']:.3f} ms a request in the HTTP process,"
            f" {cpu['reader']:.3f} ms in the reader"
        )


if __name__ == "__main__":
    main()
