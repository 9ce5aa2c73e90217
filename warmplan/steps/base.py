"""The shape of a step kind: ``StepKind``, the record every kind's record extends
(``StepSpec``), the resolved step every kind's resolution extends (``ResolvedStep``),
what resolution gets (``ResolveContext``, with the one clamp) and what a run returns
(``StepResult``).

A kind is one module under ``warmplan/steps/`` that defines these and registers a
``StepKind`` in ``warmplan.steps.STEPS``; schema, loading, resolution and the executor
all dispatch through that registry. This module never imports torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypedDict, TypeVar

from warmplan.diagnostics import Report, format_path, read_yaml
from warmplan.errors import PlanError
from warmplan.log import Logger
from warmplan.steps.common import Gates, Path, Problems
from warmplan.workers.base import Facts, Limits, Shape, Worker

# --------------------------------------------------------------------------- records


class StepFields(TypedDict):
    """The fields every step record has, as the loader reads them (``**`` into a record)."""

    id: str
    kind: str
    description: str
    enabled: bool
    when: Gates
    replaces: str | None
    line: int


@dataclass(frozen=True, slots=True, kw_only=True)
class StepSpec:
    """What every step of a plan has. ``replaces`` names a later step whose run this
    one covers (only kinds whose schema has the field can set it)."""

    id: str
    kind: str
    description: str = ""
    enabled: bool = True
    when: Gates = field(default_factory=Gates)
    replaces: str | None = None
    line: int = 0

    def backends(self) -> tuple[str, ...]:
        """The autotune backends this step uses (their versions key cache paths)."""
        return ()


# --------------------------------------------------------------------------- resolution


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheContext:
    """What cache path templates and config hashes are made from."""

    cache_root: str
    arch: str = "unknown"  # "sm90", "sm120", "cpu"
    rank: int = 0
    world_size: int = 1
    backend_versions: Mapping[str, str] = field(default_factory=dict)
    config: Mapping[str, Any] = field(default_factory=dict)  # worker.config_fingerprint()


def arch_of(facts: Facts) -> str:
    """``sm90`` for capability 9.0, the platform (``cpu``) off CUDA."""
    if facts.device_capability is None:
        return facts.platform
    major, minor = facts.device_capability
    return f"sm{major}{minor}"


def clamp(requested: int, limit: int) -> int:
    """The one clamp: ``max(0, min(requested, limit))``."""
    return max(0, min(requested, limit))


def apply_limit(requested: Iterable[int], limit: int) -> tuple[int, ...]:
    """Clamp each count, drop zeros and duplicates after clamping; order kept."""
    seen: set[int] = set()
    out: list[int] = []
    for n in requested:
        applied = clamp(n, limit)
        if applied > 0 and applied not in seen:
            seen.add(applied)
            out.append(applied)
    return tuple(out)


class ResolvedFields(TypedDict):
    """The fields every resolved step has (``**`` into a resolved record)."""

    id: str
    kind: str
    requested: tuple[int, ...]
    applied: tuple[int, ...]
    clamp_to: str
    limit: int
    skipped: str | None
    replaced_by: str | None
    replaces: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class ResolvedStep:
    """One step after expansion, clamping, gating and rendering (``slot_mapping``'s
    resolution as it is; other kinds extend it)."""

    id: str
    kind: str
    requested: tuple[int, ...]  # token counts as the plan asked (expanded)
    applied: tuple[int, ...]  # after clamp, zeros dropped, duplicates dropped; order kept
    clamp_to: str  # name of the limit
    limit: int  # its value
    skipped: str | None = None  # reason, or None when the step runs
    replaced_by: str | None = None  # the step that covers this one if it runs its run
    replaces: str | None = None  # the later step this one covers when it runs its run

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (``warmplan plan --json``)."""
        return {
            "id": self.id,
            "kind": self.kind,
            "requested_tokens": list(self.requested),
            "applied_tokens": list(self.applied),
            "clamp_to": self.clamp_to,
            "limit": self.limit,
            "skipped": self.skipped,
            "replaced_by": self.replaced_by,
        }

    def detail(self) -> str:
        """What ``warmplan plan`` shows beside the token counts."""
        return ""

    def forward(self) -> tuple[Shape | None, int]:
        """The dummy-run shape and prior context the step runs, for the report."""
        return None, 0


@dataclass(frozen=True, slots=True, kw_only=True)
class ResolveContext:
    """What a kind's resolution gets besides its record."""

    limits: Limits
    facts: Facts
    cache: CacheContext
    plan_path: str | None
    plan_source: str = ""  # the plan's text, to place a resolution problem in it
    index: int  # the step's position in the plan
    skipped: str | None  # why a gate or ``enabled: false`` skips the step, if one does
    replaced_by: str | None  # the active step that covers this one

    def fields(self, step: StepSpec, requested: Iterable[int], clamp_to: str) -> ResolvedFields:
        """The common resolved fields: clamps once to the limit ``clamp_to`` names; a
        step whose counts all clamp to 0 is skipped, and says why."""
        requested = tuple(requested)
        limit = self.limits.get(clamp_to)
        applied = apply_limit(requested, limit)
        skipped = self.skipped
        if not applied and skipped is None:
            skipped = f"every requested token count clamps to 0 ({clamp_to} = {limit})"
        return ResolvedFields(
            id=step.id,
            kind=step.kind,
            requested=requested,
            applied=applied,
            clamp_to=clamp_to,
            limit=limit,
            skipped=skipped,
            replaced_by=self.replaced_by,
            replaces=step.replaces,
        )

    def error(self, step: StepSpec, path: str, message: str) -> PlanError:
        """A resolution problem (``path``: the field, dotted, such as ``cache.path``) in
        the form every input's problems take, ``file:line:column: steps[i].field:
        message``; the position is read back from the plan's text only now, so that
        resolving a valid plan records nothing extra."""
        file = self.plan_path or "<plan>"
        where: Path = ("steps", self.index, *path.split("."))
        if not self.plan_source:  # a plan built in code: the step's line is all there is
            return PlanError([f"{file}:{step.line}:1: {format_path(where)}: {message}"])
        report = Report(file, read_yaml(self.plan_source, file=file))
        report.add(where, message)
        return PlanError(report.messages())


# --------------------------------------------------------------------------- runs


@dataclass(frozen=True, slots=True, kw_only=True)
class AutotuneReport:
    """The ``autotune`` entry of a step's report line."""

    backend: str
    policy: str
    decision: str  # tune | load | skip
    cache_path: str | None
    fingerprint: str | None
    reason: str | None
    ran_run: bool = True  # false: loaded, and the tuning forward was skipped
    run_skipped: str | None = None  # why the run did not run after a load
    ignored: str | None = None  # this rank's file exists but was not used, and why
    entries: int | None = None  # entries of the FlashInfer table loaded or tuned
    coverage: dict[str, list[int]] | None = None  # op -> tuned token buckets


@dataclass(frozen=True, slots=True, kw_only=True)
class KeysReport:
    """The ``keys`` entry of a ``compile_keys`` step's report line: per kernel (cases,
    keys, compiled / loaded / present, seconds), per key, and how a split went."""

    kernels: list[dict[str, Any]] = field(default_factory=list)
    keys: list[dict[str, Any]] = field(default_factory=list)
    split: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class StepResult:
    """``covers_run``: the step ran its dummy run, so a step it ``replaces`` is covered."""

    covers_run: bool = False
    autotune: AutotuneReport | None = None
    keys: KeysReport | None = None


# --------------------------------------------------------------------------- the kind

RecordT = TypeVar("RecordT", bound=StepSpec)
ResolvedT = TypeVar("ResolvedT", bound=ResolvedStep)


def no_check(raw: Mapping[str, Any], path: Path, problems: Problems) -> None:
    """For kinds whose schema says everything."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StepKind(Generic[RecordT, ResolvedT]):
    """One step kind: everything warmplan knows about it, from one module.

    ``name``: the plan's ``kind`` value. ``schema``: the JSON Schema of the step
    mapping (``kind: {const: name}`` and the common fields included). ``build``: the
    record from validated data and the common fields. ``check``: problems the schema
    cannot express, on raw data of any shape. ``resolve``: the resolved step for one
    worker. ``run``: run it on a worker (``preserve_state`` and ``synchronize`` are the
    executor's). ``collective``: the run holds collectives, so every rank runs it and a
    rank may not run it early (shared compile caches stop before it).
    """

    name: str
    schema: Mapping[str, Any]
    build: Callable[[Mapping[str, Any], StepFields], RecordT]
    resolve: Callable[[RecordT, ResolveContext], ResolvedT]
    run: Callable[[ResolvedT, Worker, Logger], StepResult]
    check: Callable[[Mapping[str, Any], Path, Problems], None] = no_check
    collective: bool = False
