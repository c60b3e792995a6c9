"""keen_stream.backup's pure parts: comparing a restored database with its manifest, tools."""

from __future__ import annotations

import pytest

from keen_stream.backup import compare, find_tool, roles_sql
from keen_stream.errors import KeenError

ACCOUNT = {
    "account_id": "a1",
    "user_id": "u1",
    "balance": "99.506173",
    "held": "0.000000",
    "transactions": 2,
    "ledger_sum": "99.506173",
}
MANIFEST = {
    "schema_revision": "0009_stream_epoch",
    "row_counts": {"users": 2, "credit_transactions": 2},
    "ledger": [ACCOUNT],
}


def found(**changes: object) -> dict[str, object]:
    return {**MANIFEST, **changes}


def test_the_same_figures_agree_and_money_compares_as_decimals() -> None:
    assert compare(MANIFEST, found()) == []
    # The same amount written with another scale is the same money.
    same = {**ACCOUNT, "balance": "99.50617300"}
    assert compare(MANIFEST, found(ledger=[same])) == []


def test_each_difference_is_named() -> None:
    problems = compare(
        MANIFEST,
        found(
            schema_revision="0008_session_handle",
            row_counts={"users": 2, "credit_transactions": 1, "extra": 0},
            ledger=[{**ACCOUNT, "balance": "99.506172"}, {**ACCOUNT, "account_id": "a2"}],
        ),
    )
    assert problems == [
        "schema revision 0008_session_handle (manifest: 0009_stream_epoch)",
        "table credit_transactions: 1 rows (manifest: 2)",
        "table extra: 0 rows (manifest: None)",
        "account a1: balance 99.506172 (manifest: 99.506173)",
        "account a2: not in manifest",
    ]
    assert compare(MANIFEST, found(ledger=[])) == ["account a1: missing"]


def test_a_tool_older_than_the_server_is_refused() -> None:
    with pytest.raises(KeenError, match="older than the server"):
        find_tool("pg_dump", 999)


def test_the_roles_file_creates_every_keen_role_and_carries_no_password() -> None:
    text = roles_sql()
    for role in ("keen_app", "keen_system", "keen_billing", "keen_ledger"):
        assert f"CREATE ROLE {role}" in text
    assert "TEMPORARY ON DATABASE" in text
    assert "PASSWORD" not in text.upper()
