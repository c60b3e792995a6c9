"""Frame parsing, cursors, event frames and the wire encoding: pure functions, no database."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import pytest
from websockets.frames import Frame, Opcode

from keen_stream.dal.models.events import EVENT_TYPES, ORIGIN, Cursor, StreamEvent
from keen_stream.errors import InvalidInput, TokenExpired, TokenRevoked, TokenScopeError
from keen_stream.hub.protocol import (
    AuthFrame,
    CloseCode,
    PingFrame,
    ProtocolError,
    SubscribeFrame,
    close_code_for,
    error_frame,
    event_frame,
    event_type_filter,
    parse_client_frame,
    parse_session_ids,
    parse_since,
    pong_frame,
    ready_frame,
    subscribed_frame,
    unsubscribed_frame,
    ws_text_frame,
)
from keen_stream.protocol import (
    ErrorFrame,
    EventFrame,
    PongFrame,
    ReadyFrame,
    ServerFrame,
    SubscribedFrame,
    UnsubscribedFrame,
)


def test_cursors_round_trip_and_order_by_transaction_then_id():
    assert str(Cursor(12, 7)) == "12-7"
    assert Cursor.parse("12-7") == Cursor(12, 7)
    assert Cursor(5, 100) < Cursor(6, 1) < Cursor(6, 2)
    assert Cursor(0, 1) > ORIGIN
    for bad in [
        "",
        "12",
        "12-",
        "-7",
        "a-b",
        "01-2",
        "1-2-3",
        " 1-2",
        12,
        None,
        "99999999999999999999-1",
        "9223372036854775808-1",
    ]:
        with pytest.raises(InvalidInput):
            Cursor.parse(bad)


def test_client_frames_parse_and_bad_ones_say_why():
    assert parse_client_frame('{"type":"ping","id":3}') == PingFrame(type="ping", id=3)
    auth = parse_client_frame('{"type":"auth","token":"ks_ses_x","client_type":"cli"}')
    assert isinstance(auth, AuthFrame) and auth.client_type == "cli"
    sub = parse_client_frame('{"type":"subscribe","sessions":["a"],"events":["*"],"since":"1-2"}')
    assert isinstance(sub, SubscribeFrame) and sub.sessions == ["a"]
    cases = {
        "nope": "invalid_json",
        "[]": "invalid_frame",
        "null": "invalid_frame",
        '{"type":1}': "unknown_type",
        '{"type":"hello"}': "unknown_type",
        '{"type":"subscribe","scope":"everything"}': "invalid_frame",
        '{"type":"auth"}': "invalid_frame",
        '{"type":"ping","id":{"x":1}}': "invalid_frame",
        '{"type":"ping","id":"' + "x" * 65 + '"}': "invalid_frame",
        "[" * 100_000: "invalid_json",
    }
    for text, code in cases.items():
        with pytest.raises(ProtocolError) as info:
            parse_client_frame(text)
        assert info.value.code == code, text
    with pytest.raises(ProtocolError) as info:
        parse_client_frame(b"binary")
    assert info.value.code == "invalid_frame"
    with pytest.raises(ProtocolError) as info:
        parse_client_frame('{"type":"subscribe","id":"r1","since":5}')
    assert info.value.ref == "r1"


def test_session_ids_cursors_and_event_patterns_are_validated():
    sid = uuid.uuid4()
    assert parse_session_ids([str(sid), str(sid)], 10) == frozenset({sid})
    with pytest.raises(ProtocolError) as info:
        parse_session_ids(["not-a-uuid"], 10)
    assert info.value.code == "invalid_identifier"
    with pytest.raises(ProtocolError) as info:
        parse_session_ids([str(uuid.uuid4()) for _ in range(3)], 2)
    assert info.value.code == "too_many_sessions"
    assert parse_since(None) is None and parse_since("3-4") == Cursor(3, 4)
    with pytest.raises(ProtocolError) as info:
        parse_since("later")
    assert info.value.code == "invalid_cursor"
    assert event_type_filter(None) is None and event_type_filter(["*"]) is None
    assert event_type_filter(["session.*"]) == frozenset(
        t for t in EVENT_TYPES if t.startswith("session.")
    )
    assert event_type_filter(["credit.usage", "session.created"]) == frozenset(
        {"credit.usage", "session.created"}
    )
    with pytest.raises(ProtocolError):
        event_type_filter(["session.%"])


def test_auth_errors_map_to_documented_close_codes():
    assert close_code_for(TokenExpired()) == CloseCode.TOKEN_EXPIRED
    assert CloseCode.TOKEN_EXPIRED.value == 4004
    assert close_code_for(TokenRevoked()) == CloseCode.TOKEN_REVOKED
    assert CloseCode.TOKEN_REVOKED.value == 4005
    assert close_code_for(TokenScopeError()) == CloseCode.INVALID_TOKEN
    assert CloseCode.INVALID_TOKEN.value == 4003


def _event(data: str = '{"phase":"PLAN","cost":"1.500000"}', session: bool = True) -> StreamEvent:
    sid = uuid.uuid4() if session else None
    return StreamEvent(
        cursor=Cursor(900, 42),
        user_id=uuid.uuid4(),
        session_id=sid,
        root_session_id=sid,
        event_type="session.phase_changed",
        data=data,
        created_at=datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
    )


def test_event_frames_are_valid_json_with_the_payload_untouched():
    event = _event()
    frame = json.loads(event_frame(event))
    assert frame == {
        "type": "event",
        "cursor": "900-42",
        "version": 42,
        "event_type": "session.phase_changed",
        "user_id": str(event.user_id),
        "session_id": str(event.session_id),
        "root_session_id": str(event.session_id),
        "time": "2026-01-02T03:04:05.000006+00:00",
        "data": {"phase": "PLAN", "cost": "1.500000"},
    }
    bare = json.loads(event_frame(_event(session=False)))
    assert bare["session_id"] is None and bare["root_session_id"] is None


def _same_as_model(text: str, model: type[ServerFrame]) -> dict[str, object]:
    """The frame parses as ``model`` (the client's view) and nothing in it is left out of it."""
    raw = json.loads(text)
    parsed = model.model_validate(raw)
    dumped = json.loads(parsed.model_dump_json())
    assert set(dumped) == set(raw)
    assert model.model_validate(dumped) == parsed
    return raw  # type: ignore[no-any-return]


def test_every_server_frame_is_one_of_the_shared_models_the_client_parses():
    """keen_stream.protocol is what the Python client parses with: every frame the hub builds
    (as text, for speed) parses as its model, with no field the model does not know."""
    for event in (_event(), _event(session=False)):
        frame = _same_as_model(event_frame(event), EventFrame)
        assert frame["version"] == 42
    user, s1, s2 = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    ready = _same_as_model(ready_frame("ws-1", user, True, Cursor(7, 8)), ReadyFrame)
    assert ready == {
        "type": "ready",
        "connection_id": "ws-1",
        "user_id": str(user),
        "admin": True,
        "cursor": "7-8",
    }
    sub = _same_as_model(
        subscribed_frame(
            "r1",
            scope="sessions",
            sessions=[s2, s1],
            events=["session.progress", "credit.usage"],
            cursor=Cursor(7, 9),
            recovered=True,
        ),
        SubscribedFrame,
    )
    assert sub["sessions"] == sorted([str(s1), str(s2)])
    assert sub["events"] == ["credit.usage", "session.progress"]
    assert "reason" not in sub
    gap = _same_as_model(
        subscribed_frame(
            5,
            scope="mine",
            sessions=None,
            events=None,
            cursor=Cursor(7, 9),
            recovered=False,
            reason="since_expired",
        ),
        SubscribedFrame,
    )
    assert (gap["id"], gap["sessions"], gap["reason"]) == (5, None, "since_expired")
    assert _same_as_model(unsubscribed_frame(7, "none", None), UnsubscribedFrame) == {
        "type": "unsubscribed",
        "id": 7,
        "scope": "none",
        "sessions": None,
    }
    assert _same_as_model(pong_frame(None, Cursor(1, 2)), PongFrame) == {
        "type": "pong",
        "id": None,
        "cursor": "1-2",
    }
    assert _same_as_model(error_frame("forbidden", "no", "r2"), ErrorFrame) == {
        "type": "error",
        "id": "r2",
        "code": "forbidden",
        "message": "no",
    }


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65_535, 65_536, 70_000])
def test_wire_frames_match_what_the_websockets_library_encodes(size: int):
    payload = b"x" * size
    expected = Frame(Opcode.TEXT, payload).serialize(mask=False, extensions=[])
    assert ws_text_frame(payload) == expected
