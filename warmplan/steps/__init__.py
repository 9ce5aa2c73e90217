"""The step registry: one module per step kind, registered in one literal dict.

Each step runner takes the resolved step and the worker and returns a
``StepResult``; it speaks only the Worker protocol. The schema's step kinds
(``warmplan.schema.STEP_KINDS``) equal ``sorted(STEPS)``; a test keeps it so.
"""

from __future__ import annotations

from typing import Any

from warmplan.resolve import ResolvedStep
from warmplan.steps import dummy_run, slot_mapping
from warmplan.steps.result import StepResult, StepRunner
from warmplan.workers.base import Worker


def _autotune(rstep: ResolvedStep, worker: Worker, *, log: Any) -> StepResult:
    # Imported on use: the autotune machinery (torch.distributed, backends) is not
    # needed to validate or resolve a plan.
    from warmplan.steps.autotune import run_autotune

    outcome = run_autotune(rstep, worker, log=log)
    return StepResult(
        covers_run=outcome.ran_run,
        autotune={
            "backend": rstep.backend,
            "policy": rstep.policy,
            "decision": outcome.decision,
            "cache_path": outcome.cache_path,
            "fingerprint": outcome.fingerprint,
            "reason": outcome.reason,
        },
    )


STEPS: dict[str, StepRunner] = {
    "autotune": _autotune,
    "dummy_run": dummy_run.run,
    "slot_mapping": slot_mapping.run,
}

__all__ = ["STEPS", "StepResult", "StepRunner"]
