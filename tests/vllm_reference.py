"""The oracle for the vLLM equivalence tests: vLLM's hard-coded DeepSeek-V4 kernel
warmup, transcribed as test code that drives the fake ``vllm`` package
(``tests/fakes/vllm``) the way ``vllm/model_executor/warmup/kernel_warmup.py`` drives
the real one (see ``/work/shared/reference/vllm-kernel-warmup.txt``).

What ``kernel_warmup(worker)`` runs, in vLLM's order (vLLM runs the sparse-MLA
attention warmup *before* the request-prep slot mapping, "so the slot-mapping kernel
and attention input-prep kernels are JIT'd against the runner's pristine state"):

1. sparse-MLA attention: the SM120 decode autotune, which consumes the mixed shape
   when it runs, else a plain mixed dummy run; one max-chunk single prefill; and a
   second chunk with as much prior context (``profile_seq_lens = 2 * tokens``);
2. request prep: the slot-mapping fan over ``1..16, 32, 64, 128, 256, 512`` clamped
   to ``max_num_tokens``, then ``torch.accelerator.synchronize()``;
3. FlashInfer autotune (``enable_flashinfer_autotune is not False`` and FlashInfer
   present and capability >= 9.0): a plain dummy run at ``max_num_batched_tokens``,
   tuned on the leader, the cache broadcast and loaded on every rank.

Parts of vLLM's ``kernel_warmup`` that no plan step stands for (DeepGEMM, mHC, the
FlashInfer attention warmup for FLASHINFER-only models) are left out.

Test helpers for standing the fake in vLLM's place live here too.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import structlog
import torch

FAKE_ROOT = Path(__file__).resolve().parent / "fakes" / "vllm"
ROOT = Path(__file__).resolve().parents[1]
DSV4_PLAN = ROOT / "plans" / "dsv4.yaml"

# vLLM's constants for this warmup.
SPARSE_MLA_BACKENDS = frozenset({"V4_FLASHMLA_SPARSE", "DEEPSEEK_SPARSE_SWA"})
SPARSE_MLA_MIXED_TOKENS = 16
SPARSE_MLA_PREFILL_TOKENS = 8192
SLOT_MAPPING_TOKENS = (*range(1, 17), 32, 64, 128, 256, 512)
# vLLM's switch between the persistent autotune cache (leader tunes, broadcasts) and
# in-memory tuning on every rank; plans/dsv4.yaml's leader policy is the former.
USE_PERSISTENT_CACHE = True


# -- standing the fake in vLLM's place -------------------------------------------------


def _drop_modules() -> None:
    for name in list(sys.modules):
        if name in ("vllm", "flashinfer") or name.startswith(("vllm.", "flashinfer.")):
            del sys.modules[name]


@contextlib.contextmanager
def fake_vllm() -> Iterator[Any]:
    """Import the fake ``vllm`` (and ``flashinfer``) in place of any real one; yields
    ``vllm._fake``. Everything is forgotten again on exit."""
    # An earlier test may have pointed structlog at a stream pytest has closed since.
    structlog.reset_defaults()
    _drop_modules()
    sys.path.insert(0, str(FAKE_ROOT))
    importlib.invalidate_caches()
    try:
        fake = importlib.import_module("vllm._fake")
        assert getattr(importlib.import_module("vllm"), "WARMPLAN_FAKE", False)
        fake.reset()
        yield fake
    finally:
        sys.path.remove(str(FAKE_ROOT))
        _drop_modules()
        importlib.invalidate_caches()


@contextlib.contextmanager
def recorded_synchronize(fake: Any) -> Iterator[None]:
    """``torch.accelerator.synchronize`` (and ``is_available``) recorded as ``sync`` events."""
    accel = torch.accelerator
    saved = accel.synchronize, accel.is_available

    def synchronize(device: Any = None) -> None:
        fake.record("sync", "torch.accelerator.synchronize", {})

    accel.synchronize = synchronize  # type: ignore[assignment]
    accel.is_available = lambda: True  # type: ignore[assignment]
    try:
        yield
    finally:
        accel.synchronize, accel.is_available = saved  # type: ignore[assignment]


# -- vLLM's DeepSeek-V4 warmup, as vLLM runs it ------------------------------------------


def clamp(num_tokens: int, max_tokens: int) -> int:
    return max(0, min(num_tokens, max_tokens))


def backend_name(backend: Any) -> str | None:
    get_name = getattr(backend, "get_name", None)
    if get_name is None:
        return None
    try:
        return str(get_name())
    except NotImplementedError:
        return None


def has_sparse_mla_backend(runner: Any) -> bool:
    return any(
        backend_name(getattr(group, "backend", None)) in SPARSE_MLA_BACKENDS
        for groups in getattr(runner, "attn_groups", []) or ()
        for group in groups
    )


def autotune_cache_file() -> Path:
    """Where vLLM keeps the FlashInfer autotune cache (its hash of the config is a
    constant here: one fake model)."""
    import vllm.envs as envs

    root = Path(envs.VLLM_FLASHINFER_AUTOTUNE_CACHE_DIR or envs.VLLM_CACHE_ROOT)
    out = root / "fake-config-hash"
    out.mkdir(parents=True, exist_ok=True)
    return out / "autotune_configs.json"


def slot_mapping_warmup(runner: Any) -> None:
    max_tokens = getattr(runner, "max_num_tokens", 1)
    block_table = runner.input_batch.block_table
    has_qsl = hasattr(runner, "query_start_loc")
    kept_np = kept_gpu = None
    if has_qsl:
        kept_np = runner.query_start_loc.np[:2].copy()
        kept_gpu = runner.query_start_loc.gpu[:2].clone()
    try:
        for requested in SLOT_MAPPING_TOKENS:
            n = clamp(requested, max_tokens)
            if n <= 0:
                continue
            source = torch.arange(n, dtype=torch.int64, device=runner.device)
            if has_qsl:
                runner.query_start_loc.np[0] = 0
                runner.query_start_loc.np[1] = n
                runner.query_start_loc.copy_to_gpu(2)
                qsl = runner.query_start_loc.gpu[:2]
            else:
                qsl = torch.tensor([0, n], dtype=torch.int32, device=runner.device)
            kept_positions = None
            if hasattr(runner, "positions"):
                kept_positions = runner.positions[:n].clone()
                runner.positions[:n].copy_(source)
                positions = runner.positions[:n]
            else:
                positions = source
            try:
                block_table.commit_block_table(1)
                block_table.compute_slot_mapping(1, qsl, positions)
            finally:
                if kept_positions is not None:
                    runner.positions[:n].copy_(kept_positions)
    finally:
        if kept_np is not None:
            runner.query_start_loc.np[:2] = kept_np
            runner.query_start_loc.gpu[:2].copy_(kept_gpu)


def deepseek_v4_request_prep_warmup(worker: Any) -> None:
    import vllm.envs as envs
    from vllm.platforms import current_platform

    if not envs.VLLM_ENABLE_DEEPSEEK_V4_SPARSE_MLA_WARMUP:
        return
    runner = worker.model_runner
    if runner.is_pooling_model or not has_sparse_mla_backend(runner):
        return
    if not current_platform.is_cuda_alike():
        return
    with torch.inference_mode():
        slot_mapping_warmup(runner)
        torch.accelerator.synchronize()


def deepseek_v4_sparse_mla_decode_autotune(
    worker: Any, num_tokens: int, *, generic_tuning: bool = False
) -> bool:
    """True when it ran (and so consumed) the mixed shape. ``generic_tuning`` (not
    vLLM: a known-deviation variant) tunes under FlashInfer's general autotune."""
    from vllm.platforms import current_platform
    from vllm.utils.flashinfer import has_flashinfer

    if worker.vllm_config.kernel_config.enable_flashinfer_autotune is not True:
        return False
    if not has_flashinfer() or not current_platform.is_device_capability_family(120):
        return False
    try:
        if generic_tuning:
            from vllm.utils.flashinfer import autotune

            def sparse_mla_sm120_decode_dsv4_autotune(cache_path: str) -> Any:
                return autotune(tune_mode=True, cache=cache_path)
        else:
            from flashinfer import sparse_mla_sm120_decode_dsv4_autotune
        from flashinfer.autotuner import AutoTuner
    except ImportError:
        return False
    from vllm.distributed.parallel_state import get_world_group

    runner = worker.model_runner
    world = get_world_group()
    leader = world.rank_in_group == 0
    cache = autotune_cache_file()
    kwargs = {
        "num_tokens": num_tokens,
        "skip_eplb": True,
        "is_profile": True,
        "force_attention": True,
        "create_mixed_batch": True,
    }
    with torch.inference_mode():
        if leader:
            with sparse_mla_sm120_decode_dsv4_autotune(cache_path=str(cache)):
                runner._dummy_run(**kwargs)
        else:
            runner._dummy_run(**kwargs)
    results = cache.read_bytes() if leader and cache.exists() else None
    results = world.broadcast_object(results, src=0)
    if results is None:
        world.barrier()
        return True
    if not leader and world.local_rank == 0:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_bytes(results)
    world.barrier()
    AutoTuner.get().load_configs(str(cache))
    return True


def deepseek_v4_sparse_mla_attention_warmup(
    worker: Any, *, generic_decode_tuning: bool = False
) -> None:
    import vllm.envs as envs

    if not envs.VLLM_ENABLE_DEEPSEEK_V4_SPARSE_MLA_WARMUP:
        return
    runner = worker.model_runner
    if runner.is_pooling_model or not has_sparse_mla_backend(runner):
        return
    max_tokens = worker.scheduler_config.max_num_batched_tokens
    mixed = clamp(SPARSE_MLA_MIXED_TOKENS, max_tokens)
    prefill = clamp(SPARSE_MLA_PREFILL_TOKENS, max_tokens)
    if mixed <= 0 and prefill <= 0:
        return
    if mixed > 0 and not deepseek_v4_sparse_mla_decode_autotune(
        worker, mixed, generic_tuning=generic_decode_tuning
    ):
        runner._dummy_run(
            num_tokens=mixed,
            skip_eplb=True,
            is_profile=True,
            force_attention=True,
            create_mixed_batch=True,
        )
    if prefill > 0:
        runner._dummy_run(
            num_tokens=prefill,
            skip_eplb=True,
            is_profile=True,
            force_attention=True,
            create_single_prefill=True,
        )
        runner._dummy_run(
            num_tokens=prefill,
            skip_eplb=True,
            is_profile=True,
            force_attention=True,
            create_single_prefill=True,
            profile_seq_lens=prefill * 2,
        )


def flashinfer_autotune(runner: Any) -> None:
    import vllm.utils.flashinfer as fi_utils
    from vllm.distributed.parallel_state import get_world_group

    kwargs = {
        "num_tokens": runner.scheduler_config.max_num_batched_tokens,
        "skip_eplb": True,
        "is_profile": True,
    }
    if not USE_PERSISTENT_CACHE:
        with torch.inference_mode(), fi_utils.autotune():
            runner._dummy_run(**kwargs)
        get_world_group().barrier()
        return
    world = get_world_group()
    leader = world.rank_in_group == 0
    cache = autotune_cache_file()
    with torch.inference_mode():
        if leader:
            with fi_utils.autotune(tune_mode=True, cache=str(cache)):
                runner._dummy_run(**kwargs)
        else:
            runner._dummy_run(**kwargs)
    results = cache.read_bytes() if leader and cache.exists() else None
    results = world.broadcast_object(results, src=0)
    if results is not None:
        if not leader and world.local_rank == 0:
            cache.write_bytes(results)
        world.barrier()
        from flashinfer.autotuner import AutoTuner

        AutoTuner.get().load_configs(str(cache))


VLLM_ORDER = ("attention", "request_prep", "flashinfer_autotune")


def kernel_warmup(
    worker: Any, *, order: tuple[str, ...] = VLLM_ORDER, generic_decode_tuning: bool = False
) -> None:
    """vLLM's ``kernel_warmup``, restricted to the parts plans/dsv4.yaml stands for.

    ``order`` and ``generic_decode_tuning`` are not vLLM: they build the variants the
    equivalence tests recognise as a plan's known deviations.
    """
    from vllm.platforms import current_platform
    from vllm.utils.flashinfer import has_flashinfer

    for part in order:
        if part == "attention":
            deepseek_v4_sparse_mla_attention_warmup(
                worker, generic_decode_tuning=generic_decode_tuning
            )
        elif part == "request_prep":
            deepseek_v4_request_prep_warmup(worker)
        elif part == "flashinfer_autotune":
            enable = worker.vllm_config.kernel_config.enable_flashinfer_autotune
            if (
                enable is not False
                and has_flashinfer()
                and current_platform.has_device_capability(90)
            ):
                flashinfer_autotune(worker.model_runner)
        else:
            raise ValueError(f"unknown part {part!r}; expected one of {', '.join(VLLM_ORDER)}")


def env_for_tests(**values: str | None) -> dict[str, str]:
    """``os.environ`` with ``values`` set (``None`` removes the variable)."""
    env = dict(os.environ)
    for key, value in values.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env
