"""``slot_mapping``: run the worker's slot-mapping kernel for one request at each
applied token count, so that every specialisation the fan names (Triton compiles
one variant per class of each int argument: ``== 1``, ``% 16 == 0``, other) is
compiled before the first real request."""

from __future__ import annotations

from typing import Any

from warmplan.resolve import ResolvedStep
from warmplan.steps.result import StepResult
from warmplan.workers.base import Worker


def run(rstep: ResolvedStep, worker: Worker, *, log: Any) -> StepResult:
    for n in rstep.applied:
        worker.slot_mapping(n)
    return StepResult()
