"""Slot mapping, chunk metadata, compile sizes, state restore, limits and facts."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch

from warmplan.workers.base import Batch, PrefillChunk, ServingWorker, Worker
from warmplan.workers.builtin import (
    CONFIG_FIELDS,
    DENSE_BACKEND,
    SPARSE_MLA_BACKEND,
    BuiltinWorker,
    EngineConfig,
    build_worker,
    config_json_schema,
)
from warmplan.workers.builtin.kernels import Kernels, chunk_metadata_torch, size_class
from warmplan.workers.builtin.runner import DECODE_CONTEXT
from warmplan.world import LocalWorld


def test_slot_mapping_matches_formula(eager_worker: BuiltinWorker) -> None:
    """slot = block_table[req, pos // bs] * bs + pos % bs for one request."""
    runner = eager_worker.runner
    slots = runner.slot_mapping(37).clone()
    row = runner.buffers["block_tables"][0]
    bs = runner.config.block_size
    want = torch.tensor([int(row[p // bs]) * bs + p % bs for p in range(37)])
    assert torch.equal(slots, want)


@pytest.mark.parametrize("n", [1, 15, 16, 17, 32, 64])
def test_compiled_slot_mapping_classes(compiled_dense: BuiltinWorker, n: int) -> None:
    """The compiled slot mapping of every Triton size class equals the eager one."""
    runner = compiled_dense.runner
    bt = torch.randint(1, 90, (9, 40))
    req = torch.randint(0, 8, (n,))
    pos = torch.randint(0, 160, (n,))
    out = torch.zeros(64, dtype=torch.int64)
    runner.kernels.slot_mapping(bt, req, pos, out, 4)
    assert torch.equal(out[:n], bt[req, pos // 4] * 4 + pos % 4)


def test_size_classes() -> None:
    """Triton's int specialisation classes: ==1, %16==0, other."""
    assert [size_class(n) for n in (1, 2, 16, 17, 32)] == [
        "one",
        "other",
        "div16",
        "other",
        "div16",
    ]


@pytest.mark.parametrize("compiled", [False, True])
def test_chunk_metadata_variants(compiled: bool) -> None:
    """HAS_PRIOR_CONTEXT picks the variant; both agree with the plain formula, after 2 decodes."""
    kernels = Kernels(torch.device("cpu"), compiled=compiled)
    # Whole step buffers: 2 decode requests first, then 2 prefill chunks of 3 and 5 tokens.
    qsl = torch.tensor([0, 3, 8, 0, 0])
    kv_start = torch.tensor([0, 0, 10, 20, 0])
    outs = tuple(torch.full((12,), -1, dtype=torch.int64) for _ in range(4))
    assert (
        kernels.chunk_metadata(qsl, torch.tensor([9, 9, 0, 0, 0]), kv_start, 2, 8, 2, outs) is False
    )
    assert outs[0].tolist() == [-1, -1, 0, 1, 2, 0, 1, 2, 3, 4, -1, -1]
    assert outs[1].tolist() == [-1, -1, 2, 2, 2, 3, 3, 3, 3, 3, -1, -1]
    ctx = torch.tensor([9, 9, 4, 0, 0])
    assert kernels.chunk_metadata(qsl, ctx, kv_start, 2, 8, 2, outs) is True
    want = chunk_metadata_torch(qsl[:3], ctx[2:4], kv_start[2:4], 8, 2, True)
    for got, exp in zip(outs, want, strict=True):
        assert torch.equal(got[2:10], exp)
    assert outs[0].tolist()[2:10] == [4, 5, 6, 0, 1, 2, 3, 4]
    assert outs[3].tolist()[2:10] == [14, 15, 16, 20, 21, 22, 23, 24]


def test_second_chunk_uses_prior_context_variant(compiled_dense: BuiltinWorker) -> None:
    """A single_prefill with prior_context runs the HAS_PRIOR_CONTEXT variant."""
    compiled_dense.dummy_run("single_prefill", 16)
    assert compiled_dense.runner.last.has_prior_context is False
    compiled_dense.dummy_run("single_prefill", 16, prior_context=40)
    assert compiled_dense.runner.last.has_prior_context is True


def test_padding_to_compile_size(compiled_dense: BuiltinWorker) -> None:
    """5 tokens run the static graph of compile size 8."""
    compiled_dense.dummy_run("single_prefill", 5)
    last = compiled_dense.runner.last
    assert (last.num_tokens, last.padded, last.graph) == (5, 8, "static")


def test_batch_above_largest_size_is_dynamic(compiled_dense: BuiltinWorker) -> None:
    """40 tokens (> 32, the largest size) run unpadded through the dynamic graph."""
    compiled_dense.dummy_run("plain", 40)
    last = compiled_dense.runner.last
    assert (last.padded, last.graph) == (40, "dynamic")


def test_recompile_limit_raised(compiled_dense: BuiltinWorker) -> None:
    """dynamo's recompile limit covers every size times every attention impl."""
    cfg = torch._dynamo.config
    limit = getattr(cfg, "recompile_limit", None) or cfg.cache_size_limit
    assert limit >= 2 * len(compiled_dense.config.compile_sizes) + 8


@pytest.mark.parametrize(
    ("shape", "n", "prior", "specs"),
    [
        ("mixed", 16, 0, [(1, DECODE_CONTEXT, True)] * 7 + [(9, 0, False)]),
        ("mixed", 1, 0, [(1, 0, False)]),
        ("single_prefill", 10, 30, [(10, 30, False)]),
        ("uniform_decode", 50, 0, [(1, DECODE_CONTEXT, True)] * 8),
        ("plain", 12, 99, [(12, 0, False)]),
    ],
)
def test_dummy_specs(
    eager_worker: BuiltinWorker, shape: str, n: int, prior: int, specs: list[Any]
) -> None:
    """Dummy shapes become the documented synthetic batches (decodes clamped to max_num_seqs)."""
    assert eager_worker.runner.dummy_specs(shape, n, prior) == specs


def test_pool_too_small_is_a_clear_error(tiny: Callable[..., dict[str, Any]]) -> None:
    """A request the pool cannot hold raises ValueError naming num_blocks."""
    worker = BuiltinWorker(tiny("dense", num_blocks=8), compile=False)
    with pytest.raises(ValueError, match='raise "num_blocks"'):
        worker.dummy_run("single_prefill", 16, prior_context=64)
    assert worker.runner.pool.num_free == 7


def _state(worker: BuiltinWorker) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in worker.runner.state_tensors().items()}


def test_preserve_state_restores_every_buffer(eager_worker: BuiltinWorker) -> None:
    """Buffers, caches and the block pool are bit-identical after dummy runs."""
    eager_worker.dummy_run("mixed", 20)
    before, pool = _state(eager_worker), eager_worker.runner.pool.snapshot()
    with eager_worker.preserve_state():
        eager_worker.dummy_run("single_prefill", 30, prior_context=20)
        eager_worker.slot_mapping(50)
        changed = [
            k
            for k, v in eager_worker.runner.state_tensors().items()
            if not torch.equal(v, before[k])
        ]
        assert "kv_slots" in changed
        assert any("cache" in k for k in changed)
    after = _state(eager_worker)
    assert set(after) == set(before)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    assert eager_worker.runner.pool.snapshot() == pool


def test_preserve_state_restores_on_exception(
    eager_worker: BuiltinWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step that raises midway (after the KV write) still leaves every buffer restored."""
    before = _state(eager_worker)
    layer = eager_worker.runner.model.layers[1]

    def boom(*args: Any) -> torch.Tensor:
        raise RuntimeError("injected")

    # Layer 0 has written its KV cache when layer 1 raises.
    monkeypatch.setattr(layer, "forward", boom)
    with pytest.raises(RuntimeError, match="injected"), eager_worker.preserve_state():
        eager_worker.dummy_run("mixed", 16)
    for name, tensor in _state(eager_worker).items():
        assert torch.equal(tensor, before[name]), name


def test_execute_runs_real_batches(eager_worker: BuiltinWorker) -> None:
    """execute() takes decodes plus prefill chunks through the serving path."""
    eager_worker.execute(Batch(decode=3, prefill=(PrefillChunk(10, 0), PrefillChunk(5, 20))))
    last = eager_worker.runner.last
    assert (last.num_tokens, last.has_prior_context) == (18, True)
    assert isinstance(eager_worker, ServingWorker)


def test_limits_facts_describe(eager_worker: BuiltinWorker) -> None:
    """limits come from the config; facts and describe report the engine."""
    cfg = eager_worker.config
    assert isinstance(eager_worker, Worker)
    assert eager_worker.limits.as_dict() == {
        "max_num_tokens": cfg.max_num_tokens,
        "max_num_batched_tokens": cfg.max_num_batched_tokens,
        "max_num_seqs": cfg.max_num_seqs,
    }
    facts = eager_worker.facts
    want = DENSE_BACKEND if cfg.preset == "dense" else SPARSE_MLA_BACKEND
    assert facts.platform == "cpu"
    assert facts.device_capability is None
    assert facts.attention_backends == (want,)
    assert (facts.pooling, dict(facts.flags)) == (False, {})
    assert dict(facts.env) == dict(os.environ)
    info = eager_worker.describe()
    assert (info.engine, info.device) == ("builtin", "cpu")
    assert info.versions["torch"] == torch.__version__
    assert info.model["preset"] == cfg.preset
    assert isinstance(eager_worker.world, LocalWorld)
    fp = eager_worker.config_fingerprint()
    assert "seed" not in fp
    assert "device" not in fp
    assert fp["dtype"] == "float32"


def test_config_rejects_unknown_keys() -> None:
    """An unknown key names itself and lists the valid ones."""
    with pytest.raises(
        ValueError,
        match=r"unknown builtin config key\(s\) 'hiden_size'; expected one of preset, num_layers",
    ):
        EngineConfig.from_mapping({"hiden_size": 64})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"preset": "moe"}, '"preset" must be one of dense, sparse-mla'),
        ({"num_layers": 0}, '"num_layers" must be >= 1: 0'),
        ({"num_heads": 3}, '"num_heads" \\(3\\) must be a multiple'),
        ({"compile_sizes": [0]}, '"compile_sizes" must be integers from 1 to 16777216'),
        ({"dtype": "int8"}, '"dtype" must be one of'),
    ],
)
def test_config_rejects_bad_values(data: dict[str, Any], message: str) -> None:
    """Bad values name the key and repeat the value."""
    with pytest.raises(ValueError, match=message):
        EngineConfig.from_mapping(data)


def test_config_schema_matches_fields() -> None:
    """The JSON Schema lists exactly the dataclass fields, each described."""
    schema = config_json_schema()
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) == set(CONFIG_FIELDS) == set(EngineConfig.__dataclass_fields__)
    assert all(p["description"] for p in schema["properties"].values())


def test_build_worker_device_override(tiny: Callable[..., dict[str, Any]]) -> None:
    """build_worker's device argument overrides the mapping's."""
    data = tiny("dense")
    data.pop("device")
    assert build_worker(data, device="cpu").describe().device == "cpu"
