"""FlashInfer's mm_bf16 inside the engine, and its autotune end to end (GPU + flashinfer)."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from warmplan.executor import run_plan
from warmplan.plan import parse_plan
from warmplan.workers.builtin import BuiltinWorker

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("flashinfer") is None, reason="needs flashinfer"),
]

PLAN = """version: 1
name: fi
steps:
  - id: tune
    kind: autotune
    backend: flashinfer
    run: {shape: plain, tokens: 64}
    cache: {policy: leader}
"""


def test_flashinfer_gemm_matches_torch(tiny: Callable[..., dict[str, Any]]) -> None:
    """The MLP through FlashInfer's cuBLASLt GEMM computes what the torch GEMM computes."""
    cfg = tiny("dense", device="cuda", dtype="bfloat16")
    fi = BuiltinWorker({**cfg, "gemm_backend": "flashinfer"}, compile=False)
    pt = BuiltinWorker({**cfg, "gemm_backend": "torch"}, compile=False)
    assert fi.runner.flashinfer_gemm and not pt.runner.flashinfer_gemm
    x = torch.randn(48, cfg["hidden_size"], device="cuda", dtype=torch.bfloat16)
    a = fi.runner.model.layers[0].mlp(x).float()
    b = pt.runner.model.layers[0].mlp(x).float()
    assert torch.allclose(a, b, rtol=2e-2, atol=2e-2)


def test_flashinfer_autotune_tunes_then_loads(
    tiny: Callable[..., dict[str, Any]], tmp_path: Path
) -> None:
    """A plan's flashinfer autotune step tunes the engine's mm_bf16 once, then a second run loads it."""
    cfg = {**tiny("dense", device="cuda", dtype="bfloat16"), "gemm_backend": "flashinfer"}
    plan = parse_plan(PLAN)
    first = run_plan(plan, BuiltinWorker(cfg), cache_root=str(tmp_path))
    tuned = first.step("tune").autotune
    assert tuned is not None and tuned["decision"] == "tune", tuned
    path = Path(tuned["cache_path"])
    assert path.is_file() and json.loads(path.read_text())
    second = run_plan(plan, BuiltinWorker(cfg), cache_root=str(tmp_path))
    loaded = second.step("tune").autotune
    assert loaded is not None and loaded["decision"] == "load", loaded
    assert loaded["fingerprint"] == tuned["fingerprint"]
