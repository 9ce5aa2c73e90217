"""The JSON Schema: equal to the registry, written out, strict, described."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
import yaml

from tests._paths import PLANS, ROOT
from warmplan.schema import SCHEMA, STEP_KINDS, schema_text
from warmplan.steps import STEPS

SCHEMA_FILE = ROOT / "schemas" / "plan.schema.json"


def test_step_kinds_equal_registry() -> None:
    """The schema's step kinds are exactly the registry's."""
    kinds = sorted(
        ref["$ref"].rsplit("/", 1)[-1].removesuffix("_step")
        for ref in SCHEMA["properties"]["steps"]["items"]["oneOf"]
    )
    assert kinds == sorted(STEPS) == sorted(STEP_KINDS)
    consts = sorted(SCHEMA["$defs"][f"{k}_step"]["properties"]["kind"]["const"] for k in STEP_KINDS)
    assert consts == sorted(STEPS)


def test_registry_keys_are_kind_names() -> None:
    """Each registered kind is filed under its own name, and its schema's kind const is that name."""
    for name, kind in STEPS.items():
        assert kind.name == name
        assert kind.schema["properties"]["kind"]["const"] == name


def test_schema_file_is_current() -> None:
    """schemas/plan.schema.json is the schema as warmplan builds it (run `warmplan schema --write schemas/plan.schema.json`)."""
    assert SCHEMA_FILE.read_text() == schema_text()


def test_schema_is_valid_2020_12() -> None:
    """The schema is itself valid JSON Schema 2020-12 with an $id."""
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert SCHEMA["$id"].endswith("plan.schema.json")


def _objects(node: Any, path: str = "#") -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(node, dict):
        if node.get("type") == "object":
            yield path, node
        for key, value in node.items():
            yield from _objects(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _objects(value, f"{path}/{i}")


def test_every_object_rejects_unknown_keys() -> None:
    """additionalProperties is false on every object with named properties (flag maps take a value schema)."""
    for path, obj in _objects(SCHEMA):
        extra = obj.get("additionalProperties")
        if "properties" in obj:
            assert extra is False, path
        else:
            assert isinstance(extra, dict), path


def test_every_property_has_a_description() -> None:
    """Every property in the schema says what it is."""
    for path, obj in _objects(SCHEMA):
        for name, prop in obj.get("properties", {}).items():
            assert prop.get("description"), f"{path}/properties/{name}"


@pytest.mark.parametrize("path", sorted(PLANS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_plans_validate_against_schema_file(path: Any) -> None:
    """Each shipped plan is valid against the schema file alone (as check-jsonschema sees it)."""
    schema = json.loads(SCHEMA_FILE.read_text())
    jsonschema.Draft202012Validator(schema).validate(yaml.safe_load(path.read_text()))


def test_unknown_keys_rejected_by_schema_file() -> None:
    """The schema file alone rejects an unknown step key."""
    schema = json.loads(SCHEMA_FILE.read_text())
    plan = {
        "version": 1,
        "name": "x",
        "steps": [{"id": "a", "kind": "slot_mapping", "tokens": [1], "extra": 1}],
    }
    assert not jsonschema.Draft202012Validator(schema).is_valid(plan)
