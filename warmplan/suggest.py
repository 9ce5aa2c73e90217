"""Plan steps that would have covered the compilations seen while replaying a trace.

For every trace batch that compiled something (events labelled ``batch[N]``, see
``warmplan.trace.batch_label``) this suggests:

* its token count for a ``slot_mapping`` step (the Triton kernel specialises on the
  raw count, so it is never padded), and
* a ``dummy_run`` of the batch's shape - ``uniform_decode`` for decodes only,
  ``single_prefill`` for one chunk, ``mixed`` for decodes plus one chunk (both with
  the chunk's context as ``prior_context``), ``plain`` otherwise - at the batch's token count, padded the way
  the worker pads its forward when it says how (``padded_num_tokens(n)``).

``suggest_keys`` says the same by compile key, for the built-in engine's kernels:
one ``compile_keys`` step per kernel (``keys-forward``, ...) whose ``domain`` lists
the cases the compiling batches reached (forward ``num_tokens``, padded; slot
mapping ``num_tokens``, raw; chunk metadata ``has_prior_context``) - compiled
without a launch.

Suggestions are deduplicated and sorted, and render as YAML step mappings that
conform to the plan schema, ready to paste under a plan's ``steps:``, or as a unified
diff that adds them to the plan file (``render_patch``). The events come from a
replay (``warmplan verify``) or from a trace ``warmplan record`` wrote
(``recorded_events``).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol, cast

import yaml

from warmplan.errors import UserError
from warmplan.monitor import CompileEvent
from warmplan.trace import TraceEntry, batch_index, batch_label
from warmplan.workers.base import SHAPES, Batch, Shape

if TYPE_CHECKING:
    from warmplan.monitor import EventKind

Padding = Callable[[int], int]


class EventLike(Protocol):
    """What ``suggest`` reads of an event: its label (``batch[N]``) and whether it was
    a disk-cache load (``CompileEvent``, or a ``ColdEvent`` device load)."""

    @property
    def label(self) -> str | None: ...

    @property
    def cache_hit(self) -> bool: ...


class _FlowList(list[Any]):
    """A list of values, written inline: ``tokens: [7, 32, 48]``."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(
    _FlowList,
    lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True),
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
    events: Iterable[EventLike],
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
    hit = _hit(events, batches, include_cache_loads)
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
        out.append(
            Suggestion(
                id="suggested-slot-mapping",
                kind="slot_mapping",
                tokens=sizes,
                batches=tuple(sorted({i for s in sizes for i in slot_sizes[s]})),
            )
        )
    for shape, tokens, prior in sorted(runs, key=lambda k: (SHAPES.index(k[0]), k[1], k[2])):
        name = shape.replace("_", "-")
        ident = f"suggested-{name}-{tokens}" + (f"-ctx-{prior}" if prior else "")
        out.append(
            Suggestion(
                id=ident,
                kind="dummy_run",
                shape=shape,
                tokens=tokens,
                prior_context=prior,
                batches=tuple(runs[(shape, tokens, prior)]),
            )
        )
    return out


# --------------------------------------------------------------------------- compile keys

KEY_KERNELS = ("slot_mapping", "chunk_metadata", "forward")


@dataclass(frozen=True, slots=True, kw_only=True)
class KeysSuggestion:
    """A suggested ``compile_keys`` step: one kernel, its domain as value lists (each
    sorted, deduplicated), and the trace batches (0-based) whose cases they are."""

    id: str
    kernel: str
    domain: tuple[tuple[str, tuple[Any, ...]], ...]
    batches: tuple[int, ...] = ()
    kind: str = "compile_keys"

    def to_step(self) -> dict[str, Any]:
        step: dict[str, Any] = {"id": self.id, "kind": self.kind, "kernel": self.kernel}
        step["domain"] = {name: _FlowList(values) for name, values in self.domain}
        step["description"] = _covers(self.batches)
        return step


def batch_key_cases(
    batch: Batch, padded_num_tokens: Padding | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """The built-in engine's kernel cases one batch reaches (``ModelRunner.step``):
    ``chunk_metadata`` (whether a prefill chunk has prior context) when it has prefill
    chunks, ``slot_mapping`` at its raw token count, ``forward`` at its padded count."""
    n = batch.num_tokens
    out: list[tuple[str, dict[str, Any]]] = []
    if batch.prefill:
        out.append(
            ("chunk_metadata", {"has_prior_context": any(c.context > 0 for c in batch.prefill)})
        )
    out.append(("slot_mapping", {"num_tokens": n}))
    padded = max(n, int(padded_num_tokens(n))) if padded_num_tokens is not None else n
    out.append(("forward", {"num_tokens": padded}))
    return out


def suggest_keys(
    events: Iterable[EventLike],
    batches: Sequence[Batch],
    *,
    padded_num_tokens: Padding | None = None,
    include_cache_loads: bool = True,
) -> list[KeysSuggestion]:
    """``compile_keys`` steps that would have covered ``events`` (labelled ``batch[N]``)
    of ``batches``: the cases of every compiling batch, merged per kernel into one step
    (``keys-forward``, ``keys-slot-mapping``, ``keys-chunk-metadata``) whose domain
    lists each parameter's values. Built-in engine kernels; no launch when run."""
    hit = _hit(events, batches, include_cache_loads)
    values: dict[str, dict[str, set[Any]]] = {}
    covered: dict[str, set[int]] = {}
    for index in sorted(hit):
        for kernel, case in batch_key_cases(batches[index], padded_num_tokens):
            domain = values.setdefault(kernel, {})
            for name, value in case.items():
                domain.setdefault(name, set()).add(value)
            covered.setdefault(kernel, set()).add(index)
    out = []
    for kernel in KEY_KERNELS:
        if kernel not in values:
            continue
        out.append(
            KeysSuggestion(
                id=f"keys-{kernel.replace('_', '-')}",
                kernel=kernel,
                domain=tuple((name, tuple(sorted(vals))) for name, vals in values[kernel].items()),
                batches=tuple(sorted(covered[kernel])),
            )
        )
    return out


def _hit(
    events: Iterable[EventLike], batches: Sequence[Batch], include_cache_loads: bool
) -> set[int]:
    hit: set[int] = set()
    for event in events:
        if event.cache_hit and not include_cache_loads:
            continue
        index = batch_index(event.label)
        if index is not None and 0 <= index < len(batches):
            hit.add(index)
    return hit


def render_yaml(suggestions: Sequence[Suggestion | KeysSuggestion], *, header: bool = True) -> str:
    """The suggestions as a YAML list of plan steps (``""`` when there are none)."""
    if not suggestions:
        return ""
    body = yaml.dump(
        [s.to_step() for s in suggestions],
        Dumper=_Dumper,
        sort_keys=False,
        default_flow_style=False,
        width=100,
    )
    if not header:
        return body
    return "# Steps that would have covered the compilations above; paste under `steps:`.\n" + body


# --------------------------------------------------------------------------- recorded


def recorded_events(entries: Sequence[TraceEntry]) -> list[CompileEvent]:
    """The compilations a recorded trace carries, as monitor events labelled with
    their batch (``batch[N]``, N the entry's index)."""
    out = []
    for index, entry in enumerate(entries):
        for c in entry.compiles:
            out.append(
                CompileEvent(
                    kind=cast("EventKind", c.kind),
                    name=c.name,
                    key=c.key,
                    label=batch_label(index),
                    cache_hit=c.cache_hit,
                    duration_s=c.duration_s,
                )
            )
    return out


def compile_size_padding(sizes: Iterable[int]) -> Padding:
    """Pad up to the smallest of ``sizes`` that holds ``n`` (``n`` above them all)."""
    ordered = sorted(set(sizes))

    def pad(n: int) -> int:
        return next((s for s in ordered if s >= n), n)

    return pad


# --------------------------------------------------------------------------- patches


def insert_steps(text: str, suggestions: Sequence[Suggestion], *, file: str, note: str = "") -> str:
    """Plan ``text`` with ``suggestions`` appended to its ``steps:`` list, indented as
    the list is; ids that exist already get a ``-2``, ``-3`` ... suffix. Raises
    ``UserError`` when the plan's steps are not a block list this can append to."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise UserError(f"{file}: cannot read the plan to patch it: {exc}") from None
    steps = None
    if isinstance(root, yaml.MappingNode):
        steps = next((v for k, v in root.value if getattr(k, "value", None) == "steps"), None)
    if not isinstance(steps, yaml.SequenceNode) or not steps.value:
        raise UserError(f"{file}: no 'steps:' list to add the suggested steps to")
    if steps.flow_style:
        line = steps.start_mark.line + 1
        raise UserError(
            f"{file}:{line}: 'steps' is a flow list ([...]); paste the steps by hand (--yaml prints them)"
        )
    lines = text.splitlines(keepends=True)
    first = steps.value[0].start_mark
    dash = lines[first.line].rfind("-", 0, first.column)
    indent = " " * max(dash, 0)
    taken = {
        str(v.value)
        for item in steps.value
        if isinstance(item, yaml.MappingNode)
        for k, v in item.value
        if getattr(k, "value", None) == "id"
    }
    renamed = [_unique(s, taken) for s in suggestions]
    end = steps.value[-1].end_mark
    at = end.line + 1 if end.column > 0 else end.line
    body = render_yaml(renamed, header=False)
    block = [f"{indent}# {note}\n"] if note else []
    block += [f"{indent}{line}\n" for line in body.splitlines()]
    if at > 0 and not lines[at - 1].endswith("\n"):
        lines[at - 1] += "\n"
    return "".join(lines[:at] + block + lines[at:])


def _unique(suggestion: Suggestion, taken: set[str]) -> Suggestion:
    ident, n = suggestion.id, 2
    while ident in taken:
        ident = f"{suggestion.id}-{n}"
        n += 1
    taken.add(ident)
    return replace(suggestion, id=ident)


def render_patch(path: str, text: str, suggestions: Sequence[Suggestion], *, note: str = "") -> str:
    """A unified diff (``git apply`` / ``patch -p1``) adding ``suggestions`` to the plan
    at ``path`` whose content is ``text``; ``""`` when there are none. The patched plan
    is checked to load before the diff is returned."""
    if not suggestions:
        return ""
    from warmplan.plan import parse_plan

    patched = insert_steps(text, suggestions, file=path, note=note)
    parse_plan(patched, file=path, path=path)
    name = path.lstrip("./") if not path.startswith("/") else path
    return "".join(
        difflib.unified_diff(
            text.splitlines(keepends=True),
            patched.splitlines(keepends=True),
            fromfile=f"a/{name}",
            tofile=f"b/{name}",
        )
    )
