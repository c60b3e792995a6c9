"""keen_stream/protocol.schema.json is current and says what the hub sends; the event stream's
encoding and query string."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from keen_stream.dal.models.events import Cursor, StreamEvent
from keen_stream.hub import protocol
from keen_stream.hub.fanout import Frame
from keen_stream.hub.protocol import SubscribeFrame
from keen_stream.hub.protocol_schema import FRAMES, build_schema, main, packaged_path
from keen_stream.hub.sse import parse_events_query
from keen_stream.protocol import CloseFrame


def test_the_committed_schema_is_current() -> None:
    committed = json.loads(packaged_path().read_text(encoding="utf-8"))
    assert committed == build_schema(), (
        "keen_stream/protocol.schema.json is stale: run python -m keen_stream.hub.protocol_schema"
    )
    assert main(["--check"]) == 0


def test_check_fails_on_a_stale_file(tmp_path) -> None:
    stale = tmp_path / "schema.json"
    stale.write_text("{}\n")
    assert main(["--check", "--output", str(stale)]) == 1
    assert main(["--output", str(stale)]) == 0
    assert main(["--check", "--output", str(stale)]) == 0


def test_every_frame_is_in_the_schema() -> None:
    defs = build_schema()["$defs"]
    for group in FRAMES.values():
        for model in group:
            assert model.__name__ in defs
    assert {r["$ref"] for r in defs["SseServerFrame"]["oneOf"]} == {
        "#/$defs/SubscribedFrame",
        "#/$defs/ErrorFrame",
        "#/$defs/EventFrame",
        "#/$defs/CloseFrame",
    }


CURSOR = Cursor(1373496, 41)
USER = uuid.uuid4()


def _event(event_type: str = "session.progress") -> StreamEvent:
    return StreamEvent(
        cursor=CURSOR,
        user_id=USER,
        session_id=uuid.uuid4(),
        root_session_id=None,
        event_type=event_type,
        data='{"phase": "EXPLORE", "cost": "0.005000"}',
        created_at=datetime.now(UTC),
    )


def test_the_close_frame_of_an_event_stream_is_the_shared_model() -> None:
    """tests/unit/test_protocol.py holds the other frames to keen_stream.protocol."""
    text = protocol.close_frame(4008, protocol.too_slow_reason(CURSOR))
    assert CloseFrame.model_validate_json(text).model_dump() == json.loads(text)


def test_the_schemas_frames_validate_what_the_hub_sends_and_refuse_what_it_never_would() -> None:
    defs = build_schema()["$defs"]
    event = json.loads(protocol.event_frame(_event()))
    assert set(event) == set(defs["EventFrame"]["properties"])
    assert set(defs["SessionState"]["properties"]) >= {"phase", "budget_used", "session_handle"}
    # Money is a string on the wire, and the schema says so.
    assert defs["CreditTransaction"]["properties"]["amount"]["type"] == "string"
    with pytest.raises(ValidationError):
        SubscribeFrame.model_validate({"type": "subscribe", "scope": "everything"})


def test_server_sent_events_are_encoded_once_with_their_cursor_as_id() -> None:
    event = Frame(protocol.event_frame(_event()), CURSOR)
    data = event.sse()
    assert data.startswith(b"id: 1373496-41\ndata: {") and data.endswith(b"}\n\n")
    assert b"\nevent:" not in data  # a plain message: EventSource's onmessage
    assert event.sse() is data
    reply = Frame(protocol.pong_frame(None, CURSOR), None, resume=CURSOR)
    assert reply.sse().startswith(b"event: pong\nid: 1373496-41\ndata: ")
    assert Frame(protocol.error_frame("x", "y")).sse().startswith(b"event: error\ndata: ")


def test_the_query_string_is_a_subscribe_frame_and_last_event_id_wins() -> None:
    sid = uuid.uuid4()
    frame, ticket = parse_events_query(
        f"sessions={sid}&events=session.*,credit.usage&events=credit.refund&since=1-1&ticket=t".encode(),
        "5-6",
    )
    assert (frame.scope, frame.sessions, frame.since, ticket) == (None, [str(sid)], "5-6", "t")
    assert frame.events == ["session.*", "credit.usage", "credit.refund"]
    for bad, code in [
        (b"scope=mine&scope=all", "invalid_frame"),
        (b"nope=1", "invalid_frame"),
        (b"since=x", "invalid_cursor"),
        (b"sessions=x", "invalid_identifier"),
        (b"events=nothing", "invalid_frame"),
    ]:
        with pytest.raises(protocol.ProtocolError) as caught:
            parse_events_query(bad, None)
        assert caught.value.code == code, bad
