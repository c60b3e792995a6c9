from __future__ import annotations

import pytest
from pydantic import ValidationError

from keen_stream.settings import Settings


def test_defaults_suit_a_small_box(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("KEEN_DATABASE_URL", "KEEN_POOL_MAX_SIZE"):
        monkeypatch.delenv(key, raising=False)
    s = Settings()
    assert s.database_url is None
    assert s.pool_max_size <= 20


def test_environment_is_read_with_the_keen_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEN_DATABASE_URL", "postgresql://db/keen")
    monkeypatch.setenv("KEEN_ADMIN_PASSWORD", "s3cret-pass")
    s = Settings()
    assert s.database_url == "postgresql://db/keen"
    assert "s3cret" not in repr(s)


def test_the_markup_is_not_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """The price lives in the database, where tenant code cannot change it (docs/ledger.md);
    a deployment still setting KEEN_CREDIT_MARKUP is told so instead of being ignored."""
    monkeypatch.delenv("KEEN_CREDIT_MARKUP", raising=False)
    assert Settings().credit_markup is None
    monkeypatch.setenv("KEEN_CREDIT_MARKUP", "4.50")
    with pytest.raises(ValidationError, match="lives in the database"):
        Settings()


def test_settings_are_frozen() -> None:
    s = Settings()
    with pytest.raises(ValidationError):
        s.pool_max_size = 99  # type: ignore[misc]
