"""``compile_keys``: compile a kernel's declared compile keys without running it.

A forward or a slot-mapping call warms the kernels it happens to reach, once per
call; most calls of a fan reach variants already compiled (21 slot-mapping sizes
are 3 Triton variants). This step names the kernel and its parameters' domains
(``warmplan.domains``: values, ranges, rows in lockstep, ``where`` filters); the
worker expands the domain, deduplicates the cases by the compiler's own key (for
Triton, its binder's specialisation and cache key, autotune configs included) and
compiles each key once, without a launch, concurrently where the compiler allows
(``threads``). ``kernel: "*"`` warms every kernel the worker registers with its
own domain (on vLLM 0.34, its ``jit_warmup_registry``).

Across ranks (``split: auto`` with more than one rank) the keys are divided among
the ranks; each compiles its share, the ranks exchange the files their compiles
wrote (``warmplan.world.exchange``: only what is new, nothing when the ranks share
one cache root), and then each loads the rest from disk, so cold time falls with
the number of ranks. The report's ``split`` says how: keys and seconds of this
rank's share, the exchange's seconds and bytes.

The report lists each key: kernel, label, outcome (``compiled``, ``loaded`` from
disk, ``present`` in the process), seconds, and the rank that compiled it.

Over ~400 lines on purpose: a step kind is one module (schema fragment, records,
checks, resolution and run), and this one's run includes the split across ranks.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

from warmplan.domains import (
    MAX_CASES,
    DomainError,
    KeyDomain,
    declared_count,
    domain_from_raw,
    parse_filter,
)
from warmplan.errors import PlanError, StepError
from warmplan.log import Logger
from warmplan.steps.base import (
    KeysReport,
    ResolveContext,
    ResolvedStep,
    StepFields,
    StepKind,
    StepResult,
    StepSpec,
)
from warmplan.steps.common import COMMON_FIELDS, ID_PATTERN, Path, Problems, obj
from warmplan.workers.base import (
    CompileKey,
    KeyedWorker,
    KeyResult,
    KeySet,
    StepUnsupported,
    Worker,
)
from warmplan.world import DEFAULT_TIMEOUT_S, World, WorldError
from warmplan.world.exchange import Snapshot, exchange_artefacts, snapshot

NAME: Final = "compile_keys"
ALL: Final = "*"
KERNEL_PATTERN: Final = r"^(\*|[A-Za-z_][A-Za-z0-9_.:-]*)$"
PARAM_PATTERN: Final = "^[A-Za-z_][A-Za-z0-9_]*$"
MAX_THREADS: Final = 64

Split = Literal["auto", "none"]

_SCALAR: dict[str, Any] = {
    "description": "One value: a number, a string, true/false or null.",
    "oneOf": [{"type": "number"}, {"type": "string"}, {"type": "boolean"}, {"type": "null"}],
}
_RANGE: dict[str, Any] = obj(
    {
        "range": {
            "type": "array",
            "prefixItems": [
                {"type": "integer", "description": "first value (inclusive)"},
                {"type": "integer", "description": "last value (inclusive)"},
            ],
            "items": False,
            "minItems": 2,
            "maxItems": 2,
            "description": "Every integer from the first to the last, inclusive.",
        },
        "step": {"type": "integer", "minimum": 1, "description": "Stride (default 1)."},
    },
    required=("range",),
    description=(
        "An integer range. Over a plain int Triton specialises, it collapses to one "
        "value per class (== 1, % 16 == 0, other) unless a filter reads the parameter."
    ),
)
_ITEM: dict[str, Any] = {"description": "A value or an integer range.", "oneOf": [_SCALAR, _RANGE]}

SCHEMA: dict[str, Any] = obj(
    {
        **COMMON_FIELDS,
        "kind": {
            "const": NAME,
            "description": "Compile a kernel's declared compile keys without running it.",
        },
        "kernel": {
            "type": "string",
            "pattern": KERNEL_PATTERN,
            "description": (
                "The kernel by name (built-in engine: slot_mapping, chunk_metadata, forward; "
                'on vLLM, a kernel its jit_warmup_registry holds), or "*" for every kernel '
                "the worker registers, each with its own domain."
            ),
        },
        "domain": {
            "type": "object",
            "propertyNames": {"pattern": PARAM_PATTERN},
            "additionalProperties": {
                "description": "The parameter's values: one value, or a list of values and ranges.",
                "oneOf": [
                    _SCALAR,
                    _RANGE,
                    {"type": "array", "items": _ITEM, "minItems": 1},
                ],
            },
            "description": (
                "Parameter -> values. Replaces (mode: replace) or adds to (mode: extend) "
                "the kernel's declared values of that parameter; the cases are the product."
            ),
        },
        "rows": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "propertyNames": {"pattern": PARAM_PATTERN},
                "additionalProperties": _SCALAR,
                "description": "One row: parameter -> value. Every row has the same names.",
            },
            "description": "Parameters that vary in lockstep: one case per row, not a product.",
        },
        "where": {
            "type": "array",
            "items": {"type": "string", "minLength": 1},
            "description": (
                "Filters: a case is kept when every expression is true over its parameters "
                "and the worker's limits (max_num_tokens, max_num_batched_tokens, "
                "max_num_seqs) and facts. Python syntax: arithmetic, comparisons, and/or/not, "
                "min, max, abs, cdiv, is_power_of_two."
            ),
        },
        "replaces": {
            "type": "string",
            "pattern": ID_PATTERN,
            "description": (
                "The id of a later slot_mapping or dummy_run step whose compiles this step "
                "covers: skipped when this step compiled its keys, run when it did not "
                "(a worker without the kernel)."
            ),
        },
        "mode": {
            "enum": ["replace", "extend"],
            "default": "replace",
            "description": "How the domain's values combine with the kernel's declared ones.",
        },
        "threads": {
            "oneOf": [
                {"type": "integer", "minimum": 1, "maximum": MAX_THREADS},
                {"const": "auto"},
            ],
            "default": "auto",
            "description": "Concurrent compiles (auto: the CPU count, at most 8).",
        },
        "split": {
            "enum": ["auto", "none"],
            "default": "auto",
            "description": (
                "auto: with several ranks, each compiles a share of the keys and the "
                "ranks exchange the artefacts; none: every rank compiles every key."
            ),
        },
    },
    required=("id", "kind", "kernel"),
    description="Compile a kernel's declared compile keys, deduplicated, without a launch.",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class CompileKeysStep(StepSpec):
    kernel: str
    domain: KeyDomain | None = None
    mode: str = "replace"
    threads: int | None = None  # None: auto
    split: Split = "auto"


@dataclass(frozen=True, slots=True, kw_only=True)
class ResolvedCompileKeys(ResolvedStep):
    kernel: str
    domain: KeyDomain | None
    mode: str
    threads: int
    split: Split
    declared: int | None  # cases the plan's domain declares, before collapse and filters
    where_prefix: str  # "plan.yaml:12: steps[3]" for run-time domain problems

    def as_dict(self) -> dict[str, Any]:
        out = {**ResolvedStep.as_dict(self), "kernel": self.kernel, "mode": self.mode}
        out.update(self.domain.as_dict() if self.domain else {})
        out["declared_cases"] = self.declared
        out["threads"] = self.threads
        out["split"] = self.split
        return out

    def detail(self) -> str:
        what = "every registered kernel" if self.kernel == ALL else f"kernel {self.kernel}"
        if self.declared is None:
            return f"{what}, its own domain"
        return f"{what}, {self.declared} case{'s' * (self.declared != 1)} declared"


def _threads(raw: Any) -> int | None:
    return None if raw in (None, "auto") else int(raw)


def build(raw: Mapping[str, Any], common: StepFields) -> CompileKeysStep:
    has_domain = any(k in raw for k in ("domain", "rows", "where"))
    return CompileKeysStep(
        **common,
        kernel=raw["kernel"],
        domain=domain_from_raw(raw) if has_domain else None,
        mode=raw.get("mode", "replace"),
        threads=_threads(raw.get("threads")),
        split=raw.get("split", "auto"),
    )


def check(raw: Mapping[str, Any], path: Path, problems: Problems) -> None:
    """Filters parse; ranges run forward; rows share their names; the declared
    product stays under ``MAX_CASES`` (ranges count in full here)."""
    where = raw.get("where")
    for j, text in enumerate(where if isinstance(where, list) else []):
        if isinstance(text, str):
            try:
                parse_filter(text)
            except ValueError as exc:
                problems.add((*path, "where", j), f"expected a filter expression: {exc}")
    domain = raw.get("domain")
    ok = True
    for name, value in (domain if isinstance(domain, dict) else {}).items():
        items = value if isinstance(value, list) else [value]
        for j, item in enumerate(items):
            if isinstance(item, dict) and isinstance(item.get("range"), list):
                bounds = item["range"]
                if len(bounds) == 2 and all(isinstance(b, int) for b in bounds):
                    if bounds[0] > bounds[1]:
                        where_at = (*path, "domain", name) + (
                            (j,) if isinstance(value, list) else ()
                        )
                        problems.add(
                            (*where_at, "range"),
                            f"expected first <= last, found [{bounds[0]}, {bounds[1]}]",
                        )
                        ok = False
                    continue
            if isinstance(item, dict | list):
                ok = False
    rows = raw.get("rows")
    if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
        first = set(rows[0])
        for j, row in enumerate(rows[1:], start=1):
            if set(row) != first:
                problems.add(
                    (*path, "rows", j),
                    f"expected the names of rows[0] ({', '.join(sorted(first))}), "
                    f"found {', '.join(sorted(row))}",
                )
                ok = False
        clash = first & set(domain if isinstance(domain, dict) else {})
        if clash:
            problems.add(
                (*path, "rows"),
                f"expected names apart from domain's, found {', '.join(sorted(clash))} in both",
            )
    if ok and isinstance(domain, dict):
        try:
            n = declared_count(domain_from_raw({"domain": domain, "rows": rows or []}))
        except (KeyError, TypeError, ValueError):
            return
        if n > MAX_CASES:
            problems.add(
                (*path, "domain"),
                f"expected at most {MAX_CASES} cases, the domain declares {n} "
                "(ranges over Triton ints collapse to their classes; list fewer values)",
            )


def resolve(step: CompileKeysStep, ctx: ResolveContext) -> ResolvedCompileKeys:
    threads = step.threads or min(8, os.cpu_count() or 1)
    file = ctx.plan_path or "<plan>"
    return ResolvedCompileKeys(
        id=step.id,
        kind=step.kind,
        requested=(),
        applied=(),
        clamp_to="max_num_tokens",
        limit=ctx.limits.max_num_tokens,
        skipped=ctx.skipped,
        replaced_by=ctx.replaced_by,
        replaces=step.replaces,
        kernel=step.kernel,
        domain=step.domain,
        mode=step.mode,
        threads=threads,
        split=step.split,
        declared=declared_count(step.domain) if step.domain and step.domain.params else None,
        where_prefix=f"{file}:{step.line}: steps[{ctx.index}]",
    )


# --------------------------------------------------------------------------- run


# Exchanges the compiled artefacts of a split warmup among the ranks
# (``warmplan.world.exchange``); tests may install another, ``None`` turns the
# split off (every rank compiles every key).
class Exchange(Protocol):
    def __call__(
        self,
        world: World,
        dirs: Sequence[str],
        *,
        since: Snapshot | None,
        error: str | None,
        timeout_s: float,
    ) -> dict[str, Any]: ...


_exchange: Exchange | None = exchange_artefacts
# How long a rank waits for the others at the exchange: it covers the slowest
# rank's share of the compiles, not only the transfer.
EXCHANGE_TIMEOUT_S: Final = DEFAULT_TIMEOUT_S


def set_exchange(fn: Exchange | None) -> None:
    """Install how a split warmup moves artefacts between ranks (``None``: do not split)."""
    global _exchange
    _exchange = fn


def keysets(rstep: ResolvedCompileKeys, worker: KeyedWorker) -> list[KeySet]:
    """The step's keys on ``worker``, per kernel (no compile). ``StepUnsupported`` when
    the worker lacks the kernel; a domain problem is a ``PlanError`` naming the field."""
    offered = worker.jit_kernels()
    if rstep.kernel == ALL:
        names = list(offered)
    elif rstep.kernel in offered:
        names = [rstep.kernel]
    else:
        raise StepUnsupported(
            f"the {worker.describe().engine} worker has no kernel {rstep.kernel!r} to key; "
            f"it has: {', '.join(offered) or 'none'}"
        )
    out = []
    for name in names:
        try:
            out.append(worker.compile_keys(name, rstep.domain, mode=rstep.mode))
        except DomainError as exc:
            raise PlanError(
                [f"{rstep.where_prefix}.{exc.path}: {exc.message} (kernel {name})"]
            ) from None
    return out


def _share(keys: Sequence[CompileKey], rank: int, world_size: int) -> list[CompileKey]:
    """Rank ``rank``'s share: keys dealt round-robin in a fixed order, so every rank
    computes the same division without talking."""
    ordered = sorted(keys, key=lambda k: (k.kernel, k.key))
    return [k for i, k in enumerate(ordered) if i % world_size == rank]


def run(rstep: ResolvedCompileKeys, worker: Worker, log: Logger) -> StepResult:
    if not isinstance(worker, KeyedWorker):
        raise StepUnsupported(
            f"the {worker.describe().engine} worker cannot compile kernels by key "
            f"(kernel {rstep.kernel!r})"
        )
    sets = keysets(rstep, worker)
    keys = [k for s in sets for k in s.keys]
    world = worker.world
    split_info: dict[str, Any] | None = None
    results: dict[tuple[str, str], KeyResult] = {}
    if rstep.split == "auto" and world.world_size > 1 and _exchange is not None and keys:
        split_info = _split(rstep, worker, keys, results, _exchange)
    else:
        for r in worker.compile(keys, threads=rstep.threads):
            results[_ident(r.key)] = r
    info = worker.jit_kernels()
    kernels = []
    for s in sets:
        rs = [results[_ident(k)] for k in s.keys]
        kernels.append(
            {
                "kernel": s.kernel,
                "backend": info[s.kernel].backend if s.kernel in info else None,
                "declared_cases": s.declared,
                "cases": s.cases,
                "collapsed": list(s.collapsed),
                "keys": len(s.keys),
                "compiled": sum(r.outcome == "compiled" for r in rs),
                "loaded": sum(r.outcome == "loaded" for r in rs),
                "present": sum(r.outcome == "present" for r in rs),
                "seconds": round(sum(r.seconds for r in rs), 4),
            }
        )
        log.info(
            "keys.kernel",
            kernel=s.kernel,
            cases=s.cases,
            keys=len(s.keys),
            compiled=kernels[-1]["compiled"],
            loaded=kernels[-1]["loaded"],
        )
    per_key = [
        {
            **r.key.as_dict(),
            "outcome": r.outcome,
            "seconds": round(r.seconds, 4),
            **({"rank": r.rank} if r.rank is not None else {}),
        }
        for k in keys
        for r in [results[_ident(k)]]
    ]
    return StepResult(
        covers_run=True, keys=KeysReport(kernels=kernels, keys=per_key, split=split_info)
    )


def _split(
    rstep: ResolvedCompileKeys,
    worker: KeyedWorker,
    keys: Sequence[CompileKey],
    results: dict[tuple[str, str], KeyResult],
    exchange: Exchange,
) -> dict[str, Any]:
    """Compile this rank's share, exchange the artefacts, then compile (load) the rest.

    A failure in this rank's share is carried into the exchange, so every rank fails
    with one message naming this rank instead of waiting for it; a failed exchange
    (on any rank, or a peer that hung or died) is a ``StepError`` on every rank."""
    world = worker.world
    dirs = list(worker.key_artefacts())
    mine = _share(keys, world.rank, world.world_size)
    t0 = time.perf_counter()
    error: str | None = None
    cause: BaseException | None = None
    try:
        since = snapshot(dirs)
        for r in worker.compile(mine, threads=rstep.threads):
            results[_ident(r.key)] = KeyResult(
                key=r.key, outcome=r.outcome, seconds=r.seconds, rank=world.rank
            )
    except Exception as exc:
        error, cause = f"compiling its share of the keys: {type(exc).__name__}: {exc}", exc
        since = None
    own_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    try:
        moved = exchange(world, dirs, since=since, error=error, timeout_s=EXCHANGE_TIMEOUT_S)
    except WorldError as exc:
        raise StepError(rstep.id, str(exc), rank=world.rank) from (cause or exc)
    exchange_s = time.perf_counter() - t1
    rest = [k for k in keys if _ident(k) not in results]
    t2 = time.perf_counter()
    for r in worker.compile(rest, threads=rstep.threads):
        results[_ident(r.key)] = r
    return {
        "ranks": world.world_size,
        "own_keys": len(mine),
        "own_s": round(own_s, 4),
        "exchange_s": round(exchange_s, 4),
        "rest_keys": len(rest),
        "rest_s": round(time.perf_counter() - t2, 4),
        **moved,
    }


def _ident(key: CompileKey) -> tuple[str, str]:
    return key.kernel, key.key


# Collective when split: every rank takes its share and the exchange needs them all.
KIND: StepKind[CompileKeysStep, ResolvedCompileKeys] = StepKind(
    name=NAME, schema=SCHEMA, build=build, check=check, resolve=resolve, run=run, collective=True
)
