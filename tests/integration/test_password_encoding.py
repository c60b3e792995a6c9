"""A password that is not valid Unicode is bad input, not a crash.

JSON can carry a lone surrogate (``"\\ud800"``), and Python decodes it into a ``str`` that
cannot be encoded as UTF-8. ``db.users.create`` and ``db.users.authenticate`` hash or verify
the password with argon2, which encodes it: the ``UnicodeEncodeError`` reached the caller (a
login endpoint answered 500) instead of ``InvalidInput`` / ``InvalidCredentials``. The same
holds for any other text the driver must encode.
"""

from __future__ import annotations

import pytest

from keen_stream.dal.database import KeenDatabase
from keen_stream.dal.models import User
from keen_stream.errors import InvalidCredentials, InvalidInput

SURROGATE = "\ud800" * 12


async def test_registering_with_an_unencodable_password_is_invalid_input(
    db: KeenDatabase,
) -> None:
    with pytest.raises(InvalidInput):
        await db.users.create(email="s@example.com", username="surrogate", password=SURROGATE)


async def test_logging_in_with_an_unencodable_password_is_invalid_credentials(
    db: KeenDatabase, alice: User
) -> None:
    with pytest.raises(InvalidCredentials):
        await db.users.authenticate(alice.email, SURROGATE)
    with pytest.raises(InvalidCredentials):
        await db.users.authenticate("nobody@example.com", SURROGATE)


async def test_unencodable_text_in_any_other_field_is_invalid_input(db: KeenDatabase) -> None:
    """Not only the password: the driver cannot encode a lone surrogate in any text argument."""
    with pytest.raises(InvalidInput):
        await db.users.create(
            email="d@example.com",
            username="surrogate2",
            password="long enough",
            display_name=SURROGATE,
        )
