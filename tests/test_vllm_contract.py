"""The vLLM adapter's contract with the installed vLLM: every attribute, method and
keyword warmplan.workers.vllm uses exists there. Runs only where a real vLLM is
installed (the one test module allowed to skip on CPU); the fake in tests/fakes/vllm
is never what it checks."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from typing import Any

import pytest


def _real_vllm() -> Any:
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed")
    vllm = importlib.import_module("vllm")
    if getattr(vllm, "WARMPLAN_FAKE", False):
        pytest.skip("the vllm importable here is warmplan's fake")
    return vllm


@pytest.fixture(scope="module")
def vllm() -> Any:
    return _real_vllm()


def params(fn: Any) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(fn).parameters)


def test_dummy_run_takes_every_keyword_the_adapter_passes(vllm: Any) -> None:
    """GPUModelRunner._dummy_run takes num_tokens, skip_eplb, is_profile, force_attention,
    create_mixed_batch, create_single_prefill, uniform_decode and profile_seq_lens."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    have = params(GPUModelRunner._dummy_run)
    needed = {
        "num_tokens",
        "skip_eplb",
        "is_profile",
        "force_attention",
        "create_mixed_batch",
        "create_single_prefill",
        "uniform_decode",
        "profile_seq_lens",
    }
    assert needed <= set(have), f"missing: {sorted(needed - set(have))}"


def test_block_table_slot_mapping_api(vllm: Any) -> None:
    """The block table has commit_block_table(num_reqs) and
    compute_slot_mapping(num_reqs, query_start_loc, positions)."""
    from vllm.v1.worker.block_table import BlockTable, MultiGroupBlockTable

    for cls in (BlockTable, MultiGroupBlockTable):
        assert list(params(cls.commit_block_table))[1:] == ["num_reqs"]
        assert list(params(cls.compute_slot_mapping))[1:4] == [
            "num_reqs",
            "query_start_loc",
            "positions",
        ]


def test_cpu_gpu_buffer(vllm: Any) -> None:
    """CpuGpuBuffer has copy_to_gpu(n) (np and gpu are instance attributes)."""
    from vllm.v1.utils import CpuGpuBuffer

    assert "n" in params(CpuGpuBuffer.copy_to_gpu)


def test_platform_api(vllm: Any) -> None:
    """current_platform has is_cuda_alike, get_device_capability, has_device_capability
    and is_device_capability_family, and DeviceCapability is (major, minor)."""
    from vllm.platforms import current_platform
    from vllm.platforms.interface import DeviceCapability

    for name in (
        "is_cuda_alike",
        "get_device_capability",
        "has_device_capability",
        "is_device_capability_family",
    ):
        assert callable(getattr(current_platform, name)), name
    assert DeviceCapability._fields[:2] == ("major", "minor")
    assert DeviceCapability(12, 0).to_int() == 120


def test_world_group_api(vllm: Any) -> None:
    """GroupCoordinator has rank_in_group, local_rank, world_size, cpu_group,
    broadcast_object(obj, src) and barrier()."""
    from vllm.distributed.parallel_state import GroupCoordinator, get_world_group

    assert callable(get_world_group)
    assert {"obj", "src"} <= set(params(GroupCoordinator.broadcast_object))
    assert callable(GroupCoordinator.barrier)
    init = inspect.getsource(GroupCoordinator.__init__)
    for attr in ("rank_in_group", "local_rank", "world_size", "cpu_group"):
        assert f"self.{attr}" in init, attr


def test_kernel_warmup_hook_points(vllm: Any) -> None:
    """gpu_worker looks kernel_warmup up in its own module, and the functions replace
    mode switches off exist in vllm.model_executor.warmup.kernel_warmup."""
    import vllm.model_executor.warmup.kernel_warmup as kw
    import vllm.v1.worker.gpu_worker as gw

    from warmplan.workers.vllm import REPLACED_VLLM_FUNCTIONS

    assert gw.kernel_warmup is kw.kernel_warmup or getattr(
        gw.kernel_warmup, "__warmplan_wrapped__", False
    )
    assert "kernel_warmup(self)" in inspect.getsource(gw.Worker.compile_or_warm_up_model)
    missing = [name for name in REPLACED_VLLM_FUNCTIONS if not hasattr(kw, name)]
    assert not missing, f"WARMPLAN_MODE=replace cannot switch off: {missing}"


def test_flashinfer_helpers(vllm: Any) -> None:
    """vllm.utils.flashinfer has has_flashinfer() and autotune(tune_mode, cache)."""
    import vllm.utils.flashinfer as fi

    assert callable(fi.has_flashinfer)
    assert callable(fi.autotune)


def test_plugin_group_is_vllms(vllm: Any) -> None:
    """vLLM loads general plugins from the entry-point group warmplan registers in."""
    import vllm.plugins as plugins

    assert plugins.DEFAULT_PLUGINS_GROUP == "vllm.general_plugins"
