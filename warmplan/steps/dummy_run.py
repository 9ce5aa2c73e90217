"""``dummy_run``: one dummy forward pass of a shape (mixed, single_prefill,
uniform_decode, plain) at the applied token count, with prior context for a second
prefill chunk, so that its compiled graphs and kernels exist before serving."""

from __future__ import annotations

from typing import Any

from warmplan.resolve import ResolvedStep
from warmplan.steps.result import StepResult
from warmplan.workers.base import Worker


def run(rstep: ResolvedStep, worker: Worker, *, log: Any) -> StepResult:
    assert rstep.shape is not None  # the resolver sets it for every dummy_run
    for n in rstep.applied:
        worker.dummy_run(rstep.shape, n, prior_context=rstep.prior_context, force_attention=rstep.force_attention)
    return StepResult(covers_run=True)
