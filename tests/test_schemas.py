"""The published JSON Schemas and examples under ``schemas/`` agree with the decoder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from events import KINDS, VENDORS

from worker.errors import DecodeError
from worker.events.decode import decode
from worker.events.records import ConnectionEvent, EventKind, Vendor
from worker.events.schemas import generate

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"
VALID = SCHEMAS / "examples" / "valid"
INVALID = SCHEMAS / "examples" / "invalid"
EXPECTED: dict[str, str] = orjson.loads((INVALID / "expected.json").read_bytes())
VALID_FILES = sorted(VALID.glob("*.json"))


def test_checked_in_schemas_equal_the_generated_ones() -> None:
    """schemas/*.schema.json are exactly what the models generate (no drift, no stale file)."""
    generated = generate()
    on_disk = {path.name for path in SCHEMAS.glob("*.schema.json")}
    assert on_disk == set(generated), "schemas/ has missing or stale files: run `make schemas`"
    for name, content in generated.items():
        assert (SCHEMAS / name).read_bytes() == content, (
            f"schemas/{name} differs from the models: run `make schemas` and commit the result"
        )


def test_one_valid_example_per_kind_and_vendor() -> None:
    """examples/valid holds <vendor>-<kind>.json for each of the 2 vendors and 7 kinds."""
    expected = {f"{vendor}-{kind}.json" for vendor in VENDORS for kind in KINDS}
    assert {path.name for path in VALID_FILES} == expected


@pytest.mark.parametrize("path", VALID_FILES, ids=lambda p: p.stem)
def test_valid_example_decodes(path: Path) -> None:
    """Each valid example decodes to a connection event of the kind and vendor in its name."""
    vendor, kind = path.stem.split("-", 1)
    event = decode(path.read_bytes())
    assert isinstance(event, ConnectionEvent)
    assert event.kind is EventKind(kind)
    assert event.vendor is Vendor(vendor)
    assert event.extra is None


def test_every_invalid_example_is_listed_with_its_reason() -> None:
    """Each file in examples/invalid has an expected reason in expected.json, and vice versa."""
    files = {path.name for path in INVALID.iterdir() if path.name != "expected.json"}
    assert files == set(EXPECTED)


@pytest.mark.parametrize(("name", "reason"), sorted(EXPECTED.items()))
def test_invalid_example_fails_with_its_reason(name: str, reason: str) -> None:
    """Each invalid example raises DecodeError whose reason contains the expected text."""
    with pytest.raises(DecodeError) as info:
        decode((INVALID / name).read_bytes())
    assert reason in info.value.reason


# --- the JSON Schemas themselves, where jsonschema is installed (moto brings it) ------------


def _validator(name: str) -> Any:
    jsonschema = pytest.importorskip("jsonschema")
    schema = orjson.loads((SCHEMAS / name).read_bytes())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("path", VALID_FILES, ids=lambda p: p.stem)
def test_valid_example_matches_the_json_schemas(path: Path) -> None:
    """A valid example's envelope and data validate against the published JSON Schemas."""
    event = orjson.loads(path.read_bytes())
    version = event["dataschema"].rsplit("/", 1)[-1]
    _validator("envelope.schema.json").validate(event)
    _validator(f"connection-data-v{version}.schema.json").validate(event["data"])


@pytest.mark.parametrize(
    "name",
    [
        "byte-count-as-string.json",
        "byte-count-as-float.json",
        "negative-byte-count.json",
        "negative-cumulative-byte-count.json",
        "missing-sim-iccid.json",
        "location-lat-as-string.json",
        "error-code-as-string.json",
    ],
)
def test_json_schema_rejects_what_the_decoder_rejects(name: str) -> None:
    """Field-level mistakes the decoder rejects also fail the published data schema."""
    # One difference is inherent: JSON Schema counts 120.0 as an integer and the decoder
    # does not, so the float example has a fractional part.
    validator = _validator("connection-data-v2.schema.json")
    data = orjson.loads((INVALID / name).read_bytes())["data"]
    assert list(validator.iter_errors(data)), f"{name} passes the JSON Schema"
