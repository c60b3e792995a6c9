"""Run Alembic migrations from code (``keen-stream migrate``, tests, embedded startup).

The migrations ship inside the package (``keen_stream/migrations``: ``env.py``, ``versions/``),
so an installed wheel migrates without the source tree. The advisory lock that keeps two
migrators apart lives in ``keen_stream/migrations/env.py`` so that the plain ``alembic`` CLI
takes it too.
"""

from __future__ import annotations

import asyncio
import threading
from decimal import Decimal
from pathlib import Path
from typing import Literal

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

from keen_stream.errors import ConfigurationError

# Alembic keeps its context in module globals: one command at a time per process. (Separate
# processes are kept apart by the advisory lock in env.py.)
_ALEMBIC = threading.Lock()

#: Package data, not a subpackage (no ``__init__.py``): Alembic loads env.py and the revisions
#: by path. A real directory: keen_stream is not importable from a zip.
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def alembic_config(dsn: str, *, credit_markup: Decimal | str | None = None) -> Config:
    if not (MIGRATIONS_DIR / "env.py").is_file():
        raise ConfigurationError(
            f"migrations not found at {MIGRATIONS_DIR}: this installation of keen_stream is "
            "incomplete (its package data is missing); reinstall it from the wheel"
        )
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["dsn"] = dsn
    if credit_markup is not None:
        # Read only by migration 0007, which seeds credit_pricing with it (the price the
        # deployment charged before, when KEEN_CREDIT_MARKUP set it; docs/operations.md).
        config.attributes["credit_markup"] = str(credit_markup)
    return config


def upgrade(
    dsn: str, revision: str = "head", *, credit_markup: Decimal | str | None = None
) -> None:
    """Bring the database to ``revision``; a no-op when it is already there. Blocking.

    ``credit_markup``: the markup the deployment charged before migration 0007 (its
    KEEN_CREDIT_MARKUP), used only if this run applies 0007; default 5.00.
    """
    with _ALEMBIC:
        command.upgrade(alembic_config(dsn, credit_markup=credit_markup), revision)


def downgrade(dsn: str, revision: str = "base") -> None:
    """Undo migrations down to ``revision``. Blocking."""
    with _ALEMBIC:
        command.downgrade(alembic_config(dsn), revision)


def heads(dsn: str = "postgresql:///unused") -> list[str]:
    return list(ScriptDirectory.from_config(alembic_config(dsn)).get_heads())


async def upgrade_async(
    dsn: str, revision: str = "head", *, credit_markup: Decimal | str | None = None
) -> None:
    # Alembic's env.py runs its own event loop, so it must not share ours.
    await asyncio.to_thread(upgrade, dsn, revision, credit_markup=credit_markup)


def revision_state(revision: str | None) -> Literal["current", "behind", "newer"]:
    """Where a database at ``revision`` stands against this release's migrations.

    ``behind``: never migrated (None) or at an older revision of ours; ``newer``: a revision we
    do not know, i.e. a later release migrated it (an additive migration lets this release
    keep running on it: docs/operations.md, "Deploying a release that migrates").
    """
    if revision is None:
        return "behind"
    script = ScriptDirectory.from_config(alembic_config("postgresql:///unused"))
    if revision in script.get_heads():
        return "current"
    known = {r.revision for r in script.walk_revisions()}
    return "behind" if revision in known else "newer"
