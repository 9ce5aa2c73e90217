"""Run a plan on a worker: resolve it against the worker, run each step in order
under the worker's state snapshot, time it, count the compilations seen during it,
and produce the report (``docs/report.md`` documents its fields)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from warmplan.errors import StepError, UserError, WarmplanError
from warmplan.fsutil import default_cache_root
from warmplan.log import Logger, get_logger
from warmplan.monitor import JitMonitor, Monitor, MonitorMode, NoMonitor
from warmplan.plan import Plan
from warmplan.report import Report, StepReport
from warmplan.resolve import ResolvedPlan, resolve
from warmplan.steps import STEPS
from warmplan.steps.base import CacheContext, ResolvedStep, arch_of
from warmplan.workers.base import StepUnsupported, Worker

log = get_logger(__name__)

__all__ = ["Report", "StepReport", "cache_context", "resolve_for", "run_plan"]


def cache_context(plan: Plan, worker: Worker, cache_root: str | None = None) -> CacheContext:
    """What the resolver needs to render cache paths for this worker."""
    versions: dict[str, str] = {}
    for step in plan.steps:
        for name in step.backends():
            if name not in versions:
                backend = worker.autotune_backend(name)
                versions[name] = backend.version if backend is not None else "unavailable"
    world = worker.world
    return CacheContext(
        cache_root=cache_root or default_cache_root(),
        arch=arch_of(worker.facts),
        rank=world.rank,
        world_size=world.world_size,
        backend_versions=versions,
        config=dict(worker.config_fingerprint()),
    )


def resolve_for(plan: Plan, worker: Worker, cache_root: str | None = None) -> ResolvedPlan:
    """Resolve ``plan`` against ``worker``'s limits, facts and cache context."""
    return resolve(plan, worker.limits, worker.facts, cache_context(plan, worker, cache_root))


ProgressHook = Callable[[int, int, ResolvedStep, str], None]


def check_fits(plan: Plan, resolved: ResolvedPlan, worker: Worker) -> None:
    """Before any step runs: a worker that can tell (an optional ``check_fits(steps)``
    raising ``ValueError``, as the built-in engine has) says whether the resolved
    steps' batches fit its configuration. A ``UserError`` naming the plan, the step
    and the field to change, in well under a second, instead of a failure after
    minutes of compiling."""
    check = getattr(worker, "check_fits", None)
    if check is None:
        return
    try:
        check(resolved.steps)
    except ValueError as exc:
        raise UserError(f"{plan.path or plan.name}: {exc}") from None


def run_plan(
    plan: Plan,
    worker: Worker,
    *,
    monitor: Monitor | None = None,
    jit_monitor: MonitorMode = "off",
    cache_root: str | None = None,
    progress: ProgressHook | None = None,
) -> Report:
    """Run ``plan`` on ``worker`` and return the report.

    ``monitor``: a ``warmplan.monitor.JitMonitor`` to count compilations with; one is
    made, and uninstalled however the run ends (a Ctrl-C included), when not given.
    ``jit_monitor`` (``off`` / ``warn`` / ``error``) arms the monitor after the plan,
    so that it keeps watching the worker while it serves; an armed monitor stays
    installed. Raises ``StepError`` (its ``report`` attribute holds the partial report)
    when a step fails.
    """
    started = time.perf_counter()
    resolved = resolve_for(plan, worker, cache_root)
    check_fits(plan, resolved, worker)
    world = worker.world
    info = worker.describe()
    report = Report(
        plan={"name": plan.name, "path": plan.path, "sha256": plan.sha256},
        worker={
            "engine": info.engine,
            "device": info.device,
            "versions": dict(info.versions),
            "rank": world.rank,
            "local_rank": world.local_rank,
            "world_size": world.world_size,
            "limits": worker.limits.as_dict(),
            "facts": worker.facts.as_dict(),
        },
    )
    own_monitor = monitor is None
    mon = _make_monitor() if monitor is None else monitor
    keep_installed = False
    bound = (
        log.bind(plan=plan.name, rank=world.rank)
        if world.world_size > 1
        else log.bind(plan=plan.name)
    )
    bound.info("plan.start", steps=len(resolved.steps), engine=info.engine, device=info.device)
    done: dict[str, StepReport] = {}
    covered: dict[str, str] = {}
    try:
        if plan.compile_cache.share and world.world_size > 1:
            report.compile_cache = _share_compile_caches(
                plan, resolved, worker, mon, done, covered, bound, progress
            )
        for index, rstep in enumerate(resolved.steps):
            if rstep.id in done:
                report.steps.append(done[rstep.id])
                continue
            _run_one(
                index,
                len(resolved.steps),
                rstep,
                worker,
                mon,
                covered,
                bound,
                progress,
                into=report.steps,
            )
        report.duration_s = time.perf_counter() - started
        totals = report.totals
        bound.info(
            "plan.done",
            duration_s=round(report.duration_s, 3),
            compiles=totals["compiles"],
            run=totals["steps_run"],
            skipped=totals["steps_skipped"],
        )
        if jit_monitor != "off":
            mon.arm(jit_monitor)
            keep_installed = True
        return report
    except StepError as exc:
        report.failed = str(exc)
        report.duration_s = time.perf_counter() - started
        exc.report = report
        raise
    finally:
        if own_monitor and not keep_installed:
            mon.uninstall()


def _make_monitor() -> Monitor:
    if "torch" not in sys.modules and "triton" not in sys.modules:
        # Nothing can compile in a process that never imported torch or Triton.
        return NoMonitor()
    m = JitMonitor()
    m.install()
    return m


def _run_one(
    index: int,
    total: int,
    rstep: ResolvedStep,
    worker: Worker,
    monitor: Monitor,
    covered: dict[str, str],
    bound: Logger,
    progress: ProgressHook | None,
    into: list[StepReport],
) -> StepReport:
    """Run one step, appending its entry to ``into`` before it runs (so that a failed
    step still appears in the partial report)."""
    shape, prior_context = rstep.forward()
    entry = StepReport(
        id=rstep.id,
        kind=rstep.kind,
        requested=list(rstep.requested),
        applied=list(rstep.applied),
        skipped=rstep.skipped,
        shape=shape,
        prior_context=prior_context,
    )
    into.append(entry)
    slog = bound.bind(step=rstep.id, kind=rstep.kind)
    if entry.skipped is None and rstep.id in covered:
        entry.skipped = f"covered by {covered[rstep.id]}"
    if entry.skipped is not None:
        slog.info(
            "step.skip",
            reason=entry.skipped,
            requested=list(rstep.requested),
            applied=list(rstep.applied),
        )
        if progress:
            progress(index, total, rstep, "skipped")
        return entry
    clamped = {r: a for r, a in zip(rstep.requested, _clamped(rstep), strict=False) if r != a}
    slog.info(
        "step.start",
        requested=list(rstep.requested),
        applied=list(rstep.applied),
        clamp_to=rstep.clamp_to,
        limit=rstep.limit,
        **({"clamped": clamped} if clamped else {}),
    )
    if progress:
        progress(index, total, rstep, "start")
    t0 = time.perf_counter()
    try:
        with monitor.attribute(rstep.id), worker.preserve_state():
            result = STEPS[rstep.kind].run(rstep, worker, slog)
            worker.synchronize()
    except StepUnsupported as exc:
        # The worker refused before changing anything: the step cannot do here what
        # it is for (its reason says why); a skip with that reason, not a failure.
        entry.duration_s = time.perf_counter() - t0
        entry.skipped = str(exc)
        slog.info(
            "step.skip",
            reason=entry.skipped,
            requested=list(rstep.requested),
            applied=list(rstep.applied),
        )
        if progress:
            progress(index, total, rstep, "skipped")
        return entry
    except WarmplanError as exc:
        entry.duration_s = time.perf_counter() - t0
        entry.error = str(exc)
        slog.error("step.failed", error=str(exc))
        if isinstance(exc, StepError):
            raise
        raise StepError(rstep.id, str(exc), rank=_rank(worker)) from exc
    except Exception as exc:
        entry.duration_s = time.perf_counter() - t0
        entry.error = f"{type(exc).__name__}: {exc}"
        slog.error("step.failed", error=entry.error)
        raise StepError(rstep.id, entry.error, rank=_rank(worker)) from exc
    entry.duration_s = time.perf_counter() - t0
    entry.compiles = monitor.compiles(rstep.id)
    entry.cache_loads = monitor.cache_loads(rstep.id)
    entry.device_loads = monitor.device_loads(rstep.id)
    if result.autotune is not None:
        entry.autotune = asdict(result.autotune)
    if result.keys is not None:
        entry.keys = asdict(result.keys)
    if result.covers_run and rstep.replaces:
        how = "compiled its keys" if result.keys is not None else "ran this shape"
        covered[rstep.replaces] = f"{rstep.id}, which {how}"
    slog.info(
        "step.done",
        duration_s=round(entry.duration_s, 4),
        compiles=entry.compiles,
        **({"autotune": entry.autotune["decision"]} if entry.autotune else {}),
    )
    if progress:
        progress(index, total, rstep, "done")
    return entry


def _clamped(rstep: ResolvedStep) -> list[int]:
    return [max(0, min(r, rstep.limit)) for r in rstep.requested]


def _rank(worker: Worker) -> int | None:
    world = worker.world
    return world.rank if world.world_size > 1 else None


def _share_compile_caches(
    plan: Plan,
    resolved: ResolvedPlan,
    worker: Worker,
    monitor: Monitor,
    done: dict[str, StepReport],
    covered: dict[str, str],
    bound: Logger,
    progress: ProgressHook | None,
) -> dict[str, Any]:
    """Rank 0 runs the compile-heavy steps (those before the first collective step,
    such as autotune, which needs every rank) and broadcasts its compile caches; the
    other ranks unpack them before running their own steps."""
    from warmplan.compile_cache import share_compile_caches

    leading: list[tuple[int, ResolvedStep]] = []
    for index, rstep in enumerate(resolved.steps):
        if STEPS[rstep.kind].collective and rstep.skipped is None:
            break
        leading.append((index, rstep))

    def leader_work() -> None:
        ran: list[StepReport] = []
        for index, rstep in leading:
            done[rstep.id] = _run_one(
                index,
                len(resolved.steps),
                rstep,
                worker,
                monitor,
                covered,
                bound,
                progress,
                into=ran,
            )

    outcome = share_compile_caches(
        worker.world, leader_work=leader_work, timeout_s=plan.compile_cache.timeout_s, log=bound
    )
    return {"role": outcome.role, "bytes": outcome.bytes, "seconds": round(outcome.seconds, 6)}
