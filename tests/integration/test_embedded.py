"""The embedded default: a real PostgreSQL from a wheel, reused across runs."""

from __future__ import annotations

from pathlib import Path

from keen_stream.dal.database import KeenDatabase
from tests.conftest import PASSWORD, make_settings


async def test_connect_without_a_dsn_starts_migrates_and_reuses_embedded_postgres(
    embedded_dir: Path,
) -> None:
    settings = make_settings(None, embedded_dir=embedded_dir)  # type: ignore[arg-type]
    db = await KeenDatabase.connect(settings=settings)
    try:
        health = await db.health()
        assert health["ok"] and health["embedded"]
        user = await db.users.create(email="e@example.com", username="embedded", password=PASSWORD)
    finally:
        await db.close()
    assert (embedded_dir / "PG_VERSION").exists()

    # a second start reuses the data directory: the user is still there
    db = await KeenDatabase.connect(settings=settings)
    try:
        again = await db.users.authenticate("e@example.com", PASSWORD)
        assert again.id == user.id
    finally:
        await db.close()
