"""``warmplan run PLAN``: load and validate the plan, take limits and facts from the
worker, resolve, run the steps in order, print a summary table and write the report.

Exit codes: 0 done; 1 a user error (bad plan, unsatisfiable option); 2 a step failed."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from warmplan.commands._common import (
    add_worker_options,
    load_plan_or_exit,
    make_worker,
    print_table,
    tokens_text,
)
from warmplan.errors import StepError, UserError
from warmplan.fsutil import check_writable
from warmplan.monitor import MONITOR_MODES
from warmplan.report import report_path
from warmplan.world import launch_env


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("run", help="run a plan on a worker")
    p.add_argument("plan", metavar="PLAN")
    add_worker_options(p)
    p.add_argument(
        "--report",
        metavar="FILE",
        help="write the JSON report here ({rank} is replaced by the rank)",
    )
    p.add_argument(
        "--jit-monitor",
        choices=MONITOR_MODES,
        default="off",
        help="keep watching for compilations after the plan",
    )
    p.add_argument(
        "--cache-root",
        metavar="DIR",
        help="autotune cache root (default: $WARMPLAN_CACHE_ROOT or ~/.cache/warmplan)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar, even on a terminal")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from warmplan.executor import run_plan

    plan = load_plan_or_exit(args.plan)
    if args.report:
        # Before the engine is built and the warmup runs, so that its result is not
        # lost to a bad path at the end (the launcher's RANK names this rank's file).
        target = report_path(args.report, launch_env()[0])
        why = check_writable(target)
        if why is not None:
            raise UserError(f"--report {target}: cannot write the report there: {why}")
    worker = make_worker(args, plan)
    rank = worker.world.rank
    show = args.log_format == "console" and rank == 0
    with _progress(enabled=show and not args.no_progress and sys.stderr.isatty()) as hook:
        try:
            report = run_plan(
                plan,
                worker,
                jit_monitor=args.jit_monitor,
                cache_root=args.cache_root,
                progress=hook,
            )
        except StepError as exc:
            partial = exc.report
            if args.report and partial is not None:
                try:
                    partial.write(report_path(args.report, rank))
                except UserError as lost:
                    # The step's failure is the news (exit 2); the lost report is a note.
                    print(f"warmplan: warning: {lost}", file=sys.stderr)
            raise
    if args.report:
        report.write(report_path(args.report, rank))
    if show:
        rows = []
        for s in report.steps:
            status = s.skipped or ("ok" if s.autotune is None else f"{s.autotune['decision']}")
            rows.append(
                {
                    "step": s.id,
                    "kind": s.kind,
                    "tokens (requested -> applied)": tokens_text(s.requested, s.applied),
                    "time": f"{s.duration_s:.2f}s" if s.skipped is None else "",
                    "compiles": s.compiles if s.skipped is None else "",
                    "cache loads": s.cache_loads if s.skipped is None else "",
                    "status": status,
                }
            )
        w = report.worker
        print(
            f"plan {plan.name} on {w['engine']} ({w['device']}), rank {w['rank']}/{w['world_size']}"
        )
        print_table(
            rows,
            [
                "step",
                "kind",
                "tokens (requested -> applied)",
                "time",
                "compiles",
                "cache loads",
                "status",
            ],
        )
        t = report.totals
        print(
            f"total {t['duration_s']:.2f}s, {t['compiles']} compiles, {t['cache_loads']} loaded from disk caches, {t['steps_run']} run, {t['steps_skipped']} skipped"
        )
    return 0


class _progress:
    """A rich progress bar over the steps on a terminal; nothing otherwise."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None
        self.task: Any = None

    def __enter__(self) -> Any:
        if not self.enabled:
            return None
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            transient=True,
        )
        self.bar.start()
        self.task = self.bar.add_task("warmup", total=None)

        def hook(index: int, total: int, rstep: Any, event: str) -> None:
            if event == "start":
                self.bar.update(self.task, total=total, description=f"{rstep.id}")
            else:
                self.bar.update(self.task, total=total, completed=index + 1)

        return hook

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()
