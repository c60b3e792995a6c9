"""keen_stream/protocol.schema.json is current, and the frames the hub builds as text are what
the models (and so the schema) say."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import pytest
from pydantic import BaseModel, ValidationError

from keen_stream.client import Event
from keen_stream.dal.models.events import Cursor, StreamEvent
from keen_stream.hub import protocol
from keen_stream.hub.fanout import Frame
from keen_stream.hub.protocol_schema import build_schema, main, packaged_path
from keen_stream.hub.sse import parse_events_query


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
    for group in protocol.FRAMES.values():
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


@pytest.mark.parametrize(
    ("text", "model"),
    [
        (protocol.ready_frame("ws-1", USER, False, CURSOR), protocol.ReadyFrame),
        (
            protocol.subscribed_frame(
                "r1",
                scope="sessions",
                sessions=[USER],
                events=["credit.usage"],
                cursor=CURSOR,
                recovered=False,
                reason="since_expired",
            ),
            protocol.SubscribedFrame,
        ),
        (protocol.unsubscribed_frame(7, "none", None), protocol.UnsubscribedFrame),
        (protocol.pong_frame(12, CURSOR), protocol.PongFrame),
        (protocol.error_frame("invalid_json", "the frame is not JSON"), protocol.ErrorFrame),
        (protocol.close_frame(4008, protocol.too_slow_reason(CURSOR)), protocol.CloseFrame),
    ],
)
def test_the_frames_the_hub_builds_match_their_models(text: str, model: type[BaseModel]) -> None:
    model.model_validate_json(text)


def test_an_event_frame_matches_its_model_and_the_clients() -> None:
    text = protocol.event_frame(_event())
    frame = protocol.EventFrame.model_validate_json(text)
    assert frame.cursor == "1373496-41"
    assert Event.model_validate_json(text).cursor == frame.cursor
    # The Python client reads every field the schema promises.
    assert set(Event.model_fields) == set(protocol.EventFrame.model_fields)


def test_a_frame_that_breaks_the_schema_is_refused_by_its_model() -> None:
    with pytest.raises(ValidationError):
        protocol.PongFrame.model_validate({"type": "pong", "cursor": "soon"})
    with pytest.raises(ValidationError):
        protocol.EventFrame.model_validate_json(
            protocol.event_frame(_event()).replace("session.progress", "session.exploded")
        )


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
