"""Synthetic request-level workloads, for ``warmplan record --synthetic`` and tests.

Two shapes of traffic, drawn from a seeded generator (the same seed gives the same
requests on every machine):

* ``chat``: conversations of a few turns behind one shared system prompt; each turn's
  prompt is the conversation so far plus a new user message, and the part already
  served is a prefix-cache hit (whole blocks of 16); short to medium replies;
  arrivals a few steps apart.
* ``long-prompt``: documents of 1,500 to 3,500 tokens with a short question, some
  documents asked about twice (the second time a prefix-cache hit), short answers,
  arrivals tens of steps apart.

Every request fits ``max_model_len`` (prompt + output) when one is given.
"""

from __future__ import annotations

import json
import random
from typing import Final, Literal

from warmplan.trace import TraceRequest

Workload = Literal["chat", "long-prompt"]
WORKLOADS: Final[tuple[Workload, ...]] = ("chat", "long-prompt")

SYSTEM_PROMPT: Final = 200
BLOCK: Final = 16


def synthetic_requests(
    kind: Workload, count: int, *, seed: int = 0, max_model_len: int = 4096
) -> list[TraceRequest]:
    """``count`` requests of workload ``kind`` (see the module docstring)."""
    if kind not in WORKLOADS:
        raise ValueError(f"unknown workload {kind!r}; expected one of {', '.join(WORKLOADS)}")
    if count < 1:
        raise ValueError(f'"count" must be >= 1: {count}')
    rng = random.Random(seed)
    return _chat(rng, count, max_model_len) if kind == "chat" else _long(rng, count, max_model_len)


def _request(n: int, step: int, prompt: int, cached: int, output: int, name: str) -> TraceRequest:
    return TraceRequest(
        line=n + 1,
        id=name,
        arrival_step=step,
        prompt_tokens=prompt,
        cached_tokens=cached,
        output_tokens=output,
    )


def _chat(rng: random.Random, count: int, max_model_len: int) -> list[TraceRequest]:
    out: list[TraceRequest] = []
    step = 0
    # Conversations between turns: (id, tokens so far, turns taken, step it can go on at:
    # after the reply was generated, one token a step, and the user has read it).
    conversations: list[tuple[str, int, int, int]] = []
    next_id = 0
    while len(out) < count:
        step += int(rng.expovariate(1 / 3))
        ready = [c for c in conversations if c[3] <= step]
        if ready and rng.random() < 0.6:
            pick = rng.choice(ready)
            conversations.remove(pick)
            name, history, turns, _ = pick
        else:
            name, history, turns = f"chat-{next_id}", SYSTEM_PROMPT, 0
            next_id += 1
        user = rng.randint(10, 400)
        output = rng.randint(8, 300)
        prompt = history + user
        if prompt + output > max_model_len:  # the conversation is over; start a new one
            name, history, turns = f"chat-{next_id}", SYSTEM_PROMPT, 0
            next_id += 1
            prompt = history + user
        if prompt + output > max_model_len:  # a small worker: shorten this turn to fit
            prompt = max(1, min(prompt, max_model_len // 2))
            output = max(1, min(output, max_model_len - prompt))
            history = min(history, prompt - 1)
        # The first turn hits the shared system prompt once another request has cached it.
        cached = history if turns or out else 0
        cached -= cached % BLOCK
        out.append(_request(len(out), step, prompt, cached, output, f"{name}/{turns}"))
        think = rng.randint(10, 60)
        conversations.append((name, prompt + output, turns + 1, step + output + think))
    return out


def _long(rng: random.Random, count: int, max_model_len: int) -> list[TraceRequest]:
    out: list[TraceRequest] = []
    step = 0
    documents: list[int] = []
    for n in range(count):
        step += int(rng.expovariate(1 / 25))
        question = rng.randint(16, 64)
        output = rng.randint(4, 128)
        if documents and rng.random() < 0.3:
            document = rng.choice(documents)
            cached = document - document % BLOCK
        else:
            document = rng.randint(1500, 3500)
            documents.append(document)
            cached = 0
        prompt = min(document + question, max_model_len - output)
        cached = min(cached, prompt)
        out.append(_request(n, step, prompt, cached, output, f"doc-{n}"))
    return out


def dump_requests(requests: list[TraceRequest]) -> str:
    """A request-level trace for ``requests``, one line each."""
    lines = []
    for r in requests:
        fields = [f'"id": {json.dumps(r.id)}']
        if r.arrival_step is not None:
            fields.append(f'"arrival_step": {r.arrival_step}')
        elif r.arrival_s is not None:
            fields.append(f'"arrival_s": {r.arrival_s}')
        fields.append(f'"prompt_tokens": {r.prompt_tokens}')
        if r.cached_tokens:
            fields.append(f'"cached_tokens": {r.cached_tokens}')
        fields.append(f'"output_tokens": {r.output_tokens}')
        lines.append("{" + ", ".join(fields) + "}\n")
    return "".join(lines)
