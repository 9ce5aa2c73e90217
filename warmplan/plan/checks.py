"""What the schema cannot say about a plan: unique step ids, ``replaces`` naming a
later dummy run, gates, and each kind's own checks (``StepKind.check``).

The checks run even when the schema found problems, so that every problem of a file
is reported at once: each looks only at values of the right shape.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from warmplan.diagnostics import did_you_mean
from warmplan.steps import STEPS
from warmplan.steps.common import Path, Problems, check_gates


def check_plan(data: Mapping[str, Any], problems: Problems) -> None:
    """Add every semantic problem of the plan ``data`` (of any shape) to ``problems``."""
    raw_steps = data.get("steps")
    steps = raw_steps if isinstance(raw_steps, list) else []
    kinds = {
        s["id"]: s.get("kind")
        for s in steps
        if isinstance(s, dict) and isinstance(s.get("id"), str)
    }
    index: dict[str, int] = {}
    for i, step in enumerate(steps):
        sid = step.get("id") if isinstance(step, dict) else None
        if not isinstance(sid, str):
            continue
        if sid in index:
            problems.add(
                ("steps", i, "id"), f"duplicate step id {sid!r} (first used by steps[{index[sid]}])"
            )
        else:
            index[sid] = i
    for i, step in enumerate(steps):
        if not isinstance(step, dict):
            continue
        if isinstance(step.get("when"), dict):
            check_gates(step["when"], ("steps", i, "when"), problems)
        _check_replaces(step, i, index, kinds, problems)
        name = step.get("kind")
        kind = STEPS.get(name) if isinstance(name, str) else None
        if kind is not None:
            kind.check(step, ("steps", i), problems)
    if isinstance(data.get("when"), dict):
        check_gates(data["when"], ("when",), problems)
    _check_nan(data, (), problems)


def _check_nan(value: Any, path: Path, problems: Problems) -> None:
    """``.nan`` passes every bound (each comparison with it is false), so it is
    refused wherever it appears: no field of a plan means "not a number"."""
    if isinstance(value, float) and math.isnan(value):
        problems.add(path, "expected a number, found nan")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_nan(item, (*path, key), problems)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_nan(item, (*path, i), problems)


# What a step of each kind may stand in for: an autotune step's run is a dummy run; a
# compile_keys step compiles what a slot-mapping fan or a dummy run would have.
REPLACEABLE: dict[str, tuple[str, ...]] = {
    "autotune": ("dummy_run",),
    "compile_keys": ("slot_mapping", "dummy_run"),
}


def _check_replaces(
    step: Mapping[str, Any],
    i: int,
    index: Mapping[str, int],
    kinds: Mapping[Any, Any],
    problems: Problems,
) -> None:
    target = step.get("replaces")
    if not isinstance(target, str):
        return
    at = ("steps", i, "replaces")
    j = index.get(target)
    if j is None:
        problems.add(at, f"no step with id {target!r}{did_you_mean(target, index)}")
    elif j <= i:
        problems.add(
            at,
            f"expected a later step, found {target!r} (steps[{j}]), which runs before this one",
        )
    else:
        allowed = REPLACEABLE.get(str(step.get("kind")), ("dummy_run",))
        if kinds.get(target) not in allowed:
            what = " or ".join(allowed)
            problems.add(
                at,
                f"expected the id of a {what} step, found {target!r}, a {kinds.get(target)} step",
            )
