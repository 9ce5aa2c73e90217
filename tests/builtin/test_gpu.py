"""The Triton kernels and the compiled CUDA engine (skipped without a GPU)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from warmplan.workers.builtin import BuiltinWorker
from warmplan.workers.builtin.kernels import chunk_metadata_torch, slot_mapping_torch
from warmplan.workers.builtin.runner import Request

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def gpu_worker(tiny: Callable[..., dict[str, Any]]) -> BuiltinWorker:
    return BuiltinWorker(tiny("sparse-mla", device="cuda", dtype="float32"))


@pytest.mark.parametrize("n", [1, 7, 16, 17, 32, 300])
def test_triton_slot_mapping(gpu_worker: BuiltinWorker, n: int) -> None:
    """The autotuned Triton slot mapping equals the torch formula in every size class."""
    kernels = gpu_worker.runner.kernels
    assert kernels.use_triton
    bt = torch.randint(1, 90, (9, 40), device="cuda")
    req = torch.randint(0, 9, (n,), device="cuda")
    pos = torch.randint(0, 160, (n,), device="cuda")
    out = torch.zeros(512, dtype=torch.int64, device="cuda")
    kernels.slot_mapping(bt, req, pos, out, 4)
    assert torch.equal(out[:n], slot_mapping_torch(bt, req, pos, 4))


@pytest.mark.parametrize("ctx", [[0, 0], [4, 9]])
@pytest.mark.parametrize("req_offset", [0, 1, 3])
def test_triton_chunk_metadata(gpu_worker: BuiltinWorker, ctx: list[int], req_offset: int) -> None:
    """Both HAS_PRIOR_CONTEXT variants equal the torch version, after any number of decodes."""
    qsl = torch.tensor([0, 3, 300, 0, 0], device="cuda")
    c = torch.tensor([7] * req_offset + ctx + [5, 5], device="cuda")
    kv = torch.tensor([1] * req_offset + [10, 20] + [0, 0], device="cuda")
    outs = tuple(torch.full((400,), -1, dtype=torch.int64, device="cuda") for _ in range(4))
    kernels = gpu_worker.runner.kernels
    assert kernels.chunk_metadata(qsl, c, kv, 2, 300, req_offset, outs) is any(ctx)
    want = chunk_metadata_torch(
        qsl[:3],
        c[req_offset : req_offset + 2],
        kv[req_offset : req_offset + 2],
        300,
        req_offset,
        any(ctx),
    )
    for got, expected in zip(outs, want, strict=True):
        assert torch.equal(got[req_offset : req_offset + 300], expected)
        assert bool((got[:req_offset] == -1).all()) and bool((got[req_offset + 300 :] == -1).all())


def test_cuda_engine_matches_reference(
    gpu_worker: BuiltinWorker, reference: Callable[..., torch.Tensor]
) -> None:
    """Compiled (inductor/Triton) sparse-MLA prefill + second chunk + decode vs the reference."""
    runner = gpu_worker.runner
    seq = [(5 * i + 1) % 128 for i in range(50)]
    blocks = tuple(runner.pool.allocate(len(seq)))
    outs = [
        runner.step([Request(30, 0, blocks, token_ids=tuple(seq[:30]))]),
        runner.step([Request(19, 30, blocks, token_ids=tuple(seq[30:49]))]),
        runner.step([Request(1, 49, blocks, decode=True, token_ids=(seq[49],))]),
    ]
    got = torch.cat(outs).cpu().double()
    runner.pool.free(list(blocks))
    cpu = BuiltinWorker(dict(gpu_worker.config.as_dict(), device="cpu"), compile=False)
    ref = reference(cpu.runner.model, seq)
    err = (got - ref).abs().max().item()
    assert err <= 1e-3 * ref.abs().max().item()


def test_triton_autotune_round_trip(gpu_worker: BuiltinWorker) -> None:
    """The triton backend exports the tuned slot-mapping configs and loads them back."""
    backend = gpu_worker.autotune_backend("triton")
    assert backend is not None
    assert backend.unavailable_reason() is None
    for n in (1, 17, 64):
        gpu_worker.slot_mapping(n)
    payload = backend.export()
    assert payload
    backend.load(payload)
    assert backend.export() == payload
    gpu_worker.dummy_run("mixed", 16)
    builtin = gpu_worker.autotune_backend("builtin")
    assert builtin is not None
    with builtin.tuning():
        gpu_worker.dummy_run("plain", 32)
    assert builtin.export()
