"""Plans: records (``records``), loading (``load``: ``load_plan(path)``,
``parse_plan(text)``), the checks the schema cannot express (``checks``). Problems
are worded by the one diagnostics engine, ``warmplan.diagnostics``."""

from __future__ import annotations

from warmplan.diagnostics import validate_text as check_mapping
from warmplan.plan.load import (
    MAX_PLAN_BYTES,
    Checked,
    check_files,
    load_plan,
    load_plans,
    parse_plan,
    read_source,
)
from warmplan.plan.records import CompileCacheSpec, Plan, Step

__all__ = [
    "MAX_PLAN_BYTES",
    "Checked",
    "CompileCacheSpec",
    "Plan",
    "Step",
    "check_files",
    "check_mapping",
    "load_plan",
    "load_plans",
    "parse_plan",
    "read_source",
]
