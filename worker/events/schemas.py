"""JSON Schema files generated from the pydantic models (``make schemas``).

The checked-in files under ``schemas/`` must equal what ``generate()`` returns; a test
fails on drift, so the published schemas can never silently disagree with the decoder.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel

from worker.events.records import ConnectionDataV1, ConnectionDataV2, Envelope, SinkTestEnvelope

SCHEMAS: dict[str, tuple[type[BaseModel], str]] = {
    "envelope.schema.json": (Envelope, "CloudEvent envelope of a Super SIM connection event"),
    "connection-data-v1.schema.json": (ConnectionDataV1, "Connection event data, schema v1"),
    "connection-data-v2.schema.json": (ConnectionDataV2, "Connection event data, schema v2"),
    "sink-test-event.schema.json": (SinkTestEnvelope, "Event Streams sink test event"),
}


def generate() -> dict[str, bytes]:
    """File name → schema bytes (sorted keys, two-space indent, trailing newline)."""
    out: dict[str, bytes] = {}
    for name, (model, title) in SCHEMAS.items():
        schema: dict[str, Any] = model.model_json_schema(mode="validation")
        schema["title"] = title
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$id"] = name
        out[name] = orjson.dumps(schema, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
    return out


def write(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, content in generate().items():
        path = directory / name
        path.write_bytes(content)
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the JSON Schema files.")
    parser.add_argument("directory", type=Path, nargs="?", default=Path("schemas"))
    for path in write(parser.parse_args().directory):
        print(path)


if __name__ == "__main__":
    main()
