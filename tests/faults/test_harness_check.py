"""The fault harness measures truthfully: its view of the outbox is in cursor order, and its
wait for the clients ends only when each has its newest entitled event.

Found with the fault scenario (test_fault_scenario.py): ``read_stream`` and ``head_cursor``
sorted the transaction id as text (``ORDER BY xid`` named the ``xid::text`` output column), so
once the stream's transaction ids passed 9999 the "newest" row was an older one, the catch-up
wait ended while a client was still reading a replay, and what it had not read yet was
reported lost ("never delivered").
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import asyncpg

from tests.faults.harness import (
    Received,
    ResumingClient,
    StreamRow,
    SubscriptionSpec,
    Timeline,
    format_cursor,
    head_cursor,
    read_stream,
    verify,
    wait_caught_up,
    write_evidence,
)

#: Transaction ids on both sides of two powers of ten, inserted out of order.
XIDS = (10001, 999, 9999, 1000, 10000, 99999, 100000)


async def insert_events(dsn: str, xids: tuple[int, ...]) -> None:
    """One outbox row per transaction id (given explicitly; the column's default is the
    writing transaction's)."""
    conn = await asyncpg.connect(dsn)
    try:
        user = uuid.uuid4()
        for xid in xids:
            await conn.execute(
                """INSERT INTO stream_events (xid, user_id, event_type, payload)
                   VALUES ($1::text::xid8, $2, 'credit.usage', '{}')""",
                str(xid),
                user,
            )
    finally:
        await conn.close()


async def test_the_outbox_is_read_in_cursor_order_across_powers_of_ten(fresh_dsn: str) -> None:
    await insert_events(fresh_dsn, XIDS)
    rows = await read_stream(fresh_dsn)
    xids = [r.cursor[0] for r in rows]
    assert xids == sorted(XIDS)
    assert [r.cursor for r in rows] == sorted(r.cursor for r in rows)
    assert await head_cursor(fresh_dsn) == rows[-1].cursor
    # ``after`` is compared as a cursor too.
    after = await read_stream(fresh_dsn, after=rows[2].cursor)
    assert [r.cursor[0] for r in after] == sorted(XIDS)[3:]


async def test_the_catch_up_wait_targets_the_greatest_cursor_whatever_the_row_order() -> None:
    user = str(uuid.uuid4())
    # The order the text sort gave: "10000" < "9999".
    rows = [
        StreamRow((10000, 2), user, None, None, "credit.usage"),
        StreamRow((10001, 3), user, None, None, "credit.usage"),
        StreamRow((9999, 1), user, None, None, "credit.usage"),
    ]
    client = ResumingClient(
        "reader",
        ["ws://127.0.0.1:1/ws"],
        "token",
        SubscriptionSpec("all"),
        user_id=uuid.UUID(user),
        is_admin=True,
        since=format_cursor((1, 0)),
        timeline=Timeline(),
    )
    client.last = format_cursor((9999, 1))  # read up to the text sort's "newest" row only
    record: list[dict[str, object]] = []
    assert await wait_caught_up([client], rows, within=0.2, record=record) == ["reader"]
    assert record[0]["target"] == "10001-3"
    assert record[0]["behind"] is True
    client.last = format_cursor((10001, 3))
    assert await wait_caught_up([client], rows, within=0.2) == []


async def test_a_failed_check_leaves_its_evidence(tmp_path: Path) -> None:
    user = str(uuid.uuid4())
    rows = [StreamRow((10, n), user, None, None, "credit.usage") for n in (1, 2, 3)]
    client = ResumingClient(
        "reader",
        ["ws://127.0.0.1:1/ws"],
        "token",
        SubscriptionSpec("all"),
        user_id=uuid.UUID(user),
        is_admin=True,
        since="1-0",
        timeline=Timeline(),
    )
    client.received.append(Received((10, 1), "credit.usage", user, None, 1, 1, "start"))
    client.last = "10-1"
    verdict = verify([client], rows, faults=0)
    assert not verdict.ok
    path = write_evidence(tmp_path / "evidence.json", [client], rows, verdict, note="x")
    data = json.loads(path.read_text())
    (reader,) = data["clients"]
    assert reader["received"] == ["10-1"]
    assert reader["lost"] == ["10-2", "10-3"]
    assert reader["segments"] == [
        {
            "connection": 1,
            "subscription": 1,
            "phase": "start",
            "first": 0,
            "end": 1,
            "first_cursor": "10-1",
            "last_cursor": "10-1",
        }
    ]
    assert [r["cursor"] for r in data["rows"]] == ["10-1", "10-2", "10-3"]
    assert data["note"] == "x"
