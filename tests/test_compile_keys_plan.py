"""``compile_keys`` steps as plan data: the schema, the checks that place each problem
at its file, line and field, resolution, and ``warmplan plan``'s key counts (CPU
variants; Triton's count needs Triton and is in tests/test_compile_keys.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from warmplan.errors import PlanError
from warmplan.plan import parse_plan
from warmplan.resolve import CacheContext, resolve
from warmplan.workers.base import Facts, Limits

HEAD = "version: 1\nname: keys\nsteps:\n"


def _errors(text: str) -> str:
    with pytest.raises(PlanError) as info:
        parse_plan(HEAD + text, file="keys.yaml")
    return str(info.value)


def test_a_keys_step_loads_and_resolves_without_a_worker() -> None:
    plan = parse_plan(
        HEAD
        + """\
  - id: slot
    kind: compile_keys
    kernel: slot_mapping
    domain:
      num_tokens: [{range: [1, 16]}, 32, 64, 128, 256, 512]
    where: ["num_tokens <= max_num_tokens"]
    threads: 4
  - id: everything
    kind: compile_keys
    kernel: "*"
""",
        file="keys.yaml",
    )
    limits = Limits(max_num_tokens=512, max_num_batched_tokens=512, max_num_seqs=8)
    resolved = resolve(plan, limits, Facts(platform="cpu"), CacheContext(cache_root="/tmp/x"))
    slot, every = resolved.steps
    assert slot.skipped is None and every.skipped is None
    d = slot.as_dict()
    assert d["kernel"] == "slot_mapping" and d["declared_cases"] == 21 and d["threads"] == 4
    assert d["domain"]["num_tokens"][0] == {"range": [1, 16]}
    assert "21 cases declared" in slot.detail()
    assert "every registered kernel" in every.detail()


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (
            "    where: ['num_tokens <=']\n",
            "keys.yaml:7:13: steps[0].where[0]: expected a filter expression",
        ),
        (
            "    where: ['__import__(\"os\")']\n",
            "steps[0].where[0]: expected a filter expression: Call is not allowed",
        ),
        (
            "    domain: {num_tokens: [{range: [16, 1]}]}\n",
            "steps[0].domain.num_tokens[0].range: expected first <= last, found [16, 1]",
        ),
        (
            "    rows: [{a: 1, b: 2}, {a: 3}]\n",
            "steps[0].rows[1]: expected the names of rows[0] (a, b), found a",
        ),
        (
            "    domain: {a: [{range: [1, 5000]}], b: [{range: [1, 5000]}]}\n",
            "steps[0].domain: expected at most 1000000 cases, the domain declares 25000000",
        ),
        ("    threads: 0\n", "steps[0].threads"),
        ("    mode: merge\n", "steps[0].mode"),
        ("    domain: {num_tokens: [[1]]}\n", "steps[0].domain.num_tokens"),
    ],
)
def test_each_problem_names_its_file_line_and_field(step: str, expected: str) -> None:
    text = "  - id: slot\n    kind: compile_keys\n    kernel: slot_mapping\n" + step
    assert expected in _errors(text)


def test_a_kernel_name_is_a_name() -> None:
    assert "steps[0].kernel" in _errors("  - id: k\n    kind: compile_keys\n    kernel: 'a b'\n")


@pytest.mark.compiles
def test_warmplan_plan_counts_cpu_keys_before_anything_runs(
    write_plan: Callable[[str, str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from warmplan.cli import main

    path = write_plan(
        """\
version: 1
name: keys
builtin: {preset: dense, compile_sizes: [1, 8, 64, 512]}
steps:
  - id: slot
    kind: compile_keys
    kernel: slot_mapping
    domain:
      num_tokens: [{range: [1, 16]}, 32, 64, 128, 256, 512]
  - id: forward
    kind: compile_keys
    kernel: forward
    domain: {num_tokens: [1, 2, 3, 8, 9, 100]}
  - id: bad
    kind: compile_keys
    kernel: chunk_metadata
    enabled: false
""",
        "keys.yaml",
    )
    args = ["plan", str(path), "--max-num-tokens", "512", "--max-num-batched-tokens", "512"]
    assert main([*args, "--platform", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    by_id = {s["id"]: s for s in out["steps"]}
    (slot,) = by_id["slot"]["compile_keys"]
    assert (slot["declared_cases"], slot["cases"], slot["keys"]) == (21, 8, 3)
    (fwd,) = by_id["forward"]["compile_keys"]
    # 1 -> 1, 2 3 8 -> 8, 9 -> 64, 100 -> 512: four graphs
    assert (fwd["cases"], fwd["keys"]) == (6, 4)
    assert "compile_keys" not in by_id["bad"]
    assert main([*args, "--platform", "cpu"]) == 0
    table = capsys.readouterr().out
    assert "slot_mapping: 21 cases -> 3 keys" in table


@pytest.mark.compiles
def test_a_domain_problem_found_when_keying_names_the_step_and_exits_1(
    write_plan: Callable[[str, str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from warmplan.cli import main

    path = write_plan(
        "version: 1\nname: k\nsteps:\n  - id: s\n    kind: compile_keys\n"
        "    kernel: slot_mapping\n    domain: {num_tokens: [1], block: [4]}\n",
        "k.yaml",
    )
    code = main(
        [
            "plan",
            str(path),
            "--max-num-tokens",
            "64",
            "--max-num-batched-tokens",
            "64",
            "--platform",
            "cpu",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "k.yaml:4: steps[0].domain.block: kernel slot_mapping has no parameter 'block'" in err
    assert "Traceback" not in err
