"""Compile-key domains (warmplan.domains): expansion, lockstep rows, filters, and the
collapse of integer ranges to Triton's specialisation classes. Pure logic."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from warmplan.domains import (
    MAX_CASES,
    DomainError,
    IntRange,
    KeyDomain,
    declared_count,
    domain_from_raw,
    expand,
    filter_names,
    int_class,
    int_class_representatives,
    parse_filter,
)


def test_the_cases_are_the_product_times_the_rows_less_the_filtered() -> None:
    d = domain_from_raw(
        {
            "domain": {"n": [1, {"range": [2, 4]}], "dtype": ["bf16", "fp8"]},
            "rows": [{"a": 1, "b": 2}, {"a": 4, "b": 8}],
            "where": ["n * a <= limit"],
        }
    )
    assert declared_count(d) == 4 * 2 * 2
    e = expand(d, env={"limit": 8})
    assert e.declared == 16
    assert len(e.cases) + e.filtered == 16
    assert {"n": 2, "dtype": "fp8", "a": 4, "b": 8} in e.cases
    assert all(c["n"] * c["a"] <= 8 for c in e.cases)
    # rows travel in lockstep: never a=1 with b=8
    assert all((c["a"], c["b"]) in {(1, 2), (4, 8)} for c in e.cases)


def test_a_case_name_wins_over_the_environment_and_unknown_names_are_named() -> None:
    d = KeyDomain(params=(("max_num_tokens", (3,)),), where=("max_num_tokens == 3",))
    assert len(expand(d, env={"max_num_tokens": 512}).cases) == 1
    with pytest.raises(DomainError, match=r"unknown name 'nope'.*known: max_num_tokens") as exc:
        expand(KeyDomain(params=(("n", (1,)),), where=("nope > 1",)), env={"max_num_tokens": 1})
    assert exc.value.path == "where.0"


@pytest.mark.parametrize(
    "text", ["__import__('os')", "n.real", "lambda: 1", "open('x')", "n[0]", "f(n)", "x = 1"]
)
def test_filters_allow_only_plain_expressions(text: str) -> None:
    with pytest.raises(ValueError, match=r"not allowed|not an expression"):
        parse_filter(text)


def test_filter_helpers() -> None:
    assert filter_names("cdiv(n, 16) * 16 == n and is_power_of_two(m) and true") == {"n", "m"}
    d = KeyDomain(params=(("n", (IntRange(1, 64),)),), where=("is_power_of_two(n)",))
    assert [c["n"] for c in expand(d).cases] == [1, 2, 4, 8, 16, 32, 64]


def test_a_range_collapses_to_one_value_per_triton_class_unless_a_filter_reads_it() -> None:
    d = KeyDomain(params=(("n", (IntRange(1, 8192),)),))
    e = expand(d, collapsible=lambda p: p == "n")
    assert [c["n"] for c in e.cases] == [1, 2, 16]
    assert e.collapsed == ("n",)
    assert e.declared == 8192
    filtered = KeyDomain(params=d.params, where=("n % 2 == 1",))
    assert len(expand(filtered, collapsible=lambda p: True).cases) == 4096


def test_integer_types_are_classes_too() -> None:
    # Triton binds ints of 2**31 and above as i64: another variant.
    reps = int_class_representatives(IntRange((1 << 31) - 20, (1 << 31) + 40))
    assert {int_class(v) for v in reps} == {"i32:other", "i32:div16", "i64:div16", "i64:other"}


@settings(max_examples=150, deadline=None)
@given(
    lo=st.integers(-300, 5000),
    span=st.integers(0, 3000),
    step=st.integers(1, 40),
)
def test_representatives_hold_every_class_of_the_range_and_nothing_else(
    lo: int, span: int, step: int
) -> None:
    r = IntRange(lo, lo + span, step)
    reps = int_class_representatives(r)
    members = list(r)
    assert set(reps) <= set(members)
    assert {int_class(v) for v in reps} == {int_class(v) for v in members}
    assert len({int_class(v) for v in reps}) == len(reps)


def test_a_domain_past_the_cap_is_refused_before_it_is_built() -> None:
    d = KeyDomain(params=(("a", (IntRange(1, 2000),)), ("b", (IntRange(1, 2000),))))
    with pytest.raises(DomainError, match=f"at most {MAX_CASES}"):
        expand(d)


def test_merge_replaces_or_extends_per_parameter() -> None:
    base = KeyDomain(params=(("n", (1, 2)), ("impl", ("auto",))), where=("n > 0",))
    over = KeyDomain(params=(("n", (16,)),), where=("n < 100",))
    assert dict(base.merged(over).params)["n"] == (16,)
    assert dict(base.merged(over, mode="extend").params)["n"] == (1, 2, 16)
    assert base.merged(over).where == ("n > 0", "n < 100")
    assert dict(base.merged(over).params)["impl"] == ("auto",)
