"""The ``autotune`` step: tune a backend's kernels once, keep the results in a cache
file, and make every rank use the same results.

The step runs its ``run`` (a dummy forward) once on every rank, under tuning on the
rank(s) that tune and after loading elsewhere, so kernels compile with the tactics
that will serve. Who tunes and how ranks agree is the cache policy's business
(``warmplan.autotune.policy``: ``leader``, ``every_rank``, ``load_only``). A backend
this worker lacks, or cannot use here, makes the step ``skip`` on every rank (the
ranks agree first), and the step it replaces runs instead.
"""

from __future__ import annotations

from typing import Any

from warmplan.autotune.policy import (
    DEFAULT_TIMEOUT_S,
    ON_MISSING,
    POLICIES,
    RUNNERS,
    AutotuneOutcome,
    TuneContext,
    expected_metadata,
)
from warmplan.dist import WorldError
from warmplan.errors import StepError
from warmplan.resolve import ResolvedStep
from warmplan.workers.base import AutotuneBackend, Worker

__all__ = ["AutotuneOutcome", "arch_of", "run_autotune"]


def arch_of(worker: Worker) -> str:
    """``sm90``-style arch from the worker's device capability, else its platform."""
    cap = worker.facts.device_capability
    return f"sm{cap[0]}{cap[1]}" if cap is not None else worker.facts.platform


def _backend_or_reason(worker: Worker, name: str) -> tuple[AutotuneBackend | None, str | None]:
    backend = worker.autotune_backend(name)
    if backend is None:
        return None, f"worker has no autotune backend {name!r}"
    reason = backend.unavailable_reason()
    if reason is not None:
        return None, f"backend {name!r} unavailable: {reason}"
    return backend, None


def run_autotune(rstep: ResolvedStep, worker: Worker, *, log: Any) -> AutotuneOutcome:
    """Run one autotune step on this rank; every rank of the world must call it."""
    world = worker.world
    rank = world.rank
    if rstep.backend is None or rstep.shape is None:
        raise StepError(rstep.id, "autotune step needs a backend and a run shape", rank=rank)
    policy = rstep.policy or "leader"
    if policy not in POLICIES:
        raise StepError(
            rstep.id,
            f"unknown cache policy {policy!r}; expected one of {', '.join(POLICIES)}",
            rank=rank,
        )
    on_missing = rstep.on_missing or ("skip" if policy == "load_only" else "tune")
    if on_missing not in ON_MISSING:
        raise StepError(
            rstep.id,
            f"unknown on_missing {on_missing!r}; expected one of {', '.join(ON_MISSING)}",
            rank=rank,
        )
    if policy == "load_only" and on_missing == "tune":
        raise StepError(
            rstep.id,
            "policy load_only never tunes; on_missing must be skip or fail: 'tune'",
            rank=rank,
        )
    if not rstep.cache_path:
        raise StepError(
            rstep.id, "autotune step has no cache path (the resolver renders it)", rank=rank
        )
    timeout_s = float(rstep.timeout_s or DEFAULT_TIMEOUT_S)
    slog = (
        log.bind(step=rstep.id, backend=rstep.backend, policy=policy)
        if hasattr(log, "bind")
        else log
    )

    # Agree on availability first: a rank that cannot tune or load must not leave the
    # others waiting in a collective, and ran_run must be the same on every rank.
    backend, reason = _backend_or_reason(worker, rstep.backend)
    try:
        reasons = world.all_gather_str(reason or "", timeout_s=timeout_s)
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

    shape = rstep.shape

    def run() -> None:
        for n in rstep.applied:
            worker.dummy_run(
                shape, n, prior_context=rstep.prior_context, force_attention=rstep.force_attention
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
            arch=arch_of(worker),
            config_hash=rstep.config_hash,
        ),
        timeout_s=timeout_s,
        on_missing=on_missing,
        run=run,
        log=slog,
    )
    outcome = RUNNERS[policy](ctx)
    slog.info(
        "autotune.done",
        rank=rank,
        decision=outcome.decision,
        ran_run=outcome.ran_run,
        fingerprint=outcome.fingerprint,
        reason=outcome.reason,
    )
    return outcome
