"""vLLM 0.34's FlashInfer autotune cache identity, from vLLM's own functions
(``vllm.model_executor.warmup.flashinfer_autotune_cache``): the root
(``flashinfer_autotune_root``), the config hash (``flashinfer_autotune_cache_hash``:
the sha256 of ``compile_factors(include_version=False)``) and the per-rank file name
(``flashinfer_autotune_filename``). vLLM is imported inside functions only.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from warmplan.autotune.vllm_layout import VllmCacheFile

__all__ = ["tune_group", "vllm_cache_file"]


def vllm_cache_file(vllm_config: Any, rank: int) -> VllmCacheFile:
    """The file vLLM 0.34 reads and writes for world rank ``rank`` under this config
    (``resolve_rank_flashinfer_autotune_file``, without creating its directory)."""
    from vllm.model_executor.warmup.flashinfer_autotune_cache import (
        flashinfer_autotune_cache_hash,
        flashinfer_autotune_root,
    )

    root = flashinfer_autotune_root()
    chash = flashinfer_autotune_cache_hash(SimpleNamespace(vllm_config=vllm_config))
    dp_rank = int(getattr(vllm_config.parallel_config, "data_parallel_rank", 0) or 0)
    return VllmCacheFile(
        root=str(root), config_hash=str(chash), dp_rank=dp_rank, rank=rank, source="vllm"
    )


def tune_group() -> Any:
    """The gloo group vLLM 0.34 tunes over: the tensor-parallel group when pipeline
    parallelism splits the model (each stage profiles its own ops), else the world;
    ``None`` for a single rank or when vLLM's groups are not set up."""
    try:
        from vllm.distributed.parallel_state import get_pp_group, get_tp_group, get_world_group

        group = get_tp_group() if get_pp_group().world_size > 1 else get_world_group()
    except Exception:
        return None
    return group.cpu_group if group.world_size > 1 else None
