"""warmplan against the real vLLM 0.34 package (CI's vLLM tier, ``scripts/vllm-env.sh``):
vLLM's own warmup functions and warmplan's plans run on two fresh recording workers
shaped like 0.34's (``tests/vllm_real/recording.py``), and the calls must be equal.

What runs for real on the CPU: ``kernel_warmup()`` itself (its order and its gates,
under each emulated GPU), the DeepSeek-V4 sparse-MLA attention warmup and the
mixed-batch attention warmup (vLLM's ``run_mixed_prefill_decode_warmup`` building
real ``SchedulerOutput``s), the plugin through vLLM's own plugin loader. What
cannot: the parts' kernels (``vllm._C`` and FlashInfer are CUDA-only, and
``qwen_vl_triton`` imports torchvision, which this CPU venv leaves out), so the
whole-warmup comparison stands a recorder in for each part's function, in its own
module and wherever ``kernel_warmup``'s module binds it.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import warmplan
from tests.vllm_real.recording import (
    Recorder,
    install_single_rank_groups,
    make_worker,
    normalised,
    record_synchronize,
)
from warmplan.errors import StepError

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[1]
VLLM_PLAN = ROOT / "plans" / "vllm-0.34.yaml"
DSV4_PLAN = ROOT / "plans" / "dsv4-vllm-0.34.yaml"

# (name, capability, cuda, rocm): the machines kernel_warmup() branches on.
MACHINES = [
    ("cpu", None, False, False),
    ("h200", (9, 0), True, False),
    ("b200", (10, 0), True, False),
    ("rtx-pro-6000", (12, 0), True, False),
    ("mi300", (9, 4), False, True),
]


class Current:
    """The recorder the current run writes to (synchronize is process-wide)."""

    rec: Recorder


@pytest.fixture
def current(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Current:
    install_single_rank_groups(monkeypatch)
    holder = Current()
    holder.rec = Recorder()
    record_synchronize(monkeypatch, lambda: holder.rec)
    monkeypatch.setenv("WARMPLAN_CACHE_ROOT", str(tmp_path / "cache"))
    return holder


def emulate(
    monkeypatch: pytest.MonkeyPatch,
    capability: tuple[int, int] | None,
    cuda: bool,
    rocm: bool,
    *,
    flashinfer: bool,
    deep_gemm: bool,
) -> None:
    """vLLM's ``current_platform`` (one object every module shares) as that machine."""
    import vllm.model_executor.warmup.kernel_warmup as kw
    import vllm.utils.deep_gemm as dg
    import vllm.utils.flashinfer as fi
    from vllm.platforms import current_platform as p
    from vllm.platforms.interface import DeviceCapability

    cap = None if capability is None else DeviceCapability(*capability)
    # vLLM's has_device_capability / is_device_capability_family are classmethods over
    # get_device_capability: replacing that one alone keeps vLLM's own formulas.
    monkeypatch.setattr(type(p), "get_device_capability", classmethod(lambda cls, device_id=0: cap))
    monkeypatch.setattr(p, "is_cuda", lambda: cuda)
    monkeypatch.setattr(p, "is_rocm", lambda: rocm)
    monkeypatch.setattr(p, "is_cuda_alike", lambda: cuda or rocm)
    for module in (kw, fi):
        monkeypatch.setattr(module, "has_flashinfer", lambda: flashinfer)
    for module in (kw, dg):
        monkeypatch.setattr(module, "is_deep_gemm_supported", lambda: deep_gemm)


def stand_in_parts(monkeypatch: pytest.MonkeyPatch, holder: Current) -> None:
    """Every function a part of kernel_warmup() calls records its name instead of
    compiling, in its own module and in kernel_warmup's module globals."""
    import importlib

    import vllm.model_executor.warmup.kernel_warmup as kw

    from warmplan.workers.vllm.warmups import KERNEL_WARMUP, VLLM_WARMUPS

    for spec in VLLM_WARMUPS:
        for module_name, attribute in spec.targets:
            if attribute == "_outside_kv_cache_transient_window":

                def window(worker: Any) -> contextlib.AbstractContextManager[None]:
                    holder.rec.add("part", "_outside_kv_cache_transient_window")
                    return contextlib.nullcontext()

                fn: Any = window
            else:

                def fn(*args: Any, _name: str = attribute, **kwargs: Any) -> None:
                    holder.rec.add("part", _name)

            if module_name != KERNEL_WARMUP:
                try:
                    module = importlib.import_module(module_name)
                except ImportError:  # imports a CUDA-only package: stand a module in
                    import sys
                    import types

                    module = types.ModuleType(module_name)
                    monkeypatch.setitem(sys.modules, module_name, module)
                monkeypatch.setattr(module, attribute, fn, raising=False)
            if attribute in vars(kw):
                monkeypatch.setattr(kw, attribute, fn)


def events_of(holder: Current, body: Any, *, syncs: bool = False) -> list[Any]:
    """What ``body`` did: every call on the recording workers and the parts' stand-ins.
    Device waits are left out unless ``syncs``: the executor waits after every step
    so that a step's time is its own, where vLLM waits only where a part does."""
    start = len(holder.rec.events)
    body()
    return [e for e in holder.rec.events[start:] if syncs or e[0] != "sync"]


def worker_for(holder: Current, *args: Any, **kwargs: Any) -> Any:
    """A fresh recording 0.34 worker writing into the test's recorder."""
    worker, _ = make_worker(*args, rec=holder.rec, **kwargs)
    return worker


def run_plan_on(path: Path, worker: Any, **adapter: Any) -> Any:
    from warmplan.workers.vllm import VllmWorker

    return warmplan.run_plan(warmplan.load_plan(path), VllmWorker(worker, **adapter))


# -- the whole kernel_warmup() -------------------------------------------------------------


@pytest.mark.parametrize(("machine", "capability", "cuda", "rocm"), MACHINES)
@pytest.mark.parametrize("flashinfer", [True, False], ids=["flashinfer", "no-flashinfer"])
@pytest.mark.parametrize("jit", [True, False], ids=["jit", "no-jit"])
def test_plan_calls_what_kernel_warmup_calls_in_its_order(
    current: Current,
    monkeypatch: pytest.MonkeyPatch,
    machine: str,
    capability: tuple[int, int] | None,
    cuda: bool,
    rocm: bool,
    flashinfer: bool,
    jit: bool,
) -> None:
    """plans/vllm-0.34.yaml through the adapter calls exactly the parts vLLM 0.34's
    kernel_warmup() calls, in its order, on every machine it branches on."""
    from vllm.model_executor.warmup.kernel_warmup import kernel_warmup

    emulate(monkeypatch, capability, cuda, rocm, flashinfer=flashinfer, deep_gemm=cuda)
    stand_in_parts(monkeypatch, current)
    config = {"enable_jit_warmup": jit}
    worker = worker_for(current, **config)
    vllm_calls = events_of(current, lambda: kernel_warmup(worker))
    worker = worker_for(current, **config)
    plan_calls = events_of(current, lambda: run_plan_on(VLLM_PLAN, worker))
    assert vllm_calls, "kernel_warmup called nothing"
    assert plan_calls == vllm_calls


@pytest.mark.parametrize("enabled", [True, False])
def test_flashinfer_autotune_switched_off_as_vllm_does(
    current: Current, monkeypatch: pytest.MonkeyPatch, enabled: bool
) -> None:
    """enable_flashinfer_autotune=False skips the autotune part, as kernel_warmup's
    `is False` does; True runs it on a 9.0 GPU with FlashInfer."""
    from vllm.model_executor.warmup.kernel_warmup import kernel_warmup

    emulate(monkeypatch, (9, 0), True, False, flashinfer=True, deep_gemm=False)
    stand_in_parts(monkeypatch, current)
    worker = worker_for(current, enable_flashinfer_autotune=enabled)
    vllm_calls = events_of(current, lambda: kernel_warmup(worker))
    worker = worker_for(current, enable_flashinfer_autotune=enabled)
    plan_calls = events_of(current, lambda: run_plan_on(VLLM_PLAN, worker))
    assert plan_calls == vllm_calls
    assert (("part", "flashinfer_autotune") in plan_calls) is enabled


def test_process_local_only_runs_only_the_local_parts(
    current: Current, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kernel_warmup(process_local_only=True) - a worker joining a running group -
    and the plan on an adapter told so call the same parts; the collective ones are
    skipped with the reason."""
    from vllm.model_executor.warmup.kernel_warmup import kernel_warmup

    emulate(monkeypatch, (9, 0), True, False, flashinfer=True, deep_gemm=True)
    stand_in_parts(monkeypatch, current)
    worker = worker_for(current)
    vllm_calls = events_of(
        current, lambda: kernel_warmup(worker, process_local_only=True), syncs=False
    )
    worker = worker_for(current)
    reports: list[Any] = []
    plan_calls = events_of(
        current, lambda: reports.append(run_plan_on(VLLM_PLAN, worker, process_local_only=True))
    )
    assert plan_calls == vllm_calls
    skipped = {s["id"]: s["skipped"] for s in reports[0].to_dict()["steps"]}
    assert skipped["flashinfer-autotune"].startswith(
        "vLLM warmup 'flashinfer_autotune': process_local_only"
    )


# -- parts that run for real on the CPU -------------------------------------------------------


def test_deepseek_v4_path_equals_vllms(current: Current, monkeypatch: pytest.MonkeyPatch) -> None:
    """The DSv4 plan for 0.34 and vLLM's deepseek_v4_sparse_mla_attention_warmup
    make the same steps: one mixed prefill+decode batch of 16 tokens through
    execute_model (decode's prefill, the mixed step, the cleanup), KV connector off
    around it, each step waited for."""
    from vllm.model_executor.warmup.flashinfer_sparse_mla_warmup import (
        deepseek_v4_sparse_mla_attention_warmup,
    )

    emulate(monkeypatch, None, False, False, flashinfer=False, deep_gemm=False)
    worker = worker_for(current, ("FLASHMLA_SPARSE_DSV4",))
    vllm_calls = events_of(current, lambda: deepseek_v4_sparse_mla_attention_warmup(worker))
    worker = worker_for(current, ("FLASHMLA_SPARSE_DSV4",))
    plan_calls = events_of(current, lambda: run_plan_on(DSV4_PLAN, worker))
    prefixes = ("_sparse_mla_v2_warmup", "_v2_mixed_warmup")
    assert normalised(plan_calls, prefixes) == normalised(vllm_calls, prefixes)
    steps = [data for kind, data in vllm_calls if kind == "execute_model"]
    assert [s["total"] for s in steps] == [2, 16, 0]  # decode prefill, mixed, cleanup


def test_engine_warmup_step_calls_vllms_function(
    current: Current, monkeypatch: pytest.MonkeyPatch, write_plan: Any
) -> None:
    """An engine_warmup step runs vLLM's own function: the same calls as calling it."""
    from vllm.model_executor.warmup.flashinfer_sparse_mla_warmup import (
        deepseek_v4_sparse_mla_attention_warmup,
    )

    emulate(monkeypatch, None, False, False, flashinfer=False, deep_gemm=False)
    plan = write_plan(
        "version: 1\nname: t\nsteps:\n"
        "  - {id: dsv4, kind: engine_warmup, warmup: deepseek_v4_sparse_mla_attention}\n"
    )
    worker = worker_for(current, ("DEEPSEEK_SPARSE_SWA",))
    vllm_calls = events_of(current, lambda: deepseek_v4_sparse_mla_attention_warmup(worker))
    worker = worker_for(current, ("DEEPSEEK_SPARSE_SWA",))
    plan_calls = events_of(current, lambda: run_plan_on(plan, worker))
    assert plan_calls == vllm_calls


def test_mixed_shape_equals_vllms_mixed_batch_attention_warmup(
    current: Current, monkeypatch: pytest.MonkeyPatch, write_plan: Any
) -> None:
    """A mixed dummy_run of 16 tokens is vLLM's mixed_batch_attention_warmup."""
    from vllm.model_executor.warmup.attention_warmup import mixed_batch_attention_warmup

    plan = write_plan(
        "version: 1\nname: t\nsteps:\n  - {id: m, kind: dummy_run, shape: mixed, tokens: 16}\n"
    )
    worker = worker_for(current, ("FLASHINFER",))
    vllm_calls = events_of(current, lambda: mixed_batch_attention_warmup(worker))
    worker = worker_for(current, ("FLASHINFER",))
    plan_calls = events_of(current, lambda: run_plan_on(plan, worker))
    assert plan_calls == vllm_calls


def test_single_prefill_with_prior_context_is_one_request(
    current: Current, write_plan: Any
) -> None:
    """single_prefill: one request, tokens scheduled after prior_context computed,
    finished in a second step; plain with prior context: _dummy_run(context_len=)."""
    plan = write_plan(
        "version: 1\nname: t\nsteps:\n"
        "  - {id: chunk, kind: dummy_run, shape: single_prefill, tokens: 512, prior_context: 1024}\n"
        "  - {id: plain, kind: dummy_run, shape: plain, tokens: 64, prior_context: 256}\n"
    )
    worker = worker_for(current)
    calls = events_of(current, lambda: run_plan_on(plan, worker))
    steps = [data for kind, data in calls if kind == "execute_model"]
    (new,) = steps[0]["new"]
    assert (new["prompt_len"], new["num_computed_tokens"]) == (1536, 1024)
    assert steps[0]["scheduled"] == {new["req_id"]: 512}
    assert len(new["block_ids"][0]) == 1536 // 16
    assert steps[1]["finished"] == [new["req_id"]]
    (dummy,) = [data for kind, data in calls if kind == "dummy_run"]
    assert (dummy["num_tokens"], dummy["context_len"], dummy["swallowed"]) == (64, 256, [])


def test_uniform_decode_rounds_to_decode_query_len(current: Current, write_plan: Any) -> None:
    """vLLM asserts num_tokens % decode_query_len == 0: warmplan rounds down (and
    skips, saying why, when nothing is left)."""
    plan = write_plan(
        "version: 1\nname: t\nsteps:\n"
        "  - {id: d7, kind: dummy_run, shape: uniform_decode, tokens: 7}\n"
        "  - {id: d1, kind: dummy_run, shape: uniform_decode, tokens: 1}\n"
    )
    worker = worker_for(current)
    worker.model_runner.decode_query_len = 2  # one speculative token
    reports: list[Any] = []
    calls = events_of(current, lambda: reports.append(run_plan_on(plan, worker)))
    dummies = [data for kind, data in calls if kind == "dummy_run"]
    assert [(d["num_tokens"], d["uniform_decode"]) for d in dummies] == [(6, True)]
    skipped = {s["id"]: s["skipped"] for s in reports[0].to_dict()["steps"]}
    assert skipped["d1"] == (
        "a uniform decode batch is a multiple of decode_query_len (2); 1 tokens round down to none"
    )


def test_slot_mapping_is_skipped_with_the_reason(current: Current, write_plan: Any) -> None:
    """The V2 slot-mapping kernel does not vary with the token count: skipped, not crashed."""
    from warmplan.workers.vllm.v2 import SLOT_MAPPING_REASON

    plan = write_plan(
        "version: 1\nname: t\nsteps:\n  - {id: slots, kind: slot_mapping, tokens: [1, 16, 17]}\n"
    )
    worker = worker_for(current)
    reports: list[Any] = []
    calls = events_of(current, lambda: reports.append(run_plan_on(plan, worker)))
    assert [kind for kind, _ in calls if kind != "sync"] == []
    assert reports[0].to_dict()["steps"][0]["skipped"] == SLOT_MAPPING_REASON


def test_a_keyword_vllm_would_swallow_is_an_error(current: Current) -> None:
    """The V2 _dummy_run takes **kwargs: a keyword it does not name would be dropped
    silently; the adapter refuses it, naming it, before anything runs."""
    from warmplan.workers.vllm import UnsupportedByVllm, VllmWorker

    worker = worker_for(current)
    adapter = VllmWorker(worker)
    with pytest.raises(UnsupportedByVllm) as info:
        adapter._check_keywords({"create_mixed_batch": True}, "mixed")
    assert "would swallow 'create_mixed_batch' in **kwargs and never read it" in str(info.value)
    assert current.rec.events == []


def test_mixed_with_prior_context_is_a_step_error(current: Current, write_plan: Any) -> None:
    """vLLM's mixed warmup has no prior context: the step fails naming it, no silent other run."""
    plan = write_plan(
        "version: 1\nname: t\nsteps:\n"
        "  - {id: m, kind: dummy_run, shape: mixed, tokens: 16, prior_context: 16}\n"
    )
    worker = worker_for(current)
    with pytest.raises(StepError, match=re.escape("step 'm': vLLM 0.34.0: the V2 runner's mixed")):
        run_plan_on(plan, worker)
    assert current.rec.events == []


def test_adapter_picks_the_v2_layout_and_reports_vllms_flags(current: Current) -> None:
    """The layout comes from the runner's attributes; the flags are 0.34's switches."""
    from warmplan.workers.vllm import V2Layout, VllmWorker

    worker = worker_for(current)
    adapter = VllmWorker(worker)
    assert isinstance(adapter, V2Layout)
    flags = dict(adapter.facts.flags)
    assert flags["enable_jit_warmup"] is True
    assert flags["enable_flashinfer_autotune"] is True
    assert {"has_flashinfer", "deep_gemm_warmup", "flashinfer_pcie_ipc_allreduce"} <= set(flags)


# -- the plugin, through vLLM's own loader -------------------------------------------------


@pytest.fixture
def plugin(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    from warmplan import vllm_plugin

    monkeypatch.setenv("VLLM_PLUGINS", "warmplan")
    monkeypatch.setenv("WARMPLAN_REPORT", str(tmp_path / "report-{rank}.json"))
    try:
        yield
    finally:
        vllm_plugin._unregister_for_tests()


def load_plugins() -> None:
    import vllm.plugins as plugins

    monkey_loaded = getattr(plugins, "plugins_loaded", None)
    if monkey_loaded is not None:
        plugins.plugins_loaded = False
    plugins.load_general_plugins()


def test_plugin_registers_through_vllms_loader(
    plugin: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """VLLM_PLUGINS=warmplan: vLLM's load_general_plugins() finds warmplan's entry point
    and the worker's kernel_warmup is wrapped."""
    import vllm.v1.worker.gpu_worker as gw

    from warmplan import vllm_plugin

    monkeypatch.setenv("WARMPLAN_PLAN", str(DSV4_PLAN))
    load_plugins()
    assert vllm_plugin._registered
    assert getattr(gw.kernel_warmup, "__warmplan_wrapped__", False)


def test_plugin_replace_all_runs_the_plan_instead_of_kernel_warmup(
    plugin: None, current: Current, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WARMPLAN_MODE=replace WARMPLAN_REPLACE=all: the worker's kernel_warmup call runs
    plans/vllm-0.34.yaml and nothing else - the same parts vLLM's would call."""
    import vllm.model_executor.warmup.kernel_warmup as kw
    import vllm.v1.worker.gpu_worker as gw

    emulate(monkeypatch, (9, 0), True, False, flashinfer=True, deep_gemm=True)
    stand_in_parts(monkeypatch, current)
    worker = worker_for(current)
    vllm_calls = events_of(current, lambda: kw.kernel_warmup(worker))
    monkeypatch.setenv("WARMPLAN_PLAN", str(VLLM_PLAN))
    monkeypatch.setenv("WARMPLAN_MODE", "replace")
    monkeypatch.setenv("WARMPLAN_REPLACE", "all")
    load_plugins()
    worker = worker_for(current)
    plan_calls = events_of(current, lambda: gw.kernel_warmup(worker))
    assert plan_calls == vllm_calls


def test_plugin_refuses_a_replace_it_cannot_honour(
    plugin: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A part kernel_warmup imports inside the call cannot be switched off alone:
    registration fails naming it."""
    from warmplan import vllm_plugin
    from warmplan.errors import UserError

    monkeypatch.setenv("WARMPLAN_PLAN", str(DSV4_PLAN))
    monkeypatch.setenv("WARMPLAN_MODE", "replace")
    monkeypatch.setenv("WARMPLAN_REPLACE", "step5_dsa,jit_warmup_registry")
    with pytest.raises(UserError) as info:
        vllm_plugin.register()
    assert "'step5_dsa': kernel_warmup's module has no function 'step5_dsa_warmup'" in str(
        info.value
    )
    assert "'jit_warmup_registry' is a runner method" in str(info.value)


def test_one_report_per_compile_beside_vllms_jit_monitor(
    plugin: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With vLLM's own JIT monitor active (it reports Triton compiles), warmplan's
    counts Triton compiles quietly and reports only what vLLM's does not watch."""
    import vllm.utils.jit_monitor as vllm_monitor
    from structlog.testing import capture_logs

    from warmplan import vllm_plugin
    from warmplan.monitor import CompileEvent

    monkeypatch.setenv("WARMPLAN_JIT_MONITOR", "warn")
    monkeypatch.setattr(vllm_monitor, "_active", True)
    worker = SimpleNamespace()
    vllm_plugin.arm_monitor(worker)
    monitor = worker._warmplan_monitor
    try:
        event = {"key": "k", "label": "serving step 1", "cache_hit": False, "duration_s": 0.1}
        with capture_logs() as logs:
            monitor.store.record(CompileEvent(kind="triton", name="_kernel", **event))
            monitor.store.record(CompileEvent(kind="dynamo", name="forward", **event))
        assert monitor.compiles() == 2
        assert [(e["event"], e["kind"]) for e in logs] == [("jit_compile_after_warmup", "dynamo")]
    finally:
        monitor.uninstall()


def test_record_writes_each_served_batch_with_its_compiles(
    plugin: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, current: Current
) -> None:
    """WARMPLAN_RECORD: after warmup every execute_model's scheduler output becomes a
    batch-level trace line (decodes, prefill chunks with their computed context) with
    the compiles the step caused; the trace loads with warmplan's trace reader."""
    from vllm import SamplingParams
    from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput

    from warmplan import vllm_plugin
    from warmplan.monitor import CompileEvent
    from warmplan.trace import load_trace_entries

    monkeypatch.setenv("WARMPLAN_RECORD", str(tmp_path / "served-{rank}.jsonl"))
    worker = worker_for(current)
    vllm_plugin.arm_monitor(worker)
    monitor = worker._warmplan_monitor
    step = SchedulerOutput.make_empty()
    step.scheduled_new_reqs = [
        NewRequestData(
            req_id="a",
            prompt_token_ids=list(range(1500)),
            mm_features=[],
            sampling_params=SamplingParams(max_tokens=4),
            pooling_params=None,
            block_ids=([1],),
            num_computed_tokens=1024,
            lora_request=None,
            prefill_token_ids=list(range(1500)),
        )
    ]
    cached = CachedRequestData.make_empty()
    cached.req_ids = ["b", "c"]
    cached.num_computed_tokens = [40, 77]
    step.scheduled_cached_reqs = cached
    step.num_scheduled_tokens = {"a": 476, "b": 1, "c": 1}
    step.total_num_scheduled_tokens = 478

    def execute(scheduler_output: Any) -> None:
        monitor.store.record(
            CompileEvent(
                kind="triton", name="_k", key="k", label=None, cache_hit=False, duration_s=0.2
            )
        )

    try:
        vllm_plugin.serving_step(worker, execute, (step,), {})
        vllm_plugin.serving_step(worker, lambda so: None, (SchedulerOutput.make_empty(),), {})
        worker._warmplan_recorder.close()
    finally:
        monitor.uninstall()
    (entry,) = load_trace_entries(tmp_path / "served-0.jsonl")
    assert (entry.batch.decode, [(c.tokens, c.context) for c in entry.batch.prefill]) == (
        2,
        [(476, 1024)],
    )
    assert [c.name for c in entry.compiles] == ["_k"]


CAPABILITIES = [(7, 0), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (10, 3), (11, 0), (12, 0), (12, 1)]


@pytest.mark.parametrize("capability", CAPABILITIES, ids=lambda c: f"{c[0]}.{c[1]}")
def test_capability_gates_agree_with_vllms_platform(
    current: Current, monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int]
) -> None:
    """warmplan's device_capability and device_capability_family gates, on the facts
    the adapter reads, decide as vLLM's own has_device_capability and
    is_device_capability_family do."""
    from vllm.platforms import current_platform

    from warmplan.resolve import gate_failure
    from warmplan.steps.common import Gates
    from warmplan.workers.vllm import VllmWorker

    emulate(monkeypatch, capability, True, False, flashinfer=True, deep_gemm=False)
    facts = VllmWorker(worker_for(current)).facts
    assert facts.device_capability == capability
    for family in (80, 90, 100, 110, 120):
        ours = gate_failure(Gates(device_capability_family=family), facts) is None
        assert ours == current_platform.is_device_capability_family(family), family
    for need in ((8, 0), (9, 0), (10, 0), (12, 0)):
        ours = gate_failure(Gates(device_capability=need), facts) is None
        assert ours == current_platform.has_device_capability(need[0] * 10 + need[1]), need


def test_randomize_inputs_reaches_the_dummy_run(current: Current) -> None:
    """The autotune step's tuning.randomize_inputs: random token ids for plain and
    uniform-decode dummy runs (as vLLM's FlashInfer autotune asks); refused, naming
    it, for a shape whose requests have fixed prompts."""
    from warmplan.workers.vllm import UnsupportedByVllm, VllmWorker

    adapter = VllmWorker(worker_for(current))
    calls = events_of(current, lambda: adapter.dummy_run("plain", 64, randomize_inputs=True))
    assert [(d["num_tokens"], d["randomize_inputs"]) for k, d in calls if k == "dummy_run"] == [
        (64, True)
    ]
    with pytest.raises(UnsupportedByVllm, match="randomize_inputs applies to plain"):
        adapter.dummy_run("mixed", 16, randomize_inputs=True)


def test_autotune_runs_outside_the_kv_cache_reserve(
    current: Current, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The FlashInfer backend tunes inside vLLM's own _outside_kv_cache_transient_window
    (the extensible KV cache records its transient peak before, peak tracking restarts
    after), as kernel_warmup wraps flashinfer_autotune."""
    import torch

    from warmplan.workers.vllm import VllmWorker

    worker = worker_for(current)
    worker.model_runner.extensible_kv_cache = SimpleNamespace(
        record_transient_peak=lambda: current.rec.add("record_transient_peak")
    )
    monkeypatch.setattr(
        torch.accelerator,
        "reset_peak_memory_stats",
        lambda device=None: current.rec.add("reset_peak"),
    )
    backend = VllmWorker(worker).autotune_backend("flashinfer")
    assert backend is not None

    def tuned() -> None:
        with backend._outside_kv_cache_reserve():  # type: ignore[attr-defined]
            current.rec.add("tuning")

    assert events_of(current, tuned) == [
        ("record_transient_peak", None),
        ("tuning", None),
        ("reset_peak", None),
    ]


def test_each_tuning_pass_also_tunes_the_dsv41_indexer(
    current: Current, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As vLLM 0.34's flashinfer_autotune: each pass runs under autotune(tuning_buckets=,
    round_up=), its forward, then autotune_indexer_wq_b(model, max M) inside the same
    scope (short dummy runs never reach the DSv4.1 indexer's wq_b)."""
    import vllm.models.deepseek_v41.attention as dsv41
    import vllm.utils.flashinfer as fi

    from warmplan.workers.vllm import VllmWorker

    @contextlib.contextmanager
    def autotune(**kwargs: Any) -> Iterator[None]:
        current.rec.add("autotune", sorted(kwargs.items()))
        yield
        current.rec.add("autotune_exit")

    monkeypatch.setattr(fi, "autotune", autotune)
    monkeypatch.setattr(
        dsv41,
        "autotune_indexer_wq_b",
        lambda model, num_tokens: current.rec.add("wq_b", num_tokens),
    )
    worker = worker_for(current)
    backend = VllmWorker(worker).autotune_backend("flashinfer")

    def one_pass() -> None:
        with backend.pass_scope(buckets=(1, 2, 4, 8), round_up=True):  # type: ignore[union-attr]
            current.rec.add("forward")

    assert events_of(current, one_pass) == [
        ("autotune", [("round_up", True), ("tuning_buckets", (1, 2, 4, 8))]),
        ("forward", None),
        ("wq_b", 8),
        ("autotune_exit", None),
    ]
