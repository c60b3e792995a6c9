"""One connection's record that can no longer be written does not stop a node's bookkeeping.

The hub writes connection rows in batches (``ConnectionRecorder.flush``, every
``KEEN_HUB_FLUSH_INTERVAL``); a failed flush keeps its changes for the next one. The "opened"
record references the token and the user by foreign key. ``keen_app`` may DELETE its own
``auth_tokens`` rows, and an admin may delete a user without ledger history (0007): if that
happens between a connection's authentication and the next flush, the record can never be
inserted, and every later flush of that node fails on it again, with everyone else's records
(opens, subscriptions, pings, closes) piling up behind it in memory.
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from ipaddress import ip_address

import pytest

from keen_stream.dal.database import KeenDatabase
from keen_stream.dal.models import User
from keen_stream.dal.models.connections import ConnectionOpened
from keen_stream.errors import KeenError
from tests.integration.hubkit import open_client, running_hub, stream_token


async def test_a_record_that_cannot_be_written_does_not_block_the_others(
    db: KeenDatabase, fresh_dsn: str, alice: User, bob: User, owner_conn
) -> None:
    alice_token = await stream_token(db, alice.id)
    bob_token = await stream_token(db, bob.id)
    async with running_hub(fresh_dsn, hub_flush_interval=3600.0) as hub:
        recorder = hub.service.recorder
        a = await open_client(hub.url, alice_token)
        # Tenant SQL, as keen_app: its own token row is its to delete.
        async with db.user_transaction(alice.id) as conn:
            assert (
                await conn.execute("DELETE FROM auth_tokens WHERE user_id = $1", alice.id)
                == "DELETE 1"
            )
        b = await open_client(hub.url, bob_token)
        await b.subscribe()
        for _ in range(3):  # three flush intervals
            with contextlib.suppress(KeenError):
                await recorder.flush()
        assert (
            await owner_conn.fetchval(
                "SELECT subscription_scope FROM websocket_connections WHERE user_id = $1", bob.id
            )
            == "mine"
        )
        await a.close()
        await b.close()


async def test_a_batch_refused_for_good_is_dropped_and_the_next_one_is_written(
    db: KeenDatabase, fresh_dsn: str, bob: User, owner_conn
) -> None:
    bob_token = await stream_token(db, bob.id)
    async with running_hub(fresh_dsn, hub_flush_interval=3600.0) as hub:
        recorder = hub.service.recorder
        node_id = hub.service.node_id
        assert node_id is not None  # registered when the hub started
        # A record the database refuses whatever the retry (here: past a CHECK, as a bug in
        # the hub could produce it; the model would refuse it, so it is built unchecked).
        recorder.opened(
            ConnectionOpened.model_construct(
                connection_id="ws-bad",
                user_id=bob.id,
                token_id=None,
                client_ip=ip_address("127.0.0.1"),
                user_agent="x" * 2000,
                client_type="test",
                admin_connection=False,
                can_view_all_sessions=False,
                hub_node_id=node_id,
                connected_at=datetime.now(UTC),
            )
        )
        with pytest.raises(KeenError) as refused:
            await recorder.flush()
        assert not refused.value.retryable
        b = await open_client(hub.url, bob_token)
        await b.subscribe()
        await recorder.flush()  # the refused record is not tried again
        assert (
            await owner_conn.fetchval(
                "SELECT subscription_scope FROM websocket_connections WHERE user_id = $1", bob.id
            )
            == "mine"
        )
        assert recorder.pending == 0
        await b.close()
