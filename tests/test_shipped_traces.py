"""The shipped request-level and 8192-budget traces fit the built-in engine at 512 once
scheduled (no engine runs here; docs/benchmarks.md has the replays)."""

from __future__ import annotations

import pytest

from tests._paths import TRACES
from warmplan.scheduler import SchedulerLimits, batch_blocks, replay_batches
from warmplan.trace import read_trace

# plans/dsv4.yaml and plans/dense-llm.yaml on the built-in engine (its default 256 blocks).
BUILTIN_512 = SchedulerLimits(
    max_num_batched_tokens=512, max_num_seqs=64, max_model_len=4096, kv_cache_blocks=255
)


@pytest.mark.parametrize("name", ["requests-chat", "requests-long-prompt"])
def test_request_traces_schedule_within_the_builtin_limits(name: str) -> None:
    """Every scheduled batch fits the budget, max_num_seqs and the engine's block pool."""
    trace = read_trace(TRACES / f"{name}.jsonl")
    assert trace.kind == "requests"
    replay = replay_batches(trace, BUILTIN_512)
    assert replay.stats is not None and replay.stats.requests == len(trace.requests)
    for entry in replay.entries:
        batch = entry.batch
        assert 0 < batch.num_tokens <= 512
        assert batch.decode + len(batch.prefill) <= 64
        assert batch_blocks(batch, BUILTIN_512) <= 255
        assert all(c.context + c.tokens <= 4096 for c in batch.prefill)


def test_request_traces_have_their_character() -> None:
    """chat: prefix-cache hits on most requests; long-prompt: prompts over 1,500 tokens."""
    chat = read_trace(TRACES / "requests-chat.jsonl").requests
    assert sum(1 for r in chat if r.cached_tokens) > len(chat) / 2
    long = read_trace(TRACES / "requests-long-prompt.jsonl").requests
    assert all(r.prompt_tokens >= 1500 for r in long)
    assert any(r.cached_tokens for r in long)


@pytest.mark.parametrize("name", ["recorded-8192-chat", "recorded-8192-long-prompt"])
def test_traces_recorded_at_8192_are_rechunked_to_fit_512(name: str) -> None:
    """Recorded by warmplan record at an 8192 budget; batches over 512 are re-chunked."""
    trace = read_trace(TRACES / f"{name}.jsonl")
    assert trace.kind == "batches" and trace.recorded
    assert trace.header["engine"] == "builtin"
    assert trace.header["limits"]["max_num_batched_tokens"] == 8192
    assert max(e.batch.num_tokens for e in trace.batches) > 512
    replay = replay_batches(trace, BUILTIN_512)
    assert replay.rechunked
    for entry in replay.entries:
        assert 0 < entry.batch.num_tokens <= 512
        assert entry.batch.decode + len(entry.batch.prefill) <= 64
        assert batch_blocks(entry.batch, BUILTIN_512) <= 255
