"""``warmplan minimize PLAN --trace T [--trace T ...]``: the smallest plan with zero
compiles on the traces (``warmplan.minimize``).

Prints the minimised plan (to ``--out`` or stdout) and a table (step, action, keys
before -> after, why) on stderr when the plan goes to stdout. ``--confirm`` runs the
minimised plan on the built-in worker and replays every trace (as ``warmplan
verify``): exit 1 when anything compiled. A needed key that no step covers is exit 1,
naming the trace batch, with a ``compile_keys`` step that would cover it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from warmplan.commands._common import (
    add_worker_options,
    load_plan_or_exit,
    make_worker,
    print_json,
    print_table,
    read_model_config,
)
from warmplan.commands.plan_cmd import _capability
from warmplan.commands.verify import add_step_option, step_seconds
from warmplan.errors import UserError
from warmplan.trace import read_trace

COLUMNS = ["step", "kind", "action", "keys", "why"]


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "minimize",
        help="the smallest plan (fewest compile keys and dummy runs) with zero compiles on traces",
    )
    p.add_argument("plan", metavar="PLAN")
    p.add_argument(
        "--trace",
        metavar="TRACE",
        required=True,
        action="append",
        help="JSON Lines trace (batch- or request-level, docs/monitor.md); repeatable",
    )
    p.add_argument("--out", metavar="FILE", help="write the minimised plan here (default: stdout)")
    p.add_argument(
        "--platform",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="key the kernels for this platform (auto: the engine's device; cuda binds "
        "Triton for --device-capability without a GPU)",
    )
    p.add_argument(
        "--device-capability",
        type=_capability,
        metavar="X.Y",
        help="CUDA capability of the target with --platform cuda (default 9.0)",
    )
    p.add_argument(
        "--confirm",
        action="store_true",
        help="run the minimised plan on the built-in worker and replay the traces: "
        "exit 1 when anything compiled (slow on a CPU)",
    )
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    add_worker_options(p)
    add_step_option(p)
    p.set_defaults(run=run)


def _platform(args: argparse.Namespace, plan: Any, overrides: dict[str, Any]) -> str:
    if args.platform != "auto":
        return str(args.platform)
    device = args.device if args.device != "auto" else {**plan.builtin, **overrides}.get("device")
    if device in ("cpu", "cuda"):
        return str(device)
    import warnings

    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run(args: argparse.Namespace) -> int:
    from warmplan.minimize import minimize

    plan = load_plan_or_exit(args.plan)
    step_s = step_seconds(args)
    traces = [read_trace(path) for path in args.trace]
    overrides = read_model_config(args.model_config)
    platform = _platform(args, plan, overrides)
    if platform == "cpu" and args.device_capability:
        raise UserError("--device-capability applies to --platform cuda only")
    result = minimize(
        plan,
        traces,
        platform=platform,
        capability=args.device_capability,
        step_s=step_s,
        overrides=overrides,
    )
    if args.out:
        try:
            Path(args.out).write_text(result.text, encoding="utf-8")
        except OSError as exc:
            raise UserError(f"--out {args.out}: {exc}") from None
    confirm: dict[str, Any] | None = None
    if args.confirm:
        confirm = _confirm(args, result.text, traces, step_s)
    if args.json:
        out = result.to_dict()
        if confirm is not None:
            out["confirm"] = confirm
        print_json(out)
    else:
        if not args.out:
            print(result.text, end="")
        report = sys.stderr if not args.out else sys.stdout
        print(summary(result), file=report)
        print_table(result.rows(), COLUMNS, file=report)
        if args.out:
            print(f"wrote {args.out}", file=report)
        if confirm is not None:
            print(confirm["summary"], file=report)
    if confirm is not None and confirm["compiles"]:
        return 1
    return 0


def summary(result: Any) -> str:
    exact = "exact" if result.exact else "greedy (the exact search passed its budget)"
    return (
        f"plan {result.plan.name}: {len(result.needed)} compile keys needed by "
        f"{result.batches} batches ({result.platform}); keys {result.keys_before} -> "
        f"{result.keys_after}, launches (dummy runs and slot-mapping calls) "
        f"{result.launches(after=False)} -> {result.launches(after=True)}; cover {exact}"
    )


def _confirm(
    args: argparse.Namespace, text: str, traces: list[Any], step_s: float
) -> dict[str, Any]:
    from warmplan.plan import parse_plan
    from warmplan.verify import verify_all

    path = args.out or f"{args.plan} (minimised)"
    plan = parse_plan(text, file=path, path=args.out)
    worker = make_worker(args, plan)
    results = verify_all(plan, worker, traces, step_s=step_s)
    compiles = sum(r.compiles for r in results)
    loads = sum(r.cache_loads + r.device_loads + r.autotune_misses for r in results)
    lines = [r.summary() for r in results]
    return {
        "compiles": compiles + loads,
        "traces": [r.to_dict() for r in results],
        "summary": "confirm: " + "; ".join(lines),
    }
