"""``warmplan validate FILE...``: exit 0 when every plan is valid, 1 when any is not.
Every problem of every file is reported in one run."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from warmplan.plan import check_files


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "validate", help="check plans against the schema and warmplan's rules"
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="plan files (.yaml)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only problems")
    p.add_argument(
        "-j",
        "--jobs",
        type=int,
        default=None,
        help="worker processes for many files (default: the CPU count)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    bad = 0
    for result in check_files(args.files, jobs=args.jobs):
        if result.problems:
            bad += 1
            for problem in result.problems:
                print(problem, file=sys.stderr)
        elif not args.quiet:
            print(f"ok: {result.path} ({result.name}, {result.steps} steps)")
    if bad:
        print(
            f"{bad} of {len(args.files)} plan file{'s' if len(args.files) != 1 else ''} invalid",
            file=sys.stderr,
        )
    return 1 if bad else 0
