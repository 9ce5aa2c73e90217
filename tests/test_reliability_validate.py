"""Reliability: what `validate` decides without a worker (bounds, cache templates,
numbers YAML can hold but a plan cannot use); each message pinned whole."""

from __future__ import annotations

from pathlib import Path

import pytest

from warmplan import yamlsrc
from warmplan.errors import PlanError
from warmplan.plan import parse_plan

HEAD = "version: 1\nname: t\nsteps:\n"
TUNE = "  - {id: t, kind: autotune, backend: builtin, run: {shape: plain, tokens: 8}, cache: {path: %s}}\n"


def problems(text: str) -> list[str]:
    with pytest.raises(PlanError) as info:
        parse_plan(text, file="p.yaml")
    return info.value.problems


def test_token_count_is_bounded() -> None:
    """A 26-digit token count (the issue's typo) fails validation with the bound."""
    assert problems(
        HEAD + "  - {id: s, kind: slot_mapping, tokens: [99999999999999999999999999]}\n"
    ) == [
        "p.yaml:4:42: steps[0].tokens[0]: expected an integer <= 16777216, found 99999999999999999999999999"
    ]


def test_range_that_expands_too_far_is_refused() -> None:
    """{range: [1, 50000000]} (probe S2): refused at validate, not built by `plan`."""
    assert problems(
        HEAD + "  - {id: s, kind: slot_mapping, tokens: [{range: [1, 50000000]}]}\n"
    ) == [
        "p.yaml:4:54: steps[0].tokens[0].range[1]: expected an integer <= 16777216, found 50000000"
    ]


def test_range_within_bounds_but_too_many_counts() -> None:
    """A range whose ends are in bounds but that expands past 65536 counts is refused."""
    assert problems(
        HEAD + "  - {id: s, kind: slot_mapping, tokens: [{range: [1, 100000]}, 7]}\n"
    ) == [
        "p.yaml:4:41: steps[0].tokens: expected at most 65536 token counts in all, found 100001; "
        "the kernel specialises by class of count (== 1, % 16 == 0, other), so a few cover it"
    ]


def test_range_of_65536_counts_is_accepted() -> None:
    """The bound is inclusive: 65536 counts load."""
    parse_plan(
        HEAD + "  - {id: s, kind: slot_mapping, tokens: [{range: [1, 65536]}]}\n", file="p.yaml"
    )


def test_prior_context_is_bounded() -> None:
    """prior_context: 99999999999999 (probe M7) fails validation."""
    assert problems(
        HEAD
        + "  - {id: d, kind: dummy_run, shape: single_prefill, tokens: 8, prior_context: 99999999999999}\n"
    ) == [
        "p.yaml:4:79: steps[0].prior_context: expected an integer <= 16777216, found 99999999999999"
    ]


def test_integer_of_thousands_of_digits_is_an_error_not_a_traceback() -> None:
    """A 5000-digit integer (probe D2) is a positioned error, not a ValueError."""
    assert problems(HEAD + "  - {id: s, kind: slot_mapping, tokens: [" + "9" * 5000 + "]}\n") == [
        "p.yaml:4:42: an integer of 5000 characters; plans hold integers of at most 64"
    ]


@pytest.mark.parametrize(
    ("value", "found"), [(".inf", "inf"), ("1.0e+999", "inf"), ("1000000", "1000000")]
)
def test_timeout_is_finite_and_at_most_a_day(value: str, found: str) -> None:
    """timeout_s: .inf (probe D6) and timeouts over a day fail validation."""
    text = HEAD + TUNE % '"{cache_root}/x.json"'
    text = text.replace("cache: {", "cache: {timeout_s: " + value + ", ")
    assert problems(text) == [
        f"p.yaml:4:98: steps[0].cache.timeout_s: expected a number <= 86400, found {found}"
    ]


def test_timeout_nan_is_refused() -> None:
    """timeout_s: .nan (probe D6), which every comparison lets through, is refused."""
    text = "version: 1\nname: t\ncompile_cache: {timeout_s: .nan}\nsteps:\n  - {id: s, kind: slot_mapping, tokens: [1]}\n"
    assert problems(text) == ["p.yaml:3:28: compile_cache.timeout_s: expected a number, found nan"]


def test_compile_cache_timeout_inf_is_refused() -> None:
    """compile_cache.timeout_s: .inf (probe D6) is refused too."""
    text = "version: 1\nname: t\ncompile_cache: {timeout_s: .inf}\nsteps:\n  - {id: s, kind: slot_mapping, tokens: [1]}\n"
    assert problems(text) == [
        "p.yaml:3:28: compile_cache.timeout_s: expected a number <= 86400, found inf"
    ]


@pytest.mark.parametrize(
    ("template", "message"),
    [
        (
            '"{cache_root}/../../../../etc/warmplan-escape.json"',
            "expected no '..' segments, found '{cache_root}/../../../../etc/warmplan-escape.json'; cache files stay inside the cache root",
        ),
        (
            '"{cache_root}/a/../b.json"',
            "expected no '..' segments, found '{cache_root}/a/../b.json'; cache files stay inside the cache root",
        ),
        (
            '"{cache_root}/a}.json"',
            "expected {placeholder} braces in pairs, found '{cache_root}/a}.json'; write a literal brace as {{ or }}",
        ),
        ('"{cache_root}/a\\0.json"', "expected printable characters, found '\\x00' at offset 14"),
        (
            '"{cache_root}/a\\nb\\e[31m.json"',
            "expected printable characters, found '\\n' at offset 14",
        ),
        (
            '"{cache_root}"',
            "expected a file under {cache_root}, found the root itself: '{cache_root}'",
        ),
    ],
)
def test_cache_templates_that_cannot_work_fail_validation(template: str, message: str) -> None:
    """Templates that escape or cannot render (probe M1, M8, issue 16) fail at validate."""
    assert problems(HEAD + TUNE % template) == [f"p.yaml:4:93: steps[0].cache.path: {message}"]


def test_capability_string_is_bounded() -> None:
    """A 5000-digit capability string is a pattern error, not an int() crash."""
    text = (
        HEAD
        + '  - {id: s, kind: slot_mapping, tokens: [1], when: {device_capability: "'
        + "9" * 5000
        + '.0"}}\n'
    )
    assert problems(text) == [
        "p.yaml:4:72: steps[0].when.device_capability: expected major.minor such as '9.0', "
        "found '999999999999999999999999999999999999999...99999999999999999.0' (5002 characters)"
    ]


def test_builtin_sizes_are_bounded() -> None:
    """vocab_size: 99999999999999 (probe D12) fails validation of the builtin block."""
    text = "version: 1\nname: t\nbuiltin: {vocab_size: 99999999999999}\nsteps:\n  - {id: s, kind: slot_mapping, tokens: [1]}\n"
    assert problems(text) == [
        "p.yaml:3:23: builtin.vocab_size: expected an integer <= 1048576, found 99999999999999"
    ]


def test_dev_zero_as_a_plan_is_refused_without_reading_it_all() -> None:
    """`validate /dev/zero` (probe M2) reads at most the limit and says so."""
    from warmplan.plan import load_plan

    with pytest.raises(PlanError) as info:
        load_plan(Path("/dev/zero"))
    assert info.value.problems == [
        "/dev/zero: more than 4194304 bytes; plans are limited to 4194304 bytes"
    ]


def test_large_plan_without_aliases_is_not_blamed_on_aliases(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Too many plain values (probe M5: 75k steps) are refused without mentioning
    aliases (the bound lowered to 1000 to keep the test fast)."""
    monkeypatch.setattr(yamlsrc, "MAX_NODES", 1000)
    text = HEAD + "  - {id: s, kind: slot_mapping, tokens: [" + "1," * 1001 + "1]}\n"
    assert problems(text) == [
        "p.yaml:4:2014: the document expands to more than 1000 values; plans must be small and explicit"
    ]


def test_alias_bomb_is_still_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """A billion-laughs file still fails fast, naming aliases."""
    monkeypatch.setattr(yamlsrc, "MAX_NODES", 1000)
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 5)]
    assert problems("\n".join(lines) + "\n")[0].endswith(
        ": the document expands to more than 1000 values (aliases referring to aliases?); "
        "plans must be small and explicit"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "\x1f",
            "p.yaml:1:1: invalid YAML: unacceptable character #x001f: control characters are not allowed",
        ),
        (
            "version: 1\nname: x\x07\n",
            "p.yaml:2:8: invalid YAML: unacceptable character #x0007: control characters are not allowed",
        ),
        ("a: \ud800", "p.yaml:1:4: invalid YAML: not Unicode text (surrogates not allowed)"),
    ],
)
def test_characters_yaml_refuses_are_positioned(text: str, message: str) -> None:
    """A control character or lone surrogate (found by fuzzing) is one positioned line."""
    assert problems(text) == [message]


def test_a_list_as_a_step_id_is_a_problem_not_a_type_error() -> None:
    """`id: []` (found by fuzzing) is a schema problem, not an unhashable-type crash."""
    assert problems(HEAD + "  - {id: [], kind: slot_mapping, tokens: [1]}\n") == [
        "p.yaml:4:10: steps[0].id: expected a string, found a list"
    ]
