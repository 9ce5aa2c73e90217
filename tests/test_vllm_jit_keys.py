"""``compile_keys`` on vLLM 0.34: the ``KeyedWorker`` side of ``VllmWorker``
(``warmplan.workers.vllm.jit_keys``) against the real package (CI's vLLM tier).

Kernels are registered on a real ``JitWarmupRegistry`` as vLLM's model code registers
them (``activate()``, then ``register_warmup``) and put on a recording runner
(``tests/vllm_real/recording.py``) as ``jit_warmup_registry``. Every key count is
pinned against vLLM's own ``get_warmup_keys`` (or its ``_trace_dispatch``), never
against warmplan's arithmetic.

* ``add_one``: a Triton kernel declared here with vLLM's own
  ``triton_kernel_dispatcher_with_warmup``, whose warmup cases are AST-traced
  (``WarmupIntRange``, ``WarmupChoices``, ``_when``). Its keys are derived by
  Triton's binder and compiled to real sm90 cubins on this CPU through
  ``warmplan.workers.triton_target`` (a driver that knows the target and no device).
* ``PackSeqTritonKernel`` / ``UnpackSeqTritonKernel``: vLLM's real kernels from
  ``vllm.v1.attention.ops.common``, registered with the arguments vLLM's sparse
  attention indexer registers them with; their keys come from a traced
  ``_trace_dispatch`` call (dataclass keys; no compile here: vLLM bound their
  ``@triton.jit`` to its CPU placeholder at import).
* ``_topk_topp``: vLLM's real sampler kernel (``vllm.v1.sample.ops.topk_topp_triton``,
  AST-traced cases over the config's batch sizes), keyed and one key compiled, in a
  child process: vLLM picks Triton or its placeholder when ``vllm.triton_utils`` is
  first imported, and on a machine without a GPU only ``CUDA_VISIBLE_DEVICES=""``
  (a distributed worker's lenient driver check) keeps the real one. In this process
  vLLM's helper module is pointed at the real Triton instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from warmplan.domains import DomainError, IntRange, KeyDomain
from warmplan.workers.base import KeyedWorker, StepUnsupported

pytestmark = [pytest.mark.vllm, pytest.mark.compiles]
ROOT = Path(__file__).resolve().parents[1]

try:  # outside the vLLM tier every test here is deselected; the module still imports
    import torch
    import triton
    import triton.language as tl
    from vllm.model_executor.warmup.jit_warmup import (
        JitWarmupRegistry,
        WarmupChoices,
        WarmupIntRange,
        _when,
    )
    from vllm.model_executor.warmup.jit_warmup_triton_helper import (
        TritonWarmupTensor,
        triton_kernel_dispatcher_with_warmup,
    )
except ImportError:  # pragma: no cover - the fast lane and the main venv
    HAVE_VLLM = False
else:
    HAVE_VLLM = True

    def _add_one_cases(max_tokens: int = 64) -> Any:
        num_tokens = WarmupIntRange(1, max_tokens + 1)
        block = WarmupChoices(32, 64, 128)
        _when(block <= 64 or num_tokens > 16)
        return dict(  # noqa: C408 - vLLM traces one case(...) call here
            x_ptr=TritonWarmupTensor(torch.float32),
            out_ptr=TritonWarmupTensor(torch.float32),
            n=num_tokens,
            BLOCK=block,
            grid=(1,),
        )

    @triton_kernel_dispatcher_with_warmup(warmup_inputs=_add_one_cases)
    @triton.jit
    def add_one(x_ptr, out_ptr, n, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1, mask=mask)

    def _plain_cases() -> Any:
        return [
            {
                "x_ptr": TritonWarmupTensor(torch.float32),
                "out_ptr": TritonWarmupTensor(torch.float32),
                "n": n,
                "BLOCK": 32,
                "grid": (1,),
            }
            for n in (1, 2, 3, 32)
        ]

    # Another owner of the same JITFunction, its cases a plain function (not traced).
    add_one_plain = triton_kernel_dispatcher_with_warmup(warmup_inputs=_plain_cases)(add_one.kernel)


# (registrations of add_one: the default, and one as a smaller model would make it)
ADD_ONE_REGISTRATIONS: list[dict[str, Any]] = [{}, {"max_tokens": 16}]


@pytest.fixture
def triton_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """The real Triton in vLLM's helper (its import chose a placeholder: no GPU
    driver), an empty Triton cache directory, Triton bound to an sm90 target, and
    ``add_one`` with nothing compiled in this process."""
    from vllm.model_executor.warmup import jit_warmup_triton_helper as helper

    from warmplan.workers.triton_target import target_driver

    monkeypatch.setattr(helper, "triton", triton)
    cache = tmp_path / "triton-cache"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))
    add_one.kernel.device_caches.clear()
    with target_driver():
        yield cache
    add_one.kernel.device_caches.clear()


def _worker(*kernels: tuple[Any, list[dict[str, Any]]], **config: Any) -> Any:
    """A ``VllmWorker`` over a recording 0.34 worker whose runner's registry holds
    ``kernels``, each registered as vLLM's model code does."""
    from tests.vllm_real.recording import make_worker
    from warmplan.workers.vllm import VllmWorker

    worker, _ = make_worker(**config)
    registry = JitWarmupRegistry(worker.vllm_config)
    with registry.activate():
        for kernel, registrations in kernels:
            for kwargs in registrations:
                kernel.register_warmup(**kwargs)
    worker.model_runner.jit_warmup_registry = registry
    return VllmWorker(worker)


def _vllm_keys(kernel: Any, registrations: list[dict[str, Any]]) -> set[Any]:
    """vLLM's own keys: ``get_warmup_keys`` per registration, the union."""
    keys: set[Any] = set()
    for kwargs in registrations:
        keys |= set(kernel.get_warmup_keys(**kwargs))
    return keys


def _digests(keys: set[Any]) -> set[str]:
    from warmplan.workers.vllm.jit_keys import key_digest

    return {key_digest(k) for k in keys}


# --------------------------------------------------------------------------- kernels


def test_registered_kernels_are_named_and_described(
    triton_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every registered kernel, by its function's (dispatcher) or class's name;
    a second owner of the same name gets a suffix; vLLM's declared domains as data."""
    from vllm.v1.attention.ops.common import _PACK_SEQ_TRITON_KERNEL, _UNPACK_SEQ_TRITON_KERNEL

    from tests.vllm_real.recording import install_single_rank_groups

    install_single_rank_groups(monkeypatch)  # isinstance reads the protocol's world

    w = _worker(
        (add_one, ADD_ONE_REGISTRATIONS),
        (add_one_plain, [{}]),
        (_PACK_SEQ_TRITON_KERNEL, [{"dtype": torch.float8_e4m3fn, "pad_value": -float("inf")}]),
        (_UNPACK_SEQ_TRITON_KERNEL, [{}]),
    )
    assert isinstance(w, KeyedWorker)
    info = w.jit_kernels()
    assert list(info) == ["add_one", "add_one-2", "PackSeqTritonKernel", "UnpackSeqTritonKernel"]
    assert {i.backend for i in info.values()} == {"vllm:triton"}
    add = info["add_one"]
    assert add.params == ("num_tokens", "block")
    assert add.domain == KeyDomain(
        params=(
            ("num_tokens", (IntRange(1, 64), IntRange(1, 16))),
            ("block", (32, 64, 128)),
        )
    )
    assert "2 registrations" in add.description
    assert info["add_one-2"].params == () and info["add_one-2"].domain is None
    pack = info["PackSeqTritonKernel"]
    assert pack.params == ("dtype", "pad_value", "block_t", "block_d")
    assert pack.domain is not None
    assert dict(pack.domain.params)["dtype"] == ("float8_e4m3fn",)


def test_a_runner_without_a_registry_has_no_kernels() -> None:
    from tests.vllm_real.recording import make_worker
    from warmplan.workers.vllm import VllmWorker

    worker, _ = make_worker()  # the recording runner's registry has no registrations
    assert VllmWorker(worker).jit_kernels() == {}
    del worker.model_runner.jit_warmup_registry
    w = VllmWorker(worker)
    assert w.jit_kernels() == {}
    with pytest.raises(StepUnsupported, match="has no kernel 'add_one'; it has: none"):
        w.compile_keys("add_one", None)


# --------------------------------------------------------------------------- keys


def test_keys_are_vllms_own(triton_env: Path) -> None:
    """The kernel's own domain: exactly vLLM's keys (union over its registrations),
    each with the cases that map to it."""
    w = _worker((add_one, ADD_ONE_REGISTRATIONS))
    ks = w.compile_keys("add_one", None)
    expected = _vllm_keys(add_one, ADD_ONE_REGISTRATIONS)
    # n: == 1, % 16 == 0, other; BLOCK 32 and 64 for all, 128 only past 16 tokens (_when).
    assert len(expected) == 3 * 2 + 2
    assert {k.key for k in ks.keys} == _digests(expected)
    assert len(ks.keys) == len(expected)
    # 64 sizes x 2 blocks + 48 x 1, and 16 x 2: the cases _when kept; declared 64x3 + 16x3.
    assert (ks.cases, ks.declared) == (176 + 32, 240)
    assert sum(k.members for k in ks.keys) == ks.cases
    first = ks.keys[0]
    assert first.case == {"n": 1, "BLOCK": 32}
    assert first.label == "x_ptr=float32, out_ptr=float32, n=1, BLOCK=32"
    assert first.members == 2 and first.variants == 1  # n=1 in both registrations
    by_case = {(k.case["n"], k.case["BLOCK"]): k.members for k in ks.keys}
    assert by_case[(2, 32)] == 1 + 3 * 14 + 3 * 1 + 14 + 13  # 2..63 not % 16, both regs
    assert by_case[(17, 128)] == 45  # 17..64 not % 16


def test_plan_domain_replaces_a_declared_domain(triton_env: Path) -> None:
    """``mode: replace``: the plan's values for the cases method's local name."""
    w = _worker((add_one, ADD_ONE_REGISTRATIONS))
    ks = w.compile_keys("add_one", KeyDomain(params=(("block", (32,)),)))
    assert {k.case["BLOCK"] for k in ks.keys} == {32}
    assert len(ks.keys) == 3 and ks.cases == 64 + 16
    # A range is every integer in it, inclusive; vLLM's _when still applies.
    ks = w.compile_keys(
        "add_one", KeyDomain(params=(("num_tokens", (IntRange(30, 33),)), ("block", (64, 128))))
    )
    assert sorted((k.case["n"], k.case["BLOCK"]) for k in ks.keys) == [
        (30, 64),
        (30, 128),
        (32, 64),
        (32, 128),
    ]
    assert ks.declared == 2 * (4 * 2)  # both registrations take the plan's values
    assert {k.key for k in ks.keys} <= {
        k.key for k in w.compile_keys("add_one", KeyDomain(params=(("block", (64, 128)),))).keys
    }


def test_plan_domain_extends_a_declared_domain(triton_env: Path) -> None:
    """``mode: extend``: vLLM's values, then the plan's; new keys for new classes only."""
    w = _worker((add_one, ADD_ONE_REGISTRATIONS))
    base = {k.key for k in w.compile_keys("add_one", None).keys}
    ks = w.compile_keys("add_one", KeyDomain(params=(("block", (256,)),)), mode="extend")
    added = [k for k in ks.keys if k.key not in base]
    assert {k.key for k in ks.keys} >= base
    assert sorted((k.case["n"], k.case["BLOCK"]) for k in added) == [(17, 256), (32, 256)]
    same = w.compile_keys("add_one", KeyDomain(params=(("num_tokens", (8, 9)),)), mode="extend")
    assert {k.key for k in same.keys} == base  # 8 and 9 are classes it already has


def test_where_filters_the_cases(triton_env: Path) -> None:
    """``where`` over the case's scalars and the worker's limits, after vLLM's _when."""
    w = _worker((add_one, ADD_ONE_REGISTRATIONS), max_num_batched_tokens=16)
    ks = w.compile_keys("add_one", KeyDomain(where=("n <= 16 and BLOCK == 32",)))
    assert sorted(k.case["n"] for k in ks.keys) == [1, 2, 16]
    assert ks.cases == 32
    limited = w.compile_keys("add_one", KeyDomain(where=("n <= max_num_tokens",)))
    assert max(k.case["n"] for k in limited.keys) == 16 and len(limited.keys) == 6
    with pytest.raises(DomainError) as err:
        w.compile_keys("add_one", KeyDomain(where=("x_ptr is not None",)))
    assert err.value.path == "where.0"
    with pytest.raises(
        DomainError, match=r"unknown name 'x_ptr'.*unavailable: grid, out_ptr, x_ptr"
    ):
        w.compile_keys("add_one", KeyDomain(where=("x_ptr > 0",)))


def test_domain_problems_name_the_parameter(triton_env: Path) -> None:
    w = _worker((add_one, ADD_ONE_REGISTRATIONS), (add_one_plain, [{}]))
    with pytest.raises(DomainError) as err:
        w.compile_keys("add_one", KeyDomain(params=(("n", (1, 2)),)))
    assert err.value.path == "domain.n"
    assert "kernel add_one has no domain 'n'; its domains: num_tokens, block" in str(err.value)
    with pytest.raises(DomainError, match="rows in lockstep"):
        w.compile_keys("add_one", KeyDomain(rows=((("block", 32),),)))
    # A cases function vLLM does not trace: its own domain only.
    plain = w.compile_keys("add_one-2", None)
    assert plain.cases == 4 and sorted(k.members for k in plain.keys) == [1, 1, 2]
    with pytest.raises(StepUnsupported, match=r"add_one-2.*does not trace"):
        w.compile_keys("add_one-2", KeyDomain(where=("n > 1",)))


# --------------------------------------------------------------------------- compiling


def _listen() -> tuple[list[bool], Any]:
    from triton import knobs

    events: list[bool] = []
    previous = knobs.compilation.listener

    def listener(*args: Any, **kwargs: Any) -> None:
        events.append(bool(kwargs.get("cache_hit")))

    knobs.compilation.listener = listener
    return events, previous


def test_compile_once_then_present_then_loaded(triton_env: Path) -> None:
    """Each key compiles once (one real Triton compile per key, into the cache
    directory); again: present in the process; in a fresh process (Triton's
    in-process cache emptied): loaded from disk."""
    from triton import knobs

    w = _worker((add_one, ADD_ONE_REGISTRATIONS))
    keys = w.compile_keys("add_one", None).keys
    events, previous = _listen()
    try:
        first = w.compile(keys)
        assert [r.outcome for r in first] == ["compiled"] * len(keys)
        assert events == [False] * len(keys)
        assert [r.key for r in first] == list(keys)
        assert all(r.seconds > 0 for r in first)
        again = w.compile(keys)
        assert {r.outcome for r in again} == {"present"} and len(events) == len(keys)
        add_one.kernel.device_caches.clear()
        loaded = w.compile(keys)
        assert {r.outcome for r in loaded} == {"loaded"}
        assert events[len(keys) :] == [True] * len(keys)
    finally:
        knobs.compilation.listener = previous
    assert knobs.compilation.listener is previous
    assert w.key_artefacts() == [str(triton_env)]
    assert len(list(triton_env.iterdir())) >= len(keys)


def test_parallel_compile_uses_one_shared_pool(
    triton_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``threads`` > 1 for a kernel vLLM compiles in parallel (on CUDA; claimed here):
    every key through ``triton.AsyncCompileMode`` in one pool of the plan's size."""
    from vllm.model_executor.warmup import jit_warmup_triton_helper as helper

    monkeypatch.setattr(
        helper.VllmTritonJitKernel, "supports_parallel_compile", property(lambda self: True)
    )
    pools: list[int] = []
    real_mode = triton.AsyncCompileMode

    class Recording(real_mode):  # type: ignore[misc, valid-type]
        def __init__(self, executor: Any) -> None:
            pools.append(executor._max_workers)
            super().__init__(executor)

    monkeypatch.setattr(triton, "AsyncCompileMode", Recording)
    w = _worker((add_one, ADD_ONE_REGISTRATIONS))
    keys = w.compile_keys("add_one", None).keys
    results = w.compile(keys, threads=3)
    assert pools == [3]
    assert [r.outcome for r in results] == ["compiled"] * len(keys)
    assert {r.outcome for r in w.compile(keys, threads=3)} == {"present"}


# --------------------------------------------------------------------------- vLLM's own kernels


def test_real_pack_seq_kernels_by_traced_dispatch() -> None:
    """vLLM's ``PackSeqTritonKernel`` / ``UnpackSeqTritonKernel``, registered as its
    sparse-attention indexer registers them: their keys are vLLM's; a keyword of
    their ``_trace_dispatch`` call is a domain (a dtype by name)."""
    from vllm.v1.attention.ops.common import _PACK_SEQ_TRITON_KERNEL as pack
    from vllm.v1.attention.ops.common import _UNPACK_SEQ_TRITON_KERNEL as unpack

    registration = {"dtype": torch.float8_e4m3fn, "pad_value": -float("inf")}
    w = _worker((pack, [registration]), (unpack, [{}]))
    ks = w.compile_keys("PackSeqTritonKernel", None)
    assert {k.key for k in ks.keys} == _digests(_vllm_keys(pack, [registration]))
    # The case vLLM dispatched (the dtype is not a scalar); pad_is_uint8 is the key's own.
    assert ks.keys[0].case == {"pad_value": -float("inf"), "block_t": 64, "block_d": 64}
    assert ks.keys[0].label.startswith("dtype=float8_e4m3fn")
    assert len(w.compile_keys("UnpackSeqTritonKernel", None).keys) == 1

    narrowed = w.compile_keys(
        "PackSeqTritonKernel",
        KeyDomain(params=(("block_t", (32, 64, 128)), ("dtype", ("bfloat16", "float8_e4m3fn")))),
    )
    oracle = pack._trace_dispatch(pack.dispatch)(
        dtype=WarmupChoices(torch.bfloat16, torch.float8_e4m3fn),
        pad_value=-float("inf"),
        block_t=WarmupChoices(32, 64, 128),
        block_d=64,
    )
    assert len(oracle) == 6
    assert {k.key for k in narrowed.keys} == _digests(set(oracle))
    assert narrowed.cases == 6 and {k.members for k in narrowed.keys} == {1}

    extended = w.compile_keys(
        "PackSeqTritonKernel", KeyDomain(params=(("block_d", (64, 128)),)), mode="extend"
    )
    assert sorted(k.case["block_d"] for k in extended.keys) == [64, 128]
    with pytest.raises(DomainError, match="expected a torch dtype name, found 'bf16'"):
        w.compile_keys("PackSeqTritonKernel", KeyDomain(params=(("dtype", ("bf16",)),)))
    # vLLM's dispatch refuses the plan's values: a domain problem naming the kernel.
    with pytest.raises(DomainError, match="could not key kernel PackSeqTritonKernel"):
        w.compile_keys("PackSeqTritonKernel", KeyDomain(params=(("dtype", ("uint8",)),)))
    with pytest.raises(DomainError, match="its domains: dtype, pad_value, block_t, block_d"):
        w.compile_keys("PackSeqTritonKernel", KeyDomain(params=(("block", (1,)),)))


REAL_TOPK = textwrap.dedent(
    """
    import json, sys
    from types import SimpleNamespace

    import torch
    from vllm.triton_utils import HAS_TRITON
    assert HAS_TRITON, "vLLM chose its Triton placeholder"
    from vllm.model_executor.warmup.jit_warmup import JitWarmupRegistry
    from vllm.platforms import current_platform
    import vllm.v1.sample.ops.topk_topp_triton as topk

    from tests.vllm_real.recording import make_worker
    from warmplan.domains import KeyDomain
    from warmplan.workers.triton_target import target_driver
    from warmplan.workers.vllm import VllmWorker
    from warmplan.workers.vllm.jit_keys import key_digest

    # What a CUDA machine answers: the device type and an H200's SM count.
    current_platform.device_type = "cuda"
    topk.num_compute_units = lambda *args: 132

    def config(max_num_seqs):
        return SimpleNamespace(
            scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs),
            num_speculative_tokens=0,
            model_config=SimpleNamespace(get_vocab_size=lambda: 4096),
        )

    out = {}
    with target_driver():
        worker, _ = make_worker()
        registry = JitWarmupRegistry(config(4))
        with registry.activate():
            topk._topk_topp.register_warmup()   # as register_top_k_top_p_warmups() does
        worker.model_runner.jit_warmup_registry = registry
        w = VllmWorker(worker)
        out["kernels"] = {n: [i.backend, list(i.params)] for n, i in w.jit_kernels().items()}
        own = w.compile_keys("_topk_topp", None)
        vllm_keys = topk._topk_topp.get_warmup_keys(vllm_config=config(4))
        out["own"] = [len(own.keys), own.cases, own.declared]
        out["same"] = {k.key for k in own.keys} == {key_digest(k) for k in vllm_keys}
        out["vllm"] = len(vllm_keys)
        one = w.compile_keys("_topk_topp", KeyDomain(params=(("batch_size", (1,)),)))
        vllm_one = topk._topk_topp.get_warmup_keys(vllm_config=config(1))
        out["narrowed"] = len(one.keys)
        out["narrowed_same"] = {k.key for k in one.keys} == {key_digest(k) for k in vllm_one}
        bad = w.compile_keys("_topk_topp", KeyDomain(where=("num_sm == 132 and mask_value < 0",)))
        out["where"] = len(bad.keys)
        first = w.compile(own.keys[:1])
        out["compiled"] = [r.outcome for r in first + w.compile(own.keys[:1])]
    json.dump(out, sys.stdout)
    """
)


def test_real_topk_topp_kernel(tmp_path: Path) -> None:
    """vLLM's real ``_topk_topp`` sampler kernel (AST-traced cases over the config's
    batch sizes, ``logits_stride`` and top-k/top-p ``mode``): keys equal vLLM's; the
    plan's ``batch_size: [1]`` gives exactly the keys of a config whose batch is 1;
    one key compiles to a real sm90 kernel, then is present."""
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "TRITON_CACHE_DIR": str(tmp_path / "triton-cache"),
        "PYTHONPATH": str(ROOT),
    }
    proc = subprocess.run(
        [sys.executable, "-c", REAL_TOPK],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["kernels"] == {
        "_topk_topp": ["vllm:triton", ["mode", "logits_stride", "batch_size"]]
    }
    assert out["same"] and out["own"][0] == out["vllm"] == 12
    assert out["own"][1:] == [3 * 2 * 4, 3 * 2 * 4]
    assert out["narrowed_same"] and out["narrowed"] == 6
    assert out["where"] == 12
    assert out["compiled"] == ["compiled", "present"]


def test_worker_without_vllm_kernels_is_still_a_keyed_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.vllm_real.recording import install_single_rank_groups, make_worker
    from warmplan.workers.vllm import VllmWorker

    install_single_rank_groups(monkeypatch)

    worker, _ = make_worker()
    worker.model_runner.jit_warmup_registry = SimpleNamespace()
    w = VllmWorker(worker)
    assert isinstance(w, KeyedWorker)
    assert w.jit_kernels() == {}
