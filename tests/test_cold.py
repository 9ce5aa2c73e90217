"""Cold starts that are not compiles: first device loads and autotune misses (no torch
here; verify and record count them in test_record.py)."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest

from warmplan.monitor import CompileEvent, JitMonitor
from warmplan.monitor.cold import ColdWatcher, report_autotune_miss


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


def test_the_report_counts_device_loads_per_step() -> None:
    """A kernel first loaded onto the device during a step is counted in that step's
    report line (``device_loads``) and the totals, apart from compiles."""
    import warmplan
    from warmplan.plan import parse_plan
    from warmplan.testing import RecordingWorker

    monitor = JitMonitor()

    class LoadingWorker(RecordingWorker):
        def slot_mapping(self, num_tokens: int) -> None:
            super().slot_mapping(num_tokens)
            monitor.cold.record("_slot_mapping_kernel", f"n={num_tokens}", 0.001)

    plan = parse_plan(
        "version: 1\nname: p\nsteps:\n"
        "  - {id: slots, kind: slot_mapping, tokens: [1, 16]}\n"
        "  - {id: decode, kind: dummy_run, shape: uniform_decode, tokens: 1}\n"
    )
    with monitor:
        report = warmplan.run_plan(plan, LoadingWorker(), monitor=monitor)
    data = report.to_dict()
    assert [(s["id"], s["device_loads"], s["compiles"]) for s in data["steps"]] == [
        ("slots", 2, 0),
        ("decode", 0, 0),
    ]
    assert data["totals"]["device_loads"] == 2
