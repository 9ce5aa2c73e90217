"""The vLLM adapter: warmplan's Worker protocol over vLLM's ``Worker`` and its
model runner, in the layout the installed vLLM has.

* :mod:`.adapter` - :class:`VllmWorker` (limits, facts, world, reports; picks the
  layout by the runner's attributes);
* :mod:`.seed` - the seed's layout (``input_batch.block_table``, a ``_dummy_run``
  that builds every shape);
* :mod:`.v2` - vLLM 0.34's V2 runner (shapes through ``execute_model``);
* :mod:`.warmups` - vLLM's ``kernel_warmup()`` as named parts (``engine_warmup``);
* :mod:`.common` - versions, the world group, FlashInfer's autotuner as vLLM drives it.

The plugin that runs a plan inside vLLM's warmup is :mod:`warmplan.vllm_plugin`.
Every ``import vllm`` happens inside functions: importing this package needs torch
but not vLLM, and tests stand a fake ``vllm`` in vLLM's place.
"""

from __future__ import annotations

from warmplan.workers.vllm.adapter import LAYOUTS, VllmWorker, runner_layout
from warmplan.workers.vllm.common import (
    BACKEND_NAMES,
    UnsupportedByVllm,
    VllmFlashInferBackend,
    vllm_version,
)
from warmplan.workers.vllm.seed import SeedLayout
from warmplan.workers.vllm.v2 import V2Layout
from warmplan.workers.vllm.warmups import VLLM_WARMUPS, WARMUP_NAMES, VllmWarmup
from warmplan.world.vllm_group import VllmWorld

__all__ = [
    "BACKEND_NAMES",
    "LAYOUTS",
    "VLLM_WARMUPS",
    "WARMUP_NAMES",
    "SeedLayout",
    "UnsupportedByVllm",
    "V2Layout",
    "VllmFlashInferBackend",
    "VllmWarmup",
    "VllmWorker",
    "VllmWorld",
    "runner_layout",
    "vllm_version",
]
