"""A PostgreSQL server that a test owns and may stop, restart or crash.

The machine's shared server must never be stopped by a test; tests that need an outage start
their own: ``initdb`` into a temporary directory with the machine's PostgreSQL binaries (run as
the ``postgres`` OS user when the tests run as root, since PostgreSQL refuses to run as root),
listening on 127.0.0.1 at a free port and on a socket in that directory.

    cluster = OwnedPostgres.create(tmp_path)
    cluster.start()
    dsn = cluster.dsn("postgres")
    cluster.restart("immediate")   # a crash: no checkpoint, crash recovery at start
    cluster.stop("fast")           # an outage until the next start()
    cluster.destroy()

Binaries: ``KEEN_TEST_PG_BIN`` if set, else the newest ``/usr/lib/postgresql/*/bin``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

StopMode = Literal["smart", "fast", "immediate"]


def _pg_bin() -> Path | None:
    configured = os.environ.get("KEEN_TEST_PG_BIN")
    if configured:
        return Path(configured)
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    return found[-1].parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_postgres() -> list[str]:
    """Prefix that runs a command as the ``postgres`` OS user when we are root."""
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser")
    if runuser is None:
        raise RuntimeError("running as root needs runuser to start PostgreSQL as 'postgres'")
    return [runuser, "-u", "postgres", "--"]


def owned_postgres_available() -> bool:
    bin_dir = _pg_bin()
    if bin_dir is None or not (bin_dir / "initdb").exists():
        return False
    if os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            return False
    return True


requires_owned_postgres = pytest.mark.skipif(
    not owned_postgres_available(),
    reason="needs PostgreSQL server binaries (initdb, pg_ctl) to start a private server",
)


@dataclass
class OwnedPostgres:
    """One private PostgreSQL server in a temporary directory."""

    root: Path
    bin_dir: Path
    port: int

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "sock"

    @property
    def log_file(self) -> Path:
        return self.root / "server.log"

    @classmethod
    def create(cls, parent: Path | None = None, **settings: str) -> OwnedPostgres:
        """initdb a new cluster (trust auth, superuser ``postgres``); not started yet.

        ``settings`` go to postgresql.conf (e.g. ``max_connections="200"``)."""
        bin_dir = _pg_bin()
        if bin_dir is None:
            raise RuntimeError("no PostgreSQL binaries found")
        root = Path(tempfile.mkdtemp(prefix="keen-owned-pg-", dir=parent))
        root.chmod(0o755)
        cluster = cls(root=root, bin_dir=bin_dir, port=_free_port())
        cluster.socket_dir.mkdir()
        if os.geteuid() == 0:
            shutil.chown(root, "postgres", "postgres")
            shutil.chown(cluster.socket_dir, "postgres", "postgres")
        cluster._run(
            "initdb",
            "-D",
            str(cluster.data_dir),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-sync",
        )
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(cluster.port),
            "unix_socket_directories": f"'{cluster.socket_dir}'",
            "fsync": "off",  # a test server: durability across an OS crash is not the point
            "max_connections": "200",
            "shared_buffers": "32MB",
            "log_min_messages": "warning",
            **settings,
        }
        with (cluster.data_dir / "postgresql.conf").open("a") as f:
            for key, value in conf.items():
                f.write(f"{key} = {value}\n")
        return cluster

    def _run(self, tool: str, *args: str, timeout: float = 120) -> None:
        command = [*_as_postgres(), str(self.bin_dir / tool), *args]
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{tool} failed ({result.returncode}): {result.stdout}{result.stderr}\n"
                f"{self.tail_log()}"
            )

    def tail_log(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        return ""

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._run(
            "pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_file), "-w", "-t", "60", "start"
        )

    def stop(self, mode: StopMode = "fast") -> None:
        """Stop the server. ``immediate`` is a crash: backends are killed, no checkpoint."""
        self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "-t", "60", "stop")

    def restart(self, mode: StopMode = "fast") -> None:
        self.stop(mode)
        self.start()

    @property
    def running(self) -> bool:
        return (self.data_dir / "postmaster.pid").exists()

    def destroy(self) -> None:
        if self.running:
            with contextlib.suppress(Exception):
                self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    # --- connecting --------------------------------------------------------------------------
    def dsn(self, database: str = "postgres") -> str:
        """TCP DSN (proxies and hub processes can use it as is)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"
