"""Log output of the command line: text for people, or one JSON object a line for collectors.

``keen-stream serve --log-format json`` (or ``KEEN_LOG_FORMAT=json``) writes every line, uvicorn's
own included, as JSON: ``ts``, ``level``, ``logger``, ``message``, then whatever the call passed
as ``extra=`` (the hub's start line and connection lines carry their fields that way, so a
collector does not have to parse the message).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal

LogFormat = Literal["text", "json"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: What every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record; values JSON cannot hold (UUIDs, Decimals) as strings."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure(level: int | str, log_format: LogFormat = "text", *, replace: bool = False) -> None:
    """Send every logger's records (uvicorn's too: it is run without its own logging config) to
    stderr in ``log_format``. Like ``logging.basicConfig``, nothing changes where the root logger
    already has a handler (an embedding program's, pytest's) unless ``replace`` (``serve``, which
    owns its process)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    logging.basicConfig(level=level, handlers=[handler], force=replace)
    # Loading the migration scripts (serve compares revisions) logs each Alembic plugin at INFO.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
