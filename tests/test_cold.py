"""Cold starts that are not compiles: first device loads and autotune misses."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch._dynamo

from tests._compiling import CompilingWorker
from warmplan.monitor import CompileEvent, JitMonitor
from warmplan.monitor.cold import ColdWatcher, report_autotune_miss
from warmplan.plan import parse_plan
from warmplan.record import TraceRecorder, record
from warmplan.trace import read_trace
from warmplan.verify import verify
from warmplan.workers.base import Batch


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_autotune_misses_go_into_the_monitor_with_the_label_in_progress() -> None:
    """report_autotune_miss records an autotune_miss event in each watched monitor,
    labelled; nothing once the watcher is uninstalled."""
    monitor = JitMonitor()
    with ColdWatcher(monitor.store):
        monitor.store.push_label("batch[3]")
        report_autotune_miss("builtin", "attention", "bucket=128")
        monitor.store.pop_label()
    report_autotune_miss("builtin", "attention", "bucket=1")
    assert monitor.events == [
        CompileEvent(
            kind="autotune_miss",
            name="builtin:attention",
            key="bucket=128",
            label="batch[3]",
            cache_hit=False,
            duration_s=None,
        )
    ]


@pytest.fixture
def fake_triton(monkeypatch: pytest.MonkeyPatch) -> type:
    """A Triton whose CompiledKernel loads its binary lazily, as the real one does."""

    class CompiledKernel:
        def __init__(self, name: str) -> None:
            self.name = name
            self.module: object | None = None
            self.metadata = types.SimpleNamespace(hash="abcdef0123456789ffff")

        def _init_handles(self) -> None:
            if self.module is not None:
                return
            self.module = object()

    compiler = types.ModuleType("triton.compiler.compiler")
    compiler.CompiledKernel = CompiledKernel  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "triton", types.ModuleType("triton"))
    monkeypatch.setitem(sys.modules, "triton.compiler", types.ModuleType("triton.compiler"))
    monkeypatch.setitem(sys.modules, "triton.compiler.compiler", compiler)
    return CompiledKernel


def test_first_device_load_of_a_triton_kernel_is_recorded_once(fake_triton: Any) -> None:
    """The first _init_handles of a kernel is a device load; later launches are not;
    the last watcher out restores Triton's method."""
    original = fake_triton._init_handles
    kernel = fake_triton("_slot_mapping_kernel")
    monitor = JitMonitor()
    monitor.store.push_label("batch[0]")
    with ColdWatcher(monitor.store) as watcher:
        kernel._init_handles()
        kernel._init_handles()
    assert [(e.kind, e.name, e.key, e.label) for e in watcher.events] == [
        ("device_load", "_slot_mapping_kernel", "abcdef0123456789", "batch[0]")
    ]
    assert fake_triton._init_handles is original


class MissingWorker(CompilingWorker):
    """Its tuner has entries up to 16 tokens: larger batches run a default tactic."""

    def execute(self, batch: Batch) -> None:
        super().execute(batch)
        if batch.num_tokens > 16:
            report_autotune_miss(
                "builtin", "attention", f"bucket={self.padded_num_tokens(batch.num_tokens)}"
            )


PLAN = "version: 1\nname: fake\nsteps:\n  - {id: all, kind: dummy_run, shape: plain, tokens: 1}\n  - {id: b16, kind: dummy_run, shape: plain, tokens: 16}\n  - {id: b64, kind: dummy_run, shape: plain, tokens: 64}\n"


def test_verify_counts_autotune_misses_per_batch_and_is_not_covered(tmp_path: Path) -> None:
    """A replay without compiles but with a tuner miss is NOT covered; the batch is named."""
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"decode": 3}\n{"prefill": [{"tokens": 40}]}\n', encoding="utf-8")
    result = verify(parse_plan(PLAN), MissingWorker(), read_trace(trace), path=str(trace))
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
    live = record(parse_plan(PLAN), MissingWorker(), read_trace(trace), TraceRecorder(out))
    assert (live.compiles, live.autotune_misses, live.batches_hit) == (0, 1, [1])
    recorded = read_trace(out)
    assert [c.kind for e in recorded.batches for c in e.compiles] == ["autotune_miss"]
    torch._dynamo.reset()
    again = verify(parse_plan(PLAN), MissingWorker(), recorded, path=str(out))
    assert again.recorded_line() == (
        "recorded live: 1 events (compiles, disk and device loads, autotune misses); this replay: 1 (the same)"
    )
