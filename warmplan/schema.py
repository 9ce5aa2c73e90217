"""The plan JSON Schema (2020-12), as data, assembled from the step registry.

``schemas/plan.schema.json`` is this dict written out (``warmplan schema --write``);
a test keeps the two equal. Each step kind's schema is its module's
(``warmplan.steps.STEPS``), so a kind is valid the moment it is registered. Field
descriptions live in each property's ``description``.
"""

from __future__ import annotations

import json
from typing import Any

from warmplan.builtin_keys import config_json_schema
from warmplan.steps import STEP_KINDS, STEPS
from warmplan.steps.common import GATES, ID_PATTERN, obj, timeout

SCHEMA_ID = "https://warmplan.dev/schemas/plan.schema.json"

# The built-in engine's config keys, as data (warmplan/builtin_keys.py, a leaf).
BUILTIN: dict[str, Any] = {
    **config_json_schema(),
    "description": "The built-in engine's model preset and sizes when the plan runs there; ignored on other workers.",
}

COMPILE_CACHE = obj(
    {
        "share": {
            "type": "boolean",
            "description": "Rank 0 runs the compile-heavy steps first and broadcasts its inductor and Triton caches; the other ranks unpack them before their own steps.",
        },
        "timeout_s": timeout(
            "How long followers wait for rank 0's caches, in seconds (default 600)."
        ),
    },
    description="Share compile caches across ranks.",
)


def build_schema() -> dict[str, Any]:
    """The plan schema as a dict (the contents of ``schemas/plan.schema.json``)."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "warmplan plan",
        "description": "A kernel warmup plan for an LLM inference worker.",
        "type": "object",
        "properties": {
            "$schema": {"type": "string", "description": "Where editors find this schema."},
            "version": {"const": 1, "description": "Plan format version."},
            "name": {
                "type": "string",
                "pattern": ID_PATTERN,
                "description": "The plan's name, shown in logs and reports.",
            },
            "description": {"type": "string", "description": "What the plan warms up and why."},
            "when": {**GATES, "description": "Gates for the whole plan, all of which must hold."},
            "builtin": BUILTIN,
            "compile_cache": COMPILE_CACHE,
            "steps": {
                "type": "array",
                "minItems": 1,
                "description": "The warmup steps, run in order.",
                "items": {
                    "description": "A step; its kind picks its fields.",
                    "oneOf": [{"$ref": f"#/$defs/{kind}_step"} for kind in STEP_KINDS],
                },
            },
        },
        "required": ["version", "name", "steps"],
        "additionalProperties": False,
        "$defs": {f"{kind}_step": dict(STEPS[kind].schema) for kind in STEP_KINDS},
    }


SCHEMA: dict[str, Any] = build_schema()


def schema_text() -> str:
    """The schema as the JSON text written to ``schemas/plan.schema.json``."""
    return json.dumps(SCHEMA, indent=2, sort_keys=False) + "\n"
