"""Fuzzing what users feed warmplan: plans (random values at every field of the
shipped plans, random YAML text) and traces (random lines). Every input either loads
or fails with messages that name ``file:line``; nothing else escapes, and a plan that
loads resolves without building anything huge.

The trace defects found here are B's to fix (warmplan/trace.py); each is pinned by a
strict xfail, which fails the day it is fixed so the marker comes off (none left).
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests._paths import PLANS
from warmplan.errors import PlanError, UserError
from warmplan.plan import parse_plan
from warmplan.resolve import resolve
from warmplan.steps.base import CacheContext
from warmplan.trace import read_trace
from warmplan.workers.base import Facts, Limits

# 150 inputs a test in the full suite; the fast lane (`pytest -m "not compiles"`, see
# tests/conftest.py) sets WARMPLAN_FUZZ_EXAMPLES lower to stay within seconds.
FUZZ = settings(
    max_examples=int(os.environ.get("WARMPLAN_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
PLAN_PROBLEM = re.compile(r"^p\.yaml:\d+(:\d+)?: \S")

SHIPPED = [yaml.safe_load(p.read_text()) for p in sorted(PLANS.glob("*.yaml"))]

# Values users get wrong: huge, negative, non-finite, wrong types, control characters,
# path tricks, the names of limits.
JUNK = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from([0, 1, -1, 1 << 24, (1 << 24) + 1, 2**63, 10**40]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=20),
    st.sampled_from(
        [
            "{cache_root}/../x.json",
            "{cache_root}",
            "{cache_root}/{nope}.json",
            "{cache_root}/a}b",
            "/etc/passwd",
            "{cache_root}/a\x00b",
            "max_num_tokens",
            "same",
            "9.0",
            "\x1b[31m",
        ]
    ),
    st.lists(st.integers(min_value=-5, max_value=1 << 25), max_size=3),
    st.fixed_dictionaries({"range": st.lists(st.integers(-10, 1 << 25), max_size=3)}),
    st.fixed_dictionaries({"powers_of_two": st.lists(st.integers(-10, 1 << 25), max_size=3)}),
    st.dictionaries(st.text(max_size=8), st.integers(), max_size=2),
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            out += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out += _paths(item, (*prefix, i))
    return out


def _set(data: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    holder = data
    for part in path[:-1]:
        holder = holder[part]
    holder[path[-1]] = value
    return data


@st.composite
def mutated_plans(draw: st.DrawFn) -> str:
    """A shipped plan with one to three values (anywhere) replaced by junk, or a key added."""
    data = copy.deepcopy(draw(st.sampled_from(SHIPPED)))
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(data)
        path = draw(st.sampled_from(paths))
        target = data
        for part in path:
            target = target[part]
        if isinstance(target, dict) and draw(st.booleans()):
            target[draw(st.text(min_size=1, max_size=10))] = draw(JUNK)
        else:
            data = _set(data, path, draw(JUNK))
    return yaml.safe_dump(data, allow_unicode=True, width=1 << 20)


def _check_loads_or_names_positions(text: str) -> None:
    try:
        plan = parse_plan(text, file="p.yaml")
    except PlanError as exc:
        problems = exc.problems
        assert problems
        for problem in problems:
            assert PLAN_PROBLEM.match(problem), problem
        return
    limits = Limits(max_num_tokens=8192, max_num_batched_tokens=8192, max_num_seqs=256)
    facts = Facts(platform="cuda", device_capability=(9, 0), attention_backends=("X",))
    try:
        resolved = resolve(plan, limits, facts, CacheContext(cache_root="/nonexistent/root"))
    except PlanError as exc:
        problems = exc.problems
        for problem in problems:
            assert problem.startswith("p.yaml:"), problem
        return
    for step in resolved.steps:
        assert len(step.requested) <= 65536
        assert all(0 <= n <= 8192 for n in step.applied)


@FUZZ
@given(mutated_plans())
def test_mutated_shipped_plans_load_or_name_every_problem(text: str) -> None:
    """A shipped plan with junk anywhere loads, or fails naming file:line:column."""
    _check_loads_or_names_positions(text)


@FUZZ
@given(st.text(max_size=300))
def test_random_text_never_escapes_as_anything_but_a_plan_error(text: str) -> None:
    """Any text at all is a plan or a PlanError: never another exception."""
    _check_loads_or_names_positions(text)


@FUZZ
@given(
    st.lists(
        st.sampled_from(
            [
                "version: 1",
                "name: x",
                "steps:",
                "  - {id: a, kind: slot_mapping, tokens: [1]}",
                "&a [*a]",
                "!!python/object:os.system",
                "<<: *x",
                "- ",
                "  ",
                ": ",
                "'",
                "{",
                "[",
                "9" * 70,
                ".nan",
                ".inf",
                "\t",
                "---",
                "%YAML 1.1",
                "? a",
                "steps: &s [*s]",
            ]
        ),
        max_size=8,
    )
)
def test_random_yaml_fragments_never_escape(lines: list[str]) -> None:
    """Fragments of YAML syntax (tags, aliases, merges, directives) are plans or PlanErrors."""
    _check_loads_or_names_positions("\n".join(lines) + "\n")


def test_tags_never_construct_objects() -> None:
    """A python tag is refused; no code runs."""
    with pytest.raises(PlanError) as info:
        parse_plan(
            'version: 1\nname: x\nsteps: !!python/object/apply:os.system ["true"]\n', file="p.yaml"
        )
    assert info.value.problems == [
        "p.yaml:3:8: tag '!!python/object/apply:os.system' is not allowed: plans hold plain data only "
        "(strings, numbers, booleans, null, lists, mappings)"
    ]


# --------------------------------------------------------------------------- traces

JSON_VALUES = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(10**20), max_value=10**20),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=8),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
BATCHES = st.fixed_dictionaries(
    {},
    optional={
        "decode": st.one_of(st.integers(-3, 1 << 20), JSON_VALUES),
        "prefill": st.one_of(
            st.lists(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "tokens": st.one_of(st.integers(-3, 1 << 20), JSON_VALUES),
                        "context": st.one_of(st.integers(-3, 1 << 20), JSON_VALUES),
                    },
                ),
                max_size=3,
            ),
            JSON_VALUES,
        ),
    },
)
LINES = st.one_of(
    BATCHES.map(json.dumps),
    JSON_VALUES.map(json.dumps),
    st.text(max_size=40).filter(lambda t: "\n" not in t and "\r" not in t),
    st.sampled_from(["NaN", "Infinity", '{"decode": NaN}', '{"decode": 1, "decode": 2}', "#", ""]),
)


@FUZZ
@given(st.lists(LINES, min_size=1, max_size=6))
def test_random_traces_read_or_name_the_line(tmp_path: Path, lines: list[str]) -> None:
    """A trace of random lines reads, or fails with a UserError naming file:line."""
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    try:
        read_trace(path)
    except UserError as exc:
        message = str(exc)
        assert message.startswith(f"{path}:"), message


def test_trace_line_with_a_huge_integer_names_the_line(tmp_path: Path) -> None:
    """A 5000-digit integer on a trace line (probe D2) is a UserError naming the line."""
    path = tmp_path / "t.jsonl"
    path.write_text('{"decode": ' + "9" * 5000 + "}\n")
    with pytest.raises(UserError, match=r":1: "):
        read_trace(path)


def test_deeply_nested_trace_line_names_the_line(tmp_path: Path) -> None:
    """A line of 100000 nested lists (probe D2) is a UserError naming the line."""
    path = tmp_path / "t.jsonl"
    path.write_text("[" * 100000 + "]" * 100000 + "\n")
    with pytest.raises(UserError, match=r":1: "):
        read_trace(path)
