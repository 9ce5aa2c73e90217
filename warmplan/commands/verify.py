"""``warmplan verify PLAN --trace TRACE``: does the plan cover what serving runs?

Runs the plan on the worker with the JIT monitor installed, arms the monitor
(``warn``), then replays every batch of the trace through the worker's serving path
(``ServingWorker.execute``), each attributed to ``batch[N]``. Prints each compilation
seen during the replay (batch, trace line, kind, kernel or function, key or shape)
and a summary.

* ``--strict``: exit 1 when the replay compiled anything. Loads from an on-disk
  compile cache count too: a rerun on a warm cache must fail the same way.
* ``--suggest``: print plan steps (YAML) that would have covered the compilations.
* ``--json``: print the result as one JSON object instead of tables.

Exit codes: 0 covered (or not strict); 1 a user error, or ``--strict`` and the replay
compiled; 2 a step or a batch failed.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from warmplan.commands._common import (
    add_worker_options,
    load_plan_or_exit,
    make_worker,
    print_json,
    print_table,
)
from warmplan.errors import StepError, UserError
from warmplan.log import get_logger
from warmplan.monitor import CompileEvent, JitMonitor
from warmplan.plan import Plan
from warmplan.suggest import Suggestion, padding_of, render_yaml, shape_of, suggest
from warmplan.trace import TraceEntry, batch_index, batch_label, check_fits, load_trace_entries
from warmplan.workers.base import ServingWorker, Worker

log = get_logger(__name__)

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

    @property
    def compiles(self) -> int:
        return sum(1 for e in self.events if not e.cache_hit)

    @property
    def cache_loads(self) -> int:
        return sum(1 for e in self.events if e.cache_hit)

    @property
    def batches_hit(self) -> list[int]:
        return sorted({i for e in self.events if (i := batch_index(e.label)) is not None})

    @property
    def covered(self) -> bool:
        return not self.events

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for e in self.events:
            index = batch_index(e.label)
            out.append({
                "batch": index,
                "line": None if index is None else self.entries[index].line,
                "kind": e.kind,
                "name": e.name,
                "key": e.key,
                "cache": "disk load" if e.cache_hit else "compile",
                "time": None if e.duration_s is None else f"{e.duration_s * 1000:.1f}ms",
            })
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "trace": self.trace,
            "batches": len(self.entries),
            "covered": self.covered,
            "warmup": {"compiles": self.warmup_compiles, "cache_loads": self.warmup_cache_loads},
            "replay": {
                "compiles": self.compiles,
                "cache_loads": self.cache_loads,
                "batches_hit": self.batches_hit,
                "duration_s": sum(self.batch_seconds),
                "events": [
                    e.to_dict() | {"batch": batch_index(e.label), "line": row["line"]}
                    for e, row in zip(self.events, self.rows(), strict=True)
                ],
            },
            "suggestions": [s.to_step() for s in self.suggestions],
        }

    def summary(self) -> str:
        n = len(self.entries)
        if self.covered:
            return f"covered: {n} batches from {self.trace} replayed with no compilation"
        hit = self.batches_hit
        return (
            f"NOT covered: {self.compiles} compiles and {self.cache_loads} disk-cache loads "
            f"in {len(hit)} of {n} batches from {self.trace}"
        )


def _hint_for(entries: Sequence[TraceEntry]) -> Any:
    def hint(event: CompileEvent) -> str | None:
        index = batch_index(event.label)
        if index is None or not 0 <= index < len(entries):
            return None
        batch = entries[index].batch
        shape, prior = shape_of(batch)
        ctx = f" after {prior} tokens of context" if prior else ""
        return (
            f"trace line {entries[index].line}: a dummy_run {shape} of {batch.num_tokens} tokens{ctx} "
            "would cover it (--suggest prints the steps)"
        )

    return hint


def verify(
    plan: Plan,
    worker: Worker,
    entries: Sequence[TraceEntry],
    *,
    trace: str = "<trace>",
    monitor: JitMonitor | None = None,
) -> VerifyResult:
    """Run ``plan`` on ``worker``, then replay ``entries`` through ``worker.execute``."""
    from warmplan.executor import run_plan

    if not isinstance(worker, ServingWorker):
        engine = _engine(worker)
        raise UserError(
            f"warmplan verify replays batches through the worker's serving path, "
            f"but the {engine!r} worker has no execute(batch)"
        )
    check_fits(entries, worker.limits, path=trace)
    monitor = monitor or JitMonitor(hint=_hint_for(entries))
    monitor.install()
    try:
        report = run_plan(plan, worker, monitor=monitor)
        warmup = monitor.events
        monitor.arm("warn")
        seconds: list[float] = []
        for index, entry in enumerate(entries):
            label = batch_label(index)
            started = time.perf_counter()
            try:
                with monitor.attribute(label):
                    worker.execute(entry.batch)
                    worker.synchronize()
            except ValueError as exc:
                raise UserError(f"{trace}:{entry.line}: the worker cannot run this batch: {exc}") from None
            except Exception as exc:
                raise StepError(label, f"{trace}:{entry.line}: {type(exc).__name__}: {exc}") from exc
            seconds.append(time.perf_counter() - started)
        replay = monitor.events[len(warmup):]
    finally:
        monitor.uninstall()
    return VerifyResult(
        trace=trace,
        entries=list(entries),
        warmup_compiles=sum(1 for e in warmup if not e.cache_hit),
        warmup_cache_loads=sum(1 for e in warmup if e.cache_hit),
        events=replay,
        batch_seconds=seconds,
        suggestions=suggest(replay, [e.batch for e in entries], padded_num_tokens=padding_of(worker)),
        report=report,
    )


def _engine(worker: object) -> str:
    describe = getattr(worker, "describe", None)
    if callable(describe):
        try:
            return str(describe().engine)
        except Exception:  # describing the worker is for the message only
            pass
    return type(worker).__name__


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "verify", help="run a plan, replay a trace, and report every compilation the plan missed"
    )
    p.add_argument("plan", metavar="PLAN")
    p.add_argument("--trace", metavar="TRACE", required=True, help="JSON Lines trace, one batch a line (docs/monitor.md)")
    add_worker_options(p)
    p.add_argument("--strict", action="store_true", help="exit 1 when the replay compiled anything (disk-cache loads too)")
    p.add_argument("--suggest", action="store_true", help="print plan steps that would have covered the compilations")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    plan = load_plan_or_exit(args.plan)
    entries = load_trace_entries(args.trace)  # a bad trace fails before any worker is built
    worker = make_worker(args, plan)
    result = verify(plan, worker, entries, trace=str(Path(args.trace)))
    if args.json:
        print_json({"plan": {"name": plan.name, "path": plan.path}} | result.to_dict())
    else:
        print(
            f"plan {plan.name}: warmup {result.warmup_compiles} compiles, "
            f"{result.warmup_cache_loads} disk-cache loads; replay of {len(entries)} batches "
            f"took {sum(result.batch_seconds):.2f}s"
        )
        if result.events:
            print_table(result.rows(), EVENT_COLUMNS)
        print(result.summary())
        if args.suggest and result.suggestions:
            print()
            print(render_yaml(result.suggestions), end="")
    if args.strict and not result.covered:
        return 1
    return 0
