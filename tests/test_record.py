"""``warmplan record``: the recorder's file format and bounds, and record -> verify -> suggest."""

from __future__ import annotations

import argparse
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch._dynamo

from tests._compiling import CompilingWorker
from warmplan.cli import main
from warmplan.commands import record as record_cmd
from warmplan.commands import suggest as suggest_cmd
from warmplan.commands import verify as verify_cmd
from warmplan.monitor import CompileEvent
from warmplan.monitor.cold import report_autotune_miss
from warmplan.plan import Plan, parse_plan
from warmplan.record import TraceRecorder, batch_of, format_line, record
from warmplan.trace import RecordedCompile, TraceRequest, read_trace
from warmplan.verify import verify
from warmplan.workers.base import Batch, PrefillChunk


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


EVENT = CompileEvent(
    kind="dynamo",
    name="forward",
    key="x=float32[16]",
    label="batch[1]",
    cache_hit=False,
    duration_s=0.25,
)
MIXED = Batch(decode=3, prefill=(PrefillChunk(500, 1024), PrefillChunk(9)))


def test_recorded_lines_read_back_with_step_compiles_and_header(tmp_path: Path) -> None:
    """What the recorder writes is a batch-level trace: batches, steps, compiles, header."""
    path = tmp_path / "rec.jsonl"
    with TraceRecorder(path, header={"engine": "vllm"}) as recorder:
        assert recorder.record_batch(Batch(decode=4))
        assert recorder.record_batch(MIXED, compiles=[EVENT])
    trace = read_trace(path)
    assert trace.header == {"warmplan_trace": 1, "kind": "batches", "engine": "vllm"}
    assert [(e.step, e.batch) for e in trace.batches] == [(0, Batch(decode=4)), (1, MIXED)]
    assert trace.batches[1].compiles == (
        RecordedCompile("dynamo", "forward", "x=float32[16]", False, 0.25),
    )
    assert trace.recorded and trace.recorded_compiles == 1


def test_a_line_is_compact_json() -> None:
    """One batch, one line; chunk context only when there is some."""
    assert format_line(MIXED, 7) == (
        '{"step": 7, "decode": 3, "prefill": [{"tokens": 500, "context": 1024}, {"tokens": 9}]}\n'
    )


def test_files_rotate_past_max_bytes_and_keep_backups(tmp_path: Path) -> None:
    """Past max_bytes the file moves to .1 (then .2); each file is a whole trace."""
    path = tmp_path / "rec.jsonl"
    recorder = TraceRecorder(path, max_bytes=400, backups=2, flush_every_s=0)
    for n in range(40):
        recorder.record_batch(Batch(decode=n + 1))
    recorder.close()
    assert recorder.stats.rotations >= 3
    assert [p.name for p in recorder.files()] == ["rec.jsonl.2", "rec.jsonl.1", "rec.jsonl"]
    assert all(p.stat().st_size <= 400 for p in recorder.files())
    steps = [e.step for p in recorder.files() for e in read_trace(p).batches]
    assert steps == list(range(steps[0], 40))


def test_sampling_keeps_one_in_n_and_every_batch_that_compiled(tmp_path: Path) -> None:
    """sample_every=3 writes steps 0, 3, 6, ... and any batch with a compile."""
    path = tmp_path / "rec.jsonl"
    with TraceRecorder(path, sample_every=3) as recorder:
        for n in range(8):
            recorder.record_batch(Batch(decode=1), compiles=[EVENT] if n == 4 else ())
    trace = read_trace(path)
    assert [e.step for e in trace.batches] == [0, 3, 4, 6]
    assert trace.header["sample_every"] == 3
    assert (recorder.stats.batches_seen, recorder.stats.batches_written) == (8, 4)


def test_an_existing_trace_is_rotated_away_not_overwritten(tmp_path: Path) -> None:
    """A restart keeps the previous run's trace as .1."""
    path = tmp_path / "rec.jsonl"
    with TraceRecorder(path) as first:
        first.record_batch(Batch(decode=1))
    with TraceRecorder(path) as second:
        second.record_batch(Batch(decode=2))
    assert read_trace(tmp_path / "rec.jsonl.1").batches[0].batch == Batch(decode=1)
    assert read_trace(path).batches[0].batch == Batch(decode=2)


def test_a_recorder_that_cannot_write_turns_itself_off(tmp_path: Path) -> None:
    """An unwritable path never fails the batch: record_batch returns False."""
    blocker = tmp_path / "file"
    blocker.write_text("", encoding="utf-8")
    recorder = TraceRecorder(blocker / "rec.jsonl")
    assert recorder.stats.disabled is not None
    assert recorder.record_batch(Batch(decode=1)) is False
    assert recorder.stats.batches_seen == 1


# -- record on a worker, then verify and suggest ------------------------------------

PLAN = """\
version: 1
name: fake
steps:
  - {id: run-1, kind: dummy_run, shape: plain, tokens: 1}
"""
TRAFFIC = '{"decode": 1}\n{"decode": 3, "prefill": [{"tokens": 10}]}\n{"decode": 2}\n{"prefill": [{"tokens": 40, "context": 100}]}\n{"decode": 1}\n'


def _files(tmp_path: Path) -> tuple[Path, Path]:
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN, encoding="utf-8")
    traffic = tmp_path / "traffic.jsonl"
    traffic.write_text(TRAFFIC, encoding="utf-8")
    return plan, traffic


def _load(path: Path) -> Plan:
    return parse_plan(path.read_text(encoding="utf-8"), file=str(path), path=str(path))


def test_a_recorded_trace_replays_with_the_compile_count_seen_live(tmp_path: Path) -> None:
    """record sees 2 compiles (sizes 16 and 64); verify of its trace sees the same 2."""
    plan, traffic = _files(tmp_path)
    out = tmp_path / "rec.jsonl"
    live = record(_load(plan), CompilingWorker(), read_trace(traffic), TraceRecorder(out))
    assert (live.compiles, live.batches_hit) == (2, [1, 3])
    recorded = read_trace(out)
    assert [len(e.compiles) for e in recorded.batches] == [0, 1, 0, 1, 0]
    torch._dynamo.reset()
    replay = verify(_load(plan), CompilingWorker(), recorded, path=str(out))
    assert (replay.compiles, replay.batches_hit, replay.recorded) == (2, [1, 3], 2)
    assert replay.recorded_line() == (
        "recorded live: 2 events (compiles, disk and device loads, autotune misses); this replay: 2 (the same)"
    )


@pytest.fixture
def fake_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    def make(args: argparse.Namespace, plan: Plan) -> CompilingWorker:
        return CompilingWorker()

    for module in (record_cmd, verify_cmd, suggest_cmd):
        monkeypatch.setattr(module, "make_worker", make)


@pytest.mark.usefixtures("fake_worker")
def test_cli_record_then_verify_then_suggest_a_patch_that_covers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """record -> verify (same count) -> suggest (a patch git applies) -> verify --strict passes."""
    monkeypatch.chdir(tmp_path)
    _files(tmp_path)
    assert main(["record", "plan.yaml", "--trace", "traffic.jsonl", "--out", "rec.jsonl"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "live: 2 compiles and 0 disk-cache loads in 2 of 5 batches"
    assert out[2].startswith("recorded 5 of 5 batches to rec.jsonl (")
    torch._dynamo.reset()
    assert main(["verify", "plan.yaml", "--trace", "rec.jsonl"]) == 0
    verified = capsys.readouterr().out.splitlines()
    assert verified[-1] == (
        "recorded live: 2 events (compiles, disk and device loads, autotune misses); this replay: 2 (the same)"
    )

    assert main(["suggest", "plan.yaml", "--trace", "rec.jsonl", "--out", "fix.patch"]) == 0
    patch = (tmp_path / "fix.patch").read_text(encoding="utf-8")
    assert patch.startswith("--- a/plan.yaml\n+++ b/plan.yaml\n")
    assert (
        "+  # Added by warmplan suggest: 2 compilations in the recording of rec.jsonl.\n" in patch
    )
    subprocess.run(["git", "apply", "fix.patch"], cwd=tmp_path, check=True)
    torch._dynamo.reset()
    assert main(["verify", "plan.yaml", "--trace", "rec.jsonl", "--strict"]) == 0
    assert capsys.readouterr().out.splitlines()[-2] == (
        "covered: 5 batches from rec.jsonl replayed with no compilation"
    )


@pytest.mark.usefixtures("fake_worker")
def test_cli_suggest_run_replays_a_trace_that_was_not_recorded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without recorded compiles suggest says to add --run; with it, it replays."""
    monkeypatch.chdir(tmp_path)
    _files(tmp_path)
    assert main(["suggest", "plan.yaml", "--trace", "traffic.jsonl"]) == 1
    assert capsys.readouterr().err.strip() == (
        "warmplan: error: traffic.jsonl: no recorded compilations: the trace was not written "
        "by warmplan record; add --run to replay it after the plan"
    )
    assert main(["suggest", "plan.yaml", "--trace", "traffic.jsonl", "--run", "--yaml"]) == 0
    out = capsys.readouterr().out
    assert "id: suggested-mixed-16" in out


@pytest.mark.usefixtures("fake_worker")
def test_cli_record_synthetic_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--synthetic serves a generated workload under the worker's limits; --json counts."""
    monkeypatch.chdir(tmp_path)
    _files(tmp_path)
    args = ["record", "plan.yaml", "--synthetic", "chat", "--requests", "4", "--out", "r.jsonl"]
    assert main([*args, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["recorder"]["batches_written"] == data["batches"] > 4
    assert data["scheduling"]["schedule"]["requests"] == 4
    assert len(read_trace(tmp_path / "r.jsonl").batches) == data["batches"]


def test_a_trace_recorded_elsewhere_is_not_compared(tmp_path: Path) -> None:
    """Another plan, or batches re-chunked for smaller limits: the live count, not compared."""
    plan, traffic = _files(tmp_path)
    out = tmp_path / "rec.jsonl"
    header = {"plan": "production"}
    record(_load(plan), CompilingWorker(), read_trace(traffic), TraceRecorder(out, header=header))
    torch._dynamo.reset()
    other = verify(_load(plan), CompilingWorker(), read_trace(out), path=str(out))
    assert other.recorded_line() == (
        "recorded live: 2 events (compiles, disk and device loads, autotune misses) after plan 'production'; "
        "not compared"
    )
    big = tmp_path / "big.jsonl"
    with TraceRecorder(big) as recorder:
        recorder.record_batch(Batch(decode=2, prefill=(PrefillChunk(100),)), compiles=[EVENT])
    torch._dynamo.reset()
    rechunked = verify(_load(plan), CompilingWorker(), read_trace(big), path=str(big))
    assert rechunked.recorded_line() == (
        "recorded live: 1 events (compiles, disk and device loads, autotune misses) on a worker with other "
        "limits (1 batches re-chunked here); not compared"
    )


def test_a_request_recorder_writes_a_request_level_trace(tmp_path: Path) -> None:
    """kind="requests": one line a finished request, read back as requests."""
    now = [10.0]
    path = tmp_path / "req.jsonl"
    with TraceRecorder(path, kind="requests", clock=lambda: now[0]) as recorder:
        now[0] = 12.5
        assert recorder.record_request(900, 40, cached_tokens=512, request_id="r-1")
        with pytest.raises(ValueError, match="record_batch needs"):
            recorder.record_batch(Batch(decode=1))
    trace = read_trace(path)
    assert trace.kind == "requests" and trace.header["kind"] == "requests"
    assert trace.requests[0] == TraceRequest(
        line=2, id="r-1", prompt_tokens=900, output_tokens=40, cached_tokens=512, arrival_s=2.5
    )


def test_batch_of_splits_decodes_from_prefill_chunks() -> None:
    """(new, computed) per request: one new token is a decode, more a chunk after computed."""
    assert batch_of([(1, 700), (500, 1024), (1, 12), (9, 0)]) == Batch(
        decode=2, prefill=(PrefillChunk(500, 1024), PrefillChunk(9))
    )


# -- cold starts: autotune misses ----------------------------------------------------


class MissingWorker(CompilingWorker):
    """Its tuner has entries up to 16 tokens: larger batches run a default tactic."""

    def execute(self, batch: Batch) -> None:
        super().execute(batch)
        if batch.num_tokens > 16:
            report_autotune_miss(
                "builtin", "attention", f"bucket={self.padded_num_tokens(batch.num_tokens)}"
            )


MISS_PLAN = "version: 1\nname: fake\nsteps:\n  - {id: all, kind: dummy_run, shape: plain, tokens: 1}\n  - {id: b16, kind: dummy_run, shape: plain, tokens: 16}\n  - {id: b64, kind: dummy_run, shape: plain, tokens: 64}\n"


def test_verify_counts_autotune_misses_per_batch_and_is_not_covered(tmp_path: Path) -> None:
    """A replay without compiles but with a tuner miss is NOT covered; the batch is named."""
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"decode": 3}\n{"prefill": [{"tokens": 40}]}\n', encoding="utf-8")
    result = verify(parse_plan(MISS_PLAN), MissingWorker(), read_trace(trace), path=str(trace))
    assert [e.kind for e in result.events] == ["autotune_miss"]
    assert (result.compiles, result.autotune_misses, result.batches_hit) == (0, 1, [1])
    assert not result.covered and result.suggestions == []
    assert result.summary() == (
        f"NOT covered: 0 compiles and 0 disk-cache loads, 0 first device loads and 1 autotune "
        f"misses in 1 of 2 batches from {trace}"
    )
    assert result.rows()[0]["cache"] == "tune miss"


def test_record_writes_cold_events_and_verify_compares_them(tmp_path: Path) -> None:
    """A recorded miss travels in the batch's compiles; the replay counts it the same."""
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"decode": 3}\n{"prefill": [{"tokens": 40}]}\n', encoding="utf-8")
    out = tmp_path / "rec.jsonl"
    live = record(parse_plan(MISS_PLAN), MissingWorker(), read_trace(trace), TraceRecorder(out))
    assert (live.compiles, live.autotune_misses, live.batches_hit) == (0, 1, [1])
    recorded = read_trace(out)
    assert [c.kind for e in recorded.batches for c in e.compiles] == ["autotune_miss"]
    torch._dynamo.reset()
    again = verify(parse_plan(MISS_PLAN), MissingWorker(), recorded, path=str(out))
    assert again.recorded_line() == (
        "recorded live: 1 events (compiles, disk and device loads, autotune misses); this replay: 1 (the same)"
    )
