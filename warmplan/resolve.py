"""Plan + worker limits and facts -> ResolvedPlan. Pure: no torch, no I/O.

Expands token lists, clamps once (``applied = max(0, min(requested, limit))``),
skips steps whose applied count is 0, drops duplicates after clamping within a
step (order kept), evaluates gates against the facts, applies ``replaces`` and
renders cache paths confined to the cache root. Every resolved step keeps the
requested and applied values and the reason for every skip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from warmplan.fsutil import default_cache_root
from warmplan.plan import Plan
from warmplan.steps import STEPS
from warmplan.steps.base import CacheContext, ResolveContext, ResolvedStep, arch_of
from warmplan.steps.common import Gates
from warmplan.workers.base import Facts, Limits

__all__ = ["CacheContext", "ResolvedPlan", "ResolvedStep", "arch_of", "gate_failure", "resolve"]


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
            "steps": [s.as_dict() for s in self.steps],
        }


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
    if gates.attention_backend is not None and not set(gates.attention_backend) & set(
        facts.attention_backends
    ):
        have = ", ".join(facts.attention_backends) or "none"
        return f"gate attention_backend: needs any of {', '.join(gates.attention_backend)}, worker has {have}"
    if gates.pooling is not None and facts.pooling != gates.pooling:
        return f"gate pooling: needs {'a' if gates.pooling else 'a non-'}pooling model, worker's is {'' if facts.pooling else 'not '}pooling"
    for name, accepted in gates.flag.items():
        state: bool | str = facts.flags.get(name, "unset")
        if not any(
            state is a or state == a
            for a in accepted
            if isinstance(a, bool) == isinstance(state, bool)
        ):
            want = " or ".join(str(a).lower() for a in accepted)
            return f"gate flag: {name} must be {want}, worker's is {str(state).lower()}"
    return None


# --------------------------------------------------------------------------- resolve


def resolve(
    plan: Plan, limits: Limits, facts: Facts, cache: CacheContext | None = None
) -> ResolvedPlan:
    """Expand, clamp, gate and render every step of ``plan`` for one worker; each
    kind resolves its own steps (``warmplan.steps.STEPS``).

    Pure and deterministic. Raises ``PlanError`` when a cache path escapes the cache root.
    """
    if cache is None:
        cache = CacheContext(cache_root=default_cache_root(), arch=arch_of(facts))
    plan_gate = gate_failure(plan.when, facts)
    resolved: list[ResolvedStep] = []
    replaced: dict[str, str] = {}
    for index, step in enumerate(plan.steps):
        skipped: str | None = None
        if plan_gate is not None:
            skipped = f"plan {plan_gate}"
        elif not step.enabled:
            skipped = "disabled in the plan (enabled: false)"
        else:
            skipped = gate_failure(step.when, facts)
        ctx = ResolveContext(
            limits=limits,
            facts=facts,
            cache=cache,
            plan_path=plan.path,
            plan_source=plan.source,
            index=index,
            skipped=skipped,
            replaced_by=replaced.get(step.id),
        )
        rstep = STEPS[step.kind].resolve(step, ctx)
        if rstep.skipped is None and rstep.replaces:
            replaced[rstep.replaces] = rstep.id
        resolved.append(rstep)
    return ResolvedPlan(plan=plan, limits=limits, facts=facts, steps=tuple(resolved))
