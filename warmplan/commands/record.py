"""``warmplan record PLAN --out FILE``: run a plan, serve traffic, record what ran.

Argument parsing and printing only; the work is ``warmplan.record.record``. The
traffic is a trace (``--trace``: requests are scheduled and batches re-chunked under
the worker's limits) or a synthetic workload (``--synthetic chat|long-prompt``).

Exit codes: 0 recorded; 1 a user error; 2 a step or a batch failed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from warmplan.commands._common import (
    add_worker_options,
    load_plan_or_exit,
    make_worker,
    print_json,
)
from warmplan.commands.verify import add_step_option, step_seconds
from warmplan.errors import UserError
from warmplan.record import DEFAULT_BACKUPS, DEFAULT_MAX_BYTES, TraceRecorder, record
from warmplan.scheduler import SchedulerLimits
from warmplan.trace import Trace, read_trace
from warmplan.workload import WORKLOADS, synthetic_requests


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "record",
        help="run a plan, serve a trace or a synthetic workload, and record the batches run and what compiled",
    )
    p.add_argument("plan", metavar="PLAN")
    p.add_argument("--out", metavar="FILE", required=True, help="the batch-level trace to write")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--trace", metavar="TRACE", help="traffic to serve: a request- or batch-level trace"
    )
    source.add_argument(
        "--synthetic", choices=WORKLOADS, help="traffic to serve: a synthetic workload"
    )
    p.add_argument(
        "--requests",
        type=int,
        default=50,
        metavar="N",
        help="--synthetic: how many requests (default %(default)s)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="--synthetic: the generator's seed (default %(default)s)",
    )
    p.add_argument(
        "--max-bytes",
        type=int,
        default=DEFAULT_MAX_BYTES,
        metavar="N",
        help="rotate the trace past N bytes (0: never; default %(default)s)",
    )
    p.add_argument(
        "--backups",
        type=int,
        default=DEFAULT_BACKUPS,
        metavar="N",
        help="rotated files kept (default %(default)s)",
    )
    p.add_argument(
        "--sample-every",
        type=int,
        default=1,
        metavar="N",
        help="record one batch in N; batches that compiled always (default %(default)s)",
    )
    add_worker_options(p)
    add_step_option(p)
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(run=run)


def _traffic(args: argparse.Namespace, max_model_len: int | None) -> Trace:
    if args.trace is not None:
        return read_trace(args.trace)
    if args.requests < 1:
        raise UserError(f"--requests must be >= 1: {args.requests}")
    requests = synthetic_requests(
        args.synthetic, args.requests, seed=args.seed, max_model_len=max_model_len or 4096
    )
    return Trace(path=f"<synthetic {args.synthetic}>", kind="requests", requests=tuple(requests))


def run(args: argparse.Namespace) -> int:
    plan = load_plan_or_exit(args.plan)
    step_s = step_seconds(args)
    if args.trace is not None:
        read_trace(args.trace)  # a bad trace fails before any worker is built
    worker = make_worker(args, plan)
    limits = SchedulerLimits.of_worker(worker)
    traffic = _traffic(args, limits.max_model_len)
    header = {
        "engine": worker.describe().engine,
        "plan": plan.name,
        "limits": {
            "max_num_batched_tokens": limits.max_num_batched_tokens,
            "max_num_seqs": limits.max_num_seqs,
            "max_model_len": limits.max_model_len,
        },
        "traffic": traffic.path,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        recorder = TraceRecorder(
            args.out,
            max_bytes=args.max_bytes,
            backups=args.backups,
            sample_every=args.sample_every,
            header=header,
        )
    except (ValueError, OSError) as exc:
        raise UserError(f"{args.out}: cannot record: {exc}") from None
    result = record(plan, worker, traffic, recorder, limits=limits, step_s=step_s)
    if args.json:
        print_json(
            {"plan": {"name": plan.name, "path": plan.path}, "out": str(Path(args.out))}
            | result.to_dict()
        )
        return 0
    print(
        f"plan {plan.name}: warmup {result.warmup_compiles} compiles, "
        f"{result.warmup_cache_loads} disk-cache loads; served {result.batches} batches "
        f"in {sum(result.seconds):.2f}s"
    )
    if result.replay is not None:
        for line in result.replay.describe():
            print(line)
    stats = result.stats
    cold = (
        f", {len(result.cold)} first device loads and {result.autotune_misses} autotune misses"
        if result.cold or result.autotune_misses
        else ""
    )
    print(
        f"live: {result.compiles} compiles and {result.cache_loads} disk-cache loads{cold} in "
        f"{len(result.batches_hit)} of {result.batches} batches"
    )
    rotated = f", {stats.rotations} rotations" if stats.rotations else ""
    print(
        f"recorded {stats.batches_written} of {stats.batches_seen} batches to {args.out} ({stats.bytes_written} bytes{rotated})"
    )
    if stats.disabled:
        print(f"recording stopped early: {stats.disabled}")
    print(f"replay it: warmplan verify {args.plan} --trace {args.out}")
    return 0
