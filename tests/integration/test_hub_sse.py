"""GET /events and its tickets end to end: real PostgreSQL, a real uvicorn hub, httpx streams."""

from __future__ import annotations

import asyncio
import logging
import socket
from datetime import timedelta

import httpx
import pytest

from keen_stream.dal.database import KeenDatabase
from keen_stream.dal.models import User
from keen_stream.errors import StreamCredentialRejected, TicketUsed
from keen_stream.hub.fanout import SseTransportSender
from tests.integration.hubkit import running_hub, stream_token, wait_for
from tests.integration.ssekit import http_client, open_stream, refused, ticket


async def new_session(db: KeenDatabase, user: User, handle: str):
    return await db.sessions.create_session(
        user.id, session_handle=handle, vision="v", working_directory="/w", git_branch="main"
    )


async def step(db: KeenDatabase, user: User, handle: str) -> None:
    await db.sessions.update_progress(user.id, handle, iterations=1)


async def test_events_carry_their_cursor_as_id_and_each_user_sees_only_their_own(
    db, fresh_dsn, alice, bob, admin
):
    tokens = [await stream_token(db, user.id) for user in (alice, bob, admin)]
    async with (
        running_hub(fresh_dsn) as hub,
        http_client(hub) as client,
        open_stream(client, token=tokens[0]) as sa,
        open_stream(client, token=tokens[1]) as sb,
        open_stream(client, token=tokens[2], params={"scope": "all"}) as sadmin,
    ):
        for stream, scope in ((sa, "mine"), (sb, "mine"), (sadmin, "all")):
            subscribed = await stream.expect("subscribed")
            assert (subscribed["scope"], subscribed["recovered"]) == (scope, True)
            assert stream.retry == hub.settings.hub_sse_retry * 1000
            # No replay follows: the reply's cursor is a resume point, so it is the id.
            assert stream.last_id == subscribed["cursor"]
        await new_session(db, alice, "a")
        await new_session(db, bob, "b")
        await step(db, alice, "a")

        got_a = await sa.events(2)
        got_b = await sb.events(1)
        got_admin = await sadmin.events(3)
        for message in got_a + got_b + got_admin:
            assert message.id == message.json()["cursor"]
        assert {m.json()["user_id"] for m in got_a} == {str(alice.id)}
        assert {m.json()["user_id"] for m in got_b} == {str(bob.id)}
        assert [m.json()["event_type"] for m in got_a] == [
            "session.created",
            "session.progress",
        ]
        assert {m.id for m in got_admin} == {m.id for m in got_a + got_b}
        await sa.no_message()
        await sb.no_message()


async def test_last_event_id_resumes_without_loss_or_repeat_and_wins_over_since(
    db, fresh_dsn, alice
):
    async with running_hub(fresh_dsn) as hub, http_client(hub) as client:
        token = await stream_token(db, alice.id)
        async with open_stream(client, token=token) as stream:
            start = await stream.expect("subscribed")
            await new_session(db, alice, "a")
            for _ in range(3):
                await step(db, alice, "a")
            first = await stream.events(4)
        for _ in range(2):
            await step(db, alice, "a")
        # Resume after the second step: the URL's `since` (the start) loses to the header.
        headers = {"Last-Event-ID": first[2].id or ""}
        params = {"since": start["cursor"]}
        async with open_stream(client, token=token, params=params, headers=headers) as stream:
            subscribed = await stream.expect("subscribed")
            assert subscribed["recovered"] is True
            rest = await stream.events(3)
            await stream.no_message()
        counts = [m.json()["data"]["iteration_count"] for m in first[1:3] + rest]
        assert counts == [1, 2, 3, 4, 5]

        # A cursor this deployment never issued: recovered false, and the id moves on, so the
        # browser's next reconnect does not ask again for what cannot be given.
        headers = {"Last-Event-ID": "999999999999-1"}
        async with open_stream(client, token=token, headers=headers) as stream:
            subscribed = await stream.expect("subscribed")
            assert (subscribed["recovered"], subscribed["reason"]) == (False, "since_unknown")
            assert stream.last_id == subscribed["cursor"]

        # Past retention: the events after it are gone.
        await step(db, alice, "a")
        assert await db.events.prune(timedelta(0)) > 0
        headers = {"Last-Event-ID": first[0].id or ""}
        async with open_stream(client, token=token, headers=headers) as stream:
            subscribed = await stream.expect("subscribed")
            assert (subscribed["recovered"], subscribed["reason"]) == (False, "since_expired")
            assert stream.last_id == subscribed["cursor"]
            await stream.no_message()


async def test_a_ticket_opens_one_stream_and_its_cookie_lets_the_browser_reconnect(
    db, fresh_dsn, alice, caplog
):
    caplog.set_level(logging.DEBUG)
    async with running_hub(fresh_dsn) as hub, http_client(hub) as client:
        token = await stream_token(db, alice.id)
        first = await ticket(client, token)
        assert first.startswith("ks_tkt_")
        async with open_stream(client, params={"ticket": first}) as stream:
            cookie = stream.response.headers["set-cookie"]
            for part in ("keen_stream_sse=ks_sse_", "Path=/events", "HttpOnly", "SameSite=Strict"):
                assert part in cookie
            await stream.expect("subscribed")
            await new_session(db, alice, "a")
            (event,) = await stream.events(1)
        # What EventSource does next: the same URL (the spent ticket), the cookie, the id.
        await step(db, alice, "a")
        headers = {"Last-Event-ID": event.id or ""}
        async with open_stream(client, params={"ticket": first}, headers=headers) as stream:
            assert "set-cookie" not in stream.response.headers
            await stream.expect("subscribed")
            (again,) = await stream.events(1)
            assert again.json()["data"]["iteration_count"] == 1

        # Without the cookie the spent ticket is refused; a forged one is unknown.
        client.cookies.clear()
        status, body = await refused(client, params={"ticket": first})
        assert (status, body["code"]) == (401, "ticket_used")
        status, body = await refused(client, params={"ticket": "ks_tkt_" + "A" * 43})
        assert (status, body["code"]) == (401, "ticket_unknown")
        status, body = await refused(client, params={"ticket": "garbage"})
        assert (status, body["code"]) == (401, "ticket_unknown")
        status, body = await refused(client)
        assert (status, body["code"]) == (401, "authentication_required")
        # Tickets are for headers-only clients; a token never goes in the URL.
        status, body = await refused(client, params={"token": token})
        assert (status, body["code"]) == (401, "token_in_url")
        response = await client.post("/events/tickets")
        assert (response.status_code, response.json()["code"]) == (401, "authentication_required")
        response = await client.post("/events/tickets", params={"access_token": token})
        assert (response.status_code, response.json()["code"]) == (401, "token_in_url")
        response = await client.get("/events/tickets")
        assert response.status_code == 405
        # A token without the stream scope gets no ticket.
        unscoped = (await db.tokens.issue(alice.id, "session")).token.get_secret_value()
        response = await client.post(
            "/events/tickets", headers={"Authorization": f"Bearer {unscoped}"}
        )
        assert (response.status_code, response.json()["code"]) == (401, "token_scope")
    # The hub never logs them (the test's own HTTP client logs its URLs: not the hub's doing).
    logged = "\n".join(
        r.getMessage() for r in caplog.records if r.name.startswith(("keen_stream", "uvicorn"))
    )
    assert logged  # the hub did log (at DEBUG), just not the secrets
    assert first not in logged and token not in logged and "ks_sse_" not in logged


async def test_a_ticket_used_with_a_cookie_is_spent_all_the_same(db, fresh_dsn, alice):
    """A page that already holds the stream cookie opens a new EventSource with a new ticket:
    the ticket in that URL (which a proxy may log) must be spent by the request, not left
    redeemable by whoever reads the URL for the rest of its lifetime."""
    async with running_hub(fresh_dsn) as hub, http_client(hub) as client:
        token = await stream_token(db, alice.id)
        async with open_stream(client, params={"ticket": await ticket(client, token)}) as stream:
            await stream.expect("subscribed")
        assert client.cookies.get("keen_stream_sse")
        second = await ticket(client, token)
        async with open_stream(client, params={"ticket": second}) as stream:
            await stream.expect("subscribed")
        client.cookies.clear()  # someone else, with the URL only
        # A stream request: if the ticket still worked, its body would never end.
        async with client.stream("GET", "/events", params={"ticket": second}) as response:
            assert response.status_code == 401
            assert (await response.aread()).decode().count("ticket_used") == 1


async def test_the_cookie_is_secure_behind_a_proxy_that_terminates_tls(db, fresh_dsn, alice):
    """Behind a TLS-terminating proxy the hub sees plain HTTP (serve runs uvicorn without
    proxy headers): the proxy's X-Forwarded-Proto / Forwarded must still make the cookie
    Secure, or a browser sends it over any plain-HTTP request to that host."""
    async with running_hub(fresh_dsn) as hub, http_client(hub) as client:
        token = await stream_token(db, alice.id)
        for header in ({"X-Forwarded-Proto": "https"}, {"Forwarded": "for=1.2.3.4;proto=https"}):
            params = {"ticket": await ticket(client, token)}
            async with open_stream(client, params=params, headers=header) as stream:
                assert "; Secure" in stream.response.headers["set-cookie"], header
        async with open_stream(client, params={"ticket": await ticket(client, token)}) as stream:
            assert "Secure" not in stream.response.headers["set-cookie"]  # plain HTTP, direct


async def test_ticket_requests_are_rate_limited_per_token(db, fresh_dsn, alice, bob):
    """Each ticket is a row in the shared database, kept an hour past its expiry: a token
    that asks in a loop must be slowed down (429), like a WebSocket's frames, not fill the
    table. Another token is not affected."""
    async with (
        running_hub(fresh_dsn, hub_rate_limit=0.5, hub_rate_burst=2) as hub,
        http_client(hub) as client,
    ):
        token = await stream_token(db, alice.id)
        headers = {"Authorization": f"Bearer {token}"}
        codes = [(await client.post("/events/tickets", headers=headers)) for _ in range(3)]
        assert [r.status_code for r in codes] == [201, 201, 429]
        assert codes[2].json()["code"] == "rate_limited"
        assert int(codes[2].headers["retry-after"]) >= 1
        assert await ticket(client, await stream_token(db, bob.id))
    rows = await db.system_call("SELECT count(*) AS n FROM stream_tickets")
    assert rows[0]["n"] == 3


async def test_an_expired_ticket_is_refused(db, fresh_dsn, alice):
    async with running_hub(fresh_dsn, hub_ticket_ttl=0.2) as hub, http_client(hub) as client:
        issued = await ticket(client, await stream_token(db, alice.id))
        await asyncio.sleep(0.5)
        status, body = await refused(client, params={"ticket": issued})
        assert (status, body["code"]) == (401, "ticket_expired")


async def test_a_ticket_redeemed_concurrently_opens_exactly_one_stream(db, fresh_dsn, alice):
    async with running_hub(fresh_dsn) as hub:
        token = await stream_token(db, alice.id)
        async with http_client(hub) as client:
            issued = await ticket(client, token)

        async def attempt() -> int:
            # Each its own client: no cookie from another attempt.
            async with (
                http_client(hub) as own,
                own.stream("GET", "/events", params={"ticket": issued}) as response,
            ):
                return response.status_code

        statuses = await asyncio.gather(*(attempt() for _ in range(8)))
        assert sorted(statuses) == [200] + [401] * 7

        # The same race straight at the data layer, on another ticket.
        other = (await db.tickets.issue(token, timedelta(seconds=30))).ticket.get_secret_value()
        results = await asyncio.gather(
            *(db.tickets.redeem(other, timedelta(minutes=5)) for _ in range(8)),
            return_exceptions=True,
        )
        assert sum(not isinstance(r, BaseException) for r in results) == 1
        assert all(isinstance(r, TicketUsed) for r in results if isinstance(r, BaseException))


async def test_a_token_revoked_after_its_ticket_was_issued_is_refused_everywhere(
    db, fresh_dsn, alice
):
    async with running_hub(fresh_dsn) as hub, http_client(hub) as client:
        issued = await db.tokens.issue(alice.id, "session", scopes=["stream"])
        token = issued.token.get_secret_value()
        spent = await ticket(client, token)
        unspent = await ticket(client, token)
        async with open_stream(client, params={"ticket": spent}) as stream:
            await stream.expect("subscribed")
            await db.tokens.revoke(alice.id, issued.record.id)
            # The open stream ends at the next token re-check, like a WebSocket (4005).
            close = await stream.expect("close")
            assert close["code"] == 4005
        status, body = await refused(client, params={"ticket": unspent})
        assert (status, body["code"]) == (401, "token_revoked")
        # The reconnect with the cookie is refused too: the token is checked at every connect.
        status, body = await refused(client, params={"ticket": spent})
        assert (status, body["code"]) == (401, "token_revoked")
        response = await client.post(
            "/events/tickets", headers={"Authorization": f"Bearer {token}"}
        )
        assert (response.status_code, response.json()["code"]) == (401, "token_revoked")


async def test_bad_query_parameters_get_a_typed_error_and_open_nothing(db, fresh_dsn, alice, bob):
    async with running_hub(fresh_dsn) as hub, http_client(hub) as client:
        token = await stream_token(db, alice.id)
        other = await new_session(db, bob, "b")
        cases = [
            ({"colour": "red"}, 400, "invalid_frame"),
            ({"since": "yesterday"}, 400, "invalid_cursor"),
            ({"since": "1-1", "scope": "mine&scope=all"}, 400, "invalid_frame"),
            ({"scope": "everything"}, 400, "invalid_frame"),
            ({"scope": "sessions"}, 400, "invalid_frame"),
            ({"sessions": "not-a-uuid"}, 400, "invalid_identifier"),
            ({"events": "session.exploded"}, 400, "invalid_frame"),
            ({"scope": "all"}, 403, "forbidden"),
            ({"sessions": str(other.id)}, 404, "session_not_found"),
        ]
        for params, status, code in cases:
            got, body = await refused(client, token=token, params=params)
            assert (got, body["code"]) == (status, code), params
        status, body = await refused(client, token=token, headers={"Last-Event-ID": "x"})
        assert (status, body["code"]) == (400, "invalid_cursor")
        assert hub.service.fanout.clients == {}
        # A bad request does not spend the ticket it carried.
        issued = await ticket(client, token)
        await refused(client, params={"ticket": issued, "since": "bad"})
        async with open_stream(client, params={"ticket": issued}) as stream:
            await stream.expect("subscribed")


async def test_sessions_and_event_filters_work_as_on_the_websocket(db, fresh_dsn, alice):
    async with running_hub(fresh_dsn) as hub, http_client(hub) as client:
        token = await stream_token(db, alice.id)
        one = await new_session(db, alice, "one")
        await new_session(db, alice, "two")
        params = {"sessions": str(one.id), "events": "session.progress,credit.*"}
        async with open_stream(client, token=token, params=params) as stream:
            subscribed = await stream.expect("subscribed")
            assert (subscribed["scope"], subscribed["sessions"]) == ("sessions", [str(one.id)])
            await step(db, alice, "two")
            await step(db, alice, "one")
            (event,) = await stream.events(1)
            assert (event.json()["session_id"], event.json()["event_type"]) == (
                str(one.id),
                "session.progress",
            )
            await stream.no_message()


async def test_heartbeat_comments_keep_an_idle_stream_alive(db, fresh_dsn, alice):
    async with (
        running_hub(fresh_dsn, hub_sse_heartbeat_interval=0.1) as hub,
        http_client(hub) as client,
        open_stream(client, token=await stream_token(db, alice.id)) as stream,
    ):
        await stream.expect("subscribed")
        await stream.no_message(0.5)
        assert stream.comments.count(": ping") >= 2


async def test_a_hub_shutdown_ends_the_stream_with_a_close_to_reconnect(db, fresh_dsn, alice):
    async with httpx.AsyncClient(timeout=30) as client:
        async with running_hub(fresh_dsn) as hub:
            # Opened by hand: the stream outlives the hub (uvicorn waits for open responses
            # before its shutdown completes, so the hub must end them itself).
            streaming = open_stream(client, base=hub.http, token=await stream_token(db, alice.id))
            stream = await streaming.__aenter__()
            await stream.expect("subscribed")
        try:
            close = await stream.expect("close")
            assert close["code"] == 1012
            with pytest.raises(EOFError):
                await stream.next()
        finally:
            await streaming.__aexit__(None, None, None)


def _dechunk(raw: bytes) -> bytes:
    """The body of a chunked HTTP/1.1 response (``raw``: everything after the headers)."""
    body = bytearray()
    while raw:
        size_line, _, raw = raw.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        body += raw[:size]
        raw = raw[size + 2 :]
    return bytes(body)


@pytest.mark.parametrize("sender", ["transport", "asgi"])
async def test_a_reader_that_stops_reading_is_closed_with_its_resume_point(
    db, fresh_dsn, owner_conn, alice, monkeypatch, sender
):
    if sender == "asgi":  # the portable sender (servers other than uvicorn's h11 protocol)
        monkeypatch.setattr(SseTransportSender, "usable", staticmethod(lambda cycle: False))
    async with running_hub(fresh_dsn, hub_send_buffer_limit=16_384, hub_close_timeout=60) as hub:
        session = await new_session(db, alice, "s")
        # Its event published before the stream starts: not one of the stream's.
        await wait_for(lambda: hub.service.stats.events_received >= 1, "session.created")
        token = await stream_token(db, alice.id)
        port = int(hub.http.rsplit(":", 1)[1])
        # A client that stops reading: a small receive buffer, and it never reads.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", port))
        request = (
            f"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\r\n"
        )
        await loop.sock_sendall(sock, request.encode())
        await wait_for(lambda: hub.service.fanout.subscription_count == 1, "subscribed")

        total = 4000
        await owner_conn.execute(
            f"DO $$ BEGIN FOR i IN 1..{total} LOOP UPDATE agent_sessions SET iteration_count ="
            f" iteration_count + 1 WHERE id = '{session.id}'; END LOOP; END $$"
        )
        await wait_for(lambda: hub.service.stats.slow_consumers_closed == 1, "closed", 30)

        # It reads again: what was queued, in order, then the close with its resume point.
        raw = bytearray()
        while True:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), 30)
            if not chunk:
                break
            raw += chunk
            if b"event: close" in raw and raw.endswith(b"0\r\n\r\n"):
                break
        sock.close()
        text = _dechunk(bytes(raw).partition(b"\r\n\r\n")[2]).decode()
        ids = [line[4:] for line in text.splitlines() if line.startswith("id: ")]
        close = text[text.index("event: close") :]
        assert '"code":4008' in close
        since = close.split("since=")[1].split('"')[0]
        assert ids and ids[-1] == since
        assert len(ids) < total + 1
        async with (
            http_client(hub) as client,
            open_stream(client, token=token, headers={"Last-Event-ID": since}) as stream,
        ):
            assert (await stream.expect("subscribed"))["recovered"] is True
            rest = await stream.events(total - (len(ids) - 1), within=30)
            assert rest[-1].json()["data"]["iteration_count"] == total


async def test_a_ticket_issued_by_one_node_is_redeemed_by_another(db, fresh_dsn, alice):
    async with running_hub(fresh_dsn) as node_a, running_hub(fresh_dsn) as node_b:
        token = await stream_token(db, alice.id)
        async with http_client(node_a) as client_a:
            issued = await ticket(client_a, token)
        async with (
            http_client(node_b) as client_b,
            open_stream(client_b, params={"ticket": issued}) as stream,
        ):
            await stream.expect("subscribed")
            await new_session(db, alice, "a")
            (event,) = await stream.events(1)
            assert event.json()["event_type"] == "session.created"
        # Spent on node B, so node A refuses it too (no cookie in a new client).
        async with http_client(node_a) as client_a:
            status, body = await refused(client_a, params={"ticket": issued})
            assert (status, body["code"]) == (401, "ticket_used")


async def test_expired_tickets_and_credentials_are_pruned(db, owner_conn, alice):
    token = await stream_token(db, alice.id)
    spent = (await db.tickets.issue(token, timedelta(seconds=30))).ticket.get_secret_value()
    grant = await db.tickets.redeem(spent, timedelta(hours=1))
    assert grant.credential is not None and grant.info.user_id == alice.id
    await db.tickets.issue(token, timedelta(seconds=30))  # still valid: kept
    await owner_conn.execute(
        "UPDATE stream_tickets SET expires_at = now() - interval '2 hours'"
        " WHERE kind = 'credential' OR used_at IS NOT NULL"
    )
    assert await db.tickets.prune() == 2
    kinds = await owner_conn.fetch("SELECT kind, used_at FROM stream_tickets")
    assert [(r["kind"], r["used_at"]) for r in kinds] == [("ticket", None)]
    # Pruned means gone: the credential no longer authenticates.
    with pytest.raises(StreamCredentialRejected):
        await db.tickets.authenticate(grant.credential.get_secret_value())


async def test_pruning_a_spent_ticket_keeps_the_credential_it_minted(db, owner_conn, alice):
    """The credential lives KEEN_HUB_STREAM_CREDENTIAL_TTL (12 h), its ticket 30 s: pruning
    the ticket an hour later must not take the credential with it (ON DELETE CASCADE), nor
    stop EventSource's reconnects, which still carry the spent ticket in their URL."""
    token = await stream_token(db, alice.id)
    spent = (await db.tickets.issue(token, timedelta(seconds=30))).ticket.get_secret_value()
    grant = await db.tickets.redeem(spent, timedelta(hours=12))
    assert grant.credential is not None
    # Two hours on: the ticket is long expired, the credential has ten hours left.
    await owner_conn.execute(
        "UPDATE stream_tickets SET expires_at = now() - interval '2 hours' WHERE kind = 'ticket'"
    )
    await db.tickets.prune()
    credential = grant.credential.get_secret_value()
    assert (await db.tickets.authenticate(credential)).info.user_id == alice.id
    assert (await db.tickets.authenticate(credential, spent)).info.user_id == alice.id


async def test_a_reader_that_takes_nothing_for_a_ping_interval_is_closed_under_the_limit(
    db, fresh_dsn, owner_conn, alice
):
    """The stall rule (a WebSocket's unanswered ping): well under the send-buffer limit, a
    stream whose transport stays over its high-water mark for the ping interval is closed."""
    settings = {
        "hub_send_buffer_limit": 64 * 2**20,
        "hub_ws_ping_interval": 0.5,
        "hub_sse_heartbeat_interval": 0.1,
        "hub_close_timeout": 0.5,
    }
    async with running_hub(fresh_dsn, **settings) as hub:
        session = await new_session(db, alice, "s")
        await wait_for(lambda: hub.service.stats.events_received >= 1, "session.created")
        token = await stream_token(db, alice.id)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", int(hub.http.rsplit(":", 1)[1])))
        request = f"GET /events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n"
        await loop.sock_sendall(sock, request.encode())
        await wait_for(lambda: hub.service.fanout.subscription_count == 1, "subscribed")
        (client,) = hub.service.fanout.clients.values()
        sender = client.sender
        assert isinstance(sender, SseTransportSender)
        # The hub's side keeps a small kernel buffer too, so its transport fills quickly.
        server_sock = sender._cycle.transport.get_extra_info("socket")
        server_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        await owner_conn.execute(
            "DO $$ BEGIN FOR i IN 1..1000 LOOP UPDATE agent_sessions SET iteration_count ="
            f" iteration_count + 1 WHERE id = '{session.id}'; END LOOP; END $$"
        )
        await wait_for(lambda: client.closing, "closed as too slow", 20)
        assert client.close_code == 4008
        assert sender.buffered() < settings["hub_send_buffer_limit"]
        assert hub.service.stats.slow_consumers_closed == 1
        # It never read its close in time: cut.
        await wait_for(lambda: not hub.service.fanout.clients, "the stream ended", 20)
        sock.close()
