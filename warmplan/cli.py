"""The ``warmplan`` command: validate, plan, run, verify, minimize, schema.

``main(argv=None) -> int``; user errors end in one clear message on stderr and exit
1 (a failed step exits 2), never a traceback.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from typing import NoReturn

from warmplan import __version__
from warmplan.commands import (
    minimize_cmd,
    plan_cmd,
    record,
    run_cmd,
    schema_cmd,
    suggest,
    validate,
)
from warmplan.errors import PlanError, WarmplanError
from warmplan.log import configure

COMMANDS = [validate, plan_cmd, run_cmd, record, suggest, minimize_cmd, schema_cmd]


def _verify_module() -> object | None:
    try:
        from warmplan.commands import verify
    except ImportError:  # pragma: no cover - verify ships with warmplan
        return None
    return verify


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad option is a user error (exit 1, as the README says), not
    exit 2, which means a step failed: a supervisor that retries on 2 would retry a
    typo forever."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


def _common_options(default: Callable[[str], object]) -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument(
        "--log-format",
        choices=["console", "json"],
        default=default("console"),
        help="console (readable) or json (one object a line)",
    )
    common.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default=default("info"),
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="warmplan",
        description="Declarative kernel warmup plans for LLM inference workers.",
        parents=[_common_options(lambda value: value)],
    )
    # Given after the command or before it, an option counts: the subcommand's copy
    # has no default, so it never overwrites one given before the command.
    common = _common_options(lambda value: argparse.SUPPRESS)
    parser.add_argument("--version", action="version", version=f"warmplan {__version__}")
    sub: argparse._SubParsersAction[argparse.ArgumentParser] = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    _Sub.common = common
    wrapped = _Sub(sub)
    modules: list[object] = list(COMMANDS)
    verify = _verify_module()
    if verify is not None:
        modules.insert(3, verify)
    for module in modules:
        module.add_parser(wrapped)  # type: ignore[attr-defined]
    return parser


class _Sub:
    """Adds the common options to every subcommand's parser."""

    common: argparse.ArgumentParser

    def __init__(self, sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
        self.sub = sub

    def add_parser(self, name: str, **kwargs: object) -> argparse.ArgumentParser:
        parents = [self.common, *kwargs.pop("parents", [])]  # type: ignore[misc]
        return self.sub.add_parser(name, parents=parents, **kwargs)  # type: ignore[arg-type]


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that it unwinds as a Ctrl-C does:
    runner state restored, hooks uninstalled, temp files removed; exit 143."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


INTERNAL_ERROR = 3


def _before_exit() -> None:
    """The process is about to exit (``main`` was called as the program, ``argv`` from
    ``sys.argv``): move every object to the GC's permanent generation, so that the
    interpreter's teardown does not walk the millions that torch, dynamo and inductor
    made. Measured on the 2-core CPU, a warm ``warmplan run plans/dsv4.yaml``: exit
    1.6-2.0 s -> 0.3-0.4 s (issue 13). Not done for in-process callers (an explicit
    ``argv``): frozen objects are never collected."""
    import gc

    gc.freeze()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure(args.log_format, args.log_level)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        code: int = args.run(args)
        if argv is None:
            _before_exit()
        return code
    except PlanError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return exc.exit_code
    except WarmplanError as exc:
        print(f"warmplan: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Terminated:
        print("warmplan: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("warmplan: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:
        # A bug, not the user's doing: one line, and the traceback only when asked.
        if args.log_level == "debug":
            traceback.print_exc()
        print(
            f"warmplan: internal error: {type(exc).__name__}: {exc} "
            "(a bug in warmplan; --log-level debug shows where)",
            file=sys.stderr,
        )
        return INTERNAL_ERROR
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
