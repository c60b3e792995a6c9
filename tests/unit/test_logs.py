"""The command line's log formats and the DSN shown in log lines."""

from __future__ import annotations

import json
import logging
import uuid
from decimal import Decimal

import pytest

from keen_stream.logs import JsonFormatter
from keen_stream.settings import redact_dsn


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        ("postgresql://keen:s3cret@db:5432/keen", "postgresql://keen:***@db:5432/keen"),
        (
            "postgresql://keen:p%40ss@db/keen?sslmode=require",
            "postgresql://keen:***@db/keen?sslmode=require",
        ),
        (
            "postgresql://keen@db/keen?password=s3cret&sslmode=require",
            "postgresql://keen@db/keen?password=***&sslmode=require",
        ),
        ("postgresql:///keen?host=/run/pg", "postgresql:///keen?host=/run/pg"),
        ("postgresql://u:pw@[::1]:5432/keen", "postgresql://u:***@[::1]:5432/keen"),
    ],
)
def test_a_dsn_in_a_log_line_hides_its_password(dsn: str, shown: str) -> None:
    assert redact_dsn(dsn) == shown


def _record(**extra: object) -> logging.LogRecord:
    record = logging.LogRecord(
        "keen_stream.x", logging.INFO, __file__, 1, "hello %s", ("you",), None
    )
    record.__dict__.update(extra)
    return record


def test_a_json_line_carries_the_message_and_the_extra_fields() -> None:
    user = uuid.uuid4()
    line = json.loads(JsonFormatter().format(_record(user_id=user, amount=Decimal("1.50"))))
    assert line["message"] == "hello you"
    assert (line["level"], line["logger"]) == ("INFO", "keen_stream.x")
    assert line["user_id"] == str(user) and line["amount"] == "1.50"
    assert line["ts"].endswith("+00:00")
    assert "args" not in line and "msg" not in line


def test_a_json_line_holds_the_traceback_of_an_exception() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = _record()
        record.exc_info = sys.exc_info()
    text = JsonFormatter().format(record)
    assert "\n" not in text
    assert "ValueError: boom" in json.loads(text)["exception"]
