"""``warmplan verify PLAN --trace TRACE``: does the plan cover what serving runs?

Argument parsing and printing only; the work is ``warmplan.verify.verify``.

* ``--strict``: exit 1 when the replay compiled anything. Loads from an on-disk
  compile cache count too: a rerun on a warm cache must fail the same way.
* ``--suggest``: print plan steps (YAML) that would have covered the compilations:
  dummy runs and a slot mapping, then the same as ``compile_keys`` steps (one per
  built-in kernel, ``domain`` value lists; ``suggested_keys`` in ``--json``).
* ``--json``: print the result as one JSON object instead of tables.

Exit codes: 0 covered (or not strict); 1 a user error, or ``--strict`` and the replay
compiled; 2 a step or a batch failed.
"""

from __future__ import annotations

import argparse
from typing import Any

from warmplan.commands._common import (
    add_worker_options,
    load_plan_or_exit,
    make_worker,
    print_json,
    print_table,
)
from warmplan.scheduler import DEFAULT_STEP_S
from warmplan.suggest import (
    EventLike,
    KeysSuggestion,
    Padding,
    padding_of,
    render_yaml,
    suggest_keys,
)
from warmplan.trace import read_trace
from warmplan.verify import EVENT_COLUMNS, VerifyResult, verify, verify_all

__all__ = ["add_parser", "run", "verify", "verify_all"]


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "verify", help="run a plan, replay a trace, and report every compilation the plan missed"
    )
    p.add_argument("plan", metavar="PLAN")
    p.add_argument(
        "--trace",
        metavar="TRACE",
        required=True,
        action="append",
        help="JSON Lines trace: one batch or one request a line (docs/monitor.md); "
        "repeat it to replay several traces, one after another, after one warmup",
    )
    add_worker_options(p)
    p.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 when the replay compiled anything (disk-cache loads too)",
    )
    p.add_argument(
        "--suggest",
        action="store_true",
        help="print plan steps that would have covered the compilations",
    )
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    add_step_option(p)
    p.set_defaults(run=run)


def add_step_option(parser: argparse.ArgumentParser) -> None:
    """``--step-ms``: how long a scheduler step lasts, for ``arrival_s`` requests."""
    parser.add_argument(
        "--step-ms",
        type=float,
        default=DEFAULT_STEP_S * 1000,
        metavar="MS",
        help="request-level traces with arrival_s: milliseconds one scheduler step lasts (default %(default)s)",
    )


def step_seconds(args: argparse.Namespace) -> float:
    from warmplan.errors import UserError

    ms = float(args.step_ms)
    if not ms > 0:
        raise UserError(f"--step-ms must be > 0: {args.step_ms}")
    return ms / 1000


def run(args: argparse.Namespace) -> int:
    plan = load_plan_or_exit(args.plan)
    step_s = step_seconds(args)
    traces = [read_trace(path) for path in args.trace]  # bad traces fail before any worker
    worker = make_worker(args, plan)
    results = verify_all(plan, worker, traces, step_s=step_s)
    head = {"plan": {"name": plan.name, "path": plan.path}}
    pad = padding_of(worker)
    keyed = keys_kernels(worker)
    if args.json:
        dicts = [r.to_dict() for r in results]
        if args.suggest and keyed:
            for d, r in zip(dicts, results, strict=True):
                d["suggested_keys"] = [k.to_step() for k in key_suggestions(r, pad)]
        if len(results) == 1:
            print_json(head | dicts[0])
        else:
            print_json(head | {"traces": dicts})
    else:
        for n, result in enumerate(results):
            if n:
                print()
            print_result(plan.name, result, suggest=args.suggest, padded_num_tokens=pad, keys=keyed)
    if args.strict and not all(r.covered for r in results):
        return 1
    return 0


def keys_kernels(worker: object) -> bool:
    """Whether ``worker`` keys the built-in engine's kernels (``compile_keys`` steps
    for them would run there)."""
    from warmplan.suggest import KEY_KERNELS
    from warmplan.workers.base import KeyedWorker

    if not isinstance(worker, KeyedWorker):
        return False
    try:
        return set(KEY_KERNELS) <= set(worker.jit_kernels())
    except Exception:  # a worker that cannot list its kernels gets no key suggestions
        return False


def key_suggestions(result: VerifyResult, pad: Padding | None) -> list[KeysSuggestion]:
    """``compile_keys`` steps (one per built-in kernel) for the batches that compiled."""
    events: list[EventLike] = [e for e in result.events if e.kind != "autotune_miss"]
    events += result.cold
    return suggest_keys(events, [e.batch for e in result.entries], padded_num_tokens=pad)


def print_result(
    plan_name: str,
    result: VerifyResult,
    *,
    suggest: bool = False,
    padded_num_tokens: Padding | None = None,
    keys: bool = False,
) -> None:
    """The tables and lines ``verify`` prints."""
    print(
        f"plan {plan_name}: warmup {result.warmup_compiles} compiles, "
        f"{result.warmup_cache_loads} disk-cache loads; replay of {len(result.entries)} batches "
        f"took {sum(result.batch_seconds):.2f}s"
    )
    if result.replay is not None:
        for line in result.replay.describe():
            print(line)
    if result.events:
        print_table(result.rows(), EVENT_COLUMNS)
    print(result.summary())
    recorded = result.recorded_line()
    if recorded is not None:
        print(recorded)
    if suggest and result.suggestions:
        print()
        print(render_yaml(result.suggestions), end="")
        suggested = key_suggestions(result, padded_num_tokens) if keys else []
        if suggested:
            print(
                "# Or by compile key (kind: compile_keys, built-in engine: no launch); "
                "paste these instead of the dummy runs and the slot mapping."
            )
            print(render_yaml(suggested, header=False), end="")
