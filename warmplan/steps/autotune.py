"""The ``autotune`` step: tune a backend's kernels once, keep the results in a cache
file, and make every rank use the same results.

The step runs its ``run`` (a dummy forward) once on every rank, under tuning on the
rank(s) that tune and after loading elsewhere, so kernels compile with the tactics
that will serve. Who tunes and how ranks agree is the cache policy's business
(``warmplan.autotune.policy``: ``leader``, ``every_rank``, ``load_only``). A backend
this worker lacks, or cannot use here, makes the step ``skip`` on every rank (the
ranks agree first), and the step it ``replaces`` runs instead.

Resolution renders the cache path (confined to the cache root) and the
``config_hash`` of what changes tuning results.

Over ~400 lines on purpose: a step kind is one module (schema fragment, records,
checks, resolution and run together; docs/architecture.md), and this kind's cache
templates and rank agreement make it the largest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from warmplan.autotune import (
    DEFAULT_POLICY,
    DEFAULT_TIMEOUT_S,
    ON_MISSING,
    POLICIES,
    OnMissing,
    Policy,
    default_on_missing,
)
from warmplan.autotune.policy import RUNNERS, AutotuneOutcome, TuneContext, expected_metadata
from warmplan.diagnostics import did_you_mean
from warmplan.errors import StepError
from warmplan.log import Logger
from warmplan.steps.base import (
    AutotuneReport,
    CacheContext,
    ResolveContext,
    StepFields,
    StepKind,
    StepResult,
    StepSpec,
    arch_of,
)
from warmplan.steps.common import (
    COMMON_FIELDS,
    ID_PATTERN,
    RUN_FIELDS,
    Path,
    Problems,
    RunSpec,
    build_run,
    obj,
    timeout,
)
from warmplan.steps.dummy_run import ResolvedRun, requested_of, run_fields
from warmplan.workers.base import AutotuneBackend, Worker
from warmplan.world import WorldError

__all__ = ["AutotuneOutcome", "AutotuneStep", "ResolvedAutotune", "run_autotune"]

NAME: Final = "autotune"
Backend = Literal["builtin", "flashinfer", "flashinfer_dsv4_decode", "triton"]
BACKENDS: Final[tuple[Backend, ...]] = ("builtin", "flashinfer", "flashinfer_dsv4_decode", "triton")
PLACEHOLDERS: Final = ("cache_root", "backend", "backend_version", "arch", "config_hash", "rank")
DEFAULT_CACHE_PATH: Final = (
    "{cache_root}/autotune/{backend}/{backend_version}/{arch}/{config_hash}.json"
)

# --------------------------------------------------------------------------- schema

RUN: dict[str, Any] = obj(
    RUN_FIELDS,
    required=("shape", "tokens"),
    description="The dummy run to run under tuning (and, once loaded, to warm the tuned kernels).",
)

CACHE: dict[str, Any] = obj(
    {
        "path": {
            "type": "string",
            "minLength": 1,
            "description": "Cache file path template; placeholders {cache_root}, {backend}, {backend_version}, {arch}, {config_hash}, {rank}. Must stay inside the cache root.",
        },
        "policy": {
            "enum": list(POLICIES),
            "description": "leader: rank 0 tunes and broadcasts; every_rank: each rank tunes its own file; load_only: never tune (default leader).",
        },
        "on_missing": {
            "enum": list(ON_MISSING),
            "description": "When no usable cache file exists: tune (default; not with load_only), skip with a warning, or fail.",
        },
        "timeout_s": timeout(
            "How long ranks wait for each other in this step, in seconds (default 600)."
        ),
    },
    description="The persistent tuning cache and how ranks share it.",
)

SCHEMA: dict[str, Any] = obj(
    {
        **COMMON_FIELDS,
        "kind": {
            "const": NAME,
            "description": "Tune a backend's kernels, with a persistent cache.",
        },
        "backend": {
            "enum": list(BACKENDS),
            "description": "The tuning backend: builtin (the built-in engine's kernel choices), flashinfer (FlashInfer's autotuner), flashinfer_dsv4_decode (FlashInfer's DeepSeek-V4 SM120 sparse-MLA decode autotuner), triton (triton.autotune configs).",
        },
        "run": RUN,
        "cache": CACHE,
        "replaces": {
            "type": "string",
            "pattern": ID_PATTERN,
            "description": "The id of a later step whose run this step covers: skipped when this step runs its run, run when this step does not.",
        },
    },
    required=("id", "kind", "backend", "run"),
    description="Tune a backend while running a dummy run, and persist the results.",
)

# --------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheSpec:
    """Where tuning results persist and how ranks share them; ``on_missing`` ``None``
    is the policy's default (``default_on_missing``)."""

    path: str = DEFAULT_CACHE_PATH
    policy: Policy = DEFAULT_POLICY
    on_missing: OnMissing | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S


@dataclass(frozen=True, slots=True, kw_only=True)
class AutotuneStep(StepSpec):
    backend: Backend
    run: RunSpec
    cache: CacheSpec = field(default_factory=CacheSpec)

    def backends(self) -> tuple[str, ...]:
        return (self.backend,)


def build(raw: Mapping[str, Any], common: StepFields) -> AutotuneStep:
    cache = raw.get("cache", {})
    return AutotuneStep(
        **common,
        backend=raw["backend"],
        run=build_run(raw["run"]),
        cache=CacheSpec(
            path=cache.get("path", DEFAULT_CACHE_PATH),
            policy=cache.get("policy", DEFAULT_POLICY),
            on_missing=cache.get("on_missing"),
            timeout_s=float(cache.get("timeout_s", DEFAULT_TIMEOUT_S)),
        ),
    )


_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def template_problems(template: str) -> list[str]:
    """What makes a cache path template unusable on any worker, decided without one:
    braces that do not pair, control characters (NUL, newlines, escapes), ``..``
    segments (which can leave the cache root) and the bare root."""
    out = []
    try:
        list(string.Formatter().parse(template))
    except ValueError:
        out.append(
            f"expected {{placeholder}} braces in pairs, found {template!r}; write a literal brace as {{{{ or }}}}"
        )
    control = _CONTROL.search(template)
    if control is not None:
        out.append(
            f"expected printable characters, found {control.group()!r} at offset {control.start()}"
        )
    if ".." in re.split(r"[/\\]", template):
        out.append(
            f"expected no '..' segments, found {template!r}; cache files stay inside the cache root"
        )
    if re.fullmatch(r"\{cache_root\}[/\\.]*", template):
        out.append(f"expected a file under {{cache_root}}, found the root itself: {template!r}")
    return out


def check(raw: Mapping[str, Any], path: Path, problems: Problems) -> None:
    """Cache templates: known placeholders, inside the cache root, ``{rank}`` for
    every_rank; load_only never tunes."""
    cache = raw.get("cache", {})
    if not isinstance(cache, dict):
        return
    template = cache.get("path", DEFAULT_CACHE_PATH)
    if not isinstance(template, str):
        return
    at = (*path, "cache", "path")
    for problem in template_problems(template):
        problems.add(at, problem)
    for name in _PLACEHOLDER.findall(template):
        if name not in PLACEHOLDERS:
            expected = ", ".join("{" + p + "}" for p in PLACEHOLDERS)
            problems.add(
                at,
                f"unknown placeholder {{{name}}}{did_you_mean(name, PLACEHOLDERS)}; expected any of {expected}",
            )
    if not template.startswith("{cache_root}"):
        problems.add(
            at,
            f"expected a path starting with {{cache_root}}, found {template!r}; cache files stay inside the cache root",
        )
    policy = cache.get("policy", DEFAULT_POLICY)
    if policy == "every_rank" and "{rank}" not in template:
        problems.add(at, "policy every_rank keeps one file per rank: the path must contain {rank}")
    if policy == "load_only" and cache.get("on_missing") == "tune":
        problems.add(
            (*path, "cache", "on_missing"),
            "policy load_only never tunes: expected skip or fail, found 'tune'",
        )


# --------------------------------------------------------------------------- resolution


@dataclass(frozen=True, slots=True, kw_only=True)
class ResolvedAutotune(ResolvedRun):
    """A resolved autotune step: its run, and the rendered cache path."""

    backend: str
    cache_path: str  # rendered, absolute, inside the cache root
    policy: Policy = DEFAULT_POLICY
    on_missing: OnMissing = "tune"
    timeout_s: float = DEFAULT_TIMEOUT_S
    config_hash: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out = ResolvedRun.as_dict(self)
        out.update(
            backend=self.backend,
            policy=self.policy,
            on_missing=self.on_missing,
            timeout_s=self.timeout_s,
            cache_path=self.cache_path,
            config_hash=self.config_hash,
            replaces=self.replaces,
        )
        return out

    def detail(self) -> str:
        return f"{ResolvedRun.detail(self)} {self.backend}/{self.policy} -> {self.cache_path}"


def config_hash(
    ctx: CacheContext,
    step: AutotuneStep,
    backend_version: str,
    applied: tuple[int, ...],
    prior_context: int,
) -> str:
    """A hash of what changes tuning results: the worker's model and parallel config,
    world size, backend and its version, and the step's run. Not the cache root, not
    warmplan's own version."""
    key = {
        "config": ctx.config,
        "world_size": ctx.world_size,
        "backend": step.backend,
        "backend_version": backend_version,
        "run": {
            "shape": step.run.shape,
            "tokens": list(applied),
            "prior_context": prior_context,
            "force_attention": step.run.force_attention,
        },
    }
    blob = json.dumps(key, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _safe_part(value: str) -> str:
    # Placeholder values become path segments: never separators or '..'.
    cleaned = re.sub(r"[^A-Za-z0-9._+-]", "_", value)
    return "_" if cleaned in ("", ".", "..") else cleaned


def render_cache_path(template: str, values: Mapping[str, str], cache_root: str) -> str:
    """Fill ``template``; the result must stay inside ``cache_root`` (else ValueError)."""
    root = os.path.normpath(os.path.abspath(os.path.expanduser(cache_root)))
    parts = {k: (root if k == "cache_root" else _safe_part(v)) for k, v in values.items()}
    parts.setdefault("cache_root", root)
    problems = template_problems(template)
    if problems:
        raise ValueError(problems[0])
    rendered = os.path.normpath(template.format_map(parts))
    if rendered == root:
        raise ValueError(f"renders to the cache root {root} itself, not a file under it")
    if os.path.commonpath([root, rendered]) != root:
        raise ValueError(f"renders to {rendered}, outside the cache root {root}")
    # Lexically inside is not enough: a symlinked directory under the root would send
    # the write elsewhere. Existing components must resolve inside the resolved root.
    real_root = os.path.realpath(root)
    real = os.path.realpath(rendered)
    if os.path.commonpath([real_root, real]) != real_root:
        raise ValueError(
            f"renders to {rendered}, which resolves to {real} through a symbolic link, "
            f"outside the cache root {real_root}"
        )
    return rendered


def resolve(step: AutotuneStep, ctx: ResolveContext) -> ResolvedAutotune:
    fields = ctx.fields(step, requested_of(step.run, ctx), step.run.clamp_to)
    run = run_fields(step.run, fields)
    cache = ctx.cache
    version = cache.backend_versions.get(step.backend, "unknown")
    chash = config_hash(cache, step, version, fields["applied"], run["prior_context"])
    values = {
        "backend": step.backend,
        "backend_version": version,
        "arch": cache.arch,
        "config_hash": chash,
        "rank": str(cache.rank),
    }
    try:
        path = render_cache_path(step.cache.path, values, cache.cache_root)
    except ValueError as exc:
        raise ctx.error(step, "cache.path", str(exc)) from None
    return ResolvedAutotune(
        **fields,
        **run,
        backend=step.backend,
        policy=step.cache.policy,
        on_missing=step.cache.on_missing or default_on_missing(step.cache.policy),
        timeout_s=step.cache.timeout_s,
        cache_path=path,
        config_hash=chash,
    )


# --------------------------------------------------------------------------- run


def _backend_or_reason(worker: Worker, name: str) -> tuple[AutotuneBackend | None, str | None]:
    backend = worker.autotune_backend(name)
    if backend is None:
        return None, f"worker has no autotune backend {name!r}"
    reason = backend.unavailable_reason()
    if reason is not None:
        return None, f"backend {name!r} unavailable: {reason}"
    return backend, None


def run_autotune(rstep: ResolvedAutotune, worker: Worker, log: Logger) -> AutotuneOutcome:
    """Run one autotune step on this rank; every rank of the world must call it."""
    world = worker.world
    rank = world.rank
    if rstep.policy == "load_only" and rstep.on_missing == "tune":
        raise StepError(
            rstep.id,
            "policy load_only never tunes; on_missing must be skip or fail: 'tune'",
            rank=rank,
        )
    slog = log.bind(step=rstep.id, backend=rstep.backend, policy=rstep.policy)

    # Agree on availability first: a rank that cannot tune or load must not leave the
    # others waiting in a collective, and ran_run must be the same on every rank.
    backend, reason = _backend_or_reason(worker, rstep.backend)
    try:
        reasons = world.all_gather_str(reason or "", timeout_s=rstep.timeout_s)
    except WorldError as exc:
        raise StepError(rstep.id, f"agreeing on backend availability: {exc}", rank=rank) from exc
    lacking = [r for r, text in enumerate(reasons) if text]
    if lacking or backend is None:
        detail = "; ".join(f"rank {r}: {reasons[r]}" for r in lacking)
        slog.warning("autotune.skipped", reason=detail)
        return AutotuneOutcome(
            decision="skip",
            ran_run=False,
            cache_path=rstep.cache_path,
            fingerprint=None,
            reason=detail,
        )

    def run() -> None:
        for n in rstep.applied:
            worker.dummy_run(
                rstep.shape,
                n,
                prior_context=rstep.prior_context,
                force_attention=rstep.force_attention,
            )
        worker.synchronize()

    ctx = TuneContext(
        step_id=rstep.id,
        backend=backend,
        world=world,
        path=rstep.cache_path,
        metadata=expected_metadata(
            backend=backend,
            device=worker.describe().device,
            arch=arch_of(worker.facts),
            config_hash=rstep.config_hash,
        ),
        timeout_s=rstep.timeout_s,
        on_missing=rstep.on_missing,
        run=run,
        log=slog,
    )
    outcome = RUNNERS[rstep.policy](ctx)
    slog.info(
        "autotune.done",
        rank=rank,
        decision=outcome.decision,
        ran_run=outcome.ran_run,
        fingerprint=outcome.fingerprint,
        reason=outcome.reason,
    )
    return outcome


def run(rstep: ResolvedAutotune, worker: Worker, log: Logger) -> StepResult:
    outcome = run_autotune(rstep, worker, log)
    return StepResult(
        covers_run=outcome.ran_run,
        autotune=AutotuneReport(
            backend=rstep.backend,
            policy=rstep.policy,
            decision=outcome.decision,
            cache_path=outcome.cache_path,
            fingerprint=outcome.fingerprint,
            reason=outcome.reason,
        ),
    )


KIND: StepKind[AutotuneStep, ResolvedAutotune] = StepKind(
    name=NAME,
    schema=SCHEMA,
    build=build,
    check=check,
    resolve=resolve,
    run=run,
    collective=True,
)
