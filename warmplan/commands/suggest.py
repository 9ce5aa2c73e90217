"""``warmplan suggest PLAN --trace TRACE``: the plan entries that would have prevented
a trace's compilations, as a patch to the plan file.

Argument parsing and printing only. The compilations come from the trace itself when
``warmplan record`` wrote it (nothing runs), or, with ``--run``, from replaying it
after the plan (``warmplan.verify.verify``). The patch goes to stdout (or ``--out``)
and applies with ``git apply`` or ``patch -p1``; ``--yaml`` prints the steps instead.

Exit codes: 0 (a patch, or nothing to add); 1 a user error; 2 a step or batch failed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from warmplan.commands._common import add_worker_options, load_plan_or_exit, make_worker
from warmplan.commands.verify import add_step_option, step_seconds
from warmplan.errors import UserError
from warmplan.fsutil import atomic_write
from warmplan.suggest import (
    Padding,
    Suggestion,
    compile_size_padding,
    padding_of,
    recorded_events,
    render_patch,
    render_yaml,
    suggest,
)
from warmplan.trace import Trace, read_trace


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "suggest",
        help="turn a recorded trace's compilations into plan steps, as a patch to the plan",
    )
    p.add_argument("plan", metavar="PLAN")
    p.add_argument(
        "--trace",
        metavar="TRACE",
        required=True,
        help="a trace written by warmplan record (or any trace, with --run)",
    )
    p.add_argument(
        "--run",
        dest="replay",
        action="store_true",
        help="replay the trace after the plan on the worker instead of reading recorded compilations",
    )
    p.add_argument("--out", metavar="FILE", help="write the patch here instead of stdout")
    p.add_argument(
        "--yaml", action="store_true", help="print the steps as YAML to paste instead of a patch"
    )
    add_worker_options(p)
    add_step_option(p)
    p.set_defaults(run=run)


def _recorded(trace: Trace, builtin: dict[str, Any]) -> tuple[list[Suggestion], int]:
    if trace.kind != "batches" or not trace.recorded:
        raise UserError(
            f"{trace.path}: no recorded compilations: the trace was not written by warmplan "
            "record; add --run to replay it after the plan"
        )
    events = recorded_events(trace.batches)
    pad: Padding | None = None
    if trace.header.get("engine") == "builtin" and builtin.get("compile_sizes"):
        pad = compile_size_padding(builtin["compile_sizes"])
    batches = [e.batch for e in trace.batches]
    return suggest(events, batches, padded_num_tokens=pad), len(events)


def run(args: argparse.Namespace) -> int:
    plan = load_plan_or_exit(args.plan)
    step_s = step_seconds(args)
    trace = read_trace(args.trace)
    if args.replay:
        from warmplan.verify import verify

        worker = make_worker(args, plan)
        result = verify(plan, worker, trace, path=str(Path(args.trace)), step_s=step_s)
        suggestions = suggest(
            result.events, [e.batch for e in result.entries], padded_num_tokens=padding_of(worker)
        )
        seen, source = len(result.events), "the replay"
    else:
        suggestions, seen = _recorded(trace, dict(plan.builtin))
        source = "the recording"
    if not suggestions:
        print(
            f"{args.trace}: no compilations in {source}; nothing to add to {args.plan}",
            file=sys.stderr,
        )
        return 0
    if args.yaml:
        text = render_yaml(suggestions)
    else:
        original = Path(args.plan).read_text(encoding="utf-8")
        note = f"Added by warmplan suggest: {seen} compilations in {source} of {args.trace}."
        text = render_patch(args.plan, original, suggestions, note=note)
    if args.out:
        try:
            atomic_write(args.out, text.encode("utf-8"))
        except OSError as exc:
            raise UserError(f"{args.out}: cannot write the patch: {exc}") from None
        print(
            f"wrote {args.out}: {len(suggestions)} steps for {seen} compilations", file=sys.stderr
        )
    else:
        sys.stdout.write(text)
    return 0
