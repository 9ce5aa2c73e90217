"""Loading plans: records, and whole error messages with file:line:column."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests._paths import PLANS, ROOT
from warmplan.errors import PlanError
from warmplan.plan import load_plan, parse_plan
from warmplan.steps.autotune import AutotuneStep
from warmplan.steps.compile_keys import CompileKeysStep
from warmplan.steps.dummy_run import DummyRunStep
from warmplan.steps.slot_mapping import PowersOfTwo, SlotMappingStep, TokenRange, expand_tokens

HEAD = "version: 1\nname: t\nsteps:\n"


def problems(text: str) -> list[str]:
    with pytest.raises(PlanError) as info:
        parse_plan(text, file="p.yaml")
    return info.value.problems


def test_dsv4_records() -> None:
    """plans/dsv4.yaml loads into typed, frozen records in vLLM's order."""
    plan = load_plan(PLANS / "dsv4.yaml")
    # vLLM's kernel_warmup() runs the sparse-MLA attention warmup before request prep.
    assert [s.id for s in plan.steps] == [
        "builtin-slot-keys",
        "builtin-chunk-keys",
        "builtin-forward-keys",
        "sparse-mla-decode-autotune",
        "sparse-mla-mixed",
        "sparse-mla-prefill",
        "sparse-mla-second-chunk",
        "slot-mapping",
        "flashinfer-autotune",
        "builtin-slot-mapping",
    ]
    # The built-in engine's steps are gated off every other worker.
    builtin = [s for s in plan.steps if s.id.startswith("builtin-")]
    assert all(s.when.attention_backend == ("BUILTIN_SPARSE_MLA",) for s in builtin)
    keys = plan.steps[0]
    assert isinstance(keys, CompileKeysStep) and keys.kernel == "slot_mapping"
    assert keys.replaces == "slot-mapping"  # the seed's fan, covered where the kernel is keyed
    slot = plan.steps[7]
    assert isinstance(slot, SlotMappingStep)
    assert expand_tokens(slot.tokens) == [*range(1, 17), 32, 64, 128, 256, 512]
    assert slot.clamp_to == "max_num_tokens"
    assert slot.when.platform == ("cuda",)
    assert (
        slot.when.env[0].name == "VLLM_ENABLE_DEEPSEEK_V4_SPARSE_MLA_WARMUP"
        and slot.when.env[0].unset
    )
    auto = plan.steps[3]
    assert isinstance(auto, AutotuneStep)
    assert auto.backend == "flashinfer_dsv4_decode"
    assert auto.replaces == "sparse-mla-mixed" and auto.when.device_capability_family == 120
    assert auto.when.flag == {"enable_flashinfer_autotune": (True,)}
    second = plan.steps[6]
    assert isinstance(second, DummyRunStep) and second.run.prior_context == "same"
    fi = plan.steps[8]
    assert isinstance(fi, AutotuneStep) and fi.when.device_capability == (9, 0)
    assert fi.when.flag == {"enable_flashinfer_autotune": (True, "unset")}
    assert fi.cache.policy == "leader" and fi.run.tokens == "max_num_batched_tokens"
    with pytest.raises(AttributeError):
        plan.name = "x"  # type: ignore[misc]


@pytest.mark.parametrize("path", sorted(PLANS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_plans_load(path: Path) -> None:
    """Every shipped plan loads and starts with the yaml-language-server line."""
    assert load_plan(path).steps
    assert path.read_text().startswith(
        "# yaml-language-server: $schema=../schemas/plan.schema.json\n"
    )


def test_load_plan_from_text() -> None:
    """load_plan accepts YAML text as well as a path."""
    plan = load_plan(HEAD + "  - {id: a, kind: slot_mapping, tokens: [1]}\n")
    assert plan.path is None and plan.steps[0].id == "a"


def test_expansions() -> None:
    """range and powers_of_two expand inclusively, in order."""
    assert TokenRange(3, 5).expand() == [3, 4, 5]
    assert PowersOfTwo(32, 512).expand() == [32, 64, 128, 256, 512]
    assert expand_tokens([1, TokenRange(2, 3), PowersOfTwo(4, 8)]) == [1, 2, 3, 4, 8]


def test_every_problem_of_a_file_at_once() -> None:
    """Schema and semantic problems of one file come back together, in line order."""
    text = HEAD + (
        "  - id: one\n"
        "    kind: slot_mapping\n"
        "    tokns: [1, 2]\n"
        "  - id: two\n"
        "    kind: dummy_rn\n"
        "  - id: three\n"
        "    kind: dummy_run\n"
        "    shape: mixd\n"
        "    tokens: -1\n"
        "  - id: one\n"
        "    kind: slot_mapping\n"
        "    tokens: [{range: [5, 2]}, 'x', {powers_of_two: [3, 8]}]\n"
    )
    assert problems(text) == [
        "p.yaml:4:5: steps[0]: missing required key 'tokens'",
        "p.yaml:6:5: steps[0].tokns: unknown key 'tokns' (did you mean 'tokens'?); expected one of id, description, enabled, when, kind, tokens, clamp_to",
        "p.yaml:8:11: steps[1].kind: unknown step kind 'dummy_rn'; expected one of autotune, compile_keys, dummy_run, engine_warmup, slot_mapping (did you mean 'dummy_run'?)",
        "p.yaml:11:12: steps[2].shape: expected one of mixed, single_prefill, uniform_decode, plain, found 'mixd' (did you mean 'mixed'?)",
        "p.yaml:12:13: steps[2].tokens: expected an integer >= 0, found -1",
        "p.yaml:13:9: steps[3].id: duplicate step id 'one' (first used by steps[0])",
        "p.yaml:15:22: steps[3].tokens[0].range: expected first <= last, found [5, 2]",
        "p.yaml:15:31: steps[3].tokens[1]: expected an integer from 0 to 16777216 or {range: [first, last]} or {powers_of_two: [first, last]}, found 'x'",
        "p.yaml:15:53: steps[3].tokens[2].powers_of_two[0]: expected a power of two, found 3",
    ]


def test_autotune_problems() -> None:
    """Cache templates, policies and replaces are checked with their positions."""
    text = HEAD + (
        "  - id: tune\n"
        "    kind: autotune\n"
        "    backend: flashinfer\n"
        "    run: {shape: plain, tokens: max_num_batched_tokns}\n"
        "    cache: {path: '{cache_root}/{nope}.json', policy: every_rank}\n"
        "    replaces: later\n"
        "  - id: loader\n"
        "    kind: autotune\n"
        "    backend: builtin\n"
        "    run: {shape: plain, tokens: 8}\n"
        "    cache: {path: '/etc/x.json', policy: load_only, on_missing: tune}\n"
        "    replaces: tune\n"
    )
    assert problems(text) == [
        "p.yaml:7:33: steps[0].run.tokens: expected an integer from 0 to 16777216 or one of max_num_tokens, max_num_batched_tokens, max_num_seqs, found 'max_num_batched_tokns'",
        "p.yaml:8:19: steps[0].cache.path: unknown placeholder {nope}; expected any of {cache_root}, {backend}, {backend_version}, {arch}, {config_hash}, {rank}",
        "p.yaml:8:19: steps[0].cache.path: policy every_rank keeps one file per rank: the path must contain {rank}",
        "p.yaml:9:15: steps[0].replaces: no step with id 'later' (did you mean 'loader'?)",
        "p.yaml:14:19: steps[1].cache.path: expected a path starting with {cache_root}, found '/etc/x.json'; cache files stay inside the cache root",
        "p.yaml:14:65: steps[1].cache.on_missing: policy load_only never tunes: expected skip or fail, found 'tune'",
        "p.yaml:15:15: steps[1].replaces: expected a later step, found 'tune' (steps[0]), which runs before this one",
    ]


def test_replaces_must_name_a_dummy_run() -> None:
    """replaces names a later dummy_run step, whose run the autotune step covers."""
    text = HEAD + (
        "  - {id: tune, kind: autotune, backend: builtin, run: {shape: plain, tokens: 8}, replaces: fan}\n"
        "  - {id: fan, kind: slot_mapping, tokens: [1]}\n"
    )
    assert problems(text) == [
        "p.yaml:4:92: steps[0].replaces: expected the id of a dummy_run step, found 'fan', a slot_mapping step"
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "p.yaml:1:1: the file is empty; expected a plan mapping"),
        ("# only a comment\n", "p.yaml:1:1: the file is empty; expected a plan mapping"),
        (
            "[1, 2]\n",
            "p.yaml:1:1: (top level): expected a mapping with version, name and steps, found a list",
        ),
        (
            "version: 1\nname: x\nsteps: [\n",
            # libyaml and PyYAML's pure-Python parser word this one differently.
            "p.yaml:4:1: invalid YAML: did not find expected node content"
            if yaml.__with_libyaml__
            else "p.yaml:4:1: invalid YAML: expected the node content, but found '<stream end>'",
        ),
        (
            "version: 1\nname: x\nname: y\nsteps: []\n",
            "p.yaml:3:1: duplicate key 'name' (first at line 2)",
        ),
        (
            HEAD + "  - !!python/object/apply:os.system ['echo hi']\n",
            "p.yaml:4:5: tag '!!python/object/apply:os.system' is not allowed: plans hold plain data only (strings, numbers, booleans, null, lists, mappings)",
        ),
        (
            HEAD + "  - !!binary aGk=\n",
            "p.yaml:4:5: tag '!!binary' is not allowed: plans hold plain data only (strings, numbers, booleans, null, lists, mappings)",
        ),
        (
            "version: 1\nname: x\nsteps: []\n",
            "p.yaml:3:8: steps: expected at least 1 item, found 0",
        ),
        (
            "version: 2\nname: x\nsteps: [{id: a, kind: slot_mapping, tokens: [1]}]\n",
            "p.yaml:1:10: version: expected 1, found 2",
        ),
        (
            "name: x\nsteps: [{id: a, kind: slot_mapping, tokens: [1]}]\n",
            "p.yaml:1:1: (top level): missing required key 'version'",
        ),
        (
            "version: 1\nname: Bad Name\nsteps: [{id: a, kind: slot_mapping, tokens: [1]}]\n",
            "p.yaml:2:7: name: expected an id of lower-case letters, digits, '-', '_' or '.', found 'Bad Name'",
        ),
        (
            HEAD + "  - {id: a, kind: slot_mapping, tokens: [{range: [1]}]}\n",
            "p.yaml:4:50: steps[0].tokens[0].range: expected exactly 2 items, found 1",
        ),
        (
            HEAD + "  - {id: a, kind: slot_mapping, tokens: [1], when: {platform: tpu}}\n",
            "p.yaml:4:63: steps[0].when.platform: expected one of cuda, cpu or a list, found 'tpu'",
        ),
        (
            HEAD + "  - {id: a, kind: slot_mapping, tokens: [1], when: {flag: {x: maybe}}}\n",
            "p.yaml:4:63: steps[0].when.flag.x: expected true or false or 'unset' or a list, found 'maybe'",
        ),
        (
            HEAD
            + "  - {id: a, kind: slot_mapping, tokens: [1], when: {device_capability: nine}}\n",
            "p.yaml:4:72: steps[0].when.device_capability: expected major.minor such as '9.0', found 'nine'",
        ),
        (
            HEAD + "  - {id: a, kind: dummy_run, shape: mixed, tokens: 1, prior_context: lots}\n",
            "p.yaml:4:70: steps[0].prior_context: expected an integer from 0 to 16777216 or 'same', found 'lots'",
        ),
        (HEAD + "  - 7\n", "p.yaml:4:5: steps[0]: expected a step mapping, found 7"),
        (
            HEAD + "  - {id: a, tokens: [1]}\n",
            "p.yaml:4:5: steps[0]: missing required key 'kind'; expected one of autotune, compile_keys, dummy_run, engine_warmup, slot_mapping",
        ),
    ],
)
def test_whole_messages(text: str, expected: str) -> None:
    """Each kind of bad plan ends in one pinned message with file:line:column."""
    assert problems(text) == [expected]


def test_misspelt_top_level_key() -> None:
    """A misspelt top-level key is named, with the nearest valid key."""
    assert problems("version: 1\nname: x\nstep: []\n") == [
        "p.yaml:1:1: (top level): missing required key 'steps'",
        "p.yaml:3:1: step: unknown key 'step' (did you mean 'steps'?); expected one of $schema, version, name, description, when, builtin, compile_cache, steps",
    ]


def test_billion_laughs_fails_fast() -> None:
    """Alias expansion is bounded: an alias bomb fails at once with a clear message."""
    rows = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=False):
        rows.append(f"{name}: &{name} [{','.join(['*' + prev] * 9)}]")
    got = problems("\n".join(rows) + "\n")
    assert len(got) == 1
    assert "expands to more than 200000 values" in got[0]


def test_recursive_alias_is_an_error() -> None:
    """A self-referencing anchor is reported, not followed forever."""
    got = problems("a: &a [*a]\n")
    assert len(got) == 1 and "nesting deeper than 64 levels" in got[0]


def test_file_errors(tmp_path: Path) -> None:
    """Missing files, directories and non-UTF-8 files are one-line errors."""
    for path, message in [
        (tmp_path / "nope.yaml", "no such file"),
        (tmp_path, "is a directory, expected a plan file (.yaml)"),
    ]:
        with pytest.raises(PlanError) as info:
            load_plan(path)
        assert info.value.problems == [f"{path}: {message}"]
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"version: 1\nname: caf\xe9\n")
    with pytest.raises(PlanError) as info:
        load_plan(bad)
    assert info.value.problems == [
        f"{bad}:2: not UTF-8 (byte 0xe9 at offset 20); plans are UTF-8 text"
    ]


@pytest.mark.compiles  # starts an interpreter
def test_validate_cli_reports_all_files(write_plan: Callable[..., Path]) -> None:
    """warmplan validate checks every file, prints every problem, exits 1 if any is bad."""
    good = PLANS / "builtin-smoke.yaml"
    bad = write_plan(HEAD + "  - {id: a, kind: nope}\n", "bad.yaml")
    empty = write_plan("", "empty.yaml")
    proc = subprocess.run(
        [sys.executable, "-m", "warmplan", "validate", str(good), str(bad), str(empty)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stdout == f"ok: {good} (builtin-smoke, 4 steps)\n"
    assert proc.stderr == (
        f"{bad}:4:19: steps[0].kind: unknown step kind 'nope'; expected one of autotune, compile_keys, dummy_run, engine_warmup, slot_mapping\n"
        f"{empty}:1:1: the file is empty; expected a plan mapping\n"
        "2 of 3 plan files invalid\n"
    )
    assert "Traceback" not in proc.stderr


@pytest.mark.compiles  # starts an interpreter
def test_validate_imports_no_torch() -> None:
    """python -X importtime -m warmplan validate imports no torch."""
    proc = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "warmplan",
            "validate",
            str(PLANS / "dsv4.yaml"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    imported = {
        line.split("|")[-1].strip().split(".")[0]
        for line in proc.stderr.splitlines()
        if "|" in line
    }
    assert "warmplan" in imported
    assert "torch" not in imported and "triton" not in imported


def test_a_key_that_is_not_a_name_is_quoted_in_the_path() -> None:
    """An unknown key of spaces (found by the fuzz suite) is shown quoted, so the
    message still reads file:line:col: path: message."""
    with pytest.raises(PlanError) as info:
        parse_plan("' ': 0\nversion: 1\nname: p\nsteps: []\n", file="p.yaml")
    assert info.value.problems[0] == (
        "p.yaml:1:1: ' ': unknown key ' '; expected one of $schema, version, name, "
        "description, when, builtin, compile_cache, steps"
    )
