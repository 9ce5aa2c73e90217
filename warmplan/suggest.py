"""Plan steps that would have covered the compilations seen while replaying a trace.

For every trace batch that compiled something (events labelled ``batch[N]``, see
``warmplan.trace.batch_label``) this suggests:

* its token count for a ``slot_mapping`` step (the Triton kernel specialises on the
  raw count, so it is never padded), and
* a ``dummy_run`` of the batch's shape - ``uniform_decode`` for decodes only,
  ``single_prefill`` for one chunk, ``mixed`` for decodes plus one chunk (both with
  the chunk's context as ``prior_context``), ``plain`` otherwise - at the batch's token count, padded the way
  the worker pads its forward when it says how (``padded_num_tokens(n)``).

Suggestions are deduplicated and sorted, and render as YAML step mappings that
conform to the plan schema, ready to paste under a plan's ``steps:``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from warmplan.monitor import CompileEvent
from warmplan.trace import batch_index
from warmplan.workers.base import SHAPES, Batch, Shape

Padding = Callable[[int], int]


class _FlowList(list[int]):
    """A list of token counts, written inline: ``tokens: [7, 32, 48]``."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(
    _FlowList, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Suggestion:
    """One suggested step; ``batches`` are the trace batches (0-based) it covers."""

    id: str
    kind: str  # "slot_mapping" | "dummy_run"
    tokens: tuple[int, ...] | int
    shape: Shape | None = None
    prior_context: int = 0
    batches: tuple[int, ...] = ()

    def to_step(self) -> dict[str, Any]:
        """The plan step mapping (schema keys only, in the order a plan writes them)."""
        step: dict[str, Any] = {"id": self.id, "kind": self.kind}
        if self.kind == "slot_mapping":
            tokens = self.tokens if isinstance(self.tokens, tuple) else (self.tokens,)
            step["tokens"] = _FlowList(tokens)
        else:
            step["shape"] = self.shape
            step["tokens"] = self.tokens
            if self.prior_context:
                step["prior_context"] = self.prior_context
            step["force_attention"] = True
        step["description"] = _covers(self.batches)
        return step


def _covers(batches: Sequence[int]) -> str:
    shown = ", ".join(str(b) for b in batches[:12])
    more = f" and {len(batches) - 12} more" if len(batches) > 12 else ""
    noun = "batch" if len(batches) == 1 else "batches"
    return f"Suggested by warmplan verify: covers trace {noun} {shown}{more}."


def shape_of(batch: Batch) -> tuple[Shape, int]:
    """The dummy-run shape of ``batch`` and its prior context (that of its one chunk)."""
    chunks = batch.prefill
    if not chunks:
        return "uniform_decode", 0
    if len(chunks) == 1:
        return ("single_prefill" if batch.decode == 0 else "mixed"), chunks[0].context
    return "plain", 0


def padding_of(worker: object) -> Padding | None:
    """The worker's ``padded_num_tokens(n)``, when it has one."""
    pad = getattr(worker, "padded_num_tokens", None)
    return pad if callable(pad) else None


def suggest(
    events: Iterable[CompileEvent],
    batches: Sequence[Batch],
    *,
    padded_num_tokens: Padding | None = None,
    include_cache_loads: bool = True,
) -> list[Suggestion]:
    """The steps that would have covered ``events`` (labelled ``batch[N]``) of ``batches``.

    Events with another label, or an index outside ``batches``, are ignored. Disk-cache
    loads count too unless ``include_cache_loads`` is false: they are cheaper than a
    compile but still far slower than a warm call.
    """
    hit: set[int] = set()
    for event in events:
        if event.cache_hit and not include_cache_loads:
            continue
        index = batch_index(event.label)
        if index is not None and 0 <= index < len(batches):
            hit.add(index)
    slot_sizes: dict[int, list[int]] = {}
    runs: dict[tuple[Shape, int, int], list[int]] = {}
    for index in sorted(hit):
        batch = batches[index]
        slot_sizes.setdefault(batch.num_tokens, []).append(index)
        shape, prior = shape_of(batch)
        tokens = batch.num_tokens
        if padded_num_tokens is not None:
            tokens = max(tokens, int(padded_num_tokens(tokens)))
        runs.setdefault((shape, tokens, prior), []).append(index)
    out: list[Suggestion] = []
    if slot_sizes:
        sizes = tuple(sorted(slot_sizes))
        out.append(Suggestion(
            id="suggested-slot-mapping", kind="slot_mapping", tokens=sizes,
            batches=tuple(sorted({i for s in sizes for i in slot_sizes[s]})),
        ))
    for (shape, tokens, prior) in sorted(runs, key=lambda k: (SHAPES.index(k[0]), k[1], k[2])):
        name = shape.replace("_", "-")
        ident = f"suggested-{name}-{tokens}" + (f"-ctx-{prior}" if prior else "")
        out.append(Suggestion(
            id=ident, kind="dummy_run", shape=shape, tokens=tokens, prior_context=prior,
            batches=tuple(runs[(shape, tokens, prior)]),
        ))
    return out


def render_yaml(suggestions: Sequence[Suggestion], *, header: bool = True) -> str:
    """The suggestions as a YAML list of plan steps (``""`` when there are none)."""
    if not suggestions:
        return ""
    body = yaml.dump(
        [s.to_step() for s in suggestions], Dumper=_Dumper, sort_keys=False,
        default_flow_style=False, width=100,
    )
    if not header:
        return body
    return "# Steps that would have covered the compilations above; paste under `steps:`.\n" + body
