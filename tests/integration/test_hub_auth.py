"""Authentication failures and bad input: a documented close or an error frame, and the hub and
every other connection keep working."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.integration.hubkit import open_client, running_hub, stream_token


async def close_of(url: str, first_frame: object = None, *, headers=None, wait: float = 10):
    """Connect, optionally send one frame, and return the server's (close code, reason)."""
    async with connect(url, additional_headers=headers) as ws:
        if first_frame is not None:
            await ws.send(first_frame if isinstance(first_frame, str) else json.dumps(first_frame))
        with pytest.raises(ConnectionClosed) as info:
            while True:
                await asyncio.wait_for(ws.recv(), wait)
        rcvd = info.value.rcvd
        return (rcvd.code, rcvd.reason) if rcvd else (None, None)


async def test_bad_missing_expired_revoked_and_misplaced_tokens_are_closed_with_their_codes(
    db, fresh_dsn, alice
):
    async with running_hub(fresh_dsn, hub_auth_timeout=0.5) as hub:
        good = await stream_token(db, alice.id)
        assert (await close_of(hub.url))[0] == 4001  # nothing sent in time
        assert (await close_of(hub.url, {"type": "ping"}))[0] == 4001  # not an auth frame
        assert (await close_of(hub.url, "not json"))[0] == 4001
        code, reason = await close_of(hub.url, {"type": "auth", "token": "ks_ses_" + "x" * 43})
        assert (code, reason) == (4003, "invalid_token")
        assert (await close_of(hub.url, {"type": "auth", "token": "garbage"}))[0] == 4003
        no_scope = (await db.tokens.issue(alice.id, "session")).token.get_secret_value()
        assert (await close_of(hub.url, {"type": "auth", "token": no_scope})) == (
            4003,
            "token_scope",
        )
        short = await stream_token(db, alice.id, expires_in=timedelta(milliseconds=50))
        await asyncio.sleep(0.1)
        assert (await close_of(hub.url, {"type": "auth", "token": short})) == (
            4004,
            "token_expired",
        )
        revoked = await db.tokens.issue(alice.id, "session", scopes=["stream"])
        await db.tokens.revoke(alice.id, revoked.record.id)
        code, reason = await close_of(
            hub.url, headers={"Authorization": f"Bearer {revoked.token.get_secret_value()}"}
        )
        assert (code, reason) == (4005, "token_revoked")
        # Never in the URL, even a good token.
        code, reason = await close_of(hub.url + "?token=" + good)
        assert code == 4001 and "URL" in reason
        assert hub.service.stats.auth_failures >= 9
        assert hub.service.fanout.clients == {}
        # The hub still serves a good token.
        c = await open_client(hub.url, good)
        assert c.ready["user_id"] == str(alice.id)
        await c.close()


async def test_a_token_revoked_or_expiring_while_connected_ends_the_connection(
    db, fresh_dsn, alice, admin
):
    async with running_hub(fresh_dsn) as hub:
        issued = await db.tokens.issue(alice.id, "session", scopes=["stream"])
        c = await open_client(hub.url, issued.token.get_secret_value())
        await c.subscribe()
        await db.tokens.revoke(alice.id, issued.record.id)
        assert await c.closed() == (4005, "token revoked")

        c = await open_client(
            hub.url, await stream_token(db, alice.id, expires_in=timedelta(seconds=1))
        )
        assert await c.closed() == (4004, "token expired")

        c = await open_client(hub.url, await stream_token(db, alice.id))
        await db.users.set_account_status(alice.id, "suspended", actor_id=admin.id)
        assert await c.closed() == (4006, "token inactive")


async def test_bad_frames_get_error_frames_and_the_connection_keeps_working(
    db, fresh_dsn, alice, bob
):
    async with running_hub(fresh_dsn) as hub:
        bobs = await db.sessions.create_session(
            bob.id, session_handle="bob-s", vision="v", working_directory="/w", git_branch="main"
        )
        c = await open_client(hub.url, await stream_token(db, alice.id))
        cases: list[tuple[dict[str, Any] | str, str]] = [
            ("{not json", "invalid_json"),
            ("[1, 2]", "invalid_frame"),
            ({"type": "dance"}, "unknown_type"),
            ({"no": "type"}, "unknown_type"),
            ({"type": "subscribe", "sessions": "abc"}, "invalid_frame"),
            ({"type": "subscribe", "sessions": ["not-a-uuid"]}, "invalid_identifier"),
            ({"type": "subscribe", "sessions": [str(bobs.id)]}, "session_not_found"),
            ({"type": "subscribe", "scope": "all"}, "forbidden"),
            ({"type": "subscribe", "since": "yesterday"}, "invalid_cursor"),
            ({"type": "subscribe", "events": ["session.exploded"]}, "invalid_frame"),
            ({"type": "subscribe", "extra": 1}, "invalid_frame"),
            ({"type": "unsubscribe", "sessions": [str(bobs.id)]}, "invalid_frame"),
            ({"type": "auth", "token": "again"}, "already_authenticated"),
        ]
        for i, (frame, code) in enumerate(cases):
            if isinstance(frame, dict):
                frame = {**frame, "id": i}
            await c.send(frame)
            reply = await c.recv()
            assert reply["type"] == "error" and reply["code"] == code, (frame, reply)
            if isinstance(frame, dict) and code != "unknown_type":
                assert reply["id"] == i
        await c.ws.send(b"\x00\x01binary")
        assert (await c.recv())["code"] == "invalid_frame"
        # Still fully working: ping, subscribe, events.
        await c.send({"type": "ping", "id": "p1"})
        pong = await c.expect("pong")
        assert pong["id"] == "p1"
        await c.subscribe()
        await db.sessions.create_session(
            alice.id, session_handle="a-s", vision="v", working_directory="/w", git_branch="main"
        )
        assert (await c.events(1))[0]["user_id"] == str(alice.id)
        assert hub.service.stats.frames_refused >= len(cases)
        await c.close()


async def test_an_oversized_frame_closes_only_that_connection(db, fresh_dsn, alice):
    async with running_hub(fresh_dsn) as hub:
        token = await stream_token(db, alice.id)
        other = await open_client(hub.url, token)
        await other.subscribe()
        big = await open_client(hub.url, token)
        await big.send({"type": "ping", "id": "x" * 70_000})
        code, _ = await big.closed()
        assert code == 1009
        await db.sessions.create_session(
            alice.id, session_handle="a-s", vision="v", working_directory="/w", git_branch="main"
        )
        assert len(await other.events(1)) == 1
        await other.close()


async def test_a_flood_is_refused_then_closed_but_an_admin_may_send_fast(
    db, fresh_dsn, alice, admin
):
    async with running_hub(
        fresh_dsn, hub_rate_limit=5, hub_rate_burst=5, hub_flood_close_after=30
    ) as hub:
        flooder = await open_client(hub.url, await stream_token(db, alice.id))
        calm = await open_client(hub.url, await stream_token(db, alice.id))
        boss = await open_client(hub.url, await stream_token(db, admin.id))
        for i in range(60):
            await flooder.send({"type": "ping", "id": i})
            await boss.send({"type": "ping", "id": i})
        frames = []
        code, reason = None, None
        try:
            while True:
                frames.append(json.loads(await asyncio.wait_for(flooder.ws.recv(), 10)))
        except ConnectionClosed as exc:
            assert exc.rcvd is not None  # the hub sent a close frame
            code, reason = exc.rcvd.code, exc.rcvd.reason
        assert code == 4029 and reason == "rate limit exceeded"
        assert sum(f["type"] == "pong" for f in frames) <= 6
        assert any(f.get("code") == "rate_limited" for f in frames)
        pongs = [await boss.expect("pong") for _ in range(60)]
        assert [p["id"] for p in pongs] == list(range(60))
        await calm.send({"type": "ping", "id": "ok"})
        assert (await calm.expect("pong"))["id"] == "ok"
        await calm.close()
        await boss.close()


async def test_other_websocket_paths_are_refused(db, fresh_dsn):
    async with running_hub(fresh_dsn) as hub:
        with pytest.raises(Exception):  # the handshake is rejected
            async with connect(hub.url.replace("/ws", "/other")) as ws:
                await ws.recv()
