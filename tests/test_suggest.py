"""Suggested plan steps for the compilations of a replay."""

from __future__ import annotations

import pytest
import yaml

from tests._paths import PLANS
from warmplan.errors import UserError
from warmplan.monitor import CompileEvent
from warmplan.plan import parse_plan
from warmplan.suggest import (
    Suggestion,
    batch_key_cases,
    compile_size_padding,
    insert_steps,
    padding_of,
    recorded_events,
    render_patch,
    render_yaml,
    shape_of,
    suggest,
    suggest_keys,
)
from warmplan.trace import RecordedCompile, TraceEntry
from warmplan.workers.base import Batch, PrefillChunk


def _event(index: int | None, *, cache_hit: bool = False, kind: str = "dynamo") -> CompileEvent:
    return CompileEvent(
        kind=kind,  # type: ignore[arg-type]
        name="forward",
        key="x=float32[8]",
        label=None if index is None else f"batch[{index}]",
        cache_hit=cache_hit,
        duration_s=0.5,
    )


def _pad(n: int) -> int:
    for size in (1, 16, 64):
        if n <= size:
            return size
    return n


BATCHES = [
    Batch(decode=7),
    Batch(decode=3, prefill=(PrefillChunk(45),)),
    Batch(prefill=(PrefillChunk(128, 1024),)),
    Batch(decode=2, prefill=(PrefillChunk(10), PrefillChunk(20))),
    Batch(prefill=(PrefillChunk(300),)),
]


def test_shape_of_each_batch_kind() -> None:
    """decodes only, one chunk, decodes + a chunk, anything else."""
    assert [shape_of(b) for b in BATCHES] == [
        ("uniform_decode", 0),
        ("mixed", 0),
        ("single_prefill", 1024),
        ("plain", 0),
        ("single_prefill", 0),
    ]
    assert shape_of(Batch(decode=8, prefill=(PrefillChunk(504, 1008),))) == ("mixed", 1008)


def test_mixed_batch_after_context_keeps_its_prior_context() -> None:
    """Decodes riding along a later chunk of a long prompt: mixed with prior_context."""
    batches = [Batch(decode=8, prefill=(PrefillChunk(504, 1008),))]
    (_, run) = suggest([_event(0)], batches)
    assert run.to_step() | {"description": ""} == {
        "id": "suggested-mixed-512-ctx-1008",
        "kind": "dummy_run",
        "shape": "mixed",
        "tokens": 512,
        "prior_context": 1008,
        "force_attention": True,
        "description": "",
    }


def test_one_slot_mapping_step_and_one_dummy_run_per_shape() -> None:
    """Each hit batch adds its token count to the slot mapping and a dummy_run of its shape."""
    steps = [s.to_step() for s in suggest([_event(i) for i in range(5)], BATCHES)]
    assert steps[0] == {
        "id": "suggested-slot-mapping",
        "kind": "slot_mapping",
        "tokens": [7, 32, 48, 128, 300],
        "description": "Suggested by warmplan verify: covers trace batches 0, 1, 2, 3, 4.",
    }
    assert [(s["id"], s["shape"], s["tokens"], s.get("prior_context")) for s in steps[1:]] == [
        ("suggested-mixed-48", "mixed", 48, None),
        ("suggested-single-prefill-128-ctx-1024", "single_prefill", 128, 1024),
        ("suggested-single-prefill-300", "single_prefill", 300, None),
        ("suggested-uniform-decode-7", "uniform_decode", 7, None),
        ("suggested-plain-32", "plain", 32, None),
    ]
    assert all(s["force_attention"] is True for s in steps[1:])


def test_duplicates_merge_and_list_every_batch() -> None:
    """Two batches of one shape and size give one step naming both."""
    batches = [Batch(decode=5), Batch(decode=9), Batch(decode=5)]
    out = suggest([_event(0), _event(0), _event(2), _event(1)], batches)
    assert [(s.id, s.batches) for s in out] == [
        ("suggested-slot-mapping", (0, 1, 2)),
        ("suggested-uniform-decode-5", (0, 2)),
        ("suggested-uniform-decode-9", (1,)),
    ]


def test_padding_applies_to_dummy_runs_not_slot_mapping() -> None:
    """The forward runs at the padded size; the Triton slot mapping at the real count."""
    out = suggest([_event(0), _event(1)], BATCHES, padded_num_tokens=_pad)
    assert out[0].tokens == (7, 48)
    assert [(s.id, s.tokens) for s in out[1:]] == [
        ("suggested-mixed-64", 64),
        ("suggested-uniform-decode-16", 16),
    ]


def test_padding_of_reads_the_worker_method() -> None:
    """padding_of finds padded_num_tokens on a worker, None when it has none."""

    class Padded:
        def padded_num_tokens(self, n: int) -> int:
            return _pad(n)

    pad = padding_of(Padded())
    assert pad is not None
    assert pad(17) == 64
    assert padding_of(object()) is None


def test_cache_loads_and_foreign_labels() -> None:
    """Disk loads count unless excluded; labels that are not batch[N] are ignored."""
    events = [_event(0, cache_hit=True), _event(None), _event(99)]
    assert [s.id for s in suggest(events, BATCHES)] == [
        "suggested-slot-mapping",
        "suggested-uniform-decode-7",
    ]
    assert suggest(events, BATCHES, include_cache_loads=False) == []
    assert render_yaml([]) == ""


def test_rendered_yaml_is_a_valid_plan_step_list() -> None:
    """The YAML pastes under steps: of a plan that the plan loader accepts."""
    text = render_yaml(suggest([_event(i) for i in range(5)], BATCHES, padded_num_tokens=_pad))
    assert text.startswith("# Steps that would have covered")
    assert "  tokens: [7, 32, 48, 128, 300]\n" in text
    plan_text = "version: 1\nname: pasted\nsteps:\n" + "".join(
        f"  {line}\n" if line else "\n" for line in text.splitlines()
    )
    plan = parse_plan(plan_text, file="pasted.yaml")
    assert [s.id for s in plan.steps] == [s["id"] for s in yaml.safe_load(text)]


# -- patches ------------------------------------------------------------------------

BLOCK_PLAN = """\
version: 1
name: p
steps:
  - id: suggested-slot-mapping
    kind: slot_mapping
    tokens: [1]
  - {id: one, kind: dummy_run, shape: plain, tokens: 1}
# a trailing comment
"""


def _suggestions() -> list[Suggestion]:
    return suggest([_event(0), _event(1)], BATCHES, padded_num_tokens=_pad)


def test_insert_steps_appends_after_the_last_step_with_its_indentation() -> None:
    """The steps go after the last item, indented like it; taken ids get a suffix."""
    patched = insert_steps(BLOCK_PLAN, _suggestions(), file="p.yaml", note="from t.jsonl")
    head = BLOCK_PLAN.split("# a trailing comment")[0]
    assert patched.startswith(head + "  # from t.jsonl\n  - id: suggested-slot-mapping-2\n")
    assert patched.endswith("# a trailing comment\n")
    plan = parse_plan(patched)
    assert [s.id for s in plan.steps] == [
        "suggested-slot-mapping",
        "one",
        "suggested-slot-mapping-2",
        "suggested-mixed-64",
        "suggested-uniform-decode-16",
    ]


def test_render_patch_is_a_unified_diff_of_the_plan() -> None:
    """The patch only adds lines, under a/ and b/ names."""
    patch = render_patch("plans/p.yaml", BLOCK_PLAN, _suggestions())
    assert patch.startswith("--- a/plans/p.yaml\n+++ b/plans/p.yaml\n@@ ")
    changed = [
        line for line in patch.splitlines()[2:] if line[:1] in "+-" and not line.startswith("@@")
    ]
    assert changed and all(line.startswith("+") for line in changed)
    assert render_patch("plans/p.yaml", BLOCK_PLAN, []) == ""


def test_insert_steps_refuses_a_flow_list_of_steps() -> None:
    """steps: [...] cannot be appended to line-wise; the message says where and what to do."""
    text = "version: 1\nname: p\nsteps: [{id: a, kind: slot_mapping, tokens: [1]}]\n"
    with pytest.raises(UserError) as caught:
        insert_steps(text, _suggestions(), file="p.yaml")
    assert str(caught.value) == (
        "p.yaml:3: 'steps' is a flow list ([...]); paste the steps by hand (--yaml prints them)"
    )


def test_shipped_plans_take_a_patch() -> None:
    """Every shipped plan (block and flow-mapping items) loads with suggestions appended."""
    for path in sorted(PLANS.glob("*.yaml")):
        text = path.read_text(encoding="utf-8")
        patched = insert_steps(text, _suggestions(), file=str(path))
        assert len(parse_plan(patched).steps) == len(parse_plan(text).steps) + 3


def test_recorded_events_label_each_compile_with_its_batch() -> None:
    """A recorded trace's compiles become monitor events labelled batch[N]."""
    entries = [
        TraceEntry(line=1, batch=Batch(decode=1)),
        TraceEntry(
            line=2,
            batch=Batch(decode=9),
            compiles=(RecordedCompile("dynamo", "forward", "x=float32[16]", True, 0.1),),
        ),
    ]
    assert recorded_events(entries) == [
        CompileEvent(
            kind="dynamo",
            name="forward",
            key="x=float32[16]",
            label="batch[1]",
            cache_hit=True,
            duration_s=0.1,
        )
    ]
    pad = compile_size_padding([64, 1, 16])
    assert [pad(n) for n in (1, 2, 16, 17, 65)] == [1, 16, 16, 64, 65]


def test_key_suggestions_merge_cases_per_kernel() -> None:
    """One compile_keys step per kernel: forward at the padded counts, slot mapping at
    the raw ones, chunk metadata where a batch has prefill chunks; values sorted and
    deduplicated; only compiling batches count."""
    keys = suggest_keys(
        [_event(0), _event(1), _event(2), _event(4), _event(2)], BATCHES, padded_num_tokens=_pad
    )
    assert [k.to_step() | {"description": ""} for k in keys] == [
        {
            "id": "keys-slot-mapping",
            "kind": "compile_keys",
            "kernel": "slot_mapping",
            "domain": {"num_tokens": [7, 48, 128, 300]},
            "description": "",
        },
        {
            "id": "keys-chunk-metadata",
            "kind": "compile_keys",
            "kernel": "chunk_metadata",
            "domain": {"has_prior_context": [False, True]},
            "description": "",
        },
        {
            "id": "keys-forward",
            "kind": "compile_keys",
            "kernel": "forward",
            "domain": {"num_tokens": [16, 64, 128, 300]},
            "description": "",
        },
    ]
    assert keys[1].batches == (1, 2, 4)
    assert suggest_keys([_event(None)], BATCHES) == []


def test_key_suggestions_render_as_schema_valid_steps() -> None:
    import json

    import jsonschema

    from tests._paths import ROOT

    keys = suggest_keys([_event(i) for i in range(len(BATCHES))], BATCHES, padded_num_tokens=_pad)
    text = render_yaml([*suggest([_event(0)], BATCHES), *keys])
    assert "domain:\n    num_tokens: [" in text
    plan = {"version": 1, "name": "s", "steps": yaml.safe_load(text)}
    schema = json.loads((ROOT / "schemas" / "plan.schema.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(plan)
    body = "".join(f"  {line}\n" for line in text.splitlines())
    loaded = parse_plan(f"version: 1\nname: s\nsteps:\n{body}", file="s.yaml")
    assert [s.kind for s in loaded.steps][-3:] == ["compile_keys"] * 3


def test_batch_key_cases_follow_the_engine_step() -> None:
    assert batch_key_cases(Batch(decode=3)) == [
        ("slot_mapping", {"num_tokens": 3}),
        ("forward", {"num_tokens": 3}),
    ]
    assert batch_key_cases(Batch(decode=2, prefill=(PrefillChunk(30, 16),)), _pad) == [
        ("chunk_metadata", {"has_prior_context": True}),
        ("slot_mapping", {"num_tokens": 32}),
        ("forward", {"num_tokens": 64}),
    ]
