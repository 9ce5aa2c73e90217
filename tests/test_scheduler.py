"""The scheduler model: requests into batches, batches over the limits re-chunked."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from warmplan.errors import UserError
from warmplan.scheduler import (
    Rechunk,
    SchedulerLimits,
    batch_blocks,
    rechunk,
    rechunk_entries,
    replay_batches,
    schedule,
)
from warmplan.testing import RecordingWorker
from warmplan.trace import TraceEntry, TraceRequest, read_trace
from warmplan.workers.base import Batch, PrefillChunk

LIMITS = SchedulerLimits(max_num_batched_tokens=512, max_num_seqs=4, max_model_len=4096)


def _req(line: int, prompt: int, output: int, *, cached: int = 0, step: int = 0) -> TraceRequest:
    return TraceRequest(
        line=line,
        id=f"r{line}",
        prompt_tokens=prompt,
        output_tokens=output,
        cached_tokens=cached,
        arrival_step=step,
    )


def _batches(entries: list[TraceEntry]) -> list[Batch]:
    return [e.batch for e in entries]


def _chunk(tokens: int, context: int = 0) -> PrefillChunk:
    return PrefillChunk(tokens=tokens, context=context)


def test_long_prompt_is_prefilled_in_chunks_after_prior_context() -> None:
    """A prompt over the budget: full chunks, then the rest, each after what is cached."""
    entries, stats = schedule([_req(1, 1200, 3)], LIMITS)
    assert _batches(entries) == [
        Batch(prefill=(_chunk(512),)),
        Batch(prefill=(_chunk(512, 512),)),
        Batch(prefill=(_chunk(176, 1024),)),
        Batch(decode=1),
        Batch(decode=1),
    ]
    assert (stats.batches, stats.prefill_chunks, stats.decode_tokens) == (5, 3, 2)


def test_prefix_cache_hit_skips_the_cached_prompt() -> None:
    """A request starts after its hit; a fully cached prompt still computes its last token."""
    entries, _ = schedule([_req(1, 700, 1, cached=640), _req(2, 64, 1, cached=64, step=5)], LIMITS)
    assert _batches(entries) == [Batch(prefill=(_chunk(60, 640),)), Batch(decode=1)]


def test_running_requests_decode_first_then_waiting_ones_take_the_rest() -> None:
    """Running requests come first; a new prompt gets what budget is left."""
    entries, _ = schedule([_req(1, 100, 3), _req(2, 600, 2, step=1)], LIMITS)
    assert _batches(entries) == [
        Batch(prefill=(_chunk(100),)),
        Batch(decode=1, prefill=(_chunk(511),)),
        Batch(decode=1, prefill=(_chunk(89, 511),)),
        Batch(decode=1),
    ]
    assert entries[1].lines == (1, 2)


def test_max_num_seqs_bounds_the_running_requests() -> None:
    """With max_num_seqs 4, the fifth request waits for one to finish."""
    entries, _ = schedule([_req(n, 10, 3 if n == 1 else 5) for n in range(1, 6)], LIMITS)
    assert entries[0].batch == Batch(prefill=(_chunk(10),) * 4)
    assert all(e.batch.decode + len(e.batch.prefill) <= 4 for e in entries)
    assert entries[3].batch == Batch(decode=3, prefill=(_chunk(10),))  # r1 left after step 2
    assert entries[3].lines == (2, 3, 4, 5)


def test_finished_requests_leave() -> None:
    """One output token: the prefill samples it and the request is done."""
    entries, stats = schedule([_req(1, 40, 1), _req(2, 40, 1, step=3)], LIMITS)
    assert _batches(entries) == [Batch(prefill=(_chunk(40),))] * 2
    assert stats.idle_steps == 2


def test_arrival_seconds_are_placed_on_steps() -> None:
    """arrival_s over the step time gives the step; idle steps before it are skipped."""
    reqs = [
        TraceRequest(line=1, id="a", prompt_tokens=8, output_tokens=2, arrival_s=0.0),
        TraceRequest(line=2, id="b", prompt_tokens=8, output_tokens=1, arrival_s=0.1),
    ]
    entries, stats = schedule(reqs, LIMITS, step_s=0.025)
    assert _batches(entries) == [
        Batch(prefill=(_chunk(8),)),
        Batch(decode=1),
        Batch(prefill=(_chunk(8),)),
    ]
    assert stats.idle_steps == 2


def test_a_full_kv_cache_preempts_the_latest_request() -> None:
    """When a running request cannot grow, the last admitted one is preempted and recomputed."""
    small = SchedulerLimits(
        max_num_batched_tokens=64, max_num_seqs=4, max_model_len=256, kv_cache_blocks=6
    )
    entries, stats = schedule([_req(1, 40, 40), _req(2, 40, 40)], small)
    assert stats.preemptions == 1
    batches = _batches(entries)
    assert batches[:3] == [
        Batch(prefill=(_chunk(40), _chunk(24))),
        Batch(decode=1, prefill=(_chunk(16, 24),)),
        Batch(decode=2),
    ]
    # r1 reaches 49 tokens at step 9: its 4th block preempts r2 (3 blocks, 8 outputs),
    # which comes back after r1 has finished and recomputes its 40 + 8 tokens.
    assert batches[9] == Batch(decode=1) and entries[9].lines == (1,)
    assert batches[40] == Batch(prefill=(_chunk(48),)) and entries[40].lines == (2,)
    assert len(batches) == 72


def test_a_request_past_max_model_len_is_an_error_naming_its_line() -> None:
    """prompt + output over max_model_len is a UserError at the request's line."""
    with pytest.raises(UserError) as caught:
        schedule([_req(1, 10, 2), _req(7, 4000, 200)], LIMITS, path="t.jsonl")
    assert str(caught.value) == (
        "t.jsonl:7: request 'r7' needs 4200 tokens of context (4000 prompt + 200 output); "
        "the worker's max_model_len is 4096"
    )


def test_a_request_larger_than_the_kv_cache_is_an_error() -> None:
    """A request that could never fit the KV cache alone is a UserError, not a livelock."""
    small = SchedulerLimits(max_num_batched_tokens=64, max_num_seqs=4, kv_cache_blocks=4)
    with pytest.raises(UserError) as caught:
        schedule([_req(3, 60, 10)], small, path="t.jsonl")
    assert str(caught.value) == (
        "t.jsonl:3: request 'r3' needs 5 KV blocks of 16 tokens (69 tokens); "
        "the worker's KV cache holds 4"
    )


_requests = st.lists(
    st.builds(
        lambda prompt, output, hit, step: (prompt, output, min(hit, prompt), step),
        st.integers(1, 1500),
        st.integers(1, 40),
        st.integers(0, 1500),
        st.integers(0, 30),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(_requests, st.sampled_from([None, 200]))
def test_every_request_is_served_within_the_limits(
    raw: list[tuple[int, int, int, int]], kv: int | None
) -> None:
    """Every batch fits the budget, max_num_seqs and the KV cache; every request finishes;
    without preemption each computes its prompt past the hit and decodes output - 1."""
    limits = SchedulerLimits(
        max_num_batched_tokens=256, max_num_seqs=5, max_model_len=4096, kv_cache_blocks=kv
    )
    reqs = [_req(n + 1, p, o, cached=h, step=s) for n, (p, o, h, s) in enumerate(raw)]
    entries, stats = schedule(reqs, limits)
    for e in entries:
        assert 0 < e.batch.num_tokens <= 256
        assert e.batch.decode + len(e.batch.prefill) <= 5
    if stats.preemptions == 0:
        computed = sum(e.batch.num_tokens for e in entries)
        expected = sum(
            r.prompt_tokens - min(r.cached_tokens, r.prompt_tokens - 1) + r.output_tokens - 1
            for r in reqs
        )
        assert computed == expected
    assert kv is not None or stats.preemptions == 0


# -- batch-level traces -------------------------------------------------------------


def test_rechunk_splits_over_the_budget_and_continues_the_chunk() -> None:
    """Decodes first, then chunks; a cut chunk continues after its computed part."""
    limits = SchedulerLimits(max_num_batched_tokens=512, max_num_seqs=64)
    assert rechunk(Batch(decode=7, prefill=(_chunk(906), _chunk(30, 100))), limits) == [
        Batch(decode=7, prefill=(_chunk(505),)),
        Batch(prefill=(_chunk(401, 505), _chunk(30, 100))),
    ]


def test_rechunk_splits_over_max_num_seqs() -> None:
    """100 decodes under max_num_seqs 64: 64, then 36 with the chunk."""
    limits = SchedulerLimits(max_num_batched_tokens=512, max_num_seqs=64)
    assert rechunk(Batch(decode=100, prefill=(_chunk(20),)), limits) == [
        Batch(decode=64),
        Batch(decode=36, prefill=(_chunk(20),)),
    ]


def test_rechunk_keeps_each_batch_within_the_kv_cache() -> None:
    """Chunks with long contexts are spread so each batch's blocks fit the cache."""
    limits = SchedulerLimits(max_num_batched_tokens=512, max_num_seqs=64, kv_cache_blocks=255)
    batch = Batch(decode=4, prefill=(_chunk(100, 2900), _chunk(100, 2900)))
    parts = rechunk(batch, limits)
    assert parts == [
        Batch(decode=4, prefill=(_chunk(100, 2900),)),
        Batch(prefill=(_chunk(100, 2900),)),
    ]
    assert all(batch_blocks(p, limits) <= 255 for p in parts)


def test_rechunk_entries_reports_what_it_changed() -> None:
    """Batches within the limits stay; the others are listed with what they became."""
    limits = SchedulerLimits(max_num_batched_tokens=512, max_num_seqs=64)
    entries = [
        TraceEntry(line=2, batch=Batch(decode=3)),
        TraceEntry(line=5, batch=Batch(decode=7, prefill=(_chunk(906),))),
    ]
    out, changes = rechunk_entries(entries, limits, path="t.jsonl")
    assert [(e.line, e.batch.num_tokens) for e in out] == [(2, 3), (5, 512), (5, 401)]
    assert changes == [
        Rechunk(
            line=5,
            batch=entries[1].batch,
            into=(Batch(decode=7, prefill=(_chunk(505),)), Batch(prefill=(_chunk(401, 505),))),
            reason="tokens",
        )
    ]
    assert changes[0].describe() == (
        "line 5: 913 tokens (7 decodes + 1 chunk) -> 512 + 401 (over the budget)"
    )


def test_chunk_past_max_model_len_is_an_error_naming_its_line_and_field() -> None:
    """A chunk reaching past max_model_len is a UserError at file:line, naming the chunk."""
    limits = SchedulerLimits(max_num_batched_tokens=512, max_num_seqs=64, max_model_len=4096)
    entries = [TraceEntry(line=9, batch=Batch(prefill=(_chunk(10), _chunk(200, 4000))))]
    with pytest.raises(UserError) as caught:
        rechunk_entries(entries, limits, path="t.jsonl")
    assert str(caught.value) == (
        "t.jsonl:9: field 'prefill[1]': a chunk of 200 tokens after 4000 cached reaches "
        "4200 tokens of context; the worker's max_model_len is 4096"
    )


def test_replay_describes_scheduling_and_rechunking(tmp_path: Path) -> None:
    """The lines verify prints: how many batches were re-chunked and into what."""
    path = tmp_path / "t.jsonl"
    path.write_text('{"decode": 2}\n{"prefill": [{"tokens": 1000}]}\n', encoding="utf-8")
    limits = SchedulerLimits(max_num_batched_tokens=512, max_num_seqs=64)
    assert replay_batches(read_trace(path), limits).describe() == [
        "re-chunked 1 of 2 batches into 2 under max_num_batched_tokens 512, max_num_seqs 64:",
        "  line 2: 1000 tokens (1 chunk) -> 512 + 488 (over the budget)",
    ]
    path.write_text('{"prompt_tokens": 600, "output_tokens": 2}\n', encoding="utf-8")
    assert replay_batches(read_trace(path), limits).describe() == [
        "scheduled 1 requests into 3 batches under max_num_batched_tokens 512, max_num_seqs 64 "
        "(2 prefill chunks, 1 decodes, 0 preemptions, 0 idle steps skipped)"
    ]


def test_limits_of_a_worker_read_its_config() -> None:
    """limits from Worker.limits; max_model_len and the KV cache from its config."""
    worker = RecordingWorker(max_num_tokens=512, max_num_batched_tokens=512, max_num_seqs=64)
    assert SchedulerLimits.of_worker(worker) == SchedulerLimits(
        max_num_batched_tokens=512, max_num_seqs=64
    )
    worker.config = type("C", (), {"max_model_len": 4096, "num_blocks": 256, "block_size": 16})()  # type: ignore[attr-defined]
    limits = SchedulerLimits.of_worker(worker)
    assert (limits.max_model_len, limits.kv_cache_blocks, limits.block_size) == (4096, 255, 16)
