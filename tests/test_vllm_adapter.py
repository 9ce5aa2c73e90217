"""The vLLM adapter (warmplan.workers.vllm) on the recording fake vLLM."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import vllm_reference as ref
from warmplan.workers.base import AutotuneLoadError, Worker
from warmplan.workers.vllm import UnsupportedByVllm, VllmWorker
from warmplan.world import World, WorldError


@pytest.fixture
def fake() -> Iterator[Any]:
    with ref.fake_vllm() as fake, ref.recorded_synchronize(fake):
        yield fake


def slot_events(fake: Any) -> list[tuple[str, str, dict[str, Any]]]:
    return fake.compared()


# -- protocol, limits, facts --------------------------------------------------------------


def test_is_a_worker(fake: Any) -> None:
    """VllmWorker satisfies the Worker protocol, and its world the World protocol."""
    adapter = VllmWorker(fake.build())
    assert isinstance(adapter, Worker)
    assert isinstance(adapter.world, World)


def test_limits_are_vllms_names(fake: Any) -> None:
    """Limits come from runner.max_num_tokens and the scheduler config."""
    adapter = VllmWorker(
        fake.build(max_num_tokens=64, max_num_batched_tokens=2048, max_num_seqs=32)
    )
    assert adapter.limits.as_dict() == {
        "max_num_tokens": 64,
        "max_num_batched_tokens": 2048,
        "max_num_seqs": 32,
    }


def test_limits_max_num_tokens_defaults_to_one_like_vllm(fake: Any) -> None:
    """A runner without max_num_tokens gives 1, as vLLM's getattr(runner, ..., 1) does."""
    assert VllmWorker(fake.build(has_max_num_tokens=False)).limits.max_num_tokens == 1


def test_facts_on_cuda(fake: Any) -> None:
    """Platform, capability, flattened backends, pooling and the autotune flag."""
    fake.reset(capability=(12, 0))
    worker = fake.build(
        backends=("DEEPSEEK_SPARSE_SWA", None, "V4_FLASHMLA_SPARSE"),
        enable_flashinfer_autotune=True,
    )
    facts = VllmWorker(worker, env={"A": "1"}).facts
    assert facts.platform == "cuda"
    assert facts.device_capability == (12, 0)
    assert facts.attention_backends == ("DEEPSEEK_SPARSE_SWA", "V4_FLASHMLA_SPARSE")
    assert facts.pooling is False
    assert dict(facts.flags) == {"enable_flashinfer_autotune": True}
    assert dict(facts.env) == {"A": "1"}


def test_facts_off_cuda(fake: Any) -> None:
    """Off CUDA the platform is vLLM's device name and there is no capability."""
    fake.reset(device_name="tpu", cuda_alike=False, capability=None)
    facts = VllmWorker(fake.build(pooling=True)).facts
    assert (facts.platform, facts.device_capability, facts.pooling) == ("tpu", None, True)


@pytest.mark.parametrize(
    ("value", "present", "flags"),
    [
        (True, True, {"enable_flashinfer_autotune": True}),
        (False, True, {"enable_flashinfer_autotune": False}),
        (None, True, {}),
        (None, False, {}),
    ],
)
def test_flashinfer_flag_true_false_or_unset(
    fake: Any, value: bool | None, present: bool, flags: dict[str, bool]
) -> None:
    """kernel_config.enable_flashinfer_autotune None or absent is unset, not False."""
    worker = fake.build(enable_flashinfer_autotune=value, has_kernel_config_flag=present)
    assert dict(VllmWorker(worker).facts.flags) == flags


@settings(deadline=None)  # the first example imports the resolver
@given(major=st.integers(0, 15), minor=st.integers(0, 9))
def test_capability_family_agrees_with_vllm(major: int, minor: int) -> None:
    """warmplan's own capability gates, on the adapter's facts, decide as the fake's
    is_device_capability_family / has_device_capability (vLLM's formulas; the real
    vLLM's are checked in tests/test_vllm_v2.py)."""
    with ref.fake_vllm() as fake:
        fake.reset(capability=(major, minor))
        from vllm.platforms import current_platform

        from warmplan.resolve import gate_failure
        from warmplan.steps.common import Gates

        facts = VllmWorker(fake.build()).facts
        assert facts.device_capability == (major, minor)
        for family in (90, 100, 120):
            ours = gate_failure(Gates(device_capability_family=family), facts) is None
            assert ours == current_platform.is_device_capability_family(family)
        ours = gate_failure(Gates(device_capability=(9, 0)), facts) is None
        assert ours == current_platform.has_device_capability(90)


def test_env_defaults_to_os_environ(fake: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Gates read os.environ unless the caller gives an env."""
    monkeypatch.setenv("WARMPLAN_TEST_ENV", "x")
    assert VllmWorker(fake.build()).facts.env["WARMPLAN_TEST_ENV"] == "x"


# -- slot mapping -----------------------------------------------------------------------


def test_slot_mapping_calls_as_vllm_does(fake: Any) -> None:
    """One size: copy [0, n] to the device, commit one request, compute on the runner buffers."""
    adapter = VllmWorker(fake.build())
    adapter.slot_mapping(5)
    names = [(k, n) for k, n, _ in slot_events(fake)]
    assert names == [
        ("buffer", "query_start_loc.copy_to_gpu"),
        ("block_table", "commit_block_table"),
        ("block_table", "compute_slot_mapping"),
    ]
    copy, commit, compute = (d for _, _, d in slot_events(fake))
    assert (copy["n"], copy["np"]) == (2, [0, 5])
    assert commit["num_reqs"] == 1
    assert compute["query_start_loc"] == [0, 5]
    assert compute["positions"] == [0, 1, 2, 3, 4]
    assert compute["query_start_loc.is_runner_buffer"] is True
    assert compute["positions.is_runner_buffer"] is True
    assert compute["inference_mode"] is True
    assert (compute["query_start_loc.dtype"], compute["positions.dtype"]) == (
        "torch.int32",
        "torch.int64",
    )


def test_slot_mapping_restores_buffers_on_its_own(fake: Any) -> None:
    """Outside preserve_state each call restores query_start_loc[:2] and positions."""
    worker = fake.build()
    before = fake.buffers_state(worker.model_runner)
    VllmWorker(worker).slot_mapping(16)
    assert fake.buffers_state(worker.model_runner) == before


def test_preserve_state_restores_query_start_loc_once_at_exit(fake: Any) -> None:
    """Inside preserve_state, query_start_loc keeps [0, n] between sizes, as in vLLM's fan."""
    worker = fake.build()
    runner = worker.model_runner
    before = fake.buffers_state(runner)
    adapter = VllmWorker(worker)
    with adapter.preserve_state():
        adapter.slot_mapping(3)
        assert runner.query_start_loc.np[:2].tolist() == [0, 3]
        adapter.slot_mapping(4)
        assert runner.query_start_loc.gpu[:2].tolist() == [0, 4]
    assert fake.buffers_state(runner) == before


def test_preserve_state_leaves_dummy_run_state_alone(fake: Any) -> None:
    """A step of dummy runs only leaves the buffers as vLLM's _dummy_run leaves them."""
    worker = fake.build()
    adapter = VllmWorker(worker)
    with adapter.preserve_state():
        adapter.dummy_run("mixed", 16, force_attention=True)
    assert worker.model_runner.query_start_loc.np[:3].tolist() == [0, 1, 16]


def test_slot_mapping_restores_when_the_kernel_raises(
    fake: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failing compute_slot_mapping still leaves every buffer as it was."""
    worker = fake.build()
    runner = worker.model_runner
    before = fake.buffers_state(runner)

    def boom(*args: Any) -> None:
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(runner.input_batch.block_table, "compute_slot_mapping", boom)
    adapter = VllmWorker(worker)
    with pytest.raises(RuntimeError, match="kernel failed"), adapter.preserve_state():
        adapter.slot_mapping(7)
    assert fake.buffers_state(runner) == before


def test_slot_mapping_without_runner_buffers(fake: Any) -> None:
    """No query_start_loc: a fresh int32 [0, n]; no positions: arange(n); as vLLM falls back."""
    adapter = VllmWorker(fake.build(has_query_start_loc=False, has_positions=False))
    adapter.slot_mapping(3)
    [(_, _, commit), (_, _, compute)] = slot_events(fake)
    assert commit["num_reqs"] == 1
    assert compute["query_start_loc"] == [0, 3]
    assert compute["query_start_loc.dtype"] == "torch.int32"
    assert compute["positions"] == [0, 1, 2]
    assert compute["positions.dtype"] == "torch.int64"
    assert compute["query_start_loc.is_runner_buffer"] is False


def test_slot_mapping_equals_the_reference_fan(fake: Any) -> None:
    """Every size of vLLM's fan, under one preserve_state, makes vLLM's calls and states."""
    worker = fake.build(max_num_tokens=8192)
    with torch.inference_mode():
        ref.slot_mapping_warmup(worker.model_runner)
    expected = fake.compared()
    expected_after = fake.buffers_state(worker.model_runner)
    fake.reset()
    worker = fake.build(max_num_tokens=8192)
    adapter = VllmWorker(worker)
    with adapter.preserve_state():
        for n in ref.SLOT_MAPPING_TOKENS:
            adapter.slot_mapping(n)
    assert fake.compared() == expected
    assert fake.buffers_state(worker.model_runner) == expected_after


def test_slot_mapping_rejects_zero(fake: Any) -> None:
    """A count below 1 is a bug in the caller, not a kernel call."""
    with pytest.raises(ValueError, match="num_tokens must be >= 1: 0"):
        VllmWorker(fake.build()).slot_mapping(0)


# -- dummy runs -------------------------------------------------------------------------


def dummy_kwargs(fake: Any) -> list[dict[str, Any]]:
    return [d["kwargs"] for _, name, d in fake.compared() if name == "_dummy_run"]


@pytest.mark.parametrize(
    ("shape", "prior", "force", "expected"),
    [
        ("mixed", 0, True, {"force_attention": True, "create_mixed_batch": True}),
        ("single_prefill", 0, True, {"force_attention": True, "create_single_prefill": True}),
        (
            "single_prefill",
            2048,
            True,
            {"force_attention": True, "create_single_prefill": True, "profile_seq_lens": 4096},
        ),
        ("uniform_decode", 0, True, {"force_attention": True, "uniform_decode": True}),
        ("plain", 0, False, {}),
    ],
)
def test_dummy_run_passes_exactly_vllms_keywords(
    fake: Any, shape: Any, prior: int, force: bool, expected: dict[str, Any]
) -> None:
    """num_tokens, skip_eplb, is_profile, and only the shape's own keywords; no defaults."""
    VllmWorker(fake.build()).dummy_run(shape, 2048, prior_context=prior, force_attention=force)
    assert dummy_kwargs(fake) == [
        {"num_tokens": 2048, "skip_eplb": True, "is_profile": True, **expected}
    ]
    [(_, _, data)] = fake.compared()
    assert data["args"] == []


def test_dummy_run_unknown_shape(fake: Any) -> None:
    """A shape that is not one of the four names them."""
    with pytest.raises(
        ValueError, match="expected one of mixed, single_prefill, uniform_decode, plain"
    ):
        VllmWorker(fake.build()).dummy_run("decode", 8)  # type: ignore[arg-type]


def test_dummy_run_missing_keyword_is_a_clear_error(fake: Any) -> None:
    """A vLLM whose _dummy_run lacks create_single_prefill: the error names it, nothing runs."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    class OldRunner(GPUModelRunner):
        def _dummy_run(  # type: ignore[override]
            self,
            num_tokens: int,
            force_attention: bool = False,
            skip_eplb: bool = False,
            is_profile: bool = False,
            create_mixed_batch: bool = False,
        ) -> None:
            raise AssertionError("must not run")

    adapter = VllmWorker(fake.build(dummy_run_cls=OldRunner))
    with pytest.raises(UnsupportedByVllm) as info:
        adapter.dummy_run("single_prefill", 64, force_attention=True)
    assert str(info.value) == (
        "vLLM 0.0.0+warmplan.fake: OldRunner._dummy_run has no keyword 'create_single_prefill', "
        "which a 'single_prefill' dummy run needs; it takes: create_mixed_batch, force_attention, "
        "is_profile, num_tokens, skip_eplb"
    )
    assert (info.value.keyword, info.value.exit_code) == ("create_single_prefill", 2)
    assert fake.compared() == []


def test_dummy_run_accepts_var_keyword_runners(fake: Any) -> None:
    """A _dummy_run taking **kwargs (a subclass wrapper) is trusted with every keyword."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    seen: list[dict[str, Any]] = []

    class Wrapped(GPUModelRunner):
        def _dummy_run(self, num_tokens: int, **kwargs: Any) -> None:  # type: ignore[override]
            seen.append({"num_tokens": num_tokens, **kwargs})

    VllmWorker(fake.build(dummy_run_cls=Wrapped)).dummy_run("single_prefill", 8, prior_context=8)
    assert seen == [
        {
            "num_tokens": 8,
            "skip_eplb": True,
            "is_profile": True,
            "create_single_prefill": True,
            "profile_seq_lens": 16,
        }
    ]


# -- world ------------------------------------------------------------------------------


def test_world_single_rank(fake: Any) -> None:
    """One rank: collectives are the identity and touch nothing."""
    world = VllmWorker(fake.build()).world
    assert (world.rank, world.local_rank, world.world_size) == (0, 0, 1)
    assert world.broadcast_bytes(b"x", timeout_s=1) == b"x"
    assert world.all_gather_str("a", timeout_s=1) == ["a"]
    world.barrier(timeout_s=1)
    assert fake.events("world") == []


def run_ranks(fake: Any, world_size: int, body: Any) -> list[Any]:
    """Run ``body(rank, adapter)`` on ``world_size`` fake ranks, one thread each."""
    hub = fake.WorldHub(world_size)
    results: list[Any] = [None] * world_size
    errors: list[BaseException] = []
    worker = fake.build()

    def main(rank: int) -> None:
        fake.set_world_group(fake.GroupCoordinator(rank=rank, world_size=world_size, hub=hub))
        try:
            results[rank] = body(rank, VllmWorker(worker))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=main, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    if errors:
        raise errors[0]
    return results


def test_world_collectives_across_ranks(fake: Any) -> None:
    """broadcast_bytes, all_gather_str and barrier through vLLM's group on three ranks."""

    def body(rank: int, adapter: VllmWorker) -> Any:
        world = adapter.world
        got = world.broadcast_bytes(b"tuned" if rank == 0 else None, src=0, timeout_s=5)
        none = world.broadcast_bytes(None, src=0, timeout_s=5)
        names = world.all_gather_str(f"r{rank}", timeout_s=5)
        world.barrier(timeout_s=5)
        return got, none, names

    assert run_ranks(fake, 3, body) == [(b"tuned", None, ["r0", "r1", "r2"])] * 3


def test_world_failure_names_the_rank(fake: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A collective that raises becomes a WorldError naming this rank and the source."""
    group = fake.GroupCoordinator(rank=1, world_size=2)

    def broken(obj: Any = None, src: int = 0) -> Any:
        raise RuntimeError("connection reset by peer")

    monkeypatch.setattr(group, "broadcast_object", broken)
    fake.set_world_group(group)
    with pytest.raises(
        WorldError,
        match=r"^broadcast from rank 0 failed after \d+\.\ds on rank 1 waiting for rank 0: connection reset by peer$",
    ):
        VllmWorker(fake.build()).world.broadcast_bytes(None, timeout_s=1)


# -- autotune backends ------------------------------------------------------------------


def test_autotune_backend_names(fake: Any) -> None:
    """flashinfer and flashinfer_dsv4_decode exist, once each; anything else is None."""
    adapter = VllmWorker(fake.build())
    backend = adapter.autotune_backend("flashinfer")
    assert backend is not None
    assert backend is adapter.autotune_backend("flashinfer")
    assert backend.name == "flashinfer"
    dsv4 = adapter.autotune_backend("flashinfer_dsv4_decode")
    assert dsv4 is not None
    assert dsv4.name == "flashinfer_dsv4_decode"
    assert adapter.autotune_backend("triton") is None


def test_flashinfer_backend_unavailable_reasons(fake: Any) -> None:
    """Without FlashInfer, or without the DSv4 decode autotuner, the backend says why."""
    fake.reset(flashinfer=False)
    adapter = VllmWorker(fake.build())
    backend = adapter.autotune_backend("flashinfer")
    assert backend is not None
    assert backend.unavailable_reason() == (
        "vLLM reports FlashInfer unavailable (vllm.utils.flashinfer.has_flashinfer() is False)"
    )
    fake.reset(dsv4_decode_autotune=False)
    adapter = VllmWorker(fake.build())
    dsv4 = adapter.autotune_backend("flashinfer_dsv4_decode")
    generic = adapter.autotune_backend("flashinfer")
    assert dsv4 is not None
    assert generic is not None
    assert dsv4.unavailable_reason() == (
        "this FlashInfer build does not expose sparse_mla_sm120_decode_dsv4_autotune"
    )
    assert generic.unavailable_reason() is None


@pytest.mark.parametrize(
    ("name", "context"),
    [
        ("flashinfer", "flashinfer.autotune"),
        ("flashinfer_dsv4_decode", "flashinfer.sparse_mla_sm120_decode_dsv4_autotune"),
    ],
)
def test_flashinfer_backend_tunes_exports_and_loads(fake: Any, name: str, context: str) -> None:
    """Runs inside tuning() tune under vLLM's context; export is FlashInfer's file; load installs it."""
    adapter = VllmWorker(fake.build())
    backend = adapter.autotune_backend(name)
    assert backend is not None
    assert backend.unavailable_reason() is None
    with backend.tuning():
        adapter.dummy_run("mixed", 16, force_attention=True)
    [(_, _, run)] = fake.compared()
    assert run["tuning"] == context
    payload = backend.export()
    assert json.loads(payload)["tuned_by"] == context
    backend.load(payload)
    assert fake.STATE.loaded_configs == [payload]
    assert set(backend.metadata()) == {"backend", "flashinfer", "vllm", "torch"}
    assert backend.version == "0.0.0+warmplan.fake"


def test_flashinfer_backend_export_empty_when_nothing_tuned(fake: Any) -> None:
    """No file from FlashInfer: export is b"" and load of b"" installs nothing."""
    fake.reset(writes_cache=False)
    backend = VllmWorker(fake.build()).autotune_backend("flashinfer")
    assert backend is not None
    with backend.tuning():
        pass
    assert backend.export() == b""
    backend.load(b"")
    assert fake.STATE.loaded_configs == []


def test_flashinfer_backend_load_failure(fake: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """FlashInfer refusing a payload is an AutotuneLoadError saying so."""
    from flashinfer.autotuner import AutoTuner

    def refuse(self: Any, path: str) -> None:
        raise ValueError("bad json")

    monkeypatch.setattr(AutoTuner, "load_configs", refuse)
    backend = VllmWorker(fake.build()).autotune_backend("flashinfer")
    assert backend is not None
    with pytest.raises(
        AutotuneLoadError, match=r"FlashInfer refused the tuning payload \(3 bytes\): bad json"
    ):
        backend.load(b"{x}")


# -- describe and fingerprint ---------------------------------------------------------------


def test_describe(fake: Any) -> None:
    """engine vllm, the runner's device and the versions the report names."""
    info = VllmWorker(fake.build()).describe()
    assert (info.engine, info.device) == ("vllm", "cpu")
    assert info.versions["vllm"] == "0.0.0+warmplan.fake"
    assert info.versions["torch"] == torch.__version__
    assert info.versions["flashinfer"] == "0.0.0+warmplan.fake"
    assert "triton" in info.versions


def test_config_fingerprint(fake: Any) -> None:
    """Model, dtype, parallel sizes and limits, JSON-serialisable; missing sections left out."""
    worker = fake.build(tensor_parallel_size=4, max_num_tokens=64)
    fp = VllmWorker(worker).config_fingerprint()
    json.dumps(fp)
    assert fp["model"] == "deepseek-ai/DeepSeek-V4-Fake"
    assert (fp["tensor_parallel_size"], fp["pipeline_parallel_size"]) == (4, 1)
    assert (fp["dtype"], fp["max_num_tokens"], fp["max_num_batched_tokens"]) == (
        "bfloat16",
        64,
        8192,
    )
    del worker.vllm_config.parallel_config
    assert "tensor_parallel_size" not in VllmWorker(worker).config_fingerprint()


def test_synchronize_uses_torch_accelerator(fake: Any) -> None:
    """synchronize() is torch.accelerator.synchronize(), as vLLM calls after its fan."""
    VllmWorker(fake.build()).synchronize()
    assert [e.name for e in fake.events("sync")] == ["torch.accelerator.synchronize"]


# -- the plugin -------------------------------------------------------------------------


@pytest.fixture
def plugin(fake: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """vLLM's plugin loader sees warmplan's entry point; the plan is plans/dsv4.yaml."""
    import importlib.metadata

    from warmplan import vllm_plugin as adapter_module

    ours = importlib.metadata.EntryPoint(
        name="warmplan", value="warmplan.vllm_plugin:register", group="vllm.general_plugins"
    )
    real = importlib.metadata.entry_points

    def entry_points(**params: Any) -> Any:
        if params.get("group") == "vllm.general_plugins":
            return importlib.metadata.EntryPoints([ours])
        return real(**params)

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    monkeypatch.setenv("WARMPLAN_PLAN", str(ref.DSV4_PLAN))
    monkeypatch.setenv("WARMPLAN_REPORT", str(tmp_path / "reports" / "rank{rank}.json"))
    monkeypatch.setenv("WARMPLAN_CACHE_ROOT", str(tmp_path / "cache"))
    monkeypatch.setenv("VLLM_FLASHINFER_AUTOTUNE_CACHE_DIR", str(tmp_path / "vllm-cache"))
    monkeypatch.delenv("WARMPLAN_MODE", raising=False)
    try:
        yield fake
    finally:
        adapter_module._unregister_for_tests()


def load_plugins_and_warm_up(fake: Any, **config: Any) -> Any:
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    worker = fake.build(max_num_tokens=64, max_num_batched_tokens=2048, **config)
    fake.STATE.kernel_warmup_impl = ref
    worker.compile_or_warm_up_model()
    return worker


def vllm_parts(fake: Any) -> list[str]:
    return [e.name for e in fake.events("vllm")]


def test_plugin_runs_the_plan_after_vllms_warmup_before_graph_capture(
    plugin: Any, tmp_path: Path
) -> None:
    """WARMPLAN_MODE unset (after): vLLM's warmup, then the plan, then CUDA-graph capture."""
    load_plugins_and_warm_up(plugin)
    parts = vllm_parts(plugin)
    assert parts[0] == "load_general_plugin"
    assert parts[1:] == [
        "compile_or_warm_up_model",
        "kernel_warmup",
        "_deepseek_v4_sparse_mla_attention_warmup",
        "_deepseek_v4_request_prep_warmup",
        "deep_gemm_warmup",
        "flashinfer_autotune",
        "capture_model",
    ]
    runs = [d["kwargs"]["num_tokens"] for _, n, d in plugin.compared() if n == "_dummy_run"]
    assert runs == [16, 2048, 2048, 2048] * 2  # vLLM's, then the plan's
    capture = next(i for i, e in enumerate(plugin.STATE.log) if e.name == "capture_model")
    assert all(i < capture for i, e in enumerate(plugin.STATE.log) if e.kind == "runner")
    report = json.loads((tmp_path / "reports" / "rank0.json").read_text())
    assert report["plan"]["name"] == "dsv4"
    assert report["worker"]["engine"] == "vllm"
    ran = {s["id"] for s in report["steps"] if s["skipped"] is None}
    assert ran == {
        "sparse-mla-mixed",
        "sparse-mla-prefill",
        "sparse-mla-second-chunk",
        "slot-mapping",
        "flashinfer-autotune",
    }
    # The built-in engine's compile-key steps and its extra slot-mapping sizes are
    # gated off a vLLM worker.
    builtin_only = {
        s["id"]: s["skipped"] for s in report["steps"] if s["id"].startswith("builtin-")
    }
    assert len(builtin_only) == 4  # three keys steps and the bucket-tuning slot sizes
    assert all(
        reason.startswith("gate attention_backend: needs any of BUILTIN_SPARSE_MLA")
        for reason in builtin_only.values()
    )


def test_plugin_replace_mode_runs_the_plan_instead_of_vllms_dsv4_parts(
    plugin: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """replace: the DeepSeek-V4 and FlashInfer-autotune parts of vLLM are not entered;
    the plan makes the only runner calls; the rest of kernel_warmup still runs."""
    monkeypatch.setenv("WARMPLAN_MODE", "replace")
    load_plugins_and_warm_up(plugin)
    assert vllm_parts(plugin)[1:] == [
        "compile_or_warm_up_model",
        "kernel_warmup",
        "deep_gemm_warmup",
        "capture_model",
    ]
    runs = [d["kwargs"]["num_tokens"] for _, n, d in plugin.compared() if n == "_dummy_run"]
    assert runs == [16, 2048, 2048, 2048]
    import vllm.model_executor.warmup.kernel_warmup as kw

    assert kw.flashinfer_autotune.__name__ == "flashinfer_autotune"  # restored afterwards


def test_plugin_without_a_plan_changes_nothing(
    plugin: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No WARMPLAN_PLAN: register() is a no-op and vLLM's warmup runs alone."""
    monkeypatch.delenv("WARMPLAN_PLAN")
    load_plugins_and_warm_up(plugin)
    import vllm.v1.worker.gpu_worker as gw

    assert not getattr(gw.kernel_warmup, "__warmplan_wrapped__", False)
    runs = [n for _, n, _ in plugin.compared() if n == "_dummy_run"]
    assert len(runs) == 4


def test_plugin_registration_is_idempotent(plugin: Any) -> None:
    """vLLM loads plugins in every process and may call register() again: one hook, one wrap."""
    import sys

    from warmplan.vllm_plugin import register

    register()
    register()
    import vllm.v1.worker.gpu_worker as gw

    hooks = [f for f in sys.meta_path if type(f).__name__ == "_PatchOnImport"]
    assert len(hooks) == 1
    assert gw.kernel_warmup.__warmplan_wrapped__
    assert not getattr(gw.kernel_warmup.__wrapped__, "__warmplan_wrapped__", False)


def test_plugin_patches_modules_already_imported(plugin: Any) -> None:
    """A gpu_worker imported before the plugin loads gets its kernel_warmup wrapped too."""
    import vllm.v1.worker.gpu_worker as gw

    from warmplan.vllm_plugin import register

    assert not getattr(gw.kernel_warmup, "__warmplan_wrapped__", False)
    register()
    assert gw.kernel_warmup.__warmplan_wrapped__


def test_plugin_rejects_an_unknown_mode(plugin: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad WARMPLAN_MODE stops vLLM's startup with a message naming the choices."""
    from warmplan.errors import UserError
    from warmplan.vllm_plugin import register

    monkeypatch.setenv("WARMPLAN_MODE", "before")
    with pytest.raises(UserError, match=r"WARMPLAN_MODE must be one of after, replace: 'before'"):
        register()


def test_worker_extension_runs_a_plan_over_collective_rpc(fake: Any, tmp_path: Path) -> None:
    """--worker-extension-cls mixes WarmplanWorkerExtension into vLLM's Worker;
    warmplan_run(plan_text) runs the plan there and returns the report as a dict."""
    from warmplan.vllm_plugin import WarmplanWorkerExtension

    worker = fake.build(max_num_tokens=8, max_num_batched_tokens=16)
    worker.__class__ = type("Worker", (type(worker), WarmplanWorkerExtension), {})
    text = """
version: 1
name: rpc
steps:
  - id: fan
    kind: slot_mapping
    tokens: [1, 2, 16]
    clamp_to: max_num_tokens
"""
    report = worker.warmplan_run(text)
    json.dumps(report)
    [step] = report["steps"]
    assert (step["id"], step["requested"], step["applied"]) == ("fan", [1, 2, 16], [1, 2, 8])
    sizes = [d["query_start_loc"][1] for _, n, d in fake.compared() if n == "compute_slot_mapping"]
    assert sizes == [1, 2, 8]


def test_contract_checks_hold_on_the_fake(fake: Any) -> None:
    """tests/test_vllm_contract.py's checks pass on the fake: the fake has vLLM's names,
    and the contract test itself runs (it only skips for want of a real vLLM)."""
    import vllm

    from tests import test_vllm_contract as contract

    checks = contract.SEED_CHECKS
    assert len(checks) == 8
    for check in checks:
        check(vllm)


def test_flashinfer_backend_load_returning_false(
    fake: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """load_configs returning False (nothing usable) is an AutotuneLoadError, not silence."""
    from flashinfer.autotuner import AutoTuner

    monkeypatch.setattr(AutoTuner, "load_configs", lambda self, path: False)
    backend = VllmWorker(fake.build()).autotune_backend("flashinfer")
    assert backend is not None
    with pytest.raises(
        AutotuneLoadError, match=r"load_configs rejected the tuning payload \(2 bytes\)"
    ):
        backend.load(b"{}")


@pytest.fixture
def fresh_compiles() -> Iterator[None]:
    """No compiled graph in memory or on disk: every new shape is a real compile."""
    import torch

    torch._dynamo.reset()
    with torch._inductor.config.patch(force_disable_caches=True):
        yield
    torch._dynamo.reset()


@pytest.mark.usefixtures("fresh_compiles")
def test_plugin_arms_the_jit_monitor_after_graph_capture(
    plugin: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WARMPLAN_JIT_MONITOR=error: compiles during warmup and graph capture pass; a serving step that compiles raises."""

    from warmplan.monitor import JitCompileError

    monkeypatch.setenv("WARMPLAN_JIT_MONITOR", "error")
    worker = load_plugins_and_warm_up(plugin)  # graph capture compiled the fake forward at size 8
    worker.execute_model(8)  # captured: no compile
    with pytest.raises(JitCompileError) as info:
        worker.execute_model(5)
    message = str(info.value)
    assert "_fake_forward_impl" in message and "serving step 2" in message
    assert "warmplan verify PLAN --trace T --suggest" in message


@pytest.mark.usefixtures("fresh_compiles")
def test_plugin_jit_monitor_warn_keeps_serving(
    plugin: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WARMPLAN_JIT_MONITOR=warn: a compile while serving is counted and logged, and the step returns."""

    monkeypatch.setenv("WARMPLAN_JIT_MONITOR", "warn")
    worker = load_plugins_and_warm_up(plugin)
    assert float(worker.execute_model(6)) == 6.0
    monitor = worker._warmplan_monitor
    assert monitor.compiles("serving step 1") == 1
    assert worker.execute_model(6) is not None and monitor.compiles("serving step 2") == 0


def test_plugin_rejects_a_bad_jit_monitor_mode(
    plugin: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bad WARMPLAN_JIT_MONITOR stops startup with the valid choices."""
    from warmplan import vllm_plugin as adapter_module
    from warmplan.errors import UserError

    monkeypatch.setenv("WARMPLAN_JIT_MONITOR", "loud")
    with pytest.raises(UserError) as info:
        adapter_module.register()
    assert str(info.value) == "WARMPLAN_JIT_MONITOR must be one of off, warn, error: 'loud'"
