"""The systems under measurement, each a set of server processes on loopback.

- etcd, from Debian's etcd-server package, on free loopback ports and a
  temporary data folder;
- the ceiling: a plain purerpc server with an empty unary handler
  (bench.servers), and the registry's own gRPC shell with the same handler;
- the registry: `registry serve` processes against a fresh Postgres database.

A server reports readiness through a line it prints (its bound port, or
etcd's "ready to serve"); its output goes to a log file in the run's folder.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import asyncpg

log = logging.getLogger("bench.systems")

# Seconds a server gets to start, and to stop before it is killed.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_REPOSITORY = Path(__file__).resolve().parent.parent
# Runs a command with prctl(PR_SET_PDEATHSIG, SIGTERM), which outlives exec:
# a server whose runner dies without stopping it (killed, say) ends too. A
# preexec_fn would do the same, but is unsafe in a process with threads.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys; "
    "ctypes.CDLL(None).prctl(1, signal.SIGTERM); "
    "os.execvp(sys.argv[1], sys.argv[1:])"
)


class BenchError(Exception):
    """A system cannot be started or measured; the message says why."""


# --- processes ---------------------------------------------------------------


class Server:
    """One server process whose output is drained to a log file."""

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        ready: re.Pattern[str],
        log_path: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_path
        self._ready_pattern = ready
        self._ready = threading.Event()
        self.match: re.Match[str] | None = None
        self.last_line = ""
        self._log_file: IO[str] = log_path.open("w", encoding="utf-8")
        self.process = subprocess.Popen(
            [sys.executable, "-c", _DIE_WITH_PARENT, *command],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
            # Where `python -m bench.servers` finds the bench package.
            cwd=_REPOSITORY,
        )
        self._drain = threading.Thread(target=self._read_output, daemon=True)
        self._drain.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read_output(self) -> None:
        # Reading all of it also keeps a chatty server from blocking on a
        # full pipe.
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._log_file.write(line)
            if line.strip():
                self.last_line = line.strip()
            if self.match is None:
                match = self._ready_pattern.search(line)
                if match:
                    self.match = match
                    self._ready.set()
        self._log_file.flush()
        self._ready.set()

    def wait_ready(self, timeout: float = START_TIMEOUT) -> re.Match[str]:
        if self._ready.wait(timeout) and self.match is not None:
            return self.match
        code = self.process.poll()
        self.stop()
        if code is None:
            raise BenchError(
                f"{self.name} was not ready within {timeout:.0f}s; see {self.log_path}"
            )
        raise BenchError(
            f"{self.name} exited with code {code}: {self.last_line!r}; "
            f"see {self.log_path}"
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._drain.join(STOP_TIMEOUT)
        self._log_file.close()


def free_port() -> int:
    """A loopback port free right now (the server binding it next may race
    another process for it, which only fails the start)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- /proc -------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process, all its threads; 0 once gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # Field 2 is the command in parentheses and may hold spaces.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    """VmRSS of a process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise BenchError(f"process {pid} reports no VmRSS")


# --- Postgres ----------------------------------------------------------------


def with_database(url: str, name: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + name))


class Postgres:
    """Fresh databases on the server at `admin_url`, dropped at close()."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self._created: list[str] = []

    def _run(self, statement: str, *args: object) -> list[asyncpg.Record]:
        async def run() -> list[asyncpg.Record]:
            conn = await asyncpg.connect(self.admin_url, timeout=30)
            try:
                rows: list[asyncpg.Record] = await conn.fetch(statement, *args)
                return rows
            finally:
                await conn.close(timeout=30)

        return asyncio.run(run())

    def create(self) -> tuple[str, str]:
        """A new empty database: its name and URL."""
        name = f"registry_bench_{secrets.token_hex(6)}"
        try:
            self._run(f'CREATE DATABASE "{name}"')
        except (OSError, asyncpg.PostgresError) as exc:
            raise BenchError(
                f"cannot create a database on {self.admin_url}: {exc}; start "
                "Postgres or set REGISTRY_BENCH_DATABASE_URL"
            ) from None
        self._created.append(name)
        return name, with_database(self.admin_url, name)

    def version(self) -> str:
        try:
            rows = self._run("SHOW server_version")
        except (OSError, asyncpg.PostgresError) as exc:
            return f"unreachable ({exc})"
        return str(rows[0][0]).split()[0]

    def backend_pids(self, database: str) -> list[int]:
        """Server processes serving connections to `database`."""
        rows = self._run(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1", database
        )
        return [row["pid"] for row in rows]

    def close(self) -> None:
        for name in self._created:
            try:
                self._run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("could not drop database %s: %s", name, exc)
        self._created.clear()


# --- the systems -------------------------------------------------------------


@dataclass
class System:
    """What a load generator needs to know of a running system."""

    name: str
    # "registry", "etcd" or "empty" (the ceiling servers).
    kind: str
    targets: list[str]
    servers: list[Server] = field(default_factory=list)
    # The database the registry's replicas share.
    database: str | None = None
    postgres: Postgres | None = None

    def pids(self) -> list[int]:
        """Every process whose CPU counts as this system's: its servers, and
        for the registry, the Postgres backends serving its replicas."""
        pids = [server.pid for server in self.servers]
        if self.postgres is not None and self.database is not None:
            pids += self.postgres.backend_pids(self.database)
        return pids

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


def etcd_binary(install: bool) -> str | None:
    """The etcd on PATH, else Debian's etcd-server installed now (as root)."""
    found = shutil.which("etcd")
    if found or not install:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return None
    log.info("installing Debian's etcd-server package")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "etcd-server"],
    ):
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            log.warning("%s failed: %s", " ".join(command), done.stderr.strip())
            return None
    return shutil.which("etcd")


def etcd_version(binary: str) -> str:
    done = subprocess.run([binary, "--version"], capture_output=True, text=True)
    first = done.stdout.splitlines()[0] if done.stdout else "unknown"
    return first.removeprefix("etcd Version: ")


def start_etcd(binary: str, folder: Path) -> System:
    client, peer = free_port(), free_port()
    data = folder / "etcd-data"
    server = Server(
        "etcd",
        [
            binary,
            "--name=bench",
            f"--data-dir={data}",
            f"--listen-client-urls=http://127.0.0.1:{client}",
            f"--advertise-client-urls=http://127.0.0.1:{client}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=bench=http://127.0.0.1:{peer}",
            "--logger=zap",
            "--log-outputs=stderr",
        ],
        # The zap logger's line, and the older logger's.
        re.compile(r"serving client traffic|ready to serve client requests"),
        folder / "etcd.log",
    )
    server.wait_ready()
    return System("etcd", "etcd", [f"127.0.0.1:{client}"], [server])


_PORT_LINE = re.compile(r"listening on 127\.0\.0\.1:(\d+)")


def start_empty(flavour: str, folder: Path) -> System:
    """The ceiling server: `purerpc` (plain purerpc.Server) or `shell` (the
    registry's GrpcServer), each with an empty handler."""
    server = Server(
        flavour,
        [sys.executable, "-m", "bench.servers", flavour],
        _PORT_LINE,
        folder / f"{flavour}.log",
    )
    port = int(server.wait_ready().group(1))
    name = "purerpc" if flavour == "purerpc" else "grpc shell"
    return System(name, "empty", [f"127.0.0.1:{port}"], [server])


_REPLICA_READY = re.compile(r"replica ready: gRPC on [^ ]+:(\d+)")


def start_replica(database_url: str, log_path: Path, *extra: str) -> tuple[Server, str]:
    server = Server(
        "registry",
        [
            sys.executable,
            "-m",
            "registry",
            "serve",
            "--host=127.0.0.1",
            "--port=0",
            f"--database-url={database_url}",
            *extra,
        ],
        _REPLICA_READY,
        log_path,
        # Environment variables, not flags: a replica that lacks a setting
        # ignores it. Its ops endpoint must not take a fixed port either.
        env={"REGISTRY_OPS_HOST": "127.0.0.1", "REGISTRY_OPS_PORT": "0"},
    )
    port = int(server.wait_ready().group(1))
    return server, f"127.0.0.1:{port}"


def start_registry(
    name: str, postgres: Postgres, replicas: int, folder: Path, *extra: str
) -> System:
    database, url = postgres.create()
    system = System(name, "registry", [], database=database, postgres=postgres)
    try:
        for index in range(replicas):
            server, target = start_replica(
                url, folder / f"{name.replace(' ', '-')}-{index}.log", *extra
            )
            system.servers.append(server)
            system.targets.append(target)
    except BaseException:
        system.stop()
        raise
    return system
