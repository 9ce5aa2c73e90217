"""vLLM's ``kernel_warmup()`` as named parts, each called the way ``kernel_warmup``
calls it, so that a plan of ``engine_warmup`` steps (``plans/vllm-0.34.yaml``) runs
the same functions in an order, with gates and timing an operator can see and change.

Only the call is here. The conditions ``kernel_warmup`` tests *around* a call
(``enable_jit_warmup``, a device capability, the platform, an environment switch)
are plan gates, so ``warmplan plan`` shows them; the conditions a vLLM function
tests *inside* itself (the model type, the attention backend) stay inside it.

A part is looked up in the installed vLLM by module and attribute when it runs; one
that is missing is not offered (:func:`available_warmups`). ``collective`` marks the
parts ``kernel_warmup(process_local_only=True)`` leaves out: everything after its
``if process_local_only: return``.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from warmplan.workers.base import EngineWarmup

KERNEL_WARMUP = "vllm.model_executor.warmup.kernel_warmup"
_WARMUP = "vllm.model_executor.warmup"

# What the plugin's replace mode switched off for the length of one kernel_warmup
# call: (module, attribute) -> the original, which a plan step must still reach.
ORIGINALS: dict[tuple[str, str], Any] = {}


@dataclass(frozen=True, slots=True, kw_only=True)
class VllmWarmup:
    """One part of vLLM's ``kernel_warmup()``."""

    name: str
    description: str
    # (module, attribute) of every vLLM callable the part needs; the first is "the"
    # function (what replace mode switches off). Empty for a runner method.
    targets: tuple[tuple[str, str], ...]
    call: Callable[[Callable[..., Any], Any], None]  # (lookup, worker) -> None
    collective: bool = False

    @property
    def info(self) -> EngineWarmup:
        return EngineWarmup(
            name=self.name, description=self.description, collective=self.collective
        )


def lookup(module: str, attribute: str) -> Any:
    """``module.attribute`` in the installed vLLM (the original while replace mode
    has switched it off)."""
    original = ORIGINALS.get((module, attribute))
    if original is not None:
        return original
    return getattr(importlib.import_module(module), attribute)


def _kw(attribute: str) -> tuple[str, str]:
    return (KERNEL_WARMUP, attribute)


def _call_jit_registry(get: Callable[..., Any], worker: Any) -> None:
    registry = getattr(worker.model_runner, "jit_warmup_registry", None)
    if registry is None:
        from warmplan.workers.base import StepUnsupported

        raise StepUnsupported("this vLLM model runner has no jit_warmup_registry")
    registry.warmup()


def _call_flashinfer_autotune(get: Callable[..., Any], worker: Any) -> None:
    # kernel_warmup keeps the tuning's memory peak out of the KV cache's reserve.
    with get(*_kw("_outside_kv_cache_transient_window"))(worker):
        get(*_kw("flashinfer_autotune"))(worker.model_runner)


def _call_cutedsl(get: Callable[..., Any], worker: Any) -> None:
    get(*_kw("_warmup_skinny_gemm"))(worker.get_model())
    get(*_kw("cutedsl_warmup"))()


def _max_batched(worker: Any) -> int:
    return int(worker.scheduler_config.max_num_batched_tokens)


def _capture_sizes(worker: Any) -> list[int]:
    return list(worker.vllm_config.compilation_config.cudagraph_capture_sizes or [])


def _simple(
    name: str,
    target: tuple[str, str],
    args: Callable[[Any], tuple[Any, ...]],
    description: str,
    *,
    collective: bool = False,
) -> VllmWarmup:
    def call(get: Callable[..., Any], worker: Any) -> None:
        get(*target)(*args(worker))

    return VllmWarmup(
        name=name,
        description=description,
        targets=(target,),
        call=call,
        collective=collective,
    )


def _worker(w: Any) -> tuple[Any, ...]:
    return (w,)


def _runner(w: Any) -> tuple[Any, ...]:
    return (w.model_runner,)


# In kernel_warmup()'s order (vLLM 0.34.0).
VLLM_WARMUPS: tuple[VllmWarmup, ...] = (
    VllmWarmup(
        name="jit_warmup_registry",
        description="Compile every kernel registered with the runner's JIT warmup registry (compile keys, no launch).",
        targets=(),
        call=_call_jit_registry,
    ),
    _simple(
        "qwen_triton",
        (f"{_WARMUP}.qwen_triton_warmup", "qwen_triton_warmup"),
        lambda w: (w.model_runner, w.vllm_config.model_config),
        "Qwen's Triton kernels (a no-op for other models).",
    ),
    _simple(
        "qwen_vl_triton",
        (f"{_WARMUP}.qwen_vl_triton_warmup", "qwen_vl_triton_warmup"),
        _runner,
        "Qwen3-VL ViT kernels and M-RoPE (models that support M-RoPE).",
    ),
    _simple(
        "replayssm_lifecycle",
        (f"{_WARMUP}.replayssm_warmup", "replayssm_lifecycle_warmup"),
        _runner,
        "ReplaySSM request-lifecycle kernels (when use_flashinfer_replayssm).",
    ),
    _simple(
        "kimi_k3_triton",
        (f"{_WARMUP}.kimi_k3_triton_warmup", "kimi_k3_triton_warmup"),
        _worker,
        "Kimi-K3 Triton kernels reachable by this server.",
    ),
    _simple(
        "watermark_sample",
        (f"{_WARMUP}.watermark_sample_warmup", "watermark_sample_warmup"),
        _worker,
        "The watermark sampling kernel (when a watermark config is set).",
    ),
    _simple(
        "qwen4_exp_qsa_triton",
        (f"{_WARMUP}.qwen4_exp_qsa_warmup", "qwen4_exp_qsa_triton_warmup"),
        _worker,
        "Qwen4-exp QSA indexer and sparse-attention kernels.",
    ),
    _simple(
        "bf16x3_router_gemm",
        _kw("_warmup_bf16x3_router_gemm"),
        lambda w: (w.get_model(), _max_batched(w)),
        "The SM100 BF16x3 MoE router GEMM up to max_num_batched_tokens.",
    ),
    _simple(
        "ll_bf16_router_gemm",
        _kw("_warmup_ll_bf16_router_gemm"),
        lambda w: (w.get_model(),),
        "The CuTe DSL low-latency bf16 router GEMM for M in 1..16.",
    ),
    _simple(
        "gemm_rs_ar",
        _kw("_warmup_gemm_rs_ar"),
        lambda w: (),
        "GEMM + reduce-scatter/all-reduce variants (when the model enabled them).",
    ),
    VllmWarmup(
        name="cutedsl",
        description="Skinny-GEMM configs of the model, then every CuTe DSL compile provider.",
        targets=(_kw("cutedsl_warmup"), _kw("_warmup_skinny_gemm")),
        call=_call_cutedsl,
    ),
    # -- kernel_warmup(process_local_only=True) returns here ------------------------
    _simple(
        "rocm_segmented_attn_autotune",
        (f"{_WARMUP}.rocm_segmented_attn_autotune_warmup", "rocm_segmented_attn_autotune_warmup"),
        _worker,
        "ROCm (RDNA) segmented-attention autotune.",
        collective=True,
    ),
    _simple(
        "rocm_aiter_gemm",
        _kw("_rocm_aiter_gemm_warmup"),
        _worker,
        "ROCm AITER GEMM buckets, dummy runs up to max_num_batched_tokens.",
        collective=True,
    ),
    _simple(
        "flashinfer_sparse_mla_decode_autotune",
        (f"{_WARMUP}.flashinfer_sparse_mla_warmup", "flashinfer_sparse_mla_decode_autotune_warmup"),
        _worker,
        "FlashInfer's SM120 sparse-MLA (DSv3.2) decode autotune on a mixed batch.",
        collective=True,
    ),
    _simple(
        "deepseek_v4_sparse_mla_attention",
        (f"{_WARMUP}.flashinfer_sparse_mla_warmup", "deepseek_v4_sparse_mla_attention_warmup"),
        _worker,
        "DeepSeek-V4 sparse-MLA mixed prefill+decode attention (16 tokens), autotuned on SM120.",
        collective=True,
    ),
    _simple(
        "step5_dsa",
        (f"{_WARMUP}.step5_dsa_warmup", "step5_dsa_warmup"),
        _worker,
        "Step-5 DSA kernels (a no-op for other models).",
        collective=True,
    ),
    _simple(
        "deep_gemm",
        (f"{_WARMUP}.deep_gemm_warmup", "deep_gemm_warmup"),
        lambda w: (w.get_model(), _max_batched(w)),
        "DeepGEMM kernels of the model's layers up to max_num_batched_tokens.",
        collective=True,
    ),
    _simple(
        "b12x",
        (f"{_WARMUP}.b12x_warmup", "b12x_warmup"),
        lambda w: (w, _capture_sizes(w)),
        "b12x kernels at the CUDA graph capture sizes (SM120).",
        collective=True,
    ),
    _simple(
        "minimax_m3_msa",
        (f"{_WARMUP}.minimax_m3_msa_warmup", "minimax_m3_msa_warmup"),
        _worker,
        "MiniMax-M3 MSA kernels (CUDA only).",
        collective=True,
    ),
    _simple(
        "flashinfer_pcie_ipc_allreduce",
        (
            "vllm.distributed.device_communicators.flashinfer_pcie_ipc_all_reduce",
            "warmup_flashinfer_pcie_ipc_allreduce",
        ),
        _worker,
        "FlashInfer's PCIe IPC all-reduce workspace and buckets.",
        collective=True,
    ),
    VllmWarmup(
        name="flashinfer_autotune",
        description="FlashInfer autotune over the model's dummy runs, per-rank cache files, outside the KV cache's reserve.",
        targets=(_kw("flashinfer_autotune"), _kw("_outside_kv_cache_transient_window")),
        call=_call_flashinfer_autotune,
        collective=True,
    ),
    _simple(
        "flashinfer_attention",
        _kw("_warmup_flashinfer_attention"),
        _worker,
        "A mixed prefill+decode batch for FlashInfer attention groups (agreed across PP ranks).",
        collective=True,
    ),
)

WARMUP_NAMES: tuple[str, ...] = tuple(w.name for w in VLLM_WARMUPS)


def missing_targets(spec: VllmWarmup) -> list[str]:
    """The ``module.attribute`` names of ``spec`` the installed vLLM lacks."""
    missing: list[str] = []
    for module, attribute in spec.targets:
        try:
            lookup(module, attribute)
        except (ImportError, AttributeError):
            missing.append(f"{module}.{attribute}")
    return missing


@functools.cache
def available_warmups() -> tuple[VllmWarmup, ...]:
    """The parts whose every target exists in the installed vLLM, in order."""
    return tuple(w for w in VLLM_WARMUPS if not missing_targets(w))


def run_warmup(spec: VllmWarmup, worker: Any) -> None:
    """Call ``spec``'s vLLM function(s) on vLLM ``worker`` as ``kernel_warmup`` does."""
    missing = missing_targets(spec)
    if missing:
        from warmplan.workers.base import StepUnsupported

        raise StepUnsupported(
            f"the installed vLLM has no {', '.join(missing)} (warmup {spec.name!r})"
        )
    spec.call(lookup, worker)
