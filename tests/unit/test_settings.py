from __future__ import annotations

from decimal import Decimal

import pytest
from pydantic import ValidationError

from keen_stream.settings import Settings


def test_defaults_suit_a_small_box(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("KEEN_DATABASE_URL", "KEEN_CREDIT_MARKUP", "KEEN_POOL_MAX_SIZE"):
        monkeypatch.delenv(key, raising=False)
    s = Settings()
    assert s.database_url is None
    assert s.credit_markup == Decimal("5.00")
    assert isinstance(s.credit_markup, Decimal)
    assert s.pool_max_size <= 20


def test_environment_is_read_with_the_keen_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEN_DATABASE_URL", "postgresql://db/keen")
    monkeypatch.setenv("KEEN_CREDIT_MARKUP", "4.50")
    monkeypatch.setenv("KEEN_ADMIN_PASSWORD", "s3cret-pass")
    s = Settings()
    assert s.database_url == "postgresql://db/keen"
    assert s.credit_markup == Decimal("4.50")
    assert "s3cret" not in repr(s)


@pytest.mark.parametrize("markup", ["0", "-1", "100", "1.234", "NaN"])
def test_bad_markup_is_refused(monkeypatch: pytest.MonkeyPatch, markup: str) -> None:
    monkeypatch.setenv("KEEN_CREDIT_MARKUP", markup)
    with pytest.raises(ValidationError):
        Settings()


def test_settings_are_frozen() -> None:
    s = Settings()
    with pytest.raises(ValidationError):
        s.pool_max_size = 99  # type: ignore[misc]
