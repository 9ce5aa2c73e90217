"""Synthetic workloads: seeded, and every request fits the worker's max_model_len."""

from __future__ import annotations

import pytest

from warmplan.workload import WORKLOADS, Workload, dump_requests, synthetic_requests


@pytest.mark.parametrize("kind", WORKLOADS)
@pytest.mark.parametrize("max_model_len", [512, 4096])
def test_requests_fit_max_model_len(kind: Workload, max_model_len: int) -> None:
    """prompt + output <= max_model_len and 0 <= hit <= prompt, for many seeds."""
    for seed in range(10):
        for r in synthetic_requests(kind, 40, seed=seed, max_model_len=max_model_len):
            assert r.prompt_tokens + r.output_tokens <= max_model_len
            assert 0 <= r.cached_tokens <= r.prompt_tokens


def test_same_seed_same_requests() -> None:
    """The generator is seeded: the same seed gives the same trace, another seed another."""
    one = dump_requests(synthetic_requests("chat", 30, seed=5))
    assert one == dump_requests(synthetic_requests("chat", 30, seed=5))
    assert one != dump_requests(synthetic_requests("chat", 30, seed=6))


def test_unknown_workload_lists_the_known_ones() -> None:
    """A miss names what exists."""
    with pytest.raises(
        ValueError, match="unknown workload 'code'; expected one of chat, long-prompt"
    ):
        synthetic_requests("code", 3)  # type: ignore[arg-type]
