"""``dummy_run``: one dummy forward pass of a shape (mixed, single_prefill,
uniform_decode, plain) at the applied token count, with prior context for a second
prefill chunk, so that its compiled graphs and kernels exist before serving.

``ResolvedRun`` (shape, prior context, attention forced) is also what the
``autotune`` step resolves its ``run`` to.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from warmplan.log import Logger
from warmplan.steps.base import (
    ResolveContext,
    ResolvedFields,
    ResolvedStep,
    StepFields,
    StepKind,
    StepResult,
    StepSpec,
)
from warmplan.steps.common import COMMON_FIELDS, RUN_FIELDS, RunSpec, build_run, obj
from warmplan.workers.base import Shape, Worker

NAME: Final = "dummy_run"

SCHEMA: dict[str, Any] = obj(
    {
        **COMMON_FIELDS,
        "kind": {"const": NAME, "description": "Run one dummy forward pass."},
        **RUN_FIELDS,
    },
    required=("id", "kind", "shape", "tokens"),
    description="Run a dummy forward pass of one shape.",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class DummyRunStep(StepSpec):
    run: RunSpec


@dataclass(frozen=True, slots=True, kw_only=True)
class ResolvedRun(ResolvedStep):
    """A resolved dummy run: ``prior_context`` is a count (``same`` resolved)."""

    shape: Shape
    prior_context: int = 0
    force_attention: bool = False

    def as_dict(self) -> dict[str, Any]:
        out = ResolvedStep.as_dict(self)
        out.update(
            shape=self.shape,
            prior_context=self.prior_context,
            force_attention=self.force_attention,
        )
        return out

    def detail(self) -> str:
        return self.shape + (f" +{self.prior_context} ctx" if self.prior_context else "")

    def forward(self) -> tuple[Shape | None, int]:
        return self.shape, self.prior_context


def run_fields(run: RunSpec, fields: ResolvedFields) -> dict[str, Any]:
    """The ``ResolvedRun`` fields of ``run``, given its common resolved fields."""
    applied = fields["applied"]
    prior = run.prior_context
    return {
        "shape": run.shape,
        "prior_context": (applied[0] if applied else 0) if prior == "same" else prior,
        "force_attention": run.force_attention,
    }


def requested_of(run: RunSpec, ctx: ResolveContext) -> list[int]:
    """The one count a run asks for: a number, or the value of the limit it names."""
    return [run.tokens if isinstance(run.tokens, int) else ctx.limits.get(run.tokens)]


def build(raw: Mapping[str, Any], common: StepFields) -> DummyRunStep:
    return DummyRunStep(**common, run=build_run(raw))


def resolve(step: DummyRunStep, ctx: ResolveContext) -> ResolvedRun:
    fields = ctx.fields(step, requested_of(step.run, ctx), step.run.clamp_to)
    return ResolvedRun(**fields, **run_fields(step.run, fields))


def run(rstep: ResolvedRun, worker: Worker, log: Logger) -> StepResult:
    for n in rstep.applied:
        worker.dummy_run(
            rstep.shape, n, prior_context=rstep.prior_context, force_attention=rstep.force_attention
        )
    return StepResult(covers_run=True)


KIND: StepKind[DummyRunStep, ResolvedRun] = StepKind(
    name=NAME, schema=SCHEMA, build=build, resolve=resolve, run=run
)
