"""The step registry: one module per step kind, registered in one literal dict.

Each kind module (``slot_mapping``, ``dummy_run``, ``autotune``) owns its schema
fragment, typed record, builder, checks, typed resolution and run, and exports them
as one ``StepKind`` (``warmplan.steps.base``). The schema's step kinds, the loader,
the resolver and the executor all look kinds up here; ``STEP_KINDS`` is derived.
Adding a kind is one module and one line below.
"""

from __future__ import annotations

from typing import Any, Final

from warmplan.steps import autotune, compile_keys, dummy_run, engine_warmup, slot_mapping
from warmplan.steps.base import ResolvedStep, StepKind, StepResult, StepSpec

STEPS: Final[dict[str, StepKind[Any, Any]]] = {
    "autotune": autotune.KIND,
    "compile_keys": compile_keys.KIND,
    "dummy_run": dummy_run.KIND,
    "engine_warmup": engine_warmup.KIND,
    "slot_mapping": slot_mapping.KIND,
}

STEP_KINDS: Final[tuple[str, ...]] = tuple(sorted(STEPS))

__all__ = ["STEPS", "STEP_KINDS", "ResolvedStep", "StepKind", "StepResult", "StepSpec"]
