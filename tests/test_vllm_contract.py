"""The vLLM adapter's contract with vLLM: every module, attribute, method and keyword
``warmplan.workers.vllm`` and ``warmplan.vllm_plugin`` use exists there.

Two layouts, two contracts:

* the seed's (``SEED_CHECKS``): held by the recording fake in ``tests/fakes/vllm``,
  the only seed-layout vLLM there is (``test_vllm_adapter.py`` runs them on it);
* vLLM 0.34's V2 runner (the ``test_`` functions, marked ``vllm``): run against the
  installed package in CI's vLLM tier (``scripts/vllm-env.sh``), never skipped there.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import textwrap
from pathlib import Path
from typing import Any

import pytest


def params(fn: Any) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(fn).parameters)


def check_dummy_run_takes_every_keyword_the_adapter_passes(vllm: Any) -> None:
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


def check_block_table_slot_mapping_api(vllm: Any) -> None:
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


def check_cpu_gpu_buffer(vllm: Any) -> None:
    """CpuGpuBuffer has copy_to_gpu(n) (np and gpu are instance attributes)."""
    from vllm.v1.utils import CpuGpuBuffer

    assert "n" in params(CpuGpuBuffer.copy_to_gpu)


def check_platform_api(vllm: Any) -> None:
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


def check_world_group_api(vllm: Any) -> None:
    """GroupCoordinator has rank_in_group, local_rank, world_size, cpu_group,
    broadcast_object(obj, src) and barrier()."""
    from vllm.distributed.parallel_state import GroupCoordinator, get_world_group

    assert callable(get_world_group)
    assert {"obj", "src"} <= set(params(GroupCoordinator.broadcast_object))
    assert callable(GroupCoordinator.barrier)
    init = inspect.getsource(GroupCoordinator.__init__)
    for attr in ("rank_in_group", "local_rank", "world_size", "cpu_group"):
        assert f"self.{attr}" in init, attr


def check_kernel_warmup_hook_points(vllm: Any) -> None:
    """gpu_worker looks kernel_warmup up in its own module, and the functions replace
    mode switches off exist in vllm.model_executor.warmup.kernel_warmup."""
    import vllm.model_executor.warmup.kernel_warmup as kw
    import vllm.v1.worker.gpu_worker as gw

    from warmplan.vllm_plugin import SEED_REPLACED as REPLACED_VLLM_FUNCTIONS

    assert gw.kernel_warmup is kw.kernel_warmup or getattr(
        gw.kernel_warmup, "__warmplan_wrapped__", False
    )
    assert "kernel_warmup(self)" in inspect.getsource(gw.Worker.compile_or_warm_up_model)
    missing = [name for name in REPLACED_VLLM_FUNCTIONS if not hasattr(kw, name)]
    assert not missing, f"WARMPLAN_MODE=replace cannot switch off: {missing}"


def check_flashinfer_helpers(vllm: Any) -> None:
    """vllm.utils.flashinfer has has_flashinfer() and autotune(tune_mode, cache)."""
    import vllm.utils.flashinfer as fi

    assert callable(fi.has_flashinfer)
    assert callable(fi.autotune)


def check_plugin_group_is_vllms(vllm: Any) -> None:
    """vLLM loads general plugins from the entry-point group warmplan registers in."""
    import vllm.plugins as plugins

    assert plugins.DEFAULT_PLUGINS_GROUP == "vllm.general_plugins"


SEED_CHECKS = [
    obj for name, obj in sorted(globals().items()) if name.startswith("check_") and callable(obj)
]


# -- vLLM 0.34: the installed package ---------------------------------------------------

pytestmark_v2 = pytest.mark.vllm


@pytest.fixture(scope="module")
def vllm() -> Any:
    module = importlib.import_module("vllm")
    assert not getattr(module, "WARMPLAN_FAKE", False), "the real vLLM is required here"
    return module


def named(fn: Any) -> set[str]:
    return {
        p.name
        for p in inspect.signature(fn).parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def assigned_attributes(cls: type) -> set[str]:
    """``self.X`` names assigned anywhere in ``cls`` (``__init__``, ``initialize_kv_cache``)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.ctx, ast.Store)
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
    }


@pytestmark_v2
def test_v2_runner_is_what_the_adapter_detects(vllm: Any) -> None:
    """0.34's runner is vllm.v1.worker.gpu.model_runner.GPUModelRunner, with the
    attributes the layout is detected by and the V2 adapter reads."""
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    have = assigned_attributes(GPUModelRunner)
    needed = {
        "block_tables",
        "input_buffers",
        "max_num_reqs",
        "max_num_tokens",
        "max_model_len",
        "decode_query_len",
        "num_speculative_steps",
        "kv_connector",
        "is_pooling_model",
        "model_config",
        "device",
    }
    assert needed <= have, f"missing: {sorted(needed - have)}"
    assert importlib.util.find_spec("vllm.v1.worker.gpu_model_runner") is None


@pytestmark_v2
def test_v2_dummy_run_consumes_the_keywords_the_adapter_passes(vllm: Any) -> None:
    """_dummy_run takes num_tokens, skip_eplb, is_profile, uniform_decode and
    context_len by name, swallows anything else in **kwargs, and asserts that a
    uniform decode is a multiple of decode_query_len."""
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    from warmplan.workers.vllm.adapter import named_keywords

    names, swallows = named_keywords(GPUModelRunner._dummy_run)
    assert {"num_tokens", "skip_eplb", "is_profile", "uniform_decode", "context_len"} <= names
    assert swallows
    assert not {"create_mixed_batch", "create_single_prefill", "force_attention"} & names
    assert "num_tokens % self.decode_query_len == 0" in inspect.getsource(GPUModelRunner._dummy_run)


@pytestmark_v2
def test_v2_warmup_helpers(vllm: Any) -> None:
    """The V2 warmup helpers the adapter calls: the mixed batch, the block counter,
    the KV-cache commit helpers, and the scheduler-output records."""
    from vllm.v1.core.sched.output import NewRequestData, SchedulerOutput
    from vllm.v1.worker import extensible_kv_cache as kv
    from vllm.v1.worker.gpu import warmup

    assert list(inspect.signature(warmup.run_mixed_prefill_decode_warmup).parameters)[:4] == [
        "model_runner",
        "worker_execute_model",
        "worker_sample_tokens",
        "num_tokens",
    ]
    assert list(inspect.signature(warmup._warmup_block_counter).parameters) == ["model_runner"]
    assert callable(kv.ensure_kv_cache_blocks) and callable(kv.num_committable_kv_blocks)
    assert callable(SchedulerOutput.make_empty)
    fields = set(NewRequestData.__dataclass_fields__)
    assert {
        "req_id",
        "prompt_token_ids",
        "mm_features",
        "sampling_params",
        "pooling_params",
        "block_ids",
        "num_computed_tokens",
        "lora_request",
        "prefill_token_ids",
    } <= fields


@pytestmark_v2
def test_v2_worker_api(vllm: Any) -> None:
    """The worker runs synthetic steps through execute_model(scheduler_output) and
    sample_tokens(grammar_output), and its warmup is compile_or_warm_up_model."""
    from vllm.v1.worker.gpu_worker import Worker

    assert list(inspect.signature(Worker.execute_model).parameters)[1] == "scheduler_output"
    assert list(inspect.signature(Worker.sample_tokens).parameters)[1] == "grammar_output"
    assert callable(Worker.compile_or_warm_up_model)
    assert "kernel_warmup(self)" in inspect.getsource(Worker._compile_or_warm_up_model)


@pytestmark_v2
def test_every_named_warmup_exists(vllm: Any) -> None:
    """Every function VLLM_WARMUPS names is defined in the installed vLLM (read from
    the module's source: some import CUDA-only packages this CPU venv leaves out,
    e.g. minimax_m3_msa_warmup needs torchvision, and are imported where they run)."""
    import importlib.util

    from warmplan.workers.vllm.warmups import VLLM_WARMUPS

    missing: list[str] = []
    for spec in VLLM_WARMUPS:
        for module, attribute in spec.targets:
            found = importlib.util.find_spec(module)
            source = "" if found is None or found.origin is None else Path(found.origin).read_text()
            tree = ast.parse(source)
            defined = {
                node.name
                for node in tree.body
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            }
            imported = {
                alias.asname or alias.name
                for node in tree.body
                if isinstance(node, ast.ImportFrom)
                for alias in node.names
            }
            if attribute not in defined | imported:
                missing.append(f"{module}.{attribute}")
    assert missing == []


def _kernel_warmup_call_order() -> list[str]:
    """The callables kernel_warmup() calls, in source order (names only)."""
    from vllm.model_executor.warmup import kernel_warmup as kw

    tree = ast.parse(textwrap.dedent(inspect.getsource(kw.kernel_warmup)))
    calls: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            if name is not None:
                calls.append((node.lineno, node.col_offset, name))  # type: ignore[arg-type]
    return [name for _, _, name in sorted(calls)]  # type: ignore[misc]


@pytestmark_v2
def test_named_warmups_are_kernel_warmups_parts_in_its_order(vllm: Any) -> None:
    """kernel_warmup() calls exactly the parts VLLM_WARMUPS names, in that order:
    a part 0.35 adds, drops or moves fails here, not in production."""
    from warmplan.workers.vllm.warmups import VLLM_WARMUPS

    order = _kernel_warmup_call_order()
    ours = [w.targets[0][1] if w.targets else "warmup" for w in VLLM_WARMUPS]
    positions = [order.index(name) for name in ours]
    assert positions == sorted(positions), list(zip(ours, positions, strict=True))
    named_anywhere = {target for w in VLLM_WARMUPS for _, target in w.targets}
    parts = {
        name
        for name in order
        if name.endswith("_warmup")
        or name in {"flashinfer_autotune", "warmup"}
        or name.startswith("_warmup_")
        or name.startswith("_rocm_")
    }
    assert parts - set(ours) - named_anywhere == set(), (
        "kernel_warmup calls parts warmplan does not name"
    )


@pytestmark_v2
def test_process_local_only_cut_is_where_warmplan_puts_it(vllm: Any) -> None:
    """kernel_warmup(process_local_only=True) returns after the CuTe DSL part: the
    parts before are local, the ones after collective."""
    from vllm.model_executor.warmup import kernel_warmup as kw

    from warmplan.workers.vllm.warmups import VLLM_WARMUPS

    assert "process_local_only" in named(kw.kernel_warmup)
    source = inspect.getsource(kw.kernel_warmup)
    cut = source.index("if process_local_only:")
    for spec in VLLM_WARMUPS:
        if not spec.targets:
            assert source.index("jit_warmup_registry") < cut
            continue
        at = source.index(spec.targets[0][1] + "(")
        assert (at > cut) == spec.collective, spec.name


@pytestmark_v2
def test_plugin_hook_points(vllm: Any) -> None:
    """Every module the plugin wraps binds kernel_warmup by name; replace mode's
    default parts are module-level names of kernel_warmup's module."""
    import vllm.model_executor.warmup.kernel_warmup as kw

    from warmplan.vllm_plugin import KERNEL_WARMUP_HOLDERS, V034_REPLACED, replaced_functions

    for name in KERNEL_WARMUP_HOLDERS:
        module = importlib.import_module(name)
        assert callable(module.kernel_warmup), name
    assert all(callable(getattr(kw, name)) for name in V034_REPLACED)
    assert replaced_functions(vars(kw), {}) == V034_REPLACED


@pytestmark_v2
def test_vllms_jit_monitor_api(vllm: Any) -> None:
    """vLLM's own JIT monitor says whether it is active (the plugin's monitor stays
    quiet on Triton compiles then)."""
    from vllm.utils import jit_monitor

    assert callable(jit_monitor.is_active) and callable(jit_monitor.activate)


@pytestmark_v2
@pytest.mark.parametrize(
    "check",
    [
        check_platform_api,
        check_world_group_api,
        check_flashinfer_helpers,
        check_plugin_group_is_vllms,
    ],
    ids=lambda c: c.__name__,
)
def test_layout_independent_checks(vllm: Any, check: Any) -> None:
    """The checks that hold for every layout hold on the installed vLLM too."""
    check(vllm)
