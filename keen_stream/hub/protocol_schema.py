"""The JSON Schema of every frame of the stream protocol, generated from the pydantic models in
keen_stream/hub/protocol.py: ``keen_stream/protocol.schema.json`` (shipped in the package).

    python -m keen_stream.hub.protocol_schema          # write it
    python -m keen_stream.hub.protocol_schema --check  # exit 1 if it is not current

tests/unit/test_protocol_schema.py fails when the committed file is not what this generates,
so a change of a model reaches the file in the same commit.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Final

from pydantic.json_schema import models_json_schema

from keen_stream.hub.protocol import FRAMES

FILE_NAME: Final = "protocol.schema.json"
#: What each group of frames is, as the schema's union of them is named.
_GROUPS: Final = {
    "ws_client": ("WsClientFrame", "A frame a client sends on /ws (a JSON text frame)."),
    "ws_server": ("WsServerFrame", "A frame the hub sends on /ws (a JSON text frame)."),
    "sse_server": (
        "SseServerFrame",
        "The data of a server-sent event on GET /events: an event (a plain message, its SSE"
        " id the cursor) or a named SSE event (subscribed, error, close). The JSON body of a"
        " refused GET /events or POST /events/tickets is an error frame too.",
    ),
}


def build_schema() -> dict[str, Any]:
    models = sorted({m for group in FRAMES.values() for m in group}, key=lambda m: m.__name__)
    _, top = models_json_schema(
        [(model, "serialization") for model in models], ref_template="#/$defs/{model}"
    )
    defs: dict[str, Any] = dict(sorted(top["$defs"].items()))
    for key, (name, description) in _GROUPS.items():
        defs[name] = {
            "description": description,
            "oneOf": [{"$ref": f"#/$defs/{m.__name__}"} for m in FRAMES[key]],
            "discriminator": {"propertyName": "type"},
        }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "keen_stream stream protocol",
        "description": (
            "Every frame of the hub's protocol (docs/protocol.md): WebSocket /ws both ways and"
            " server-sent events on GET /events. Generated from keen_stream/hub/protocol.py by"
            " `python -m keen_stream.hub.protocol_schema`; do not edit."
        ),
        "anyOf": [{"$ref": f"#/$defs/{name}"} for name, _ in _GROUPS.values()],
        "$defs": defs,
    }


def render() -> str:
    return json.dumps(build_schema(), indent=2, sort_keys=False) + "\n"


def packaged_path() -> Path:
    """Where the file is in this checkout or installation."""
    return Path(str(resources.files("keen_stream") / FILE_NAME))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is not current")
    parser.add_argument("--output", type=Path, default=None, help="default: the package's file")
    args = parser.parse_args(argv)
    path = args.output or packaged_path()
    text = render()
    if args.check:
        current = path.read_text(encoding="utf-8") if path.exists() else ""
        if current != text:
            print(f"{path} is not current: run python -m keen_stream.hub.protocol_schema")
            return 1
        return 0
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
