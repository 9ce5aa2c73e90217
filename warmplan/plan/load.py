"""Load a plan: YAML -> schema validation -> checks -> frozen, typed records.

Every problem names ``file:line:column``, the path to the field
(``steps[2].tokens[0]``), what was found and what was expected, with a hint where
one helps (``warmplan.diagnostics``). All problems of a file are reported at once
(``PlanError.problems``). No torch import on this path.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from warmplan import schema as S
from warmplan.autotune import DEFAULT_TIMEOUT_S
from warmplan.diagnostics import Report, add_schema_error, read_yaml, show
from warmplan.errors import PlanError
from warmplan.fastcheck import compile_schema
from warmplan.plan.checks import check_plan
from warmplan.plan.records import CompileCacheSpec, Plan, Step
from warmplan.steps import STEPS
from warmplan.steps.base import StepFields
from warmplan.steps.common import build_gates
from warmplan.yamlsrc import Located

MAX_PLAN_BYTES = 4 * 1024 * 1024

# The compiled yes/no check runs first; only when it says no does jsonschema (the
# reference) walk the plan and explain every problem.
_FAST = compile_schema(S.SCHEMA)
_VALIDATOR: Any = None


def _validator() -> Any:
    """jsonschema's validator, made on first use: importing jsonschema costs ~0.2 s,
    and valid plans never need it."""
    global _VALIDATOR
    if _VALIDATOR is None:
        import jsonschema

        _VALIDATOR = jsonschema.Draft202012Validator(S.SCHEMA)
    return _VALIDATOR


def read_source(path: str | os.PathLike[str]) -> str:
    """Read a plan file as UTF-8; every failure is a one-line ``PlanError``."""
    name = str(path)
    p = Path(path)
    if not p.exists():
        raise PlanError([f"{name}: no such file"])
    if p.is_dir():
        raise PlanError([f"{name}: is a directory, expected a plan file (.yaml)"])
    try:
        # Never more than the limit is read: /dev/zero or a huge file is refused, not
        # loaded into memory. A FIFO without a writer reads as empty, not a hang.
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            os.set_blocking(fd, True)
            raw = f.read(MAX_PLAN_BYTES + 1)
    except OSError as exc:
        raise PlanError([f"{name}: cannot read: {exc.strerror}"]) from None
    if len(raw) > MAX_PLAN_BYTES:
        raise PlanError(
            [
                f"{name}: more than {MAX_PLAN_BYTES} bytes; plans are limited to {MAX_PLAN_BYTES} bytes"
            ]
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise PlanError(
            [
                f"{name}:{line}: not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); plans are UTF-8 text"
            ]
        ) from None


def load_plan(source: str | os.PathLike[str], *, name: str | None = None) -> Plan:
    """Load and validate the plan file at ``source``. Raises ``PlanError`` listing
    every problem.

    Deprecated, kept for existing callers: a string that contains a newline, or
    names no existing ``.yaml``/``.yml`` file, is taken as YAML text labelled
    ``name``; call ``parse_plan(text, file=name)`` for text instead.
    """
    if isinstance(source, os.PathLike) or (
        "\n" not in source and (Path(source).exists() or source.endswith((".yaml", ".yml")))
    ):
        label = str(source)
        return parse_plan(read_source(source), file=label, path=label)
    return parse_plan(source, file=name or "<plan>", path=None)


def parse_plan(text: str, *, file: str = "<plan>", path: str | None = None) -> Plan:
    """Validate YAML ``text`` and build the ``Plan``; ``file`` labels messages."""
    located = read_yaml(text, file=file)
    data = located.data
    if not isinstance(data, dict):
        raise PlanError(
            [
                f"{file}:1:1: (top level): expected a mapping with version, name and steps, found {show(data)}"
            ]
        )
    report = Report(file, located)
    if not _FAST(data):
        # The slow, exact validator decides and explains.
        for err in _validator().iter_errors(data):
            add_schema_error(report, err)
    check_plan(data, report)
    report.raise_if_any()
    return _build(data, located, text, path)


def _build(data: dict[str, Any], located: Located, text: str, path: str | None) -> Plan:
    steps: list[Step] = []
    for i, raw in enumerate(data["steps"]):
        mark = located.mark(("steps", i))
        common = StepFields(
            id=raw["id"],
            kind=raw["kind"],
            description=raw.get("description", ""),
            enabled=raw.get("enabled", True),
            when=build_gates(raw.get("when", {})),
            replaces=raw.get("replaces"),
            line=mark.line if mark else 0,
        )
        steps.append(STEPS[raw["kind"]].build(raw, common))
    cc = data.get("compile_cache", {})
    return Plan(
        version=data["version"],
        name=data["name"],
        description=data.get("description", ""),
        when=build_gates(data.get("when", {})),
        builtin=dict(data.get("builtin", {})),
        compile_cache=CompileCacheSpec(
            share=cc.get("share", False),
            timeout_s=float(cc.get("timeout_s", DEFAULT_TIMEOUT_S)),
        ),
        steps=tuple(steps),
        path=path,
        source=text,
    )


# --------------------------------------------------------------------------- many files


def load_plans(paths: Iterable[str]) -> Iterator[tuple[str, Plan | PlanError]]:
    """Load each path, yielding the plan or its ``PlanError``."""
    for p in paths:
        try:
            yield p, load_plan(Path(p))
        except PlanError as exc:
            yield p, exc


@dataclass(frozen=True, slots=True)
class Checked:
    """What ``validate`` needs of one file: its name and step count, or its problems."""

    path: str
    name: str | None
    steps: int
    problems: tuple[str, ...]


def _check_one(path: str) -> Checked:
    try:
        plan = load_plan(Path(path))
    except PlanError as exc:
        return Checked(path, None, 0, tuple(exc.problems))
    return Checked(path, plan.name, len(plan.steps), ())


def check_files(paths: list[str], *, jobs: int | None = None) -> list[Checked]:
    """Validate many files, in order; on several cores, in forked worker processes."""
    import multiprocessing

    jobs = jobs if jobs is not None else min(os.cpu_count() or 1, 8)
    if jobs <= 1 or len(paths) < 16 or "fork" not in multiprocessing.get_all_start_methods():
        return [_check_one(p) for p in paths]
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(
        max_workers=jobs, mp_context=multiprocessing.get_context("fork")
    ) as pool:
        return list(pool.map(_check_one, paths, chunksize=max(1, len(paths) // (jobs * 4))))
