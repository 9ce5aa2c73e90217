"""``warmplan minimize``: needed keys of traces, the set cover, narrowing, reasons,
the missing-key message, schema-valid output, determinism (all model-based: nothing
compiles), and one ``--confirm`` run on a tiny engine (``compiles``)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests._paths import PLANS, ROOT, TRACES
from warmplan.cli import main
from warmplan.minimize import MissingKeys, minimize, set_cover
from warmplan.plan import parse_plan
from warmplan.trace import read_trace

SCHEMA = json.loads((ROOT / "schemas" / "plan.schema.json").read_text())

TINY = """\
version: 1
name: tiny
builtin:
  preset: dense
  num_layers: 1
  max_num_tokens: 64
  max_num_batched_tokens: 64
  max_num_seqs: 16
  max_model_len: 512
  compile_sizes: [1, 16, 64]
steps:
"""

KEYS = """\
  # the forward graphs
  - id: forward-keys
    kind: compile_keys
    kernel: forward
  - id: slot-keys
    kind: compile_keys
    kernel: slot_mapping
    domain:
      num_tokens: [{range: [1, 64]}]
  - {id: chunk-keys, kind: compile_keys, kernel: chunk_metadata}
"""

RUNS = """\
  - id: slots
    kind: slot_mapping
    tokens: [1, 2, 3, 16, 32]
  - id: decode
    kind: dummy_run
    shape: uniform_decode
    tokens: 1
  - id: prefill
    kind: dummy_run
    shape: single_prefill
    tokens: 64
"""


def _plan(steps: str, name: str = "tiny.yaml"):  # type: ignore[no-untyped-def]
    return parse_plan(TINY + steps, file=name, path=name)


def _trace(tmp_path: Path, lines: list[str], name: str = "t.jsonl"):  # type: ignore[no-untyped-def]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return read_trace(path)


def _by_id(result):  # type: ignore[no-untyped-def]
    return {s.id: s for s in result.steps}


def test_needed_keys_of_a_small_batch_trace(tmp_path: Path) -> None:
    """Each batch needs its slot class (raw count), its padded forward, and the chunk
    metadata variant of its prefill chunks (decodes only: none)."""
    trace = _trace(
        tmp_path, ['{"decode": 1}', '{"decode": 3}', '{"prefill": [{"tokens": 20, "context": 16}]}']
    )
    result = minimize(_plan(KEYS), [trace])
    assert sorted(result.needed) == [
        "chunk_metadata-prior1",
        "forward-n1-sdpa",
        "forward-n16-sdpa",
        "forward-n64-sdpa",
        "slot_mapping-one",
        "slot_mapping-other",
    ]
    first = result.needed["forward-n64-sdpa"]
    assert (first.trace, first.line, first.index) == (str(tmp_path / "t.jsonl"), "3", 2)
    assert result.batches == 3


def test_request_level_traces_are_scheduled_under_the_plan_limits() -> None:
    """A request-level trace is scheduled at the builtin block's budget (64 tokens):
    no forward beyond the largest compile size is ever needed."""
    trace = read_trace(TRACES / "requests-chat.jsonl")
    result = minimize(_plan(KEYS), [trace], overrides={"max_model_len": 4096})
    assert result.batches > 80
    assert not any("dynamic" in k for k in result.needed)
    assert {"forward-n64-sdpa", "chunk_metadata-prior1"} <= set(result.needed)


def test_set_cover_prefers_compile_keys_and_is_exact() -> None:
    cands = [
        ("run-a", frozenset({"a", "b", "c"}), 100),
        ("keys-a", frozenset({"a", "b"}), 1),
        ("keys-c", frozenset({"c", "d"}), 1),
        ("run-d", frozenset({"d"}), 100),
    ]
    chosen, exact = set_cover(["a", "b", "c", "d"], cands)
    assert chosen == ["keys-a", "keys-c"] and exact
    # Only a launch covers "e": it is kept, and what it covers is not paid twice.
    cands.append(("run-e", frozenset({"a", "e"}), 100))
    chosen, _ = set_cover(["a", "b", "c", "d", "e"], cands)
    assert chosen == ["keys-a", "keys-c", "run-e"]


def test_set_cover_greedy_past_its_budget_still_covers() -> None:
    keys = [f"k{i}" for i in range(30)]
    cands = [(f"s{i}", frozenset(keys[i : i + 3]), 1 + i % 3) for i in range(30)]
    chosen, exact = set_cover(keys, cands, node_budget=5)
    assert not exact
    covered = set().union(*(c[1] for c in cands if c[0] in chosen))
    assert covered >= set(keys)


def test_dummy_runs_and_slot_fans_removed_when_keys_cover_them(tmp_path: Path) -> None:
    trace = _trace(tmp_path, ['{"decode": 1}', '{"decode": 3}'])
    result = minimize(_plan(KEYS + RUNS), [trace])
    steps = _by_id(result)
    assert steps["decode"].action == "removed"
    assert "compiled by" in steps["decode"].why and "cheaper" in steps["decode"].why
    assert steps["slots"].action == "removed"
    assert steps["prefill"].action == "removed"
    assert steps["chunk-keys"].action == "removed"
    assert steps["chunk-keys"].why == "covers no key the traces need"
    assert steps["forward-keys"].action == "narrowed"
    assert (len(steps["forward-keys"].covers), steps["forward-keys"].after) == (3, 2)
    assert result.launches(after=False) == 7 and result.launches(after=True) == 0


def test_domains_narrowed_to_explicit_values(tmp_path: Path) -> None:
    trace = _trace(tmp_path, ['{"decode": 1}', '{"decode": 3}'])
    result = minimize(_plan(KEYS), [trace])
    data = yaml.safe_load(result.text)
    steps = {s["id"]: s for s in data["steps"]}
    assert steps["forward-keys"]["domain"] == {"num_tokens": [1, 16]}
    # The range collapsed to its classes (1, 2, 16); the needed ones written as values.
    assert steps["slot-keys"]["domain"] == {"num_tokens": [1, 2]}
    assert "chunk-keys" not in steps
    # The comment above the first kept step and the builtin block stay as written.
    assert "  # the forward graphs\n" in result.text
    assert result.text.startswith(TINY)


def test_slot_mapping_lists_narrowed_to_one_count_per_class(tmp_path: Path) -> None:
    """Dummy runs compile their whole batch; the slot fan keeps one count of the one
    class no cheaper step covers (the first of that class in its list)."""
    trace = _trace(
        tmp_path,
        ['{"decode": 1}', '{"prefill": [{"tokens": 20}]}', '{"prefill": [{"tokens": 64}]}'],
    )
    result = minimize(_plan(RUNS), [trace])
    steps = _by_id(result)
    assert [steps[i].action for i in ("slots", "decode", "prefill")] == [
        "narrowed",
        "kept",
        "kept",
    ]
    assert steps["slots"].assigned == ["slot_mapping-other"]
    data = {s["id"]: s for s in yaml.safe_load(result.text)["steps"]}
    assert data["slots"]["tokens"] == [2]
    assert result.launches(after=False) == 7 and result.launches(after=True) == 3


def test_missing_key_is_exit_1_naming_the_batch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = tmp_path / "tiny.yaml"
    plan.write_text(TINY + RUNS, encoding="utf-8")
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"decode": 1}\n{"decode": 3}\n', encoding="utf-8")
    with pytest.raises(MissingKeys) as info:
        minimize(_plan(RUNS), [read_trace(trace)])
    assert [n.key for n in info.value.missing] == ["forward-n16-sdpa"]
    suggested = yaml.safe_load(info.value.suggestion)
    assert suggested == [
        {
            "id": "keys-forward",
            "kind": "compile_keys",
            "kernel": "forward",
            "domain": {"num_tokens": [16]},
            "description": "Suggested by warmplan minimize: keys no step of the plan covers.",
        }
    ]
    parse_plan(TINY + yaml.safe_dump(suggested), file="s.yaml")
    code = main(["minimize", str(plan), "--trace", str(trace)])
    err = capsys.readouterr().err
    assert code == 1
    assert f"{trace}:2 (batch 1): forward padded=16, impl=sdpa" in err
    assert "kind: compile_keys" in err and "Traceback" not in err


def test_output_validates_against_the_schema_file(tmp_path: Path) -> None:
    traces = [read_trace(TRACES / n) for n in ("chat.jsonl", "decode.jsonl", "long-prompt.jsonl")]
    result = minimize(parse_plan((PLANS / "dsv4.yaml").read_text(), file="dsv4.yaml"), traces)
    jsonschema.Draft202012Validator(SCHEMA).validate(yaml.safe_load(result.text))
    parse_plan(result.text, file="min.yaml")
    steps = _by_id(result)
    # Gated steps stay; a gated step's replaces of a removed step is dropped.
    assert steps["slot-mapping"].action == "kept" and "skipped" in steps["slot-mapping"].why
    assert "replaces sparse-mla-mixed dropped" in steps["sparse-mla-decode-autotune"].why
    assert steps["flashinfer-autotune"].action == "kept"
    for gone in ("sparse-mla-mixed", "sparse-mla-prefill", "sparse-mla-second-chunk"):
        assert steps[gone].action == "removed"
    assert "builtin:\n  preset: sparse-mla\n" in result.text


def test_kernel_star_is_split_per_kernel(tmp_path: Path) -> None:
    trace = _trace(tmp_path, ['{"decode": 1}'])
    result = minimize(_plan('  - {id: all, kind: compile_keys, kernel: "*"}\n'), [trace])
    data = yaml.safe_load(result.text)
    jsonschema.Draft202012Validator(SCHEMA).validate(data)
    assert [(s["id"], s["kernel"], s["domain"]) for s in data["steps"]] == [
        ("all-slot-mapping", "slot_mapping", {"num_tokens": [1]}),
        ("all-forward", "forward", {"num_tokens": [1]}),
    ]


def test_cli_is_deterministic(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["minimize", str(PLANS / "dsv4.yaml"), "--trace", str(TRACES / "chat.jsonl"), "--json"]
    outs = []
    for _ in range(2):
        assert main(args) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1]
    data = json.loads(outs[0])
    assert data["keys"]["after"] < data["keys"]["before"]
    out = tmp_path / "min.yaml"
    assert main([*args[:-1], "--out", str(out)]) == 0
    assert out.read_text() == data["plan_yaml"]


@pytest.mark.compiles
def test_confirm_replays_the_minimised_plan_without_compiles(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = tmp_path / "tiny.yaml"
    plan.write_text(TINY + KEYS + RUNS, encoding="utf-8")
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"decode": 1}\n{"decode": 3}\n', encoding="utf-8")
    out = tmp_path / "min.yaml"
    monkeypatch.setenv("WARMPLAN_CACHE_ROOT", str(tmp_path / "cache"))
    argv = ["minimize", str(plan), "--trace", str(trace), "--out", str(out), "--confirm"]
    code = main([*argv, "--device", "cpu"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "confirm: covered" in text
