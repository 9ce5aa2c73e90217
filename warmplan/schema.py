"""The plan JSON Schema (2020-12), as data.

``schemas/plan.schema.json`` is this dict written out (``warmplan schema --write``);
a test keeps the two equal, and another keeps the step kinds here equal to the
step registry (``warmplan.steps.STEPS``). Field descriptions live here, in each
property's ``description``.
"""

from __future__ import annotations

import json
from typing import Any

from warmplan.workers.builtin.config import config_json_schema

SCHEMA_ID = "https://warmplan.dev/schemas/plan.schema.json"

STEP_KINDS = ("autotune", "dummy_run", "slot_mapping")
LIMITS = ("max_num_tokens", "max_num_batched_tokens", "max_num_seqs")
SHAPES = ("mixed", "single_prefill", "uniform_decode", "plain")
BACKENDS = ("builtin", "flashinfer", "flashinfer_dsv4_decode", "triton")
POLICIES = ("leader", "every_rank", "load_only")
ON_MISSING = ("tune", "skip", "fail")
PLACEHOLDERS = ("cache_root", "backend", "backend_version", "arch", "config_hash", "rank")
DEFAULT_CACHE_PATH = "{cache_root}/autotune/{backend}/{backend_version}/{arch}/{config_hash}.json"

_ID_PATTERN = "^[a-z0-9][a-z0-9_.-]*$"


def _obj(properties: dict[str, Any], *, required: tuple[str, ...] = (), description: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "type": "object",
        "description": description,
        "properties": properties,
        "additionalProperties": False,
    }
    if required:
        out["required"] = list(required)
    return out


def _pair(description: str, *, minimum: int = 1) -> dict[str, Any]:
    return {
        "type": "array",
        "description": description,
        "prefixItems": [
            {"type": "integer", "minimum": minimum, "description": "first value (inclusive)"},
            {"type": "integer", "minimum": minimum, "description": "last value (inclusive)"},
        ],
        "items": False,
        "minItems": 2,
        "maxItems": 2,
    }


_ENV_GATE: dict[str, Any] = {
    "oneOf": [
        {
            "type": "string",
            "minLength": 1,
            "description": "An environment variable that must be truthy (anything but '', 0, false, no, off); unset counts as false.",
        },
        _obj(
            {
                "name": {"type": "string", "minLength": 1, "description": "The environment variable's name."},
                "unset": {
                    "type": "boolean",
                    "description": "What an unset variable means: true = the gate holds (warmup runs unless an operator sets the variable to 0).",
                },
            },
            required=("name",),
            description="An environment variable gate that says what an unset variable means.",
        ),
    ],
    "description": "An environment-variable gate.",
}

_FLAG_STATE: dict[str, Any] = {
    "oneOf": [
        {"type": "boolean", "description": "The flag must be reported with this value."},
        {"const": "unset", "description": "The worker must not report the flag at all."},
    ],
    "description": "A state of a named worker flag: true, false or unset.",
}

GATES: dict[str, Any] = _obj(
    {
        "env": {
            "description": "Environment gates, all of which must hold: one gate or a list.",
            "oneOf": [
                _ENV_GATE,
                {"type": "array", "items": _ENV_GATE, "minItems": 1, "description": "Several environment gates, all of which must hold."},
            ],
        },
        "platform": {
            "description": "The platform the worker must be on: one name or a list of names.",
            "oneOf": [
                {"enum": ["cuda", "cpu"], "description": "One platform."},
                {
                    "type": "array",
                    "items": {"enum": ["cuda", "cpu"], "description": "A platform."},
                    "minItems": 1,
                    "uniqueItems": True,
                    "description": "Any of these platforms.",
                },
            ],
        },
        "device_capability": {
            "description": "Minimum CUDA device capability, as major.minor (9.0 = Hopper); never holds off CUDA.",
            "oneOf": [
                {"type": "string", "pattern": "^[0-9]+\\.[0-9]+$", "description": "As a string, e.g. '9.0'."},
                {"type": "number", "minimum": 0, "description": "As a number, e.g. 9.0."},
            ],
        },
        "device_capability_family": {
            "type": "integer",
            "minimum": 10,
            "description": "CUDA capability family as major*10 (120 = SM12x): holds when the device's major version is family // 10.",
        },
        "attention_backend": {
            "type": "array",
            "items": {"type": "string", "minLength": 1, "description": "An attention backend name."},
            "minItems": 1,
            "description": "Holds when any of the worker's attention backends has one of these names.",
        },
        "pooling": {"type": "boolean", "description": "Whether the worker's model must be (true) or must not be (false) a pooling model."},
        "flag": {
            "type": "object",
            "description": "Named booleans the worker reports (vLLM's enable_flashinfer_autotune, say): each must be in the given state, or in one of a list of states.",
            "additionalProperties": {
                "description": "Accepted state(s) of the flag.",
                "oneOf": [
                    _FLAG_STATE,
                    {"type": "array", "items": _FLAG_STATE, "minItems": 1, "description": "Any of these states."},
                ],
            },
            "propertyNames": {"pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
        },
    },
    description="Gates, all of which must hold for the plan or step to run.",
)

_TOKEN_ITEM: dict[str, Any] = {
    "description": "A token count, or an expansion into several.",
    "oneOf": [
        {"type": "integer", "minimum": 0, "description": "One token count."},
        _obj({"range": _pair("Every count from the first to the last, inclusive.")}, required=("range",), description="An inclusive range of token counts."),
        _obj(
            {"powers_of_two": _pair("Every power of two from the first to the last, inclusive (both powers of two).")},
            required=("powers_of_two",),
            description="Powers of two between two bounds.",
        ),
    ],
}

_TOKENS_ONE: dict[str, Any] = {
    "description": "A token count, or the name of one of the worker's limits.",
    "oneOf": [
        {"type": "integer", "minimum": 0, "description": "A token count."},
        {"enum": list(LIMITS), "description": "The value of this limit of the worker."},
    ],
}

_CLAMP_TO: dict[str, Any] = {"enum": list(LIMITS), "description": "The worker limit that requested token counts are clamped to."}

_COMMON: dict[str, Any] = {
    "id": {"type": "string", "pattern": _ID_PATTERN, "description": "The step's id: unique in the plan, lower case, digits, '-', '_' and '.'."},
    "description": {"type": "string", "description": "What the step is for, for people reading the plan."},
    "enabled": {"type": "boolean", "description": "false skips the step (default true)."},
    "when": GATES,
}

_RUN_FIELDS: dict[str, Any] = {
    "shape": {
        "enum": list(SHAPES),
        "description": "The batch shape: mixed = decodes plus one prefill, single_prefill, uniform_decode, plain = a plain profile run.",
    },
    "tokens": _TOKENS_ONE,
    "prior_context": {
        "description": "Tokens already in the KV cache before this chunk (a second prefill chunk): a count, or 'same' for as many as the applied tokens.",
        "oneOf": [
            {"type": "integer", "minimum": 0, "description": "A count of cached tokens."},
            {"const": "same", "description": "As many as the step's applied tokens."},
        ],
    },
    "force_attention": {"type": "boolean", "description": "Build attention metadata and run attention even where a profile run would skip it."},
    "clamp_to": _CLAMP_TO,
}

SLOT_MAPPING_STEP = _obj(
    {
        **_COMMON,
        "kind": {"const": "slot_mapping", "description": "Pre-compile the slot-mapping kernel for each token count."},
        "tokens": {"type": "array", "items": _TOKEN_ITEM, "minItems": 1, "description": "Token counts to run the slot mapping at: ints and expansions."},
        "clamp_to": {**_CLAMP_TO, "description": "The worker limit the counts are clamped to (default max_num_tokens)."},
    },
    required=("id", "kind", "tokens"),
    description="Run the slot-mapping kernel for one request at each token count.",
)

DUMMY_RUN_STEP = _obj(
    {
        **_COMMON,
        "kind": {"const": "dummy_run", "description": "Run one dummy forward pass."},
        **_RUN_FIELDS,
        "clamp_to": {**_CLAMP_TO, "description": "The worker limit tokens are clamped to (default max_num_batched_tokens)."},
    },
    required=("id", "kind", "shape", "tokens"),
    description="Run a dummy forward pass of one shape.",
)

RUN = _obj(
    {**_RUN_FIELDS, "clamp_to": {**_CLAMP_TO, "description": "The worker limit tokens are clamped to (default max_num_batched_tokens)."}},
    required=("shape", "tokens"),
    description="The dummy run to run under tuning (and, once loaded, to warm the tuned kernels).",
)

CACHE = _obj(
    {
        "path": {
            "type": "string",
            "minLength": 1,
            "description": "Cache file path template; placeholders {cache_root}, {backend}, {backend_version}, {arch}, {config_hash}, {rank}. Must stay inside the cache root.",
        },
        "policy": {
            "enum": list(POLICIES),
            "description": "leader: rank 0 tunes and broadcasts; every_rank: each rank tunes its own file; load_only: never tune (default leader).",
        },
        "on_missing": {
            "enum": list(ON_MISSING),
            "description": "When no usable cache file exists: tune (default; not with load_only), skip with a warning, or fail.",
        },
        "timeout_s": {"type": "number", "exclusiveMinimum": 0, "description": "How long ranks wait for each other in this step, in seconds (default 600)."},
    },
    description="The persistent tuning cache and how ranks share it.",
)

AUTOTUNE_STEP = _obj(
    {
        **_COMMON,
        "kind": {"const": "autotune", "description": "Tune a backend's kernels, with a persistent cache."},
        "backend": {
            "enum": list(BACKENDS),
            "description": "The tuning backend: builtin (the built-in engine's kernel choices), flashinfer (FlashInfer's autotuner), flashinfer_dsv4_decode (FlashInfer's DeepSeek-V4 SM120 sparse-MLA decode autotuner), triton (triton.autotune configs).",
        },
        "run": RUN,
        "cache": CACHE,
        "replaces": {
            "type": "string",
            "pattern": _ID_PATTERN,
            "description": "The id of a later step whose run this step covers: skipped when this step runs its run, run when this step does not.",
        },
    },
    required=("id", "kind", "backend", "run"),
    description="Tune a backend while running a dummy run, and persist the results.",
)

STEP_SCHEMAS: dict[str, dict[str, Any]] = {
    "autotune": AUTOTUNE_STEP,
    "dummy_run": DUMMY_RUN_STEP,
    "slot_mapping": SLOT_MAPPING_STEP,
}

# The built-in engine owns its config keys (warmplan/workers/builtin/config.py).
BUILTIN: dict[str, Any] = {
    **config_json_schema(),
    "description": "The built-in engine's model preset and sizes when the plan runs there; ignored on other workers.",
}

COMPILE_CACHE = _obj(
    {
        "share": {"type": "boolean", "description": "Rank 0 runs the compile-heavy steps first and broadcasts its inductor and Triton caches; the other ranks unpack them before their own steps."},
        "timeout_s": {"type": "number", "exclusiveMinimum": 0, "description": "How long followers wait for rank 0's caches, in seconds (default 600)."},
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
            "name": {"type": "string", "pattern": _ID_PATTERN, "description": "The plan's name, shown in logs and reports."},
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
        "$defs": {f"{kind}_step": STEP_SCHEMAS[kind] for kind in STEP_KINDS},
    }


SCHEMA: dict[str, Any] = build_schema()


def schema_text() -> str:
    """The schema as the JSON text written to ``schemas/plan.schema.json``."""
    return json.dumps(SCHEMA, indent=2, sort_keys=False) + "\n"
