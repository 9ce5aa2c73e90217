"""Reliability: the built-in engine refuses, before any work, a config that cannot
hold the plan's batches or does not fit in memory, naming the field to change."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests._paths import PLANS
from warmplan.executor import resolve_for
from warmplan.plan import load_plan, parse_plan
from warmplan.workers.builtin import EngineConfig, build_worker
from warmplan.workers.builtin import worker as worker_module
from warmplan.workers.builtin.config import check_batch, check_memory


def test_issue_16_kv_pool_too_small_for_the_second_chunk(tmp_path: Path) -> None:
    """dense-llm raised to 2048 tokens (issue 16) fails before any step, naming
    the step and "num_blocks", instead of after a minute of compiling."""
    plan = load_plan(PLANS / "dense-llm.yaml")
    config = {
        **plan.builtin,
        "max_num_tokens": 2048,
        "max_num_batched_tokens": 2048,
        "num_layers": 1,
        "device": "cpu",
    }
    worker = build_worker(config)
    resolved = resolve_for(plan, worker, str(tmp_path))
    started = time.perf_counter()
    with pytest.raises(ValueError, match="num_blocks") as info:
        worker.check_fits(resolved.steps)
    assert time.perf_counter() - started < 1.0
    assert str(info.value) == (
        "step 'second-chunk' (single_prefill of 2048 tokens after 2048 cached) needs 256 KV "
        'cache blocks of 16 (2048 new + 2048 cached tokens), the pool holds 255; raise "num_blocks" to at least 257'
    )


def test_prior_context_beyond_max_model_len_fails_before_work(tmp_path: Path) -> None:
    """A prior context the engine cannot hold (probe M7) names "max_model_len"."""
    plan = parse_plan(
        "version: 1\nname: t\nsteps:\n"
        "  - {id: long, kind: dummy_run, shape: single_prefill, tokens: 8, prior_context: 4096}\n"
    )
    worker = build_worker({"num_layers": 1, "device": "cpu", "max_model_len": 1024})
    with pytest.raises(ValueError, match="max_model_len") as info:
        worker.check_fits(resolve_for(plan, worker, str(tmp_path)).steps)
    assert str(info.value) == (
        "step 'long' (single_prefill of 8 tokens after 4096 cached) needs a sequence of 4104 tokens, "
        'longer than "max_model_len" (1024); raise "max_model_len" to at least 4104'
    )


def test_slot_mapping_beyond_the_pool_fails_before_work(tmp_path: Path) -> None:
    """A slot-mapping count needing more blocks than the pool names "num_blocks"."""
    plan = parse_plan(
        "version: 1\nname: t\nsteps:\n  - {id: s, kind: slot_mapping, tokens: [512]}\n"
    )
    worker = build_worker({"num_layers": 1, "device": "cpu", "num_blocks": 8})
    with pytest.raises(ValueError, match="num_blocks") as info:
        worker.check_fits(resolve_for(plan, worker, str(tmp_path)).steps)
    assert str(info.value) == (
        "step 's' (slot mapping of 512 tokens) needs 32 KV cache blocks of 16 (512 new + 0 cached "
        'tokens), the pool holds 7; raise "num_blocks" to at least 33'
    )


def test_shipped_plans_fit_their_engines(tmp_path: Path) -> None:
    """Every shipped plan with a builtin block fits the engine it describes."""
    for path in sorted(PLANS.glob("*.yaml")):
        plan = load_plan(path)
        if not plan.builtin:
            continue
        worker = build_worker({**plan.builtin, "num_layers": 1, "device": "cpu"})
        worker.check_fits(resolve_for(plan, worker, str(tmp_path)).steps)


def test_batch_over_max_num_tokens() -> None:
    """A batch above max_num_tokens (a clamp to max_num_seqs, say) names the field."""
    config = EngineConfig(max_num_tokens=64, max_num_batched_tokens=64)
    with pytest.raises(ValueError, match="max_num_tokens") as info:
        check_batch(config, "step 'x'", [(100, 0, False)])
    assert str(info.value) == (
        'step \'x\' runs 100 tokens in one batch, more than "max_num_tokens" (64); raise "max_num_tokens" to at least 100'
    )


def test_memory_estimate_names_the_largest_part() -> None:
    """A config far beyond memory is refused before allocating (probe D12)."""
    config = EngineConfig(vocab_size=1 << 20, hidden_size=1 << 16)
    with pytest.raises(ValueError, match="vocab_size") as info:
        check_memory(config, dtype_bytes=4, available=64 * 10**9, where="cpu")
    assert str(info.value) == (
        "the engine would need about 553.1 GB, more than the 64.0 GB available on cpu; the largest "
        'part is "vocab_size" x "hidden_size" (embedding and output weights): 549.8 GB; lower "vocab_size"'
    )


def test_worker_refuses_before_allocating(monkeypatch: pytest.MonkeyPatch) -> None:
    """build_worker raises the estimate's ValueError at once, allocating nothing."""
    monkeypatch.setattr(worker_module, "_host_available", lambda: 64 * 10**9)
    started = time.perf_counter()
    with pytest.raises(ValueError, match="vocab_size") as info:
        build_worker(
            {"vocab_size": 1 << 20, "hidden_size": 1 << 16, "num_layers": 1, "device": "cpu"}
        )
    assert time.perf_counter() - started < 1.0
    assert str(info.value) == (
        "the engine would need about 552.8 GB, more than the 64.0 GB available on cpu; the largest "
        'part is "vocab_size" x "hidden_size" (embedding and output weights): 549.8 GB; lower "vocab_size"'
    )


def test_config_maxima_are_enforced_outside_the_schema() -> None:
    """EngineConfig itself refuses values above the schema's bounds (--model-config paths)."""
    with pytest.raises(ValueError, match="vocab_size") as info:
        EngineConfig(vocab_size=99999999999999)
    assert str(info.value) == '"vocab_size" must be <= 1048576: 99999999999999'
