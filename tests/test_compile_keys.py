"""Compile keys on the built-in engine, pinned against the compilers' own keys.

Triton: its binder and ``compute_cache_key`` run without a GPU when the driver
answers a target (``warmplan.workers.triton_target``), and its compiler makes a real
sm90 cubin on this CPU; so the expansion, the deduplication and "one compile per
key, no launch" are checked against Triton itself here. CPU: the engine's torch
variants, through the ahead-of-time store, and a replay that compiles nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.compiles

triton = pytest.importorskip("triton", reason="tests need triton (the test extra installs it)")

from tests._engines import tiny  # noqa: E402
from warmplan.domains import IntRange, KeyDomain  # noqa: E402
from warmplan.workers.base import Limits  # noqa: E402
from warmplan.workers.builtin import kernels as K  # noqa: E402
from warmplan.workers.builtin.config import EngineConfig  # noqa: E402
from warmplan.workers.builtin.jit_keys import (  # noqa: E402
    KeyCompiler,
    KeyModel,
    StandIn,
    _inductor_share,
)
from warmplan.workers.triton_target import target_driver  # noqa: E402

FAN = KeyDomain(params=(("num_tokens", (IntRange(1, 16), 32, 64, 128, 256, 512)),))
SIZES = [*range(1, 17), 32, 64, 128, 256, 512]
LIMITS = Limits(max_num_tokens=512, max_num_batched_tokens=512, max_num_seqs=8)


@pytest.fixture
def engine() -> EngineConfig:
    return EngineConfig.from_mapping(
        {
            "preset": "sparse-mla",
            "max_num_tokens": 512,
            "max_num_batched_tokens": 512,
            "max_num_seqs": 8,
            "max_model_len": 4096,
            "device": "cpu",
        }
    )


@pytest.fixture
def triton_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "triton"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(d))
    return d


@pytest.fixture
def fresh_kernels() -> Iterator[None]:
    """Forget Triton's in-process caches of the engine's kernels, before and after."""
    fns = (K._slot_mapping_kernel.fn, K._chunk_metadata_kernel)
    for fn in fns:
        fn.device_caches.clear()
    yield
    for fn in fns:
        fn.device_caches.clear()


def _triton_own_keys(target: str) -> set[str]:
    """What Triton itself caches when the 21-size fan runs through its launch path:
    ``JITFunction.run`` binds, computes the cache key and stores the kernel under it
    (``warmup`` is ``run`` without the launch), once per autotune config."""
    kernel = K._slot_mapping_kernel
    i64 = StandIn(__import__("torch").int64)
    compiled: list[Any] = []
    with target_driver(target):
        from triton.runtime import driver

        device = driver.active.get_current_device()
        # Count what would compile: Triton's own cache-miss hook, not ours.
        from triton import knobs

        previous = knobs.runtime.jit_cache_hook

        def hook(*args: Any, **kwargs: Any) -> bool:
            compiled.append(kwargs.get("key"))
            return True  # skip the compile itself: the key is what is pinned here

        knobs.runtime.jit_cache_hook = hook
        try:
            for n in SIZES:
                for config in kernel.configs:
                    kernel.fn.warmup(
                        i64,
                        i64,
                        i64,
                        i64,
                        n,
                        128,
                        K.next_power_of_two(n),
                        block_size=16,
                        grid=(1,),
                        **config.all_kwargs(),
                    )
        finally:
            knobs.runtime.jit_cache_hook = previous
        del device
    return {str(k) for k in compiled}


@pytest.mark.usefixtures("fresh_kernels")
def test_the_slot_fan_is_three_keys_by_tritons_own_cache_key(engine: EngineConfig) -> None:
    model = KeyModel(engine, triton=True)
    with target_driver("sm90"):
        keyset, _ = model.keyset("slot_mapping", FAN, "replace", LIMITS)
    assert (keyset.declared, len(keyset.keys)) == (21, 3)
    assert sorted(k.label.split()[1] for k in keyset.keys) == ["div16", "one", "other"]
    assert all(k.variants == len(K._slot_mapping_kernel.configs) for k in keyset.keys)
    ours = {v.cache_key for k in keyset.keys for v in model.variants[k.key]}
    # Triton, running every one of the 21 sizes (ranges not collapsed), keys the same
    # variants: one per class and config, no more, no fewer.
    assert _triton_own_keys("sm90") == ours
    # Enumerating the whole fan (no collapse) gives the same three keys.
    full = KeyModel(engine, triton=True)
    with target_driver("sm90"):
        listed = KeyDomain(params=(("num_tokens", tuple(SIZES)),))
        assert {k.key for k in full.keyset("slot_mapping", listed, "replace", LIMITS)[0].keys} == {
            k.key for k in keyset.keys
        }


@pytest.mark.usefixtures("fresh_kernels")
def test_keys_differ_per_target_and_constexpr(engine: EngineConfig) -> None:
    model = KeyModel(engine, triton=True)
    with target_driver("sm90"):
        a = {k.key for k in model.keyset("chunk_metadata", None, "replace", LIMITS)[0].keys}
    with target_driver("sm80"):
        b = {k.key for k in model.keyset("chunk_metadata", None, "replace", LIMITS)[0].keys}
    assert len(a) == len(b) == 2  # HAS_PRIOR_CONTEXT false / true
    assert not a & b


@pytest.mark.usefixtures("fresh_kernels")
def test_each_key_compiles_once_without_a_launch_then_is_present_then_loads(
    engine: EngineConfig, triton_cache: Path
) -> None:
    model = KeyModel(engine, triton=True)
    compiler = KeyCompiler(runner=None, model=model)  # type: ignore[arg-type]  # Triton needs no engine
    seen: list[bool] = []
    from triton import knobs

    previous = knobs.compilation.listener

    def listener(*args: Any, **kwargs: Any) -> None:
        seen.append(bool(kwargs.get("cache_hit")))

    knobs.compilation.listener = listener
    try:
        with target_driver("sm90"):
            keyset, cases = model.keyset("slot_mapping", FAN, "replace", LIMITS)
            first = compiler.compile(list(keyset.keys), cases, threads=4)
            assert [r.outcome for r in first] == ["compiled"] * 3
            assert seen == [False] * 12  # one compile per variant, none twice
            assert any(triton_cache.rglob("*.cubin"))  # a real sm90 binary, from a CPU
            again = compiler.compile(list(keyset.keys), cases, threads=4)
            assert [r.outcome for r in again] == ["present"] * 3
            assert len(seen) == 12
            # A new process (its in-memory caches empty) loads from Triton's disk cache.
            K._slot_mapping_kernel.fn.device_caches.clear()
            reloaded = KeyModel(engine, triton=True)
            keyset2, cases2 = reloaded.keyset("slot_mapping", FAN, "replace", LIMITS)
            third = KeyCompiler(runner=None, model=reloaded).compile(  # type: ignore[arg-type]
                list(keyset2.keys), cases2, threads=1
            )
            assert [r.outcome for r in third] == ["loaded"] * 3
            assert seen[12:] == [True] * 12
    finally:
        knobs.compilation.listener = previous


def test_cpu_keys_compile_ahead_of_time_and_a_replay_compiles_nothing(tmp_path: Path) -> None:
    """On the CPU engine: the keys of a plan compile as AOT artefacts (no call), a
    restarted engine loads them, and serving the covered shapes compiles nothing."""
    from warmplan.executor import run_plan
    from warmplan.monitor import JitMonitor
    from warmplan.plan import parse_plan
    from warmplan.workers.builtin import BuiltinWorker

    cfg = tiny(
        "sparse-mla",
        num_layers=1,
        max_num_tokens=16,
        max_num_batched_tokens=16,
        compile_sizes=[4, 16],
        dtype="float32",
    )
    plan = parse_plan(
        """\
version: 1
name: keys
steps:
  - id: slot
    kind: compile_keys
    kernel: slot_mapping
  - id: chunk
    kind: compile_keys
    kernel: chunk_metadata
  - id: forward
    kind: compile_keys
    kernel: forward
    threads: 2
""",
        file="keys.yaml",
    )
    root = str(tmp_path / "aot")
    first = BuiltinWorker(cfg, aot_root=root)
    report = run_plan(plan, first)
    keys = {s.id: s.keys for s in report.steps}
    assert keys["slot"] is not None and keys["slot"]["kernels"][0]["keys"] == 3
    assert keys["slot"]["kernels"][0]["cases"] == 3  # 1..16 collapsed to 1, 2, 16
    assert keys["chunk"]["kernels"][0]["compiled"] == 2  # type: ignore[index]
    assert keys["forward"]["kernels"][0]["compiled"] == 2  # type: ignore[index]
    # threads: 2 is this process and one spawned one, taking the two graphs from one
    # queue: each graph is compiled once, here (a compile) or there (saved, then
    # loaded here); the other compiles are the 5 metadata keys.
    forward = report.step("forward")
    assert forward.compiles + forward.cache_loads == 2
    assert report.totals["compiles"] == 5 + forward.compiles
    second = BuiltinWorker(cfg, aot_root=root)
    warm = run_plan(plan, second)
    assert warm.totals["compiles"] == 0
    loaded = [k["outcome"] for s in warm.steps for k in (s.keys or {}).get("keys", [])]
    assert loaded == ["loaded"] * 7
    with JitMonitor() as monitor, monitor.attribute("serve"):
        for specs in (
            [(1, 5, True)] * 3,
            [(1, 5, True), (12, 0, False)],
            [(8, 8, False)],
            [(3, 0, False)],
            [(16, 0, False)],
        ):
            second.runner.run_requests(specs)
    assert monitor.compiles("serve") == 0, monitor.events


def test_target_driver_restores_the_previous_driver() -> None:
    from triton.runtime import driver

    before = getattr(driver, "_active", None)
    with target_driver("sm90") as standing_in:
        assert standing_in is (not __import__("torch").cuda.is_available()) or True
        assert driver.active.get_current_target().arch == 90
    assert getattr(driver, "_active", None) is before
    assert os.environ.get("TRITON_CACHE_DIR") is None or True


def test_a_key_compiled_at_a_size_equal_to_a_buffer_dim_serves_its_whole_class(
    tmp_path: Path,
) -> None:
    """17 tokens is the block table's row count (max_num_seqs + 1): compiled there, the
    "other" artefact must still serve 2, 3, 5, 31 (no duck-sized guard 17 == rows)."""
    from warmplan.monitor import JitMonitor
    from warmplan.workers.builtin import BuiltinWorker

    cfg = tiny(
        "dense",
        num_layers=1,
        max_num_tokens=32,
        max_num_batched_tokens=32,
        max_num_seqs=16,
        compile_sizes=[4, 32],
        dtype="float32",
    )
    worker = BuiltinWorker(cfg, aot_root=str(tmp_path / "aot"))
    keyset = worker.compile_keys("slot_mapping", KeyDomain(params=(("num_tokens", (17,)),)))
    assert [r.outcome for r in worker.compile(list(keyset.keys))] == ["compiled"]
    with JitMonitor() as monitor, monitor.attribute("serve"):
        for n in (2, 3, 5, 17, 31):
            worker.runner.slot_mapping(n)
    assert monitor.compiles("serve") == 0, monitor.events


def test_the_key_queue_hands_each_index_out_once_across_claimants() -> None:
    """The shared counter behind the compile pool: concurrent claimants (threads here;
    spawned processes in the pool) get every index once, then None."""
    import multiprocessing
    import threading

    from warmplan.workers.builtin.jit_keys import _claim

    counter = multiprocessing.get_context("spawn").Value("i", 0)
    got: list[list[int]] = [[] for _ in range(4)]

    def drain(mine: list[int]) -> None:
        while (i := _claim(counter, 500)) is not None:
            mine.append(i)

    workers = [threading.Thread(target=drain, args=(g,)) for g in got]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    claimed = [i for g in got for i in g]
    assert sorted(claimed) == list(range(500))
    assert _claim(counter, 500) is None


@pytest.mark.parametrize(
    ("cores", "compilers", "share"), [(16, 8, 2), (16, 3, 5), (2, 2, 1), (2, 8, 1), (None, 2, 1)]
)
def test_a_spawned_compiler_gets_its_share_of_the_cores(
    monkeypatch: pytest.MonkeyPatch, cores: int | None, compilers: int, share: int
) -> None:
    """Inductor's compile workers per spawned compiler: the cores divided among the
    compilers, never below 1 (1: no worker pool at all); a valid override wins, an
    invalid one is ignored."""
    monkeypatch.delenv("WARMPLAN_POOL_INDUCTOR_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    assert _inductor_share(compilers) == share
    monkeypatch.setenv("WARMPLAN_POOL_INDUCTOR_THREADS", "3")
    assert _inductor_share(compilers) == 3
    for bad in ("0", "-2", "two"):  # ignored, not a traceback in the middle of a plan
        monkeypatch.setenv("WARMPLAN_POOL_INDUCTOR_THREADS", bad)
        assert _inductor_share(compilers) == share


def test_pool_and_this_process_compile_each_graph_once(tmp_path: Path) -> None:
    """Three graphs, threads: 2 (this process and one spawned one): what each compiled
    is disjoint, together every graph, each saved; a fresh engine loads all three."""
    from warmplan.workers.builtin import BuiltinWorker

    cfg = tiny(
        "dense",
        num_layers=1,
        max_num_tokens=16,
        max_num_batched_tokens=16,
        compile_sizes=[4, 8, 16],
        dtype="float32",
    )
    root = str(tmp_path / "aot")
    worker = BuiltinWorker(cfg, aot_root=root)
    keyset = worker.compile_keys("forward", None)
    keys = list(keyset.keys)
    assert len(keys) == 3
    compiler = KeyCompiler(worker.runner, worker._key_model())
    spawned, here = compiler._compile_in_pool(keys, worker._key_cases, 2)
    assert not set(spawned) & set(here)
    assert set(spawned) | set(here) == {k.key for k in keys}
    assert all(outcome == "compiled" for outcome, _ in here.values())
    fresh = BuiltinWorker(cfg, aot_root=root)
    again = list(fresh.compile_keys("forward", None).keys)
    assert [r.outcome for r in fresh.compile(again)] == ["loaded"] * 3
