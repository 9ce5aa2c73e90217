"""``warmplan verify``: replay a trace after the plan and report what compiled."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo
import yaml

from tests._compiling import CompilingWorker
from warmplan.cli import main
from warmplan.commands import verify as verify_cmd
from warmplan.errors import UserError
from warmplan.plan import Plan, parse_plan
from warmplan.testing import RecordingWorker
from warmplan.trace import load_trace_entries
from warmplan.workers.base import Batch, PrefillChunk, Shape


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class NoServingWorker:
    """A worker with every Worker method but no execute(batch)."""

    def __init__(self) -> None:
        self._inner = RecordingWorker()

    limits = property(lambda self: self._inner.limits)
    facts = property(lambda self: self._inner.facts)
    world = property(lambda self: self._inner.world)

    def describe(self) -> Any:
        return self._inner.describe()

    def config_fingerprint(self) -> Mapping[str, Any]:
        return self._inner.config_fingerprint()

    def slot_mapping(self, num_tokens: int) -> None:
        self._inner.slot_mapping(num_tokens)

    def dummy_run(
        self,
        shape: Shape,
        num_tokens: int,
        *,
        prior_context: int = 0,
        force_attention: bool = False,
    ) -> None:
        self._inner.dummy_run(
            shape, num_tokens, prior_context=prior_context, force_attention=force_attention
        )

    def preserve_state(self) -> Any:
        return self._inner.preserve_state()

    def synchronize(self) -> None:
        self._inner.synchronize()

    def autotune_backend(self, name: str) -> Any:
        return None


PLAN = """\
version: 1
name: fake-{name}
steps:
{steps}"""


def _plan(tmp_path: Path, *sizes: int) -> Path:
    steps = "".join(
        f"  - id: run-{n}\n    kind: dummy_run\n    shape: plain\n    tokens: {n}\n" for n in sizes
    )
    path = tmp_path / "plan.yaml"
    path.write_text(PLAN.format(name="-".join(map(str, sizes)), steps=steps), encoding="utf-8")
    return path


def _trace(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "trace.jsonl"
    path.write_text(text, encoding="utf-8")
    return path


TRACE = '{"decode": 1}\n# a comment\n{"decode": 3, "prefill": [{"tokens": 10}]}\n{"prefill": [{"tokens": 40, "context": 100}]}\n{"decode": 9}\n'


def _load(path: Path) -> Plan:
    return parse_plan(path.read_text(encoding="utf-8"), file=str(path), path=str(path))


def test_covering_plan_replays_with_no_compile(tmp_path: Path) -> None:
    """A plan that ran every padded size leaves nothing to compile during the replay."""
    worker = CompilingWorker()
    result = verify_cmd.verify(
        _load(_plan(tmp_path, 1, 16, 64)), worker, load_trace_entries(_trace(tmp_path, TRACE))
    )
    assert result.warmup_compiles == 3
    assert result.covered
    assert result.events == []
    assert [c.name for c in worker.calls_named("execute")] == ["execute"] * 4


def test_uncovered_sizes_are_reported_per_batch(tmp_path: Path) -> None:
    """Sizes the plan missed compile during the replay, each attributed to its batch."""
    trace = _trace(tmp_path, TRACE)
    result = verify_cmd.verify(
        _load(_plan(tmp_path, 1)), CompilingWorker(), load_trace_entries(trace), path=str(trace)
    )
    assert result.compiles == 2
    assert result.batches_hit == [1, 2]
    assert result.rows() == [
        {
            "batch": 1,
            "line": "3",
            "kind": "dynamo",
            "name": "forward",
            "key": "x=float32[16]",
            "cache": "compile",
            "time": result.rows()[0]["time"],
        },
        {
            "batch": 2,
            "line": "4",
            "kind": "dynamo",
            "name": "forward",
            "key": "x=float32[64]",
            "cache": "compile",
            "time": result.rows()[1]["time"],
        },
    ]
    assert (
        result.summary()
        == f"NOT covered: 2 compiles and 0 disk-cache loads in 2 of 4 batches from {trace}"
    )
    assert [s.id for s in result.suggestions] == [
        "suggested-slot-mapping",
        "suggested-mixed-16",
        "suggested-single-prefill-64-ctx-100",
    ]


def test_worker_without_execute_is_a_user_error(tmp_path: Path) -> None:
    """verify needs ServingWorker.execute; the message names the worker."""
    entries = load_trace_entries(_trace(tmp_path, TRACE))
    with pytest.raises(UserError, match="the 'recording' worker has no execute\\(batch\\)"):
        verify_cmd.verify(_load(_plan(tmp_path, 1)), NoServingWorker(), entries)


def test_batch_over_the_limits_is_rechunked(tmp_path: Path) -> None:
    """A batch over the worker's budget runs as consecutive batches within it."""
    trace = _trace(tmp_path, '{"decode": 1}\n{"decode": 3, "prefill": [{"tokens": 70}]}\n')
    worker = CompilingWorker()
    result = verify_cmd.verify(
        _load(_plan(tmp_path, 1, 16, 64)), worker, load_trace_entries(trace), path=str(trace)
    )
    assert [c.args["batch"] for c in worker.calls_named("execute")] == [
        Batch(decode=1),
        Batch(decode=3, prefill=(PrefillChunk(61),)),
        Batch(prefill=(PrefillChunk(9, 61),)),
    ]
    assert result.replay is not None
    assert result.replay.describe() == [
        "re-chunked 1 of 2 batches into 2 under max_num_batched_tokens 64, max_num_seqs 16:",
        "  line 2: 73 tokens (3 decodes + 1 chunk) -> 64 + 9 (over the budget)",
    ]
    assert [e.line for e in result.entries] == [1, 2, 2]


def test_chunk_past_max_model_len_fails_before_warmup(tmp_path: Path) -> None:
    """A chunk that reaches past the worker's max_model_len is a UserError at its line."""
    trace = _trace(tmp_path, '{"decode": 1}\n{"prefill": [{"tokens": 8, "context": 4090}]}\n')
    worker = CompilingWorker()
    worker.config = type("Config", (), {"max_model_len": 4096})()
    with pytest.raises(UserError) as caught:
        verify_cmd.verify(
            _load(_plan(tmp_path, 1)), worker, load_trace_entries(trace), path=str(trace)
        )
    assert str(caught.value) == (
        f"{trace}:2: field 'prefill[0]': a chunk of 8 tokens after 4090 cached reaches "
        "4098 tokens of context; the worker's max_model_len is 4096"
    )
    assert worker.calls == []


def test_monitor_is_uninstalled_after_verify(tmp_path: Path) -> None:
    """verify removes its hooks: compiles after it are not recorded anywhere."""
    from torch._dynamo.callback import callback_handler

    before = (list(callback_handler.start_callbacks), list(callback_handler.end_callbacks))
    verify_cmd.verify(
        _load(_plan(tmp_path, 1)), CompilingWorker(), load_trace_entries(_trace(tmp_path, TRACE))
    )
    assert (callback_handler.start_callbacks, callback_handler.end_callbacks) == before


# -- the command ------------------------------------------------------------------


@pytest.fixture
def fake_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    def make(args: argparse.Namespace, plan: Plan) -> CompilingWorker:
        return CompilingWorker()

    monkeypatch.setattr(verify_cmd, "make_worker", make)


@pytest.mark.usefixtures("fake_worker")
def test_cli_prints_each_compile_and_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The table names batch, line, kind, function and shape; exit 0 without --strict."""
    trace = _trace(tmp_path, TRACE)
    code = main(["verify", str(_plan(tmp_path, 1)), "--trace", str(trace)])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith(
        "plan fake-1: warmup 1 compiles, 0 disk-cache loads; replay of 4 batches took "
    )
    assert lines[1].split() == ["batch", "line", "kind", "name", "key", "cache", "time"]
    assert lines[3].split()[:6] == ["1", "3", "dynamo", "forward", "x=float32[16]", "compile"]
    assert lines[4].split()[:6] == ["2", "4", "dynamo", "forward", "x=float32[64]", "compile"]
    assert (
        lines[5] == f"NOT covered: 2 compiles and 0 disk-cache loads in 2 of 4 batches from {trace}"
    )
    assert "suggested-" not in out


@pytest.mark.usefixtures("fake_worker")
def test_cli_strict_exits_1_when_the_replay_compiled(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--strict: exit 1 on any replay compile, 0 when covered."""
    trace = str(_trace(tmp_path, TRACE))
    assert main(["verify", str(_plan(tmp_path, 1)), "--trace", trace, "--strict"]) == 1
    torch._dynamo.reset()
    assert main(["verify", str(_plan(tmp_path, 1, 16, 64)), "--trace", trace, "--strict"]) == 0
    assert (
        capsys.readouterr().out.splitlines()[-1]
        == f"covered: 4 batches from {trace} replayed with no compilation"
    )


@pytest.mark.usefixtures("fake_worker")
def test_cli_suggest_prints_pasteable_yaml(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--suggest prints steps that, added to the plan, make the replay covered."""
    plan = _plan(tmp_path, 1)
    trace = str(_trace(tmp_path, TRACE))
    main(["verify", str(plan), "--trace", trace, "--suggest"])
    out = capsys.readouterr().out
    suggested = out[out.index("# Steps that would have covered") :]
    steps = yaml.safe_load(suggested)
    assert [s["id"] for s in steps] == [
        "suggested-slot-mapping",
        "suggested-mixed-16",
        "suggested-single-prefill-64-ctx-100",
    ]
    pasted = plan.read_text(encoding="utf-8") + "".join(
        f"  {line}\n" for line in suggested.splitlines()
    )
    plan.write_text(pasted, encoding="utf-8")
    torch._dynamo.reset()
    assert main(["verify", str(plan), "--trace", trace, "--strict"]) == 0


@pytest.mark.usefixtures("fake_worker")
def test_cli_json_result(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--json prints one object: warmup and replay counts, events with batch and line."""
    trace = str(_trace(tmp_path, TRACE))
    assert main(["verify", str(_plan(tmp_path, 1)), "--trace", trace, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["plan"]["name"] == "fake-1"
    assert (data["batches"], data["covered"]) == (4, False)
    assert data["warmup"] == {"compiles": 1, "cache_loads": 0, "cold": 0}
    assert data["replay"]["compiles"] == 2
    assert data["replay"]["batches_hit"] == [1, 2]
    assert [(e["batch"], e["line"], e["kind"], e["key"]) for e in data["replay"]["events"]] == [
        (1, 3, "dynamo", "x=float32[16]"),
        (2, 4, "dynamo", "x=float32[64]"),
    ]
    assert data["suggestions"][0]["id"] == "suggested-slot-mapping"


def test_cli_bad_trace_exits_1_before_building_a_worker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bad trace line is one message naming file:line; no worker is built."""

    def no_worker(args: argparse.Namespace, plan: Plan) -> None:
        raise AssertionError("worker built for a bad trace")

    monkeypatch.setattr(verify_cmd, "make_worker", no_worker)
    trace = _trace(tmp_path, '{"decode": 1}\n{"decode": -2}\n')
    assert main(["verify", str(_plan(tmp_path, 1)), "--trace", str(trace)]) == 1
    assert (
        capsys.readouterr().err.strip()
        == f"warmplan: error: {trace}:2: field 'decode': expected a non-negative integer, found -2"
    )


# -- end to end on the built-in engine (CPU) ------------------------------------------

SMOKE_TRACE = """\
{"decode": 1}
{"decode": 3, "prefill": [{"tokens": 13}]}
{"decode": 5}
{"prefill": [{"tokens": 40, "context": 100}]}
"""


def test_builtin_engine_replay_suggest_and_cover(tmp_path: Path) -> None:
    """On the built-in engine: the smoke plan misses a batch; its suggestions cover it."""
    from warmplan.plan import load_plan
    from warmplan.suggest import render_yaml
    from warmplan.workers.builtin import build_worker

    root = Path(__file__).resolve().parent.parent
    plan_path = root / "plans" / "builtin-smoke.yaml"
    plan = load_plan(plan_path)
    entries = load_trace_entries(_trace(tmp_path, SMOKE_TRACE))
    # Roots of its own: artefacts an earlier test left under a shared root would
    # cover batches this plan does not warm.
    worker = build_worker(dict(plan.builtin), device="cpu", cache_root=str(tmp_path / "a"))
    result = verify_cmd.verify(plan, worker, entries)
    assert not result.covered
    # Only the chunk after prior context: 5 decodes (batch 2) run the dynamic graph
    # the plan compiled ahead of time, whose sizes are not duck-shaped
    # to one another (tokens == sequences is not a guard), so it serves them.
    assert result.batches_hit == [3]
    assert {e.kind for e in result.events} == {"dynamo"}
    suggested = render_yaml(result.suggestions)
    ids = [s["id"] for s in yaml.safe_load(suggested)]
    assert any(i.startswith("suggested-single-prefill-") and i.endswith("-ctx-100") for i in ids)

    pasted = tmp_path / "smoke-plus.yaml"
    pasted.write_text(
        plan_path.read_text(encoding="utf-8")
        + "".join(f"  {line}\n" for line in suggested.splitlines()),
        encoding="utf-8",
    )
    torch._dynamo.reset()
    plan_plus = load_plan(pasted)
    again = verify_cmd.verify(
        plan_plus,
        build_worker(dict(plan_plus.builtin), device="cpu", cache_root=str(tmp_path / "b")),
        entries,
    )
    assert again.events == [], again.rows()


@pytest.mark.usefixtures("fake_worker")
def test_cli_schedules_a_request_level_trace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Requests are scheduled under the worker's limits; the output says into what."""
    trace = _trace(
        tmp_path,
        '{"prompt_tokens": 100, "output_tokens": 3}\n'
        '{"arrival_step": 1, "prompt_tokens": 30, "cached_tokens": 16, "output_tokens": 2}\n',
    )
    code = main(["verify", str(_plan(tmp_path, 1, 16, 64)), "--trace", str(trace), "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["covered"]
    assert data["scheduling"]["schedule"] == {
        "requests": 2,
        "batches": 4,
        "idle_steps": 0,
        "preemptions": 0,
        "prefill_chunks": 3,
        "decode_tokens": 3,
    }
    assert main(["verify", str(_plan(tmp_path, 1, 16, 64)), "--trace", str(trace)]) == 0
    assert capsys.readouterr().out.splitlines()[1] == (
        "scheduled 2 requests into 4 batches under max_num_batched_tokens 64, max_num_seqs 16 "
        "(3 prefill chunks, 3 decodes, 0 preemptions, 0 idle steps skipped)"
    )


@pytest.mark.usefixtures("fake_worker")
def test_cli_replays_several_traces_after_one_warmup(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--trace twice: one warmup, one result per trace; --strict fails if any compiled."""
    first = _trace(tmp_path, '{"decode": 1}\n')
    second = tmp_path / "second.jsonl"
    second.write_text('{"decode": 9}\n{"decode": 1}\n', encoding="utf-8")
    args = ["verify", str(_plan(tmp_path, 1)), "--trace", str(first), "--trace", str(second)]
    assert main([*args, "--json", "--strict"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert [(t["trace"], t["batches"], t["replay"]["compiles"]) for t in data["traces"]] == [
        (str(first), 1, 0),
        (str(second), 2, 1),
    ]
    torch._dynamo.reset()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("plan fake-1: warmup 1 compiles") == 2


def test_cli_request_past_max_model_len_exits_1_before_warmup(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request the worker can never serve: one line naming file:line, exit 1, no run."""
    worker = CompilingWorker()
    worker.config = type("Config", (), {"max_model_len": 4096})()  # type: ignore[attr-defined]
    monkeypatch.setattr(verify_cmd, "make_worker", lambda args, plan: worker)
    trace = _trace(
        tmp_path,
        '{"prompt_tokens": 10, "output_tokens": 2}\n'
        '{"id": "big", "prompt_tokens": 4000, "output_tokens": 200}\n',
    )
    assert main(["verify", str(_plan(tmp_path, 1)), "--trace", str(trace)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"warmplan: error: {trace}:2: request 'big' needs 4200 tokens of context "
        "(4000 prompt + 200 output); the worker's max_model_len is 4096"
    )
    assert worker.calls == []
    assert main(["verify", str(_plan(tmp_path, 1)), "--trace", str(trace), "--step-ms", "0"]) == 1
    assert capsys.readouterr().err.strip() == "warmplan: error: --step-ms must be > 0: 0.0"
