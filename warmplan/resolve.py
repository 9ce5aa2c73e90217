"""Plan + worker limits and facts -> ResolvedPlan. Pure: no torch, no I/O.

Expands token lists, clamps once (``applied = max(0, min(requested, limit))``),
skips steps whose applied count is 0, drops duplicates after clamping within a
step (order kept), evaluates gates against the facts, applies ``replaces`` and
renders cache paths confined to the cache root. Every resolved step keeps the
requested and applied values and the reason for every skip.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from warmplan.errors import PlanError
from warmplan.plan import (
    AutotuneStep,
    DummyRunStep,
    Gates,
    Plan,
    RunSpec,
    SlotMappingStep,
    expand_tokens,
)
from warmplan.workers.base import Facts, Limits, Shape


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheContext:
    """What cache path templates and config hashes are made from."""

    cache_root: str
    arch: str = "unknown"  # "sm90", "sm120", "cpu"
    rank: int = 0
    world_size: int = 1
    backend_versions: Mapping[str, str] = field(default_factory=dict)
    config: Mapping[str, Any] = field(default_factory=dict)  # worker.config_fingerprint()


@dataclass(frozen=True, slots=True, kw_only=True)
class ResolvedStep:
    """One step after expansion, clamping, gating and rendering."""

    id: str
    kind: str  # "slot_mapping" | "dummy_run" | "autotune"
    requested: tuple[int, ...]  # token counts as the plan asked (expanded)
    applied: tuple[int, ...]  # after clamp, zeros dropped, duplicates dropped; order kept
    clamp_to: str  # name of the limit
    limit: int  # its value
    skipped: str | None = None  # reason, or None when the step runs
    replaced_by: str | None = None  # autotune step id that covers this step if it runs its run
    # dummy_run and autotune (the autotune step's `run`):
    shape: Shape | None = None
    prior_context: int = 0
    force_attention: bool = False
    # autotune:
    backend: str | None = None
    policy: str | None = None  # leader | every_rank | load_only
    on_missing: str | None = None  # tune | skip | fail
    timeout_s: float | None = None
    cache_path: str | None = None  # rendered, absolute, inside cache_root
    config_hash: str | None = None
    replaces: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ResolvedPlan:
    """A plan resolved against one worker's limits and facts."""

    plan: Plan
    limits: Limits
    facts: Facts
    steps: tuple[ResolvedStep, ...]

    def step(self, step_id: str) -> ResolvedStep:
        for step in self.steps:
            if step.id == step_id:
                return step
        raise KeyError(f"no step {step_id!r}; steps: {', '.join(s.id for s in self.steps)}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan": {"name": self.plan.name, "path": self.plan.path, "sha256": self.plan.sha256},
            "limits": self.limits.as_dict(),
            "facts": self.facts.as_dict(),
            "steps": [step_dict(s) for s in self.steps],
        }


def step_dict(step: ResolvedStep) -> dict[str, Any]:
    """The JSON form of a resolved step (``warmplan plan --json``)."""
    out: dict[str, Any] = {
        "id": step.id,
        "kind": step.kind,
        "requested_tokens": list(step.requested),
        "applied_tokens": list(step.applied),
        "clamp_to": step.clamp_to,
        "limit": step.limit,
        "skipped": step.skipped,
        "replaced_by": step.replaced_by,
    }
    if step.shape is not None:
        out.update(shape=step.shape, prior_context=step.prior_context, force_attention=step.force_attention)
    if step.kind == "autotune":
        out.update(
            backend=step.backend,
            policy=step.policy,
            on_missing=step.on_missing,
            timeout_s=step.timeout_s,
            cache_path=step.cache_path,
            config_hash=step.config_hash,
            replaces=step.replaces,
        )
    return out


# --------------------------------------------------------------------------- gates

_FALSY = {"", "0", "false", "no", "off", "n", "f"}


def env_truthy(value: str) -> bool:
    """How warmplan reads a boolean environment variable (vLLM-compatible: '0' is off)."""
    return value.strip().lower() not in _FALSY


def capability_family_matches(capability: tuple[int, int], family: int) -> bool:
    """vLLM's ``is_device_capability_family``: same ``(major*10+minor)//10``."""
    major, minor = capability
    return (major * 10 + minor) // 10 == family // 10


def gate_failure(gates: Gates, facts: Facts) -> str | None:
    """``None`` when every gate holds, else the first that does not, in words."""
    for env in gates.env:
        raw = facts.env.get(env.name)
        if raw is None:
            if not env.unset:
                return f"gate env: {env.name} is unset"
        elif not env_truthy(raw):
            return f"gate env: {env.name}={raw!r} is false"
    if gates.platform is not None and facts.platform not in gates.platform:
        return f"gate platform: needs {' or '.join(gates.platform)}, worker is {facts.platform}"
    cap = facts.device_capability
    if gates.device_capability is not None:
        need = ".".join(map(str, gates.device_capability))
        if cap is None:
            return f"gate device_capability: needs >= {need}, worker has no CUDA capability ({facts.platform})"
        if cap < gates.device_capability:
            return f"gate device_capability: needs >= {need}, worker is {cap[0]}.{cap[1]}"
    if gates.device_capability_family is not None:
        fam = gates.device_capability_family
        if cap is None:
            return f"gate device_capability_family: needs {fam}, worker has no CUDA capability ({facts.platform})"
        if not capability_family_matches(cap, fam):
            return f"gate device_capability_family: needs {fam}, worker is {cap[0]}.{cap[1]}"
    if gates.attention_backend is not None and not set(gates.attention_backend) & set(facts.attention_backends):
        have = ", ".join(facts.attention_backends) or "none"
        return f"gate attention_backend: needs any of {', '.join(gates.attention_backend)}, worker has {have}"
    if gates.pooling is not None and facts.pooling != gates.pooling:
        return f"gate pooling: needs {'a' if gates.pooling else 'a non-'}pooling model, worker's is {'' if facts.pooling else 'not '}pooling"
    for name, accepted in gates.flag.items():
        state: bool | str = facts.flags.get(name, "unset")
        if not any(state is a or state == a for a in accepted if isinstance(a, bool) == isinstance(state, bool)):
            want = " or ".join(str(a).lower() for a in accepted)
            return f"gate flag: {name} must be {want}, worker's is {str(state).lower()}"
    return None


# --------------------------------------------------------------------------- tokens


def clamp(requested: int, limit: int) -> int:
    """The one clamp: ``max(0, min(requested, limit))``."""
    return max(0, min(requested, limit))


def _apply(requested: list[int], limit: int) -> tuple[int, ...]:
    seen: set[int] = set()
    out: list[int] = []
    for n in requested:
        applied = clamp(n, limit)
        if applied > 0 and applied not in seen:
            seen.add(applied)
            out.append(applied)
    return tuple(out)


def _requested_run(run: RunSpec, limits: Limits) -> int:
    return run.tokens if isinstance(run.tokens, int) else limits.get(run.tokens)


# --------------------------------------------------------------------------- cache paths


def config_hash(ctx: CacheContext, step: AutotuneStep, backend_version: str, applied: tuple[int, ...], prior_context: int) -> str:
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
    rendered = os.path.normpath(template.format_map(parts))
    if os.path.commonpath([root, rendered]) != root or rendered == root:
        raise ValueError(f"renders to {rendered}, outside the cache root {root}")
    return rendered


def arch_of(facts: Facts) -> str:
    """``sm90`` for capability 9.0, ``cpu`` off CUDA."""
    if facts.device_capability is None:
        return facts.platform
    major, minor = facts.device_capability
    return f"sm{major}{minor}"


# --------------------------------------------------------------------------- resolve


def resolve(plan: Plan, limits: Limits, facts: Facts, cache: CacheContext | None = None) -> ResolvedPlan:
    """Expand, clamp, gate and render every step of ``plan`` for one worker.

    Pure and deterministic. Raises ``PlanError`` when a cache path escapes the cache root.
    """
    if cache is None:
        cache = CacheContext(cache_root=os.environ.get("WARMPLAN_CACHE_ROOT", "~/.cache/warmplan"), arch=arch_of(facts))
    plan_gate = gate_failure(plan.when, facts)
    active_autotune: set[str] = set()
    resolved: list[ResolvedStep] = []
    replaced: dict[str, str] = {}
    for step in plan.steps:
        skipped: str | None = None
        if plan_gate is not None:
            skipped = f"plan {plan_gate}"
        elif not step.enabled:
            skipped = "disabled in the plan (enabled: false)"
        else:
            skipped = gate_failure(step.when, facts)
        fields: dict[str, Any] = {}
        if isinstance(step, SlotMappingStep):
            requested = expand_tokens(step.tokens)
            clamp_to = step.clamp_to
        else:
            requested = [_requested_run(step.run, limits)]
            clamp_to = step.run.clamp_to
        limit = limits.get(clamp_to)
        applied = _apply(requested, limit)
        if not applied and skipped is None:
            skipped = f"every requested token count clamps to 0 ({clamp_to} = {limit})"
        if isinstance(step, (DummyRunStep, AutotuneStep)):
            prior = step.run.prior_context
            fields.update(
                shape=step.run.shape,
                prior_context=(applied[0] if applied else 0) if prior == "same" else prior,
                force_attention=step.run.force_attention,
            )
        if isinstance(step, AutotuneStep):
            version = cache.backend_versions.get(step.backend, "unknown")
            chash = config_hash(cache, step, version, applied, fields["prior_context"])
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
                where = f"{plan.path or '<plan>'}:{step.line}"
                raise PlanError([f"{where}: steps[{plan.steps.index(step)}].cache.path: {exc}"]) from None
            fields.update(
                backend=step.backend,
                policy=step.cache.policy,
                on_missing=step.cache.on_missing,
                timeout_s=step.cache.timeout_s,
                cache_path=path,
                config_hash=chash,
                replaces=step.replaces,
            )
            if skipped is None:
                active_autotune.add(step.id)
                if step.replaces:
                    replaced[step.replaces] = step.id
        resolved.append(
            ResolvedStep(
                id=step.id,
                kind=step.kind,
                requested=tuple(requested),
                applied=applied,
                clamp_to=clamp_to,
                limit=limit,
                skipped=skipped,
                replaced_by=replaced.get(step.id),
                **fields,
            )
        )
    return ResolvedPlan(plan=plan, limits=limits, facts=facts, steps=tuple(resolved))
