"""The smallest plan with zero compiles on given traces (``warmplan minimize``).

Model-based, on the built-in engine, before anything is built or compiled:

* **needed keys** - each trace is scheduled into batches exactly as ``warmplan
  verify`` does (``warmplan.scheduler.replay_batches`` under the limits of the
  engine the plan's ``builtin`` block describes), and each batch is mapped to the
  compile keys it reaches (``ModelRunner.step``: ``chunk_metadata`` when it has
  prefill chunks, ``slot_mapping`` at its raw token count, ``forward`` at its padded
  count), keyed by the engine's ``KeyModel``;
* **covered keys** per step - a ``compile_keys`` step its keyset, a ``slot_mapping``
  step the slot keys of its applied counts, a ``dummy_run`` step the keys of the
  batch the engine builds for it (``config.dummy_specs``); ``autotune`` and
  ``engine_warmup`` steps are kept and counted as covering nothing (a loaded tuning
  cache skips the tuning run); steps gated off on this worker are left as they are;
* **a minimum set cover** of the needed keys, compile-key steps preferred to
  launches (exact branch and bound, greedy past a node budget), then each kept
  ``compile_keys`` step narrowed to explicit values of the keys it alone compiles and
  each kept ``slot_mapping`` step to one count per needed class.

The plan's text is edited, not re-dumped: removed steps are cut out with the comments
above them, narrowed ones re-rendered in place, everything else (header, builtin
block, gates, comments) kept as written.

Over ~400 lines on purpose: needed keys, covered keys, the cover and the text edit
are one algorithm over one model of the engine; split, each part would have to
re-derive the others' view of a step.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

import yaml

from warmplan.errors import UserError
from warmplan.plan import Plan, parse_plan
from warmplan.resolve import CacheContext, resolve
from warmplan.scheduler import DEFAULT_STEP_S, SchedulerLimits, replay_batches
from warmplan.trace import Trace
from warmplan.workers.base import Batch, Facts, Limits

Case = dict[str, Any]
Spec = tuple[int, int, bool]  # (num_new, context, decode), as config.dummy_specs

# Set-cover costs: a compile-key step launches nothing; a slot-mapping step launches
# one kernel per count; a dummy run a whole forward.
COST: Final = {"compile_keys": 1, "slot_mapping": 20, "dummy_run": 100}
KEPT_KINDS: Final = ("autotune", "engine_warmup")
SEARCH_NODES: Final = 200_000


@dataclass(frozen=True, slots=True)
class Need:
    """A compile key a trace batch reaches, first seen at ``trace:line`` (batch ``index``)."""

    kernel: str
    key: str
    label: str
    case: Mapping[str, Any]
    trace: str
    line: str
    index: int
    batches: int = 1
    counts: tuple[int, ...] = ()  # slot_mapping: every raw count the traces run, sorted

    @property
    def where(self) -> str:
        return f"{self.trace}:{self.line} (batch {self.index})"


@dataclass(slots=True)
class StepInfo:
    """One step of the plan in the model: what it covers and what became of it."""

    id: str
    kind: str
    index: int
    status: str  # candidate | kept | gated | replaced
    covers: dict[str, tuple[str, Case]] = field(default_factory=dict)  # key -> (kernel, case)
    note: str = ""
    action: str = ""  # kept | removed | narrowed
    why: str = ""
    assigned: list[str] = field(default_factory=list)
    tokens: tuple[int, ...] = ()  # slot_mapping: applied counts
    kernel: str | None = None  # compile_keys
    after: int = 0
    split: int = 0


@dataclass(slots=True)
class Result:
    """What ``minimize`` found: the needed keys, each step's fate, the plan's text."""

    plan: Plan
    platform: str
    needed: dict[str, Need]
    steps: list[StepInfo]
    text: str
    batches: int
    exact: bool

    def rows(self) -> list[dict[str, Any]]:
        return [
            {
                "step": s.id,
                "kind": s.kind,
                "action": s.action,
                "keys": f"{len(s.covers)} -> {s.after}",
                "why": s.why,
            }
            for s in self.steps
        ]

    @property
    def keys_before(self) -> int:
        return sum(len(s.covers) for s in self.steps if s.status == "candidate")

    @property
    def keys_after(self) -> int:
        return sum(s.after for s in self.steps if s.status == "candidate")

    def launches(self, *, after: bool) -> int:
        """Dummy runs and slot-mapping calls of the steps that run here."""
        n = 0
        for s in self.steps:
            if s.status != "candidate" or s.kind not in ("dummy_run", "slot_mapping"):
                continue
            if not after:
                n += len(s.tokens)
            elif s.action != "removed":
                n += len(s.assigned) if s.action == "narrowed" else len(s.tokens)
        return n

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan": {"name": self.plan.name, "path": self.plan.path},
            "platform": self.platform,
            "batches": self.batches,
            "needed": [
                {"kernel": n.kernel, "key": n.key, "label": n.label, "first": n.where}
                for n in self.needed.values()
            ],
            "exact": self.exact,
            "keys": {"before": self.keys_before, "after": self.keys_after},
            "steps": [
                {
                    "id": s.id,
                    "kind": s.kind,
                    "action": s.action,
                    "keys_before": len(s.covers),
                    "keys_after": s.after,
                    "why": s.why,
                }
                for s in self.steps
            ],
            "plan_yaml": self.text,
        }


# --------------------------------------------------------------------------- the engine


class _Shim:
    """What ``SchedulerLimits.of_worker`` reads of a worker, from an engine config."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.limits = Limits(
            max_num_tokens=config.max_num_tokens,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_num_seqs=config.max_num_seqs,
        )


def engine_of(plan: Plan, overrides: Mapping[str, Any] | None = None) -> Any:
    """The ``EngineConfig`` the plan's ``builtin`` block (and ``overrides``) describe."""
    from warmplan.workers.builtin.config import EngineConfig

    try:
        return EngineConfig.from_mapping({**plan.builtin, **(overrides or {})})
    except (ValueError, TypeError, KeyError) as exc:
        raise UserError(f"{plan.path}: builtin: {exc}") from None


def batch_cases(specs: Sequence[Spec]) -> list[tuple[str, Case]]:
    """The kernel cases one batch of ``specs`` reaches (``ModelRunner.step``)."""
    n = sum(m for m, _, _ in specs)
    prefill = [ctx for _, ctx, decode in specs if not decode]
    out: list[tuple[str, Case]] = []
    if prefill:
        out.append(("chunk_metadata", {"has_prior_context": any(c > 0 for c in prefill)}))
    out.append(("slot_mapping", {"num_tokens": n}))
    out.append(("forward", {"num_tokens": n, "impl": "auto"}))
    return out


def specs_of(batch: Batch) -> list[Spec]:
    """A trace batch as ``(num_new, context, decode)`` specs (``BuiltinWorker.execute``)."""
    from warmplan.workers.builtin.config import DECODE_CONTEXT

    specs: list[Spec] = [(1, DECODE_CONTEXT, True)] * batch.decode
    return specs + [(c.tokens, c.context, False) for c in batch.prefill]


@contextlib.contextmanager
def binding(target: str | None) -> Iterator[None]:
    """Triton bound for ``target`` (``sm90``) while keys are derived; nothing on CPU."""
    if target is None:
        yield
        return
    try:
        import triton  # noqa: F401
    except ImportError:
        raise UserError("--platform cuda keys Triton kernels: Triton is not installed") from None
    from warmplan.workers.triton_target import target_driver

    with target_driver(target):
        yield


def key_model(engine: Any, target: str | None) -> Any:
    import warnings

    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    from warmplan.workers.builtin.jit_keys import KeyModel

    return KeyModel(engine, triton=target is not None)


# --------------------------------------------------------------------------- needed keys


def needed_keys(
    model: Any, traces: Sequence[Trace], limits: SchedulerLimits, *, step_s: float = DEFAULT_STEP_S
) -> tuple[dict[str, Need], int]:
    """Every compile key the batches of ``traces`` reach, in first-seen order, and
    the number of batches."""
    needed: dict[str, Need] = {}
    count: dict[str, int] = {}
    seen: dict[str, set[int]] = {}
    batches = 0
    for trace in traces:
        replay = replay_batches(trace, limits, step_s=step_s)
        for index, entry in enumerate(replay.entries):
            batches += 1
            for kernel, case in batch_cases(specs_of(entry.batch)):
                key, label, _ = model.key_of(kernel, case)
                count[key] = count.get(key, 0) + 1
                if kernel == "slot_mapping":
                    seen.setdefault(key, set()).add(case["num_tokens"])
                if key not in needed:
                    needed[key] = Need(
                        kernel=kernel,
                        key=key,
                        label=label,
                        case=case,
                        trace=trace.path,
                        line=entry.where,
                        index=index,
                    )
    return {
        k: replace(n, batches=count[k], counts=tuple(sorted(seen.get(k, ()))))
        for k, n in needed.items()
    }, batches


# --------------------------------------------------------------------------- covered keys


def _keys_of_cases(model: Any, cases: Sequence[tuple[str, Case]]) -> dict[str, tuple[str, Case]]:
    out: dict[str, tuple[str, Case]] = {}
    for kernel, case in cases:
        key, _, _ = model.key_of(kernel, case)
        out.setdefault(key, (kernel, case))
    return out


def step_infos(plan: Plan, model: Any, engine: Any, limits: Limits, facts: Facts) -> list[StepInfo]:
    """Each step of ``plan`` on this worker, with the keys it covers."""
    from warmplan.domains import DomainError
    from warmplan.workers.builtin.config import dummy_specs

    resolved = resolve(plan, limits, facts, CacheContext(cache_root="/nonexistent"))
    by_id = {r.id: r for r in resolved.steps}
    out: list[StepInfo] = []
    for index, (step, r) in enumerate(zip(plan.steps, resolved.steps, strict=True)):
        info = StepInfo(id=r.id, kind=r.kind, index=index, status="candidate")
        out.append(info)
        if r.skipped is not None:
            info.status, info.note = "gated", f"skipped on this worker: {r.skipped}"
            continue
        if r.kind in KEPT_KINDS:
            info.status = "kept"
            info.note = (
                "tunes: never removed (a loaded tuning cache skips its run, so its "
                "compiles are not counted as cover)"
                if r.kind == "autotune"
                else "an engine's own warmup: never removed"
            )
            continue
        replacer = by_id.get(r.replaced_by) if r.replaced_by else None
        if replacer is not None and replacer.skipped is None:
            if replacer.kind == "compile_keys":
                info.status = "replaced"
                info.note = f"replaced by {replacer.id} (compile keys): never runs here"
            else:
                info.status = "kept"
                info.note = f"runs only when {replacer.id} does not run its run: left as it is"
            continue
        if r.kind == "compile_keys":
            info.kernel = getattr(step, "kernel", None)
            names = list(model.kernels()) if info.kernel == "*" else [info.kernel]
            for name in names:
                if name not in model.kernels():
                    info.status = "kept"
                    info.note = f"kernel {name!r} is not a built-in kernel: left as it is"
                    break
                try:
                    keyset, cases = model.keyset(name, step.domain, step.mode, limits)  # type: ignore[attr-defined]
                except DomainError as exc:
                    where = getattr(r, "where_prefix", r.id)
                    raise UserError(f"{where}.{exc.path}: {exc.message}") from None
                for k in keyset.keys:
                    info.covers.setdefault(k.key, (str(name), dict(cases[k.key])))
        elif r.kind == "slot_mapping":
            info.tokens = tuple(r.applied)
            info.covers = _keys_of_cases(
                model, [("slot_mapping", {"num_tokens": n}) for n in r.applied]
            )
        elif r.kind == "dummy_run":
            info.tokens = tuple(r.applied)
            shape, prior = r.forward()
            batch: list[tuple[str, Case]] = []
            for n in r.applied:
                batch += batch_cases(dummy_specs(engine, str(shape), n, prior))
            info.covers = _keys_of_cases(model, batch)
        else:
            info.status = "kept"
            info.note = f"a {r.kind} step: not modelled, left as it is"
    return out


# --------------------------------------------------------------------------- set cover


def set_cover(
    universe: Sequence[str],
    candidates: Sequence[tuple[str, frozenset[str], int]],
    *,
    node_budget: int = SEARCH_NODES,
) -> tuple[list[str], bool]:
    """A cheapest subset of ``candidates`` (id, keys, cost) covering ``universe``;
    ``(ids in candidate order, exact)``. Branch and bound on the key with fewest
    covers; greedy (cost per new key) when the search passes ``node_budget``.
    Deterministic. Every key must be coverable."""
    order = {c[0]: i for i, c in enumerate(candidates)}
    covering = {k: [c for c in candidates if k in c[1]] for k in universe}
    greedy = _greedy(universe, candidates)
    best_cost = sum(c[2] for c in candidates if c[0] in greedy)
    best: list[str] = list(greedy)
    nodes = 0
    exact = True

    def search(uncovered: frozenset[str], chosen: list[str], cost: int) -> None:
        nonlocal nodes, exact, best_cost, best
        nodes += 1
        if nodes > node_budget:
            exact = False
            return
        if cost > best_cost or (cost == best_cost and len(chosen) >= len(best)):
            return
        if not uncovered:
            best_cost, best = cost, list(chosen)
            return
        key = min(uncovered, key=lambda k: (len(covering[k]), universe.index(k)))
        for cid, keys, c in sorted(covering[key], key=lambda x: (x[2], order[x[0]])):
            if cid in chosen:
                continue
            chosen.append(cid)
            search(uncovered - keys, chosen, cost + c)
            chosen.pop()

    search(frozenset(universe), [], 0)
    return sorted(best, key=lambda i: order[i]), exact


def _greedy(
    universe: Sequence[str], candidates: Sequence[tuple[str, frozenset[str], int]]
) -> list[str]:
    left = set(universe)
    chosen: list[str] = []
    while left:
        pick = min(
            (c for c in candidates if c[0] not in chosen and c[1] & left),
            key=lambda c: (c[2] / len(c[1] & left), -len(c[1] & left)),
        )
        chosen.append(pick[0])
        left -= pick[1]
    # Drop what the rest cover, most expensive first.
    by_id = {c[0]: c for c in candidates}
    for cid in sorted(chosen, key=lambda i: -by_id[i][2]):
        rest = set().union(*(by_id[o][1] for o in chosen if o != cid))
        if set(universe) <= rest:
            chosen.remove(cid)
    return chosen


# --------------------------------------------------------------------------- minimise


class MissingKeys(UserError):
    """Needed keys no step covers; ``suggestion`` is a compile_keys step for them."""

    def __init__(self, message: str, missing: Sequence[Need], suggestion: str) -> None:
        super().__init__(message)
        self.missing = list(missing)
        self.suggestion = suggestion


def minimize(
    plan: Plan,
    traces: Sequence[Trace],
    *,
    platform: str = "cpu",
    capability: tuple[int, int] | None = None,
    step_s: float = DEFAULT_STEP_S,
    overrides: Mapping[str, Any] | None = None,
) -> Result:
    """The minimised plan for ``traces`` on the built-in engine of ``plan`` (see the
    module docstring). Raises ``MissingKeys`` (a ``UserError``) when a batch needs a
    key no step covers."""
    from warmplan.workers.builtin.config import facts_for

    engine = engine_of(plan, overrides)
    target = None
    if platform == "cuda":
        major, minor = capability or (9, 0)
        target = f"sm{major}{minor}"
    facts = facts_for(engine, platform, (capability or (9, 0)) if platform == "cuda" else None)
    shim = _Shim(engine)
    limits = shim.limits
    sched = SchedulerLimits.of_worker(shim)
    model = key_model(engine, target)
    with binding(target):
        needed, batches = needed_keys(model, traces, sched, step_s=step_s)
        steps = step_infos(plan, model, engine, limits, facts)
        uncovered = [
            n
            for k, n in needed.items()
            if not any(k in s.covers for s in steps if s.status == "candidate")
        ]
        if uncovered:
            raise _missing(uncovered, model, limits)
        candidates = [
            (s.id, frozenset(s.covers) & frozenset(needed), COST.get(s.kind, 1000))
            for s in steps
            if s.status == "candidate" and set(s.covers) & set(needed)
        ]
        chosen, exact = set_cover(list(needed), candidates)
        _assign(steps, chosen, needed)
        _decide(steps, needed)
        text = render(plan, steps, model, limits, needed)
    return Result(
        plan=plan,
        platform=platform if target is None else f"cuda ({target})",
        needed=needed,
        steps=steps,
        text=text,
        batches=batches,
        exact=exact,
    )


def _missing(uncovered: Sequence[Need], model: Any, limits: Limits) -> MissingKeys:
    by_kernel: dict[str, dict[str, list[Any]]] = {}
    for n in uncovered:
        domain = by_kernel.setdefault(n.kernel, {})
        for name, value in n.case.items():
            if name == "num_tokens" and n.kernel == "forward":
                value = model.padded(value)
            if value not in domain.setdefault(name, []):
                domain[name].append(value)
    steps = []
    for kernel, domain in by_kernel.items():
        steps.append(
            {
                "id": f"keys-{kernel.replace('_', '-')}",
                "kind": "compile_keys",
                "kernel": kernel,
                "domain": {
                    k: _Flow(sorted(v, key=_sortable))
                    for k, v in domain.items()
                    if k != "impl" or v != ["auto"]
                },
                "description": "Suggested by warmplan minimize: keys no step of the plan covers.",
            }
        )
    suggestion = dump(steps)
    lines = [f"{len(uncovered)} compile key(s) the traces need are covered by no step of the plan:"]
    for n in uncovered:
        lines.append(f"  {n.where}: {n.kernel} {n.label} (key {n.key})")
    lines.append("a compile_keys step that covers them (paste under steps:):")
    lines += ["  " + line for line in suggestion.splitlines()]
    return MissingKeys("\n".join(lines), uncovered, suggestion)


def _sortable(v: Any) -> tuple[str, Any]:
    return (type(v).__name__, v)


def _assign(steps: list[StepInfo], chosen: Sequence[str], needed: Mapping[str, Need]) -> None:
    """Which chosen step compiles each needed key: a dummy run compiles its whole
    batch anyway; then slot-mapping steps; then compile-key steps, in plan order."""
    picked = [s for s in steps if s.id in set(chosen)]
    taken: set[str] = set()
    for kind in ("dummy_run", "slot_mapping", "compile_keys"):
        for s in picked:
            if s.kind != kind:
                continue
            mine = [k for k in needed if k in s.covers and k not in taken]
            s.assigned = mine
            taken.update(mine)


def _decide(steps: list[StepInfo], needed: Mapping[str, Need]) -> None:
    """Each step's action and why, from the cover and the assignment."""
    order = [s.id for s in steps]
    for s in steps:
        if s.status == "gated":
            s.action, s.why = "kept", s.note + " (left as it is)"
        elif s.status == "kept":
            s.action, s.why = "kept", s.note
        elif s.status == "replaced":
            s.action, s.why = "removed", s.note
        elif not s.assigned:
            s.action = "removed"
            mine = [k for k in s.covers if k in needed]
            by = sorted({o.id for o in steps for k in o.assigned if k in mine}, key=order.index)
            s.why = (
                f"its {len(mine)} needed key(s) are compiled by {', '.join(by)} (cheaper)"
                if mine
                else "covers no key the traces need"
            )
        elif s.kind == "dummy_run":
            s.action, s.after = "kept", len(s.covers)
            s.why = f"the cheapest cover of {len(s.assigned)} needed key(s)"
        elif s.kind == "slot_mapping":
            s.after = len(s.assigned)
            s.action = "narrowed" if len(s.assigned) < len(s.tokens) else "kept"
            s.why = f"{len(s.assigned)} needed slot-mapping class(es): one count each"
        else:
            s.after = len(s.assigned)
            if len(s.assigned) < len(s.covers):
                s.action = "narrowed"
                s.why = f"{len(s.assigned)} needed key(s); domain narrowed to their values"
            else:
                s.action = "kept"
                s.why = f"every one of its keys is needed ({len(s.assigned)})"


# --------------------------------------------------------------------------- rendering


class _Flow(list[Any]):
    """A list written inline: ``num_tokens: [16, 32]``."""


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


_Dumper.add_representer(
    _Flow,
    lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True),
)


def dump(steps: Sequence[Mapping[str, Any]]) -> str:
    return yaml.dump(
        list(steps), Dumper=_Dumper, sort_keys=False, default_flow_style=None, width=100
    )


def _narrowed_domains(
    s: StepInfo, raw: Mapping[str, Any], model: Any, limits: Limits
) -> list[tuple[str, dict[str, Any]]]:
    """``(kernel, fields)`` of each compile_keys step the narrowed ``s`` becomes (one,
    or one per kernel for ``kernel: "*"``): ``domain`` (explicit values), maybe ``rows``."""
    from warmplan.domains import domain_from_raw

    groups: dict[str, list[str]] = {}
    for k in s.assigned:
        groups.setdefault(s.covers[k][0], []).append(k)
    out = []
    own = list((raw.get("domain") or {}).keys())
    row_names = list((raw.get("rows") or [{}])[0].keys())
    for kernel, keys in groups.items():
        cases = [s.covers[k][1] for k in keys]
        declared = model.kernels()[kernel].domain
        declared_values = dict(declared.params)
        names = list(cases[0])
        domain: dict[str, Any] = {}
        for name in names:
            values: list[Any] = []
            for c in cases:
                if c[name] not in values:
                    values.append(c[name])
            values.sort(key=_sortable)
            if (
                name in own
                or name in row_names
                or len(values) > 1
                or tuple(values) != tuple(declared_values.get(name, ()))
            ):
                domain[name] = _Flow(values)
        fields: dict[str, Any] = {"domain": domain}
        if raw.get("where"):
            fields["where"] = list(raw["where"])
        if _keys_equal(model, kernel, fields, keys, limits, domain_from_raw):
            out.append((kernel, fields))
            continue
        rows = [{n: c[n] for n in names} for c in cases]
        fields = {"rows": rows}
        if raw.get("where"):
            fields["where"] = list(raw["where"])
        out.append((kernel, fields))
    return out


def _keys_equal(
    model: Any,
    kernel: str,
    fields: Mapping[str, Any],
    keys: Sequence[str],
    limits: Limits,
    from_raw: Any,
) -> bool:
    try:
        keyset, _ = model.keyset(kernel, from_raw(fields), "replace", limits)
    except Exception:  # a narrowed domain the model refuses falls back to rows
        return False
    return {k.key for k in keyset.keys} == set(keys)


def _slot_count(s: StepInfo, key: str, model: Any, needed: Mapping[str, Need]) -> int:
    """The count a narrowed slot-mapping step keeps for class ``key``: one of its own
    that the traces run too, else the first of its own (in its order)."""
    mine = [n for n in s.tokens if model.key_of("slot_mapping", {"num_tokens": n})[0] == key]
    run = set(needed[key].counts) if key in needed else set()
    return next((n for n in mine if n in run), mine[0])


def render(
    plan: Plan,
    steps: Sequence[StepInfo],
    model: Any,
    limits: Limits,
    needed: Mapping[str, Need] | None = None,
) -> str:
    """The plan's text with removed steps cut out and narrowed ones re-rendered."""
    raw = yaml.safe_load(plan.source)
    raw_steps = raw["steps"]
    needed = needed or {}
    removed = {s.id for s in steps if s.action == "removed"}
    new: dict[int, list[dict[str, Any]]] = {}
    drop: set[int] = set()
    for s in steps:
        step = raw_steps[s.index]
        if s.action == "removed":
            continue
        changed: list[dict[str, Any]] | None = None
        if s.action == "narrowed" and s.kind == "slot_mapping":
            d = dict(step)
            d["tokens"] = _Flow(sorted(_slot_count(s, k, model, needed) for k in s.assigned))
            changed = [d]
        elif s.action == "narrowed" and s.kind == "compile_keys":
            parts = _narrowed_domains(s, step, model, limits)
            changed = []
            for j, (kernel, fields) in enumerate(parts):
                d = {}
                for k, v in step.items():
                    if k in ("domain", "rows", "where", "mode"):
                        continue
                    d[k] = v
                    if k == "kernel":
                        d.update(fields)
                d["kernel"] = kernel
                if len(parts) > 1:
                    d["id"] = f"{step['id']}-{kernel.replace('_', '-')}"
                    if j and "replaces" in d:
                        del d["replaces"]
                changed.append(d)
            s.split = len(parts) if len(parts) > 1 else 0
            if s.split:
                s.why += f'; kernel "*" split into {len(parts)} steps, one per kernel'
        target = step.get("replaces") if isinstance(step, dict) else None
        if target in removed:
            for d in changed or []:
                d.pop("replaces", None)
            if changed is None:
                drop.add(s.index)
            s.why += f"; replaces {target} dropped ({target} removed)"
        if changed is not None:
            new[s.index] = changed
    text = edit_steps(
        plan.source,
        drop_replaces=drop,
        removed_indexes={s.index for s in steps if s.action == "removed"},
        new=new,
        file=plan.path or "<plan>",
    )
    parse_plan(text, file=plan.path or "<minimised plan>")
    return text


def _content_end(node: yaml.Node) -> yaml.Mark:
    """Where a node's own text ends (a block collection's end mark sits after the
    comments that follow it)."""
    if isinstance(node, yaml.MappingNode) and not node.flow_style and node.value:
        return _content_end(node.value[-1][1])
    if isinstance(node, yaml.SequenceNode) and not node.flow_style and node.value:
        return _content_end(node.value[-1])
    return node.end_mark


def _replaces_lines(item: yaml.Node, lines: Sequence[str]) -> tuple[int, int] | None:
    """The lines of a block step's ``replaces:`` entry, when they hold nothing else."""
    if not isinstance(item, yaml.MappingNode) or item.flow_style:
        return None
    for k, v in item.value:
        if getattr(k, "value", None) != "replaces":
            continue
        a = k.start_mark.line
        end = _content_end(v)
        b = end.line if end.column > 0 else end.line - 1
        if lines[a][: k.start_mark.column].strip() or a == item.start_mark.line:
            return None
        tail = lines[b][end.column :].strip()
        if tail and not tail.startswith("#"):
            return None
        return a, b
    return None


def _owned(node: yaml.Node, lo: int, hi: int, seen: set[int], outside: list[yaml.Node]) -> None:
    if id(node) in seen:
        return
    seen.add(id(node))
    if not lo <= node.start_mark.line <= hi:
        outside.append(node)  # an alias of a node anchored elsewhere
        return
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            _owned(k, lo, hi, seen, outside)
            _owned(v, lo, hi, seen, outside)
    elif isinstance(node, yaml.SequenceNode):
        for v in node.value:
            _owned(v, lo, hi, seen, outside)


def edit_steps(
    source: str,
    *,
    removed_indexes: set[int],
    new: Mapping[int, list[dict[str, Any]]],
    file: str,
    drop_replaces: set[int] | None = None,
) -> str:
    """``source`` with the steps at ``removed_indexes`` cut out (with the comment lines
    above them), those in ``new`` replaced by the rendered mappings and the
    ``replaces:`` lines of ``drop_replaces`` cut; a kept step that aliases an anchor of
    a cut or rewritten step is re-rendered expanded."""
    drop = set(drop_replaces or ())
    root = yaml.compose(source, Loader=yaml.SafeLoader)
    raw = yaml.safe_load(source)
    steps_key = None
    steps = None
    if isinstance(root, yaml.MappingNode):
        for k, v in root.value:
            if getattr(k, "value", None) == "steps":
                steps_key, steps = k, v
    if not isinstance(steps, yaml.SequenceNode) or steps.flow_style or steps_key is None:
        raise UserError(f"{file}: 'steps' is not a block list; cannot edit it in place")
    lines = source.splitlines(keepends=True)
    spans = []  # (chunk start line, item first line, item last line)
    prev_end = steps_key.start_mark.line
    for item in steps.value:
        end = _content_end(item)
        last = end.line if end.column > 0 else end.line - 1
        spans.append((prev_end + 1, item.start_mark.line, last))
        prev_end = last
    new = {i: list(v) for i, v in new.items()}
    touched = removed_indexes | set(new)
    for i, item in enumerate(steps.value):
        if i in touched:
            continue
        outside: list[yaml.Node] = []
        _owned(item, spans[i][1], spans[i][2], set(), outside)
        for node in outside:
            owner = next(
                (j for j, (_, a, b) in enumerate(spans) if a <= node.start_mark.line <= b), None
            )
            if owner is not None and owner in touched:
                new[i] = [copy.deepcopy(raw["steps"][i])]
                break
    cut: dict[int, tuple[int, int]] = {}  # step -> its replaces: lines
    for i in sorted(drop - removed_indexes - set(new)):
        item = steps.value[i]
        at = _replaces_lines(item, lines)
        if at is None:
            new[i] = [{k: v for k, v in raw["steps"][i].items() if k != "replaces"}]
        else:
            cut[i] = at
    for i in drop & set(new):
        for d in new[i]:
            d.pop("replaces", None)
    out: list[str] = lines[: spans[0][0]] if spans else list(lines)
    for i, (chunk, first, last) in enumerate(spans):
        if i in removed_indexes:
            continue
        out += lines[chunk:first]
        if i in new:
            dash = lines[first].find("-")
            indent = " " * max(dash, 0)
            body = dump(new[i])
            out += [f"{indent}{line}\n" for line in body.splitlines()]
        elif i in cut:
            a, b = cut[i]
            out += lines[first:a] + lines[b + 1 : last + 1]
        else:
            out += lines[first : last + 1]
    tail = spans[-1][2] + 1 if spans else len(lines)
    if out and not out[-1].endswith("\n"):
        out[-1] += "\n"
    out += lines[tail:]
    if len(removed_indexes) == len(spans):
        raise UserError(f"{file}: every step would be removed; the traces need nothing of it")
    return "".join(out)
