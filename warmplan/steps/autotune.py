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
import inspect
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
    IDENTITIES,
    ON_MISSING,
    POLICIES,
    RANKED_BACKENDS,
    Identity,
    OnMissing,
    Policy,
    default_on_missing,
    default_policy,
)
from warmplan.autotune.policy import (
    RUNNERS,
    AutotuneOutcome,
    TuneContext,
    expected_metadata,
    ranked,
)
from warmplan.autotune.table import hybrid_buckets
from warmplan.autotune.vllm_layout import VllmCacheFile, autotune_root
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
from warmplan.workers.base import LIMIT_NAMES, AutotuneBackend, Worker
from warmplan.world import WorldError

__all__ = ["AutotuneOutcome", "AutotuneStep", "ResolvedAutotune", "run_autotune"]

NAME: Final = "autotune"
Backend = Literal["builtin", "flashinfer", "flashinfer_dsv4_decode", "triton"]
BACKENDS: Final[tuple[Backend, ...]] = ("builtin", "flashinfer", "flashinfer_dsv4_decode", "triton")
PLACEHOLDERS: Final = ("cache_root", "backend", "backend_version", "arch", "config_hash", "rank")
DEFAULT_CACHE_PATH: Final = (
    "{cache_root}/autotune/{backend}/{backend_version}/{arch}/{config_hash}.json"
)
# Policies that keep one file per rank get one by default.
DEFAULT_RANK_CACHE_PATH: Final = (
    "{cache_root}/autotune/{backend}/{backend_version}/{arch}/{config_hash}/rank{rank}.json"
)
PER_RANK_POLICIES: Final = ("every_rank", "together")


def default_path(policy: str) -> str:
    """The cache path template a plan gets when it names none."""
    return DEFAULT_RANK_CACHE_PATH if policy in PER_RANK_POLICIES else DEFAULT_CACHE_PATH


# --------------------------------------------------------------------------- schema

_TOKENS_EXTRA: dict[str, Any] = {
    "description": "A token count, or the name of one of the worker's limits.",
    "oneOf": [
        {"type": "integer", "minimum": 1, "maximum": 1 << 24},
        {"enum": list(LIMIT_NAMES)},
    ],
}

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
            "description": "leader: rank 0 tunes and broadcasts; together: every rank tunes under FlashInfer's cross-rank timing reduction and keeps its own file, loading (and skipping the tuning forward) only when every rank's file matches; every_rank: each rank keeps its own file; load_only: never tune (default: together for backend flashinfer, leader otherwise).",
        },
        "identity": {
            "enum": list(IDENTITIES),
            "description": "warmplan (default): the path template and warmplan's wrapped file; vllm: vLLM 0.34's own files (FlashInfer's table, <root>/<config_hash>/autotune_configs_dp<dp>_rank<rank>.json, root and config hash computed with vLLM's functions inside vLLM), so a plain vLLM start and warmplan share tables. Not with path.",
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

TUNING: dict[str, Any] = obj(
    {
        "buckets": {
            "description": "The token buckets to tune: hybrid (FlashInfer's hybrid buckets up to each pass's token count, or draft_tokens when larger: what vLLM 0.34 tunes), default (each op's own), or a list of token counts.",
            "oneOf": [
                {"enum": ["hybrid", "default"], "description": "hybrid or each op's own buckets."},
                {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 256,
                    "uniqueItems": True,
                    "items": {"type": "integer", "minimum": 1, "maximum": 1 << 24},
                    "description": "Token counts to tune at.",
                },
            ],
        },
        "draft_tokens": {
            "type": "integer",
            "minimum": 1,
            "maximum": 1 << 24,
            "description": "The speculator's largest M (draft requests x queries per request): hybrid buckets reach at least this far, as vLLM's do.",
        },
        "round_up": {
            "type": "boolean",
            "description": "Serve a token count from the next bucket up instead of the one below (FlashInfer's round_up; vLLM 0.34 sets it).",
        },
        "skip_ops": {
            "type": "array",
            "maxItems": 64,
            "uniqueItems": True,
            "items": {"type": "string", "minLength": 1, "pattern": "^[A-Za-z0-9_.:-]{1,200}$"},
            "description": "FlashInfer custom ops not to tune (their heuristic tactic serves), like VLLM_FLASHINFER_AUTOTUNE_SKIP_OPS.",
        },
        "randomize_inputs": {
            "type": "boolean",
            "description": "Run the tuning forwards on random inputs so MoE routing is not degenerate (the worker's dummy run must support it).",
        },
        "extra_tokens": {
            "type": "array",
            "maxItems": 16,
            "items": _TOKENS_EXTRA,
            "description": "Further tuning passes after the run's own, at these token counts (vLLM's deferred-MoE counts), each clamped like the run's.",
        },
    },
    description="FlashInfer's tuning knobs (backend flashinfer only).",
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
        "tuning": TUNING,
        "run_after_load": {
            "type": "boolean",
            "description": "Run the run after loading tuned results (default true; false under policy together, which, like vLLM, skips the tuning forward when every rank loaded).",
        },
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
    """Where tuning results persist and how ranks share them; ``policy`` ``None`` is
    the backend's default (``default_policy``), ``on_missing`` ``None`` the policy's
    (``default_on_missing``)."""

    path: str | None = None  # None: default_path(policy)
    policy: Policy | None = None
    on_missing: OnMissing | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    identity: Identity = "warmplan"


@dataclass(frozen=True, slots=True, kw_only=True)
class TuningSpec:
    """FlashInfer's tuning knobs; ``None`` leaves FlashInfer's own behaviour."""

    buckets: Literal["hybrid", "default"] | tuple[int, ...] = "default"
    draft_tokens: int | None = None
    round_up: bool | None = None
    skip_ops: tuple[str, ...] = ()
    randomize_inputs: bool | None = None
    extra_tokens: tuple[int | str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class AutotuneStep(StepSpec):
    backend: Backend
    run: RunSpec
    cache: CacheSpec = field(default_factory=CacheSpec)
    tuning: TuningSpec = field(default_factory=TuningSpec)
    run_after_load: bool | None = None

    def backends(self) -> tuple[str, ...]:
        return (self.backend,)


def build(raw: Mapping[str, Any], common: StepFields) -> AutotuneStep:
    cache = raw.get("cache", {})
    tuning = raw.get("tuning", {})
    buckets = tuning.get("buckets", "default")
    return AutotuneStep(
        **common,
        backend=raw["backend"],
        run=build_run(raw["run"]),
        cache=CacheSpec(
            path=cache.get("path"),
            policy=cache.get("policy"),
            on_missing=cache.get("on_missing"),
            timeout_s=float(cache.get("timeout_s", DEFAULT_TIMEOUT_S)),
            identity=cache.get("identity", "warmplan"),
        ),
        tuning=TuningSpec(
            buckets="hybrid"
            if buckets == "hybrid"
            else "default"
            if buckets == "default"
            else tuple(sorted(buckets)),
            draft_tokens=tuning.get("draft_tokens"),
            round_up=tuning.get("round_up"),
            skip_ops=tuple(tuning.get("skip_ops", ())),
            randomize_inputs=tuning.get("randomize_inputs"),
            extra_tokens=tuple(tuning.get("extra_tokens", ())),
        ),
        run_after_load=raw.get("run_after_load"),
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
    backend = raw.get("backend")
    policy = cache.get("policy", default_policy(str(backend)))
    template = cache.get("path", default_path(str(policy)))
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
    identity = cache.get("identity", "warmplan")
    if identity == "vllm":
        if "path" in cache:
            problems.add(
                (*path, "cache", "identity"),
                "identity vllm names vLLM's own files: expected no cache.path beside it",
            )
        if backend != "flashinfer":
            problems.add(
                (*path, "cache", "identity"),
                f"identity vllm holds FlashInfer tables: expected backend flashinfer, found {backend!r}",
            )
    elif policy in ("every_rank", "together") and "{rank}" not in template:
        problems.add(at, f"policy {policy} keeps one file per rank: the path must contain {{rank}}")
    if policy == "together" and backend not in RANKED_BACKENDS:
        problems.add(
            (*path, "cache", "policy"),
            f"policy together needs a backend whose ranks tune together ({', '.join(RANKED_BACKENDS)}); "
            f"backend {backend!r} cannot: use leader",
        )
    if "tuning" in raw and backend not in RANKED_BACKENDS:
        problems.add(
            (*path, "tuning"),
            f"tuning knobs are FlashInfer's: expected backend flashinfer, found {backend!r}",
        )
    if policy == "load_only" and cache.get("on_missing") == "tune":
        problems.add(
            (*path, "cache", "on_missing"),
            "policy load_only never tunes: expected skip or fail, found 'tune'",
        )


# --------------------------------------------------------------------------- resolution


@dataclass(frozen=True, slots=True, kw_only=True)
class ResolvedAutotune(ResolvedRun):
    """A resolved autotune step: its run, and the rendered cache path.

    ``passes``: one tuning pass per applied token count, with the token buckets it
    tunes (``None``: each op's own). With ``identity: vllm`` the path is vLLM's
    layout as warmplan computes it; inside vLLM the run asks vLLM for it."""

    backend: str
    cache_path: str  # rendered, absolute, inside the cache root
    policy: Policy = DEFAULT_POLICY
    on_missing: OnMissing = "tune"
    timeout_s: float = DEFAULT_TIMEOUT_S
    config_hash: str | None = None
    identity: Identity = "warmplan"
    run_after_load: bool = True
    passes: tuple[tuple[int, tuple[int, ...] | None], ...] = ()
    round_up: bool | None = None
    skip_ops: tuple[str, ...] = ()
    randomize_inputs: bool | None = None

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
            identity=self.identity,
            run_after_load=self.run_after_load,
            tuning={
                "passes": [
                    {"tokens": n, "buckets": list(b) if b is not None else None}
                    for n, b in self.passes
                ],
                "round_up": self.round_up,
                "skip_ops": list(self.skip_ops),
                "randomize_inputs": self.randomize_inputs,
            },
        )
        return out

    def detail(self) -> str:
        return f"{ResolvedRun.detail(self)} {self.backend}/{self.policy} -> {self.cache_path}"

    def forward_text(self) -> str:
        """The tuning forward, for the report: ``plain x 8192``."""
        return f"the tuning forward ({self.shape} x {', '.join(map(str, self.applied))})"


def pass_buckets(tuning: TuningSpec, n: int, max_num_tokens: int) -> tuple[int, ...] | None:
    """The buckets one pass at ``n`` tokens tunes: hybrid up to the larger of ``n``
    and the drafter's M (clamped to ``max_num_tokens``), the plan's list, or None."""
    if tuning.buckets == "default":
        return None
    if tuning.buckets == "hybrid":
        draft = min(tuning.draft_tokens or 0, max_num_tokens)
        return hybrid_buckets(max(n, draft))
    return tuning.buckets


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
    if step.tuning != TuningSpec():
        key["tuning"] = {
            "buckets": step.tuning.buckets,
            "draft_tokens": step.tuning.draft_tokens,
            "round_up": step.tuning.round_up,
            "skip_ops": sorted(step.tuning.skip_ops),
            "randomize_inputs": step.tuning.randomize_inputs,
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
    extra = [n if isinstance(n, int) else ctx.limits.get(n) for n in step.tuning.extra_tokens]
    fields = ctx.fields(step, [*requested_of(step.run, ctx), *extra], step.run.clamp_to)
    run = run_fields(step.run, fields)
    cache = ctx.cache
    policy = step.cache.policy or default_policy(step.backend)
    version = cache.backend_versions.get(step.backend, "unknown")
    chash = config_hash(cache, step, version, fields["applied"], run["prior_context"])
    try:
        if step.cache.identity == "vllm":
            path = vllm_file(version, ctx.facts.device_capability, chash, cache.rank).path
        else:
            values = {
                "backend": step.backend,
                "backend_version": version,
                "arch": cache.arch,
                "config_hash": chash,
                "rank": str(cache.rank),
            }
            template = step.cache.path or default_path(policy)
            path = render_cache_path(template, values, cache.cache_root)
    except ValueError as exc:
        raise ctx.error(step, "cache.path", str(exc)) from None
    after_load = step.run_after_load
    return ResolvedAutotune(
        **fields,
        **run,
        backend=step.backend,
        policy=policy,
        on_missing=step.cache.on_missing or default_on_missing(policy),
        timeout_s=step.cache.timeout_s,
        cache_path=path,
        config_hash=chash,
        identity=step.cache.identity,
        run_after_load=(policy != "together") if after_load is None else after_load,
        passes=tuple(
            (n, pass_buckets(step.tuning, n, ctx.limits.max_num_tokens)) for n in fields["applied"]
        ),
        round_up=step.tuning.round_up,
        skip_ops=step.tuning.skip_ops,
        randomize_inputs=step.tuning.randomize_inputs,
    )


def vllm_file(
    version: str, capability: tuple[int, int] | None, chash: str, rank: int, dp_rank: int = 0
) -> VllmCacheFile:
    """vLLM's per-rank file as warmplan computes it (outside vLLM: warmplan's config
    hash, data-parallel rank 0)."""
    root = autotune_root(version, capability)
    f = VllmCacheFile(root=root, config_hash=chash, dp_rank=dp_rank, rank=rank, source="warmplan")
    real_root = os.path.abspath(root)
    if os.path.commonpath([real_root, os.path.abspath(f.path)]) != real_root:
        raise ValueError(f"renders to {f.path}, outside vLLM's autotune cache root {root}")
    return f


# --------------------------------------------------------------------------- run


def _keywords(fn: Any) -> set[str]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return set()
    return {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


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

    extra: dict[str, Any] = {}
    if rstep.randomize_inputs:
        if "randomize_inputs" not in _keywords(worker.dummy_run):
            raise StepError(
                rstep.id,
                f"tuning.randomize_inputs: this worker's dummy_run "
                f"({type(worker).__name__}) takes no randomize_inputs; drop the field",
                rank=rank,
            )
        extra["randomize_inputs"] = True

    def forward(n: int) -> None:
        worker.dummy_run(
            rstep.shape,
            n,
            prior_context=rstep.prior_context,
            force_attention=rstep.force_attention,
            **extra,
        )

    def run() -> None:
        for n in rstep.applied:
            forward(n)
        worker.synchronize()

    fi = ranked(backend)

    def tune_run() -> None:
        # One pass per token count, each under its own buckets (vLLM: the widest
        # first, so that bounded passes reuse its results).
        assert fi is not None
        for n, buckets in rstep.passes or tuple((n, None) for n in rstep.applied):
            with fi.pass_scope(buckets=buckets, round_up=rstep.round_up):
                forward(n)
        worker.synchronize()

    path = rstep.cache_path
    if rstep.identity == "vllm":
        named = getattr(backend, "vllm_cache_file", None)
        found = named(world.rank) if callable(named) else None
        if isinstance(found, VllmCacheFile):
            path = found.path
            slog.info("autotune.vllm_cache_file", path=path, source=found.source)

    ctx = TuneContext(
        step_id=rstep.id,
        backend=backend,
        world=world,
        path=path,
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
        tune_run=tune_run if fi is not None else None,
        raw=rstep.identity == "vllm",
        run_after_load=rstep.run_after_load,
        skip_ops=rstep.skip_ops,
        forward=rstep.forward_text(),
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
            ran_run=outcome.ran_run,
            run_skipped=outcome.run_skipped,
            ignored=outcome.ignored,
            entries=outcome.table.entries if outcome.table else None,
            coverage=outcome.table.coverage if outcome.table else None,
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
