"""What step kinds share, each as schema fragment, record and builder: the schema
helpers, the fields every step has, gates (``when``), and the dummy-run request
(``run``) that ``dummy_run`` and ``autotune`` both make.

The plan's top-level ``when`` uses the same gates. This module never imports torch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol

from warmplan.workers.base import LIMIT_NAMES, SHAPES, Shape

Path = tuple[str | int, ...]

ID_PATTERN: Final = "^[a-z0-9][a-z0-9_.-]*$"
# Bounds that hold on any worker. A token count or context above 2**24 is a typo, not
# a batch (the longest context windows are a few million tokens), and would have a
# plan build lists of that size; a wait longer than a day is a hang.
MAX_TOKENS: Final = 1 << 24
MAX_TIMEOUT_S: Final = 86400
DEFAULT_RUN_CLAMP: Final = "max_num_batched_tokens"
PLATFORMS: Final = ("cuda", "cpu")


class Problems(Protocol):
    """Where checks put what they find: ``add(path, message)``; the plan's diagnostics
    engine gives each problem its ``file:line:column``."""

    def add(self, path: Path, message: str) -> None: ...


# --------------------------------------------------------------------------- schema helpers


def obj(
    properties: dict[str, Any], *, required: tuple[str, ...] = (), description: str
) -> dict[str, Any]:
    """A closed JSON Schema object: unknown keys are rejected."""
    out: dict[str, Any] = {
        "type": "object",
        "description": description,
        "properties": properties,
        "additionalProperties": False,
    }
    if required:
        out["required"] = list(required)
    return out


def count(description: str, *, minimum: int = 0, maximum: int = MAX_TOKENS) -> dict[str, Any]:
    """An integer count within ``[minimum, maximum]``."""
    return {"type": "integer", "minimum": minimum, "maximum": maximum, "description": description}


def timeout(description: str) -> dict[str, Any]:
    """A wait in seconds: more than 0, at most a day (so never infinite)."""
    return {
        "type": "number",
        "exclusiveMinimum": 0,
        "maximum": MAX_TIMEOUT_S,
        "description": description,
    }


def pair(description: str, *, minimum: int = 1) -> dict[str, Any]:
    """``[first, last]``: exactly two integers."""
    return {
        "type": "array",
        "description": description,
        "prefixItems": [
            count("first value (inclusive)", minimum=minimum),
            count("last value (inclusive)", minimum=minimum),
        ],
        "items": False,
        "minItems": 2,
        "maxItems": 2,
    }


# --------------------------------------------------------------------------- gates

_ENV_GATE: dict[str, Any] = {
    "oneOf": [
        {
            "type": "string",
            "minLength": 1,
            "description": "An environment variable that must be truthy (anything but '', 0, false, no, off); unset counts as false.",
        },
        obj(
            {
                "name": {
                    "type": "string",
                    "minLength": 1,
                    "description": "The environment variable's name.",
                },
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

GATES: dict[str, Any] = obj(
    {
        "env": {
            "description": "Environment gates, all of which must hold: one gate or a list.",
            "oneOf": [
                _ENV_GATE,
                {
                    "type": "array",
                    "items": _ENV_GATE,
                    "minItems": 1,
                    "description": "Several environment gates, all of which must hold.",
                },
            ],
        },
        "platform": {
            "description": "The platform the worker must be on: one name or a list of names.",
            "oneOf": [
                {"enum": list(PLATFORMS), "description": "One platform."},
                {
                    "type": "array",
                    "items": {"enum": list(PLATFORMS), "description": "A platform."},
                    "minItems": 1,
                    "uniqueItems": True,
                    "description": "Any of these platforms.",
                },
            ],
        },
        "device_capability": {
            "description": "Minimum CUDA device capability, as major.minor (9.0 = Hopper); never holds off CUDA.",
            "oneOf": [
                {
                    "type": "string",
                    "pattern": "^[0-9]{1,4}\\.[0-9]{1,4}$",
                    "description": "As a string, e.g. '9.0'.",
                },
                {
                    "type": "number",
                    "minimum": 0,
                    "maximum": 9999,
                    "description": "As a number, e.g. 9.0.",
                },
            ],
        },
        "device_capability_family": {
            "type": "integer",
            "minimum": 10,
            "maximum": 99990,
            "description": "CUDA capability family as major*10 (120 = SM12x): holds when the device's major version is family // 10.",
        },
        "attention_backend": {
            "type": "array",
            "items": {
                "type": "string",
                "minLength": 1,
                "description": "An attention backend name.",
            },
            "minItems": 1,
            "description": "Holds when any of the worker's attention backends has one of these names.",
        },
        "pooling": {
            "type": "boolean",
            "description": "Whether the worker's model must be (true) or must not be (false) a pooling model.",
        },
        "flag": {
            "type": "object",
            "description": "Named booleans the worker reports (vLLM's enable_flashinfer_autotune, say): each must be in the given state, or in one of a list of states.",
            "additionalProperties": {
                "description": "Accepted state(s) of the flag.",
                "oneOf": [
                    _FLAG_STATE,
                    {
                        "type": "array",
                        "items": _FLAG_STATE,
                        "minItems": 1,
                        "description": "Any of these states.",
                    },
                ],
            },
            "propertyNames": {"pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
        },
    },
    description="Gates, all of which must hold for the plan or step to run.",
)

FlagState = bool | Literal["unset"]


@dataclass(frozen=True, slots=True, kw_only=True)
class EnvGate:
    """An environment variable that must be truthy; ``unset`` is what absence means."""

    name: str
    unset: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Gates:
    """Conditions that must all hold; ``None`` / empty means "no condition"."""

    env: tuple[EnvGate, ...] = ()
    platform: tuple[str, ...] | None = None
    device_capability: tuple[int, int] | None = None
    device_capability_family: int | None = None
    attention_backend: tuple[str, ...] | None = None
    pooling: bool | None = None
    flag: Mapping[str, tuple[FlagState, ...]] = field(default_factory=dict)


def build_gates(raw: Mapping[str, Any]) -> Gates:
    """The ``Gates`` of a validated ``when`` mapping."""
    env_raw = raw.get("env")
    env_items = [] if env_raw is None else env_raw if isinstance(env_raw, list) else [env_raw]
    env = tuple(
        EnvGate(name=e)
        if isinstance(e, str)
        else EnvGate(name=e["name"], unset=e.get("unset", False))
        for e in env_items
    )
    platform = raw.get("platform")
    cap = raw.get("device_capability")
    capability = None
    if cap is not None:
        major, _, minor = str(cap).partition(".")
        capability = (int(major), int(minor or 0))
    flags = {
        name: tuple(state) if isinstance(state, list) else (state,)
        for name, state in raw.get("flag", {}).items()
    }
    backends = raw.get("attention_backend")
    return Gates(
        env=env,
        platform=None
        if platform is None
        else tuple([platform] if isinstance(platform, str) else platform),
        device_capability=capability,
        device_capability_family=raw.get("device_capability_family"),
        attention_backend=None if backends is None else tuple(backends),
        pooling=raw.get("pooling"),
        flag=flags,
    )


def check_gates(gates: Mapping[str, Any], path: Path, problems: Problems) -> None:
    """What the schema cannot say about gates: a numeric capability such as 9.0."""
    cap = gates.get("device_capability")
    if (
        isinstance(cap, (int, float))
        and not isinstance(cap, bool)
        and not re.fullmatch(r"\d+(\.\d+)?", str(cap))
    ):
        problems.add(
            (*path, "device_capability"), f"expected major.minor such as 9.0, found {cap!r}"
        )


# --------------------------------------------------------------------------- common step fields

COMMON_FIELDS: dict[str, Any] = {
    "id": {
        "type": "string",
        "pattern": ID_PATTERN,
        "description": "The step's id: unique in the plan, lower case, digits, '-', '_' and '.'.",
    },
    "description": {
        "type": "string",
        "description": "What the step is for, for people reading the plan.",
    },
    "enabled": {"type": "boolean", "description": "false skips the step (default true)."},
    "when": GATES,
}

CLAMP_TO: dict[str, Any] = {
    "enum": list(LIMIT_NAMES),
    "description": "The worker limit that requested token counts are clamped to.",
}


def clamp_to(default: str, what: str = "tokens are") -> dict[str, Any]:
    """The ``clamp_to`` field of a kind, with its default said in the description."""
    return {**CLAMP_TO, "description": f"The worker limit {what} clamped to (default {default})."}


# --------------------------------------------------------------------------- the dummy-run request

_TOKENS_ONE: dict[str, Any] = {
    "description": "A token count, or the name of one of the worker's limits.",
    "oneOf": [
        count("A token count."),
        {"enum": list(LIMIT_NAMES), "description": "The value of this limit of the worker."},
    ],
}

RUN_FIELDS: dict[str, Any] = {
    "shape": {
        "enum": list(SHAPES),
        "description": "The batch shape: mixed = decodes plus one prefill, single_prefill, uniform_decode, plain = a plain profile run.",
    },
    "tokens": _TOKENS_ONE,
    "prior_context": {
        "description": "Tokens already in the KV cache before this chunk (a second prefill chunk): a count, or 'same' for as many as the applied tokens.",
        "oneOf": [
            count("A count of cached tokens."),
            {"const": "same", "description": "As many as the step's applied tokens."},
        ],
    },
    "force_attention": {
        "type": "boolean",
        "description": "Build attention metadata and run attention even where a profile run would skip it.",
    },
    "clamp_to": clamp_to(DEFAULT_RUN_CLAMP),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class RunSpec:
    """A dummy-run request: shape, tokens (a count or a limit name), prior context."""

    shape: Shape
    tokens: int | str
    prior_context: int | Literal["same"] = 0
    force_attention: bool = False
    clamp_to: str = DEFAULT_RUN_CLAMP


def build_run(raw: Mapping[str, Any]) -> RunSpec:
    """The ``RunSpec`` of a validated mapping holding the ``RUN_FIELDS``."""
    return RunSpec(
        shape=raw["shape"],
        tokens=raw["tokens"],
        prior_context=raw.get("prior_context", 0),
        force_attention=raw.get("force_attention", False),
        clamp_to=raw.get("clamp_to", DEFAULT_RUN_CLAMP),
    )
