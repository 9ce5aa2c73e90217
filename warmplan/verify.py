"""Does a plan cover what serving runs? Run it, replay a trace, list what compiled.

``verify(plan, worker, trace)`` runs the plan on the worker with the JIT monitor
installed, arms the monitor (``warn``), then replays every batch of the trace through
the worker's serving path (``ServingWorker.execute``), each attributed to
``batch[N]``. A request-level trace is first scheduled into batches under the
worker's limits, and a batch-level one has its batches over the limits re-chunked
(``warmplan.scheduler``); the result says how. A trace written by ``warmplan record``
carries the compilations the live run saw, and the result compares them with the
replay's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from warmplan.errors import StepError, UserError
from warmplan.monitor import CompileEvent, JitMonitor
from warmplan.monitor.cold import ColdEvent, ColdWatcher
from warmplan.plan import Plan
from warmplan.scheduler import DEFAULT_STEP_S, Replay, SchedulerLimits, replay_batches
from warmplan.suggest import Suggestion, padding_of, shape_of, suggest
from warmplan.trace import Trace, TraceEntry, batch_index, batch_label
from warmplan.workers.base import ServingWorker, Worker

EVENT_COLUMNS = ["batch", "line", "kind", "name", "key", "cache", "time"]


@dataclass(slots=True, kw_only=True)
class VerifyResult:
    """What a replay saw: the warmup's compiles and every event of the replay."""

    trace: str
    entries: list[TraceEntry]
    warmup_compiles: int
    warmup_cache_loads: int
    events: list[CompileEvent]
    batch_seconds: list[float]
    suggestions: list[Suggestion] = field(default_factory=list)
    report: Any = None
    replay: Replay | None = None
    plan_name: str | None = None
    cold: list[ColdEvent] = field(default_factory=list)
    warmup_cold: int = 0

    @property
    def compiles(self) -> int:
        """Real compiles (eager fallbacks too), not disk-cache loads or autotune misses."""
        return sum(1 for e in self.events if not e.cache_hit and e.kind != "autotune_miss")

    @property
    def cache_loads(self) -> int:
        return sum(1 for e in self.events if e.cache_hit)

    @property
    def device_loads(self) -> int:
        return sum(1 for e in self.cold if e.kind == "device_load")

    @property
    def autotune_misses(self) -> int:
        return sum(1 for e in self.events if e.kind == "autotune_miss")

    @property
    def batches_hit(self) -> list[int]:
        labels = [e.label for e in self.events] + [e.label for e in self.cold]
        return sorted({i for label in labels if (i := batch_index(label)) is not None})

    @property
    def covered(self) -> bool:
        """Nothing compiled, loaded from disk, loaded onto the device or missed a
        tuned entry during the replay."""
        return not self.events and not self.cold

    @property
    def recorded(self) -> int | None:
        """Compile events (compiles and disk loads) the recording of this trace saw
        live, or ``None`` for a trace that was not recorded by ``warmplan record``."""
        if self.replay is None or not self.replay.trace.recorded:
            return None
        return self.replay.trace.recorded_compiles

    def _line(self, index: int | None) -> str | None:
        if index is None or not 0 <= index < len(self.entries):
            return None
        return self.entries[index].where

    def rows(self) -> list[dict[str, Any]]:
        out = []
        cache = {"device_load": "device load", "autotune_miss": "tune miss"}
        events: list[CompileEvent | ColdEvent] = [*self.events, *self.cold]
        for e in events:
            index = batch_index(e.label)
            out.append(
                {
                    "batch": index,
                    "line": self._line(index),
                    "kind": e.kind,
                    "name": e.name,
                    "key": e.key,
                    "cache": cache.get(e.kind, "disk load" if e.cache_hit else "compile"),
                    "time": None if e.duration_s is None else f"{e.duration_s * 1000:.1f}ms",
                }
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        events = []
        for e in self.events:
            index = batch_index(e.label)
            entry = (
                self.entries[index]
                if index is not None and 0 <= index < len(self.entries)
                else None
            )
            events.append(
                e.to_dict()
                | {
                    "batch": index,
                    "line": None if entry is None else entry.line,
                    "lines": None if entry is None else list(entry.lines or (entry.line,)),
                }
            )
        return {
            "trace": self.trace,
            "batches": len(self.entries),
            "covered": self.covered,
            "warmup": {
                "compiles": self.warmup_compiles,
                "cache_loads": self.warmup_cache_loads,
                "cold": self.warmup_cold,
            },
            "replay": {
                "compiles": self.compiles,
                "cache_loads": self.cache_loads,
                "device_loads": self.device_loads,
                "autotune_misses": self.autotune_misses,
                "batches_hit": self.batches_hit,
                "duration_s": sum(self.batch_seconds),
                "events": events,
                "cold": [e.to_dict() | {"batch": batch_index(e.label)} for e in self.cold],
            },
            "recorded": None if self.recorded is None else {"events": self.recorded},
            "scheduling": None if self.replay is None else self.replay.to_dict(),
            "suggestions": [s.to_step() for s in self.suggestions],
        }

    def summary(self) -> str:
        n = len(self.entries)
        if self.covered:
            return f"covered: {n} batches from {self.trace} replayed with no compilation"
        hit = self.batches_hit
        cold = (
            f", {self.device_loads} first device loads and {self.autotune_misses} autotune misses"
            if self.cold or self.autotune_misses
            else ""
        )
        return (
            f"NOT covered: {self.compiles} compiles and {self.cache_loads} disk-cache loads{cold} "
            f"in {len(hit)} of {n} batches from {self.trace}"
        )

    def recorded_line(self) -> str | None:
        """How the replay compares with what the recording saw live (``None`` when the
        trace was not recorded). Compared only when the replay ran the recorded batches
        as they were, after the plan the recording ran."""
        live = self.recorded
        if live is None or self.replay is None:
            return None
        head = f"recorded live: {live} events (compiles, disk and device loads, autotune misses)"
        if self.replay.rechunked:
            n = len(self.replay.rechunked)
            return (
                f"{head} on a worker with other limits ({n} batches re-chunked here); not compared"
            )
        recorded_plan = self.replay.trace.header.get("plan")
        if (
            recorded_plan is not None
            and self.plan_name is not None
            and recorded_plan != self.plan_name
        ):
            return f"{head} after plan {recorded_plan!r}; not compared"
        seen = len(self.events) + len(self.cold)
        if seen == live:
            same = "the same"
        else:
            same = f"{abs(seen - live)} {'fewer' if seen < live else 'more'}"
        return f"{head}; this replay: {seen} ({same})"


def hint_for(current: list[Sequence[TraceEntry]]) -> Callable[[CompileEvent], str | None]:
    """A monitor hint naming the trace line of an event's batch (``current[0]``: the
    entries of the trace being replayed)."""

    def hint(event: CompileEvent) -> str | None:
        entries = current[0]
        index = batch_index(event.label)
        if index is None or not 0 <= index < len(entries):
            return None
        batch = entries[index].batch
        shape, prior = shape_of(batch)
        ctx = f" after {prior} tokens of context" if prior else ""
        return (
            f"trace line {entries[index].where}: a dummy_run {shape} of {batch.num_tokens} "
            f"tokens{ctx} would cover it (--suggest prints the steps)"
        )

    return hint


def as_trace(entries: Trace | Sequence[TraceEntry], path: str) -> Trace:
    """``entries`` as a batch-level ``Trace`` (a ``Trace`` as it is)."""
    if isinstance(entries, Trace):
        return entries
    return Trace(path=path, kind="batches", batches=tuple(entries))


def verify(
    plan: Plan,
    worker: Worker,
    trace: Trace | Sequence[TraceEntry],
    *,
    path: str = "<trace>",
    monitor: JitMonitor | None = None,
    limits: SchedulerLimits | None = None,
    step_s: float = DEFAULT_STEP_S,
) -> VerifyResult:
    """Run ``plan`` on ``worker``, then replay ``trace`` through ``worker.execute``.

    ``trace`` is a ``Trace`` (``warmplan.trace.read_trace``) or a list of batch
    entries; ``limits`` default to the worker's (``SchedulerLimits.of_worker``).
    """
    source = as_trace(trace, path)
    return verify_all(plan, worker, [source], monitor=monitor, limits=limits, step_s=step_s)[0]


def verify_all(
    plan: Plan,
    worker: Worker,
    traces: Sequence[Trace],
    *,
    monitor: JitMonitor | None = None,
    limits: SchedulerLimits | None = None,
    step_s: float = DEFAULT_STEP_S,
) -> list[VerifyResult]:
    """Run ``plan`` on ``worker`` once, then replay each of ``traces`` in turn.

    Every trace is scheduled (and checked) before the plan runs. A shape one trace
    compiled is warm for the traces after it: the counts of a later trace are those
    of a worker that served the earlier ones too.
    """
    from warmplan.executor import run_plan

    if not isinstance(worker, ServingWorker):
        raise UserError(
            f"warmplan verify replays batches through the worker's serving path, "
            f"but the {engine_name(worker)!r} worker has no execute(batch)"
        )
    limits = limits or SchedulerLimits.of_worker(worker)
    replays = [replay_batches(t, limits, step_s=step_s) for t in traces]
    current: list[Sequence[TraceEntry]] = [()]
    hint = hint_for(current)
    monitor = monitor or JitMonitor(hint=hint)
    monitor.install()
    cold = ColdWatcher(monitor.store)
    cold.install()
    results: list[VerifyResult] = []
    try:
        report = run_plan(plan, worker, monitor=monitor)
        warmup = monitor.events
        warmup_cold = len(cold.events)
        monitor.arm("warn")
        for replay in replays:
            entries = list(replay.entries)
            current[0] = entries
            before, cold_before = len(monitor.events), len(cold.events)
            seconds = replay_entries(worker, entries, monitor, path=replay.trace.path)
            replayed = monitor.events[before:]
            replayed_cold = cold.events[cold_before:]
            results.append(
                VerifyResult(
                    trace=replay.trace.path,
                    entries=entries,
                    warmup_compiles=sum(1 for e in warmup if not e.cache_hit),
                    warmup_cache_loads=sum(1 for e in warmup if e.cache_hit),
                    events=replayed,
                    batch_seconds=seconds,
                    suggestions=suggest(
                        # A dummy run loads what a batch loads; it cannot widen a tuned range.
                        [*(e for e in replayed if e.kind != "autotune_miss"), *replayed_cold],
                        [e.batch for e in entries],
                        padded_num_tokens=padding_of(worker),
                    ),
                    report=report,
                    replay=replay,
                    plan_name=plan.name,
                    cold=replayed_cold,
                    warmup_cold=warmup_cold,
                )
            )
    finally:
        cold.uninstall()
        monitor.uninstall()
    return results


def replay_entries(
    worker: ServingWorker,
    entries: Sequence[TraceEntry],
    monitor: JitMonitor,
    *,
    path: str,
    after_batch: Callable[[int, TraceEntry, list[CompileEvent]], None] | None = None,
) -> list[float]:
    """Execute each batch under ``monitor.attribute(batch[N])``; the seconds each took.

    ``after_batch(index, entry, events)`` gets the events each batch caused. A batch
    the worker refuses (``ValueError``) is a ``UserError`` at its trace line; any
    other failure a ``StepError`` (exit 2).
    """
    seconds: list[float] = []
    for index, entry in enumerate(entries):
        label = batch_label(index)
        before = len(monitor.events)
        started = time.perf_counter()
        try:
            with monitor.attribute(label):
                worker.execute(entry.batch)
                worker.synchronize()
        except ValueError as exc:
            raise UserError(
                f"{path}:{entry.line}: the worker cannot run this batch: {exc}"
            ) from None
        except Exception as exc:
            raise StepError(label, f"{path}:{entry.line}: {type(exc).__name__}: {exc}") from exc
        seconds.append(time.perf_counter() - started)
        if after_batch is not None:
            after_batch(index, entry, monitor.events[before:])
    return seconds


def engine_name(worker: object) -> str:
    """The engine a worker says it is (``describe().engine``), else its class name."""
    describe = getattr(worker, "describe", None)
    if callable(describe):
        try:
            return str(describe().engine)
        except Exception:  # describing the worker is for the message only
            pass
    return type(worker).__name__
