"""A model of vLLM's default scheduler: turns traces into the batches a worker would run.

Traffic is recorded on servers with other limits than the worker a plan is checked
on (a production server batches 8192 tokens; the built-in engine 512). This module
replays that traffic under the worker's own limits:

* ``schedule(requests, limits)`` runs request-level traces (arrival, prompt,
  prefix-cache hit, output tokens) through a step-by-step model of vLLM's V1
  scheduler with its default settings (``vllm/v1/core/sched/scheduler.py``):

  - one token budget a step, ``max_num_batched_tokens``, shared by all requests;
  - running requests first, in the order they were admitted; each takes what it
    still needs (the rest of its prompt, or one token to decode) up to the budget
    left - a prompt longer than the budget is prefilled in chunks, each after the
    tokens already cached (chunked prefill);
  - then waiting requests, first come first served, while fewer than
    ``max_num_seqs`` are running and budget is left; a newly admitted request
    starts after its prefix-cache hit (never the whole prompt: the last prompt
    token is always computed, to sample from);
  - KV cache blocks (when the worker says how many it has): a request holds the
    blocks of every token computed or scheduled; a running request that cannot
    grow preempts the most recently admitted one (which frees its blocks and
    starts over later, recomputing what it had); no request is admitted in a step
    that preempted; a waiting request is admitted only if its chunk's blocks fit;
  - a step that completes a request's prompt samples its first output token; each
    later step decodes one; a request leaves after its last output token.

  A scheduled request with one new token is a decode, as vLLM's attention backends
  classify it (query length 1), whatever its phase.

* ``rechunk(batch, limits)`` splits a recorded batch over the budget, over
  ``max_num_seqs`` or over the KV cache into consecutive batches the same way:
  decodes first, then chunks in order, a chunk cut where the budget (or the free KV
  blocks) ends and continued, after the part already computed, in the next batch.
  A batch-level trace does not say how much context a decode has; it is counted
  with ``decode_context`` tokens.

What is not modelled is listed in ``docs/monitor.md`` (priorities, speculative
decoding, encoder inputs, KV connectors, ``long_prefill_token_threshold``, partial
prefills, async scheduling, sliding windows, cascade attention).

This module never imports torch.

Over ~400 lines on purpose: the scheduler model is one policy (budget, admission,
chunking, KV blocks, preemption) whose parts share one step loop and its state;
split, each part would need the others' internals.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from warmplan.errors import UserError
from warmplan.trace import Trace, TraceEntry, TraceRequest
from warmplan.workers.base import Batch, PrefillChunk

DEFAULT_STEP_S = 0.025
"""Seconds a model step lasts, to place ``arrival_s`` requests on steps."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SchedulerLimits:
    """What the scheduler model schedules under (a worker's limits).

    ``max_model_len``: the longest sequence a request may reach (``None``: unchecked).
    ``kv_cache_blocks``: usable KV cache blocks of ``block_size`` tokens (``None``:
    unlimited - no preemption).
    ``decode_context``: the cached tokens a decode of a batch-level trace is counted
    with (such traces do not say; the built-in engine replays each after 16).
    """

    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int | None = None
    block_size: int = 16
    kv_cache_blocks: int | None = None
    decode_context: int = 16

    def __post_init__(self) -> None:
        if (
            isinstance(self.decode_context, bool)
            or not isinstance(self.decode_context, int)
            or self.decode_context < 0
        ):
            raise ValueError(f'"decode_context" must be an integer >= 0: {self.decode_context!r}')
        for name in ("max_num_batched_tokens", "max_num_seqs", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f'"{name}" must be a positive integer: {value!r}')
        for name in ("max_model_len", "kv_cache_blocks"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f'"{name}" must be a positive integer or None: {value!r}')

    @classmethod
    def of_worker(cls, worker: Any) -> SchedulerLimits:
        """The limits of ``worker``: its ``limits``, plus ``max_model_len`` and the KV
        cache size when its ``config`` says (the built-in engine's does: ``max_model_len``,
        ``num_blocks`` with block 0 the null block, ``block_size``)."""
        limits = worker.limits
        config = getattr(worker, "config", None)
        max_model_len = _positive(getattr(config, "max_model_len", None))
        block_size = _positive(getattr(config, "block_size", None)) or 16
        num_blocks = _positive(getattr(config, "num_blocks", None))
        return cls(
            max_num_batched_tokens=limits.max_num_batched_tokens,
            max_num_seqs=limits.max_num_seqs,
            max_model_len=max_model_len,
            block_size=block_size,
            kv_cache_blocks=None if num_blocks is None or num_blocks < 2 else num_blocks - 1,
        )

    def describe(self) -> str:
        """``max_num_batched_tokens 512, max_num_seqs 64, max_model_len 4096, 255 KV blocks of 16``."""
        parts = [
            f"max_num_batched_tokens {self.max_num_batched_tokens}",
            f"max_num_seqs {self.max_num_seqs}",
        ]
        if self.max_model_len is not None:
            parts.append(f"max_model_len {self.max_model_len}")
        if self.kv_cache_blocks is not None:
            parts.append(f"{self.kv_cache_blocks} KV blocks of {self.block_size}")
        return ", ".join(parts)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)


def _positive(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return None
    return value


# --------------------------------------------------------------------------- requests


@dataclass(slots=True)
class _Running:
    """A request's state in the model."""

    req: TraceRequest
    arrival: int
    computed: int = 0  # tokens whose KV is computed (or a prefix-cache hit)
    generated: int = 0  # output tokens sampled so far
    blocks: int = 0  # KV blocks held
    preemptions: int = 0

    @property
    def known(self) -> int:
        """Tokens the request has: its prompt and the outputs sampled so far."""
        return self.req.prompt_tokens + self.generated


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduleStats:
    """What the model did: steps, idle steps skipped, preemptions, requests."""

    requests: int
    batches: int
    idle_steps: int
    preemptions: int
    prefill_chunks: int
    decode_tokens: int

    def to_dict(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "batches": self.batches,
            "idle_steps": self.idle_steps,
            "preemptions": self.preemptions,
            "prefill_chunks": self.prefill_chunks,
            "decode_tokens": self.decode_tokens,
        }


def check_requests(requests: Sequence[TraceRequest], limits: SchedulerLimits, *, path: str) -> None:
    """Raise ``UserError`` at the first request the worker could never serve."""
    for r in requests:
        needed = r.prompt_tokens + r.output_tokens
        if limits.max_model_len is not None and needed > limits.max_model_len:
            raise UserError(
                f"{path}:{r.line}: request {r.id!r} needs {needed} tokens of context "
                f"({r.prompt_tokens} prompt + {r.output_tokens} output); the worker's "
                f"max_model_len is {limits.max_model_len}"
            )
        if limits.kv_cache_blocks is not None:
            # The last sampled token is never fed back, so its KV is never written.
            blocks = limits.blocks_for(needed - 1)
            if blocks > limits.kv_cache_blocks:
                raise UserError(
                    f"{path}:{r.line}: request {r.id!r} needs {blocks} KV blocks of "
                    f"{limits.block_size} tokens ({needed - 1} tokens); the worker's KV cache "
                    f"holds {limits.kv_cache_blocks}"
                )


def arrival_steps(requests: Sequence[TraceRequest], *, step_s: float = DEFAULT_STEP_S) -> list[int]:
    """Each request's arrival step: ``arrival_step``, or ``arrival_s`` over ``step_s``."""
    if step_s <= 0:
        raise ValueError(f'"step_s" must be > 0: {step_s}')
    out = []
    for r in requests:
        if r.arrival_step is not None:
            out.append(r.arrival_step)
        elif r.arrival_s is not None:
            out.append(math.floor(r.arrival_s / step_s + 1e-9))
        else:
            out.append(0)
    return out


def schedule(
    requests: Sequence[TraceRequest],
    limits: SchedulerLimits,
    *,
    path: str = "<trace>",
    step_s: float = DEFAULT_STEP_S,
) -> tuple[list[TraceEntry], ScheduleStats]:
    """The batches ``requests`` become under ``limits`` (see the module docstring).

    Each batch is a ``TraceEntry`` whose ``lines`` are the trace lines of the requests
    in it (decodes first, then prefill chunks, as the engines order them) and whose
    ``line`` is the first of them. Raises ``UserError`` for a request the worker can
    never serve (``check_requests``).
    """
    check_requests(requests, limits, path=path)
    arrivals = arrival_steps(requests, step_s=step_s)
    pending = deque(
        sorted(
            (_Running(req=r, arrival=a) for r, a in zip(requests, arrivals, strict=True)),
            key=lambda s: (s.arrival, s.req.line),
        )
    )
    waiting: deque[_Running] = deque()
    running: list[_Running] = []
    free = limits.kv_cache_blocks
    out: list[TraceEntry] = []
    step = idle = preemptions = chunks = decodes = 0
    while pending or waiting or running:
        if not waiting and not running and pending[0].arrival > step:
            idle += pending[0].arrival - step
            step = pending[0].arrival
        while pending and pending[0].arrival <= step:
            waiting.append(pending.popleft())
        budget = limits.max_num_batched_tokens
        scheduled: list[tuple[_Running, int, int]] = []  # (request, new tokens, context)
        preempted = False

        # Running requests first, in admission order.
        i = 0
        while i < len(running) and budget > 0:
            s = running[i]
            new = min(s.known - s.computed, budget)
            need = limits.blocks_for(s.computed + new) - s.blocks
            ok = True
            while free is not None and need > free:
                victim = running.pop()
                free += victim.blocks
                victim.blocks = victim.computed = 0
                victim.preemptions += 1
                preemptions += 1
                preempted = True
                waiting.appendleft(victim)
                if victim is s:
                    ok = False
                    break
            if not ok:
                break
            if free is not None:
                free -= need
            s.blocks += need
            scheduled.append((s, new, s.computed))
            budget -= new
            i += 1

        # Then waiting requests, first come first served, unless this step preempted.
        while not preempted and waiting and len(running) < limits.max_num_seqs and budget > 0:
            s = waiting[0]
            hit = min(s.req.cached_tokens, s.known - 1)
            new = min(s.known - hit, budget)
            need = limits.blocks_for(hit + new)
            if free is not None and need > free:
                break
            waiting.popleft()
            if free is not None:
                free -= need
            s.blocks, s.computed = need, hit
            running.append(s)
            scheduled.append((s, new, hit))
            budget -= new

        if not scheduled:  # pragma: no cover - every request fits the cache alone
            raise RuntimeError(f"scheduler model made no progress at step {step}")
        batch, lines = _batch_of(scheduled)
        chunks += len(batch.prefill)
        decodes += batch.decode
        out.append(TraceEntry(line=lines[0], batch=batch, lines=lines, step=None))

        # After the step: advance, sample, let finished requests leave.
        for s, new, _ in scheduled:
            s.computed += new
            if s.computed >= s.known:
                s.generated += 1
        for s in [s for s, _, _ in scheduled if s.generated >= s.req.output_tokens]:
            running.remove(s)
            if free is not None:
                free += s.blocks
            s.blocks = 0
        step += 1
    stats = ScheduleStats(
        requests=len(requests),
        batches=len(out),
        idle_steps=idle,
        preemptions=preemptions,
        prefill_chunks=chunks,
        decode_tokens=decodes,
    )
    return out, stats


def _batch_of(scheduled: Sequence[tuple[_Running, int, int]]) -> tuple[Batch, tuple[int, ...]]:
    dec = [s for s, new, _ in scheduled if new == 1]
    pre = [(s, new, ctx) for s, new, ctx in scheduled if new > 1]
    batch = Batch(
        decode=len(dec),
        prefill=tuple(PrefillChunk(tokens=new, context=ctx) for _, new, ctx in pre),
    )
    lines = tuple(s.req.line for s in dec) + tuple(s.req.line for s, _, _ in pre)
    return batch, lines


# --------------------------------------------------------------------------- batches


@dataclass(frozen=True, slots=True, kw_only=True)
class Rechunk:
    """A recorded batch over the worker's limits and the batches it became."""

    line: int
    batch: Batch
    into: tuple[Batch, ...]
    reason: str  # what it was over, "+"-joined: tokens, seqs, kv

    def describe(self) -> str:
        """``line 12: 906 tokens (7 decodes + 1 chunk) -> 512 + 394``."""
        b = self.batch
        parts = []
        if b.decode:
            parts.append(f"{b.decode} decode{'s' if b.decode != 1 else ''}")
        if b.prefill:
            n = len(b.prefill)
            parts.append(f"{n} chunk{'s' if n != 1 else ''}")
        sizes = " + ".join(str(x.num_tokens) for x in self.into)
        over = {"tokens": "budget", "seqs": "max_num_seqs", "kv": "KV cache"}
        why = ", ".join(over[r] for r in self.reason.split("+"))
        return (
            f"line {self.line}: {b.num_tokens} tokens ({' + '.join(parts)}) -> {sizes} "
            f"(over the {why})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "line": self.line,
            "tokens": self.batch.num_tokens,
            "seqs": self.batch.decode + len(self.batch.prefill),
            "reason": self.reason,
            "into": [x.num_tokens for x in self.into],
        }


def rechunk(batch: Batch, limits: SchedulerLimits) -> list[Batch]:
    """``batch`` as consecutive batches within the budget, ``max_num_seqs`` and the KV
    cache (each decode counted with ``decode_context`` cached tokens).

    Raises ``ValueError`` for a chunk that could not fit the KV cache even alone."""
    decodes = batch.decode
    chunks = deque((c.tokens, c.context) for c in batch.prefill)
    per_decode = limits.blocks_for(limits.decode_context + 1)
    out: list[Batch] = []
    while decodes or chunks:
        budget, seqs = limits.max_num_batched_tokens, limits.max_num_seqs
        blocks = limits.kv_cache_blocks
        take = min(decodes, budget, seqs)
        if blocks is not None:
            take = min(take, blocks // per_decode)
            blocks -= take * per_decode
        decodes -= take
        budget -= take
        seqs -= take
        parts: list[PrefillChunk] = []
        while chunks and budget > 0 and seqs > 0:
            tokens, context = chunks[0]
            n = min(tokens, budget)
            if blocks is not None:
                n = min(n, blocks * limits.block_size - context)
                if n < 1:
                    break
                blocks -= limits.blocks_for(context + n)
            parts.append(PrefillChunk(tokens=n, context=context))
            budget -= n
            seqs -= 1
            if n == tokens:
                chunks.popleft()
            else:
                chunks[0] = (tokens - n, context + n)
        if not take and not parts:
            tokens, context = chunks[0]
            raise ValueError(
                f"a chunk after {context} cached tokens needs {limits.blocks_for(context + 1)} KV "
                f"blocks of {limits.block_size}; the worker's KV cache holds {limits.kv_cache_blocks}"
            )
        out.append(Batch(decode=take, prefill=tuple(parts)))
    return out


def batch_blocks(batch: Batch, limits: SchedulerLimits) -> int:
    """KV blocks ``batch`` holds while it runs (decodes with ``decode_context``)."""
    decode = batch.decode * limits.blocks_for(limits.decode_context + 1)
    return decode + sum(limits.blocks_for(c.context + c.tokens) for c in batch.prefill)


def _over(batch: Batch, limits: SchedulerLimits) -> str | None:
    reasons = []
    if batch.num_tokens > limits.max_num_batched_tokens:
        reasons.append("tokens")
    if batch.decode + len(batch.prefill) > limits.max_num_seqs:
        reasons.append("seqs")
    if limits.kv_cache_blocks is not None and batch_blocks(batch, limits) > limits.kv_cache_blocks:
        reasons.append("kv")
    return "+".join(reasons) or None


def check_batches(entries: Iterable[TraceEntry], limits: SchedulerLimits, *, path: str) -> None:
    """Raise ``UserError`` at the first chunk longer than the worker's ``max_model_len``."""
    if limits.max_model_len is None:
        return
    for entry in entries:
        for i, chunk in enumerate(entry.batch.prefill):
            if chunk.context + chunk.tokens > limits.max_model_len:
                raise UserError(
                    f"{path}:{entry.line}: field 'prefill[{i}]': a chunk of {chunk.tokens} tokens "
                    f"after {chunk.context} cached reaches {chunk.context + chunk.tokens} tokens "
                    f"of context; the worker's max_model_len is {limits.max_model_len}"
                )


def rechunk_entries(
    entries: Sequence[TraceEntry], limits: SchedulerLimits, *, path: str = "<trace>"
) -> tuple[list[TraceEntry], list[Rechunk]]:
    """Every batch within ``limits``: those over it re-chunked, the rest as they are."""
    check_batches(entries, limits, path=path)
    out: list[TraceEntry] = []
    changes: list[Rechunk] = []
    for entry in entries:
        reason = _over(entry.batch, limits)
        if reason is None:
            out.append(entry)
            continue
        try:
            parts = rechunk(entry.batch, limits)
        except ValueError as exc:
            raise UserError(f"{path}:{entry.line}: {exc}") from None
        changes.append(
            Rechunk(line=entry.line, batch=entry.batch, into=tuple(parts), reason=reason)
        )
        # Compiles recorded with the whole batch stay with its first part.
        out.extend(
            TraceEntry(
                line=entry.line,
                batch=part,
                compiles=entry.compiles if k == 0 else (),
                step=entry.step,
                lines=(entry.line,),
            )
            for k, part in enumerate(parts)
        )
    return out, changes


# --------------------------------------------------------------------------- both


@dataclass(frozen=True, slots=True, kw_only=True)
class Replay:
    """What a worker runs for a trace: the batches, and how they were made."""

    trace: Trace
    limits: SchedulerLimits
    entries: tuple[TraceEntry, ...]
    rechunked: tuple[Rechunk, ...] = ()
    stats: ScheduleStats | None = None
    notes: tuple[str, ...] = field(default=())

    def describe(self) -> list[str]:
        """Lines saying how the batches were made (empty for a trace replayed as is)."""
        if self.stats is not None:
            s = self.stats
            return [
                f"scheduled {s.requests} requests into {s.batches} batches under "
                f"{self.limits.describe()} ({s.prefill_chunks} prefill chunks, "
                f"{s.decode_tokens} decodes, {s.preemptions} preemptions, "
                f"{s.idle_steps} idle steps skipped)"
            ]
        if not self.rechunked:
            return []
        n = len(self.trace.batches)
        head = (
            f"re-chunked {len(self.rechunked)} of {n} batches into "
            f"{sum(len(r.into) for r in self.rechunked)} under {self.limits.describe()}:"
        )
        shown = [f"  {r.describe()}" for r in self.rechunked[:10]]
        if len(self.rechunked) > 10:
            shown.append(f"  ... and {len(self.rechunked) - 10} more (--json lists them all)")
        return [head, *shown]

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.trace.kind,
            "limits": {
                "max_num_batched_tokens": self.limits.max_num_batched_tokens,
                "max_num_seqs": self.limits.max_num_seqs,
                "max_model_len": self.limits.max_model_len,
                "block_size": self.limits.block_size,
                "kv_cache_blocks": self.limits.kv_cache_blocks,
            },
            "batches": len(self.entries),
            "rechunked": [r.to_dict() for r in self.rechunked],
            "schedule": None if self.stats is None else self.stats.to_dict(),
        }


def replay_batches(
    trace: Trace, limits: SchedulerLimits, *, step_s: float = DEFAULT_STEP_S
) -> Replay:
    """The batches ``trace`` becomes on a worker with ``limits``: requests scheduled,
    batches over the limits re-chunked. Raises ``UserError`` naming file:line for a
    request or chunk the worker can never run."""
    if trace.kind == "requests":
        entries, stats = schedule(trace.requests, limits, path=trace.path, step_s=step_s)
        return Replay(trace=trace, limits=limits, entries=tuple(entries), stats=stats)
    entries, changes = rechunk_entries(trace.batches, limits, path=trace.path)
    return Replay(trace=trace, limits=limits, entries=tuple(entries), rechunked=tuple(changes))
