"""Each batch shape over the paged cache against the plain-torch reference."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from warmplan.workers.builtin import BuiltinWorker
from warmplan.workers.builtin.model import Decoder
from warmplan.workers.builtin.runner import ModelRunner, Request

Reference = Callable[[Decoder, list[int]], torch.Tensor]
Tiny = Callable[..., dict[str, Any]]

SEQ_A = [(5 * i + 1) % 128 for i in range(60)]
SEQ_B = [(11 * i + 7) % 128 for i in range(40)]


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    scale = want.abs().max().item()
    err = (got.double() - want).abs().max().item()
    assert err <= rtol * scale, f"max abs error {err:.3g} > {rtol} * {scale:.3g}"


def _scenario(runner: ModelRunner, rtol: float, reference_logits: Reference) -> None:
    """Prefill, second chunk, mixed, uniform decode: every step against the reference."""
    model = runner.model
    ref_a, ref_b = reference_logits(model, SEQ_A), reference_logits(model, SEQ_B)
    blocks_a = tuple(reversed(runner.pool.allocate(len(SEQ_A))))
    blocks_b = tuple(runner.pool.allocate(len(SEQ_B)))
    try:
        # single prefill, no context
        out = runner.step([Request(24, 0, blocks_a, token_ids=tuple(SEQ_A[:24]))])
        _close(out, ref_a[:24], rtol)
        # second chunk: prior context already in the cache
        out = runner.step([Request(20, 24, blocks_a, token_ids=tuple(SEQ_A[24:44]))])
        assert runner.last.has_prior_context is True
        _close(out, ref_a[24:44], rtol)
        # mixed: one decode plus one prefill
        out = runner.step(
            [
                Request(1, 44, blocks_a, decode=True, token_ids=(SEQ_A[44],)),
                Request(30, 0, blocks_b, token_ids=tuple(SEQ_B[:30])),
            ]
        )
        _close(out[:1], ref_a[44:45], rtol)
        _close(out[1:], ref_b[:30], rtol)
        # uniform decode
        out = runner.step(
            [
                Request(1, 45, blocks_a, decode=True, token_ids=(SEQ_A[45],)),
                Request(1, 30, blocks_b, decode=True, token_ids=(SEQ_B[30],)),
            ]
        )
        _close(out[:1], ref_a[45:46], rtol)
        _close(out[1:], ref_b[30:31], rtol)
        # plain: one prefill of the whole sequence
        out = runner.step([Request(40, 0, blocks_b, token_ids=tuple(SEQ_B))])
        _close(out, ref_b, rtol)
    finally:
        runner.pool.free(list(blocks_a))
        runner.pool.free(list(blocks_b))


def test_float32_shapes_match_reference(eager_worker: BuiltinWorker, reference: Reference) -> None:
    """float32, eager: every shape within 1e-4 relative of the reference."""
    _scenario(eager_worker.runner, 1e-4, reference)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("preset", ["dense", "sparse-mla"])
def test_half_shapes_match_reference(
    tiny: Tiny, reference: Reference, preset: str, dtype: str
) -> None:
    """bf16/fp16, eager: every shape within 2e-2 relative of the float64 reference."""
    # Two indexer heads and a topk larger than these contexts: half-precision scores
    # make a borderline top-k pick differ from the float64 one, which no tolerance covers.
    worker = BuiltinWorker(tiny(preset, dtype=dtype, index_topk=64), compile=False)
    _scenario(worker.runner, 2e-2, reference)


def test_sparse_selection_is_exercised(tiny: Callable[..., dict[str, Any]]) -> None:
    """The float32 sparse config keeps fewer tokens than the contexts hold."""
    cfg = tiny("sparse-mla")
    assert cfg["index_topk"] < len(SEQ_B)


def test_compiled_matches_eager(compiled_dense: BuiltinWorker, reference: Reference) -> None:
    """The compiled static and dynamic graphs compute what the eager path does."""
    _scenario(compiled_dense.runner, 1e-4, reference)


def test_compiled_sparse_matches_reference(tiny: Tiny, reference: Reference) -> None:
    """One compiled sparse-MLA engine through every shape."""
    worker = BuiltinWorker(tiny("sparse-mla", compile_sizes=[32, 64]))
    _scenario(worker.runner, 1e-4, reference)
    assert worker.runner.last.graph == "static"
