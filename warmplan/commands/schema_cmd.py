"""``warmplan schema``: print the plan schema's path and content (``--write`` saves it)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from warmplan.errors import UserError
from warmplan.schema import SCHEMA_ID, schema_text


def repo_schema_path() -> Path:
    """``schemas/plan.schema.json`` of the checkout this package runs from."""
    return Path(__file__).resolve().parents[2] / "schemas" / "plan.schema.json"


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("schema", help="print the plan JSON Schema")
    p.add_argument(
        "--write", metavar="PATH", help="write the schema to PATH instead of printing it"
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    text = schema_text()
    if args.write:
        from warmplan.fsutil import atomic_write

        try:
            atomic_write(Path(args.write), text.encode())
        except OSError as exc:
            raise UserError(
                f"--write {args.write}: cannot write the schema: {exc.strerror or exc}"
            ) from None
        print(f"wrote {args.write}")
        return 0
    path = repo_schema_path()
    print(f"# {path if path.exists() else SCHEMA_ID}")
    print(text, end="")
    return 0
