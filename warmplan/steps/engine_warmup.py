"""``engine_warmup``: run one of the engine's own named warmups - on vLLM, a part of
its hard-coded ``kernel_warmup()`` (``warmplan.workers.vllm.WARMUP_NAMES``) - so that
an engine's whole warmup is data: ordered, gated, timed, narrowed or left out per
step, with its time and compiles in the report.

A worker that has no warmup of that name (another engine, another vLLM release)
skips the step and says which names it has; a collective warmup on a worker that
must stay process-local is skipped with that reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from warmplan.log import Logger
from warmplan.steps.base import (
    ResolveContext,
    ResolvedStep,
    StepFields,
    StepKind,
    StepResult,
    StepSpec,
)
from warmplan.steps.common import COMMON_FIELDS, obj
from warmplan.workers.base import EngineWarmupWorker, StepUnsupported, Worker

NAME: Final = "engine_warmup"
WARMUP_PATTERN: Final = "^[a-z_][a-z0-9_]*$"

SCHEMA: dict[str, Any] = obj(
    {
        **COMMON_FIELDS,
        "kind": {
            "const": NAME,
            "description": "Run one of the engine's own named warmups.",
        },
        "warmup": {
            "type": "string",
            "pattern": WARMUP_PATTERN,
            "description": (
                "The engine's warmup by name. On vLLM 0.34, a part of kernel_warmup(): "
                "jit_warmup_registry, qwen_triton, qwen_vl_triton, replayssm_lifecycle, "
                "kimi_k3_triton, watermark_sample, qwen4_exp_qsa_triton, bf16x3_router_gemm, "
                "ll_bf16_router_gemm, gemm_rs_ar, cutedsl, rocm_segmented_attn_autotune, "
                "rocm_aiter_gemm, flashinfer_sparse_mla_decode_autotune, "
                "deepseek_v4_sparse_mla_attention, step5_dsa, deep_gemm, b12x, minimax_m3_msa, "
                "flashinfer_pcie_ipc_allreduce, flashinfer_autotune, flashinfer_attention. "
                "A worker without it skips the step and lists the names it has."
            ),
        },
    },
    required=("id", "kind", "warmup"),
    description="Run one of the engine's own named warmups (a part of vLLM's kernel_warmup()).",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineWarmupStep(StepSpec):
    warmup: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ResolvedEngineWarmup(ResolvedStep):
    warmup: str

    def as_dict(self) -> dict[str, Any]:
        return {**ResolvedStep.as_dict(self), "warmup": self.warmup}

    def detail(self) -> str:
        return f"warmup {self.warmup}"


def build(raw: Mapping[str, Any], common: StepFields) -> EngineWarmupStep:
    return EngineWarmupStep(**common, warmup=raw["warmup"])


def resolve(step: EngineWarmupStep, ctx: ResolveContext) -> ResolvedEngineWarmup:
    # No token counts: the engine's function sizes its own work from the worker.
    return ResolvedEngineWarmup(
        id=step.id,
        kind=step.kind,
        requested=(),
        applied=(),
        clamp_to="max_num_tokens",
        limit=ctx.limits.max_num_tokens,
        skipped=ctx.skipped,
        replaced_by=ctx.replaced_by,
        replaces=None,
        warmup=step.warmup,
    )


def run(rstep: ResolvedEngineWarmup, worker: Worker, log: Logger) -> StepResult:
    if not isinstance(worker, EngineWarmupWorker):
        raise StepUnsupported(
            f"the {worker.describe().engine} worker has no named engine warmups "
            f"(warmup {rstep.warmup!r})"
        )
    offered = worker.engine_warmups()
    if rstep.warmup not in offered:
        raise StepUnsupported(
            f"the {worker.describe().engine} worker has no warmup named {rstep.warmup!r}; "
            f"it has: {', '.join(offered) or 'none'}"
        )
    worker.run_engine_warmup(rstep.warmup)
    return StepResult()


# Collective: most of vLLM's parts run collectives (autotune reductions, PP/DP sync),
# so every rank runs the step and shared compile caches stop before it.
KIND: StepKind[EngineWarmupStep, ResolvedEngineWarmup] = StepKind(
    name=NAME, schema=SCHEMA, build=build, resolve=resolve, run=run, collective=True
)
