"""A real redis-server on 127.0.0.1 for the fleet's tests: a port chosen at run time, no
persistence (a restart starts empty), stopped afterwards; replicas of it, and Debian's
redis-sentinel watching it with failover in about a second."""

from __future__ import annotations

import signal
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from tests.helpers import free_port, require_binary, wait_until


def cluster_port() -> int:
    """A free port for a Cluster node: its bus listens 10,000 above, so both must be
    free and the port at most 55535."""
    for _ in range(1000):
        port = free_port()
        if port > 55535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a Cluster node")


class RedisServer:
    def __init__(self, workdir: Path, port: int | None = None, extra: list[str] | None = None):
        self.binary = require_binary("redis-server")
        self.workdir = workdir
        self.port = port or free_port()
        self.extra = extra or []
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.port, socket_timeout=5, decode_responses=True
        )

    def answers(self) -> bool:
        """Whether it answers a PING (it refuses connections until it listens)."""
        with self.client() as c:
            try:
                return bool(c.ping())
            except redis.ConnectionError:
                return False

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / f"redis-{self.port}.log", "ab")  # noqa: SIM115
        cmd = [self.binary, "--bind", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--save", "", "--appendonly", "no", "--dir", str(self.workdir)]
        self.proc = subprocess.Popen(
            [*cmd, *self.extra], cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        wait_until(self.answers, timeout=15)
        return self

    def replica(self, workdir: Path) -> RedisServer:
        """A new server replicating this one (not started)."""
        with self.client() as c:  # its first sync at once, not after 5 s
            c.config_set("repl-diskless-sync-delay", 0)
        return RedisServer(workdir, extra=["--replicaof", "127.0.0.1", str(self.port)])

    def replicated(self) -> bool:
        """Whether a replica has everything this master wrote so far."""
        with self.client() as c:
            info = c.info("replication")
        offset = info["master_repl_offset"]
        replicas = [v for k, v in info.items() if k.startswith("slave")]
        return bool(replicas) and all(
            r["state"] == "online" and r["offset"] == offset for r in replicas
        )

    def kill(self) -> None:
        """kill -9: what it held is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@contextmanager
def redis_server(workdir: Path) -> Iterator[RedisServer]:
    server = RedisServer(workdir).start()
    try:
        yield server
    finally:
        server.stop()


class SentinelServer(RedisServer):
    """Debian's redis-sentinel watching ``master`` as ``name``, alone in its quorum, with
    failover times short enough for a test: a master that stops answering is replaced
    by its replica in a second or two."""

    def __init__(self, workdir: Path, master: RedisServer, name: str = "kling") -> None:
        super().__init__(workdir)
        self.binary = require_binary("redis-sentinel")
        self.master = master
        self.name = name

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.port}/{self.name}/0"

    def start(self) -> SentinelServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "sentinel.conf"  # it rewrites this file as it learns
        n = self.name
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.workdir}\n"
            f"sentinel monitor {n} 127.0.0.1 {self.master.port} 1\n"
            f"sentinel down-after-milliseconds {n} 300\n"
            f"sentinel failover-timeout {n} 2000\n"
        )
        log = open(self.workdir / f"sentinel-{self.port}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [self.binary, str(conf)], cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        wait_until(self.answers, timeout=15)
        wait_until(self.master_port, timeout=15)
        return self

    def master_port(self) -> int:
        """The port of the master it names now (0 before it knows one)."""
        with self.client() as c:
            found = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.name)
        return int(found[1]) if found else 0

    def replicas(self) -> int:
        """How many replicas of the master it knows."""
        with self.client() as c:
            return len(c.execute_command("SENTINEL", "REPLICAS", self.name))
