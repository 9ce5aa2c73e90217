"""The built-in reference engine: a small paged-KV decoder in torch (+ Triton on CUDA).

Its kernels compile lazily (``torch.compile`` graphs per compile size, Triton
specialisations, metadata kernels), so warmup has a real, measurable effect. Two
presets: ``dense`` (GQA paged attention) and ``sparse-mla`` (DeepSeek-V3.2-style
latent cache + indexer + top-k attention).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

# config.py is torch-free and the plan schema is built from it, so it is imported
# eagerly; everything else (torch, Triton) is imported on first use.
from warmplan.workers.builtin.config import (
    CONFIG_FIELDS,
    CONFIG_KEYS,
    EngineConfig,
    config_json_schema,
)

if TYPE_CHECKING:
    from warmplan.workers.builtin.attention import (
        ATTENTION_BACKENDS,
        DENSE_BACKEND,
        SPARSE_MLA_BACKEND,
    )
    from warmplan.workers.builtin.worker import BuiltinWorker
    from warmplan.world import World

__all__ = [
    "ATTENTION_BACKENDS",
    "CONFIG_FIELDS",
    "CONFIG_KEYS",
    "DENSE_BACKEND",
    "SPARSE_MLA_BACKEND",
    "BuiltinWorker",
    "EngineConfig",
    "build_worker",
    "config_json_schema",
]

_LAZY = {
    "ATTENTION_BACKENDS": "warmplan.workers.builtin.attention",
    "DENSE_BACKEND": "warmplan.workers.builtin.attention",
    "SPARSE_MLA_BACKEND": "warmplan.workers.builtin.attention",
    "BuiltinWorker": "warmplan.workers.builtin.worker",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


def build_worker(
    config_mapping: Mapping[str, Any] | None,
    *,
    device: str = "auto",
    world: World | None = None,
    cache_root: str | None = None,
    aot: bool = True,
) -> BuiltinWorker:
    """Build the engine from a plan's ``builtin`` mapping (unknown keys rejected).

    ``device`` other than ``"auto"`` overrides the mapping's ``device``; ``world`` is
    the ranks it runs among (single-process by default). Inductor's, Triton's and
    FlashInfer's caches are put under ``cache_root`` (default: the warmplan cache
    root) where the operator has not placed them (``warmplan.cache_root.unify``);
    with ``aot`` (the default; ``WARMPLAN_AOT=0`` turns it off) the compiled
    functions are loaded from, or saved to, ``<cache_root>/aot``, so that a restarted
    worker does not trace them again.
    """
    import os

    from warmplan.cache_root import AOT_DIR, unify
    from warmplan.workers.builtin.worker import BuiltinWorker

    data = dict(config_mapping or {})
    if device != "auto":
        data["device"] = device
    config = EngineConfig.from_mapping(data)
    dirs = unify(cache_root)
    aot = aot and os.environ.get("WARMPLAN_AOT", "1") != "0"
    return BuiltinWorker(config, world=world, aot_root=dirs[AOT_DIR] if aot else None)
