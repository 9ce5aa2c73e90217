"""The monitor's FlashInfer source: autotune misses (a shape served with the fallback
tactic because nothing tuned covers it) counted like compiles, by op and shapes."""

from __future__ import annotations

import logging

import pytest

from warmplan.monitor import JitCompileError, JitMonitor

FI = logging.getLogger("flashinfer.jit")
MISS = (
    "[AutoTuner]: No tuned config covers bf16_gemm input_shapes=(torch.Size([1000, 1024]), "
    "torch.Size([1024, 2048])); falling back to runner=CublasltBf16GemmRunner tactic=-1.  "
    "This shape is outside the tuning bucket range -- expand tuning_buckets / "
    "max_num_tokens during the next tuning pass to avoid this perf cliff."
)


def test_a_miss_is_an_event_of_the_batch_it_happened_in() -> None:
    """FlashInfer's miss warning becomes one autotune_miss event, counted as a compile
    of the label in force; other FlashInfer warnings are not counted."""
    with JitMonitor() as monitor:
        with monitor.attribute("batch[3]"):
            FI.warning("[Autotuner]: Cache file x was created in a different environment")
            FI.warning(MISS)
        assert monitor.compiles("batch[3]") == 1
        (event,) = monitor.events
        assert (event.kind, event.name, event.label) == ("autotune_miss", "bf16_gemm", "batch[3]")
        assert event.key == "(torch.Size([1000, 1024]), torch.Size([1024, 2048]))"
        assert event.describe().startswith(
            "FlashInfer autotune miss (fallback tactic, shape not tuned) of 'bf16_gemm'"
        )
    FI.warning(MISS)  # uninstalled: not counted
    assert len(monitor.events) == 1


def test_flashinfers_own_logger_object_is_watched(monkeypatch: pytest.MonkeyPatch) -> None:
    """FlashInfer instantiates its logger itself (outside logging's registry): the
    source finds it on flashinfer.jit.core once imported, also after install."""
    import sys
    import types

    own = logging.Logger("flashinfer.jit")  # as FlashInferJITLogger("flashinfer.jit")
    assert own is not logging.getLogger("flashinfer.jit")
    with JitMonitor() as monitor:
        core = types.ModuleType("flashinfer.jit.core")
        core.logger = own  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "flashinfer.jit.core", core)
        with monitor.attribute("batch[1]"):
            own.warning(MISS)
        assert monitor.compiles("batch[1]") == 1
    own.warning(MISS)
    assert len(monitor.events) == 1 and own.handlers == []


def test_a_miss_after_warmup_raises_in_error_mode() -> None:
    """Armed in error mode, a miss while serving raises like a compile."""
    with JitMonitor() as monitor:
        monitor.arm("error")
        with (
            pytest.raises(JitCompileError, match="FlashInfer autotune miss"),
            monitor.attribute("batch[0]"),
        ):
            FI.warning(MISS)
