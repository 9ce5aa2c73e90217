"""bench/warm_restart.py's own logic: exclusive timers and the ratios it prints.

The measurements run in the benchmark (fresh processes, minutes); these tests cover
the accounting that decides which seconds land in which column.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from types import ModuleType
from typing import Any

import pytest

from tests._paths import ROOT


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "warm_restart_bench", ROOT / "bench" / "warm_restart.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_nested_timers_are_exclusive(bench: ModuleType) -> None:
    """A timer inside another is subtracted from it: the totals add up to the wall."""
    timers = bench.Timers()
    start = time.perf_counter()
    with timers.time("outer"):
        time.sleep(0.02)
        with timers.time("inner"):
            time.sleep(0.03)
    wall = time.perf_counter() - start
    assert timers.totals["inner"] >= 0.03
    assert 0.02 <= timers.totals["outer"] < 0.03 + 0.02
    assert sum(timers.totals.values()) == pytest.approx(wall, abs=0.005)


def test_wrap_times_calls_and_keeps_results(bench: ModuleType) -> None:
    """A wrapped method still returns its value and is timed under its category."""

    class Thing:
        def work(self, x: int) -> int:
            time.sleep(0.01)
            return x + 1

    timers = bench.Timers()
    timers.wrap(Thing, "work", "work")
    assert Thing().work(1) == 2
    assert timers.totals["work"] >= 0.01
    timers.wrap(Thing, "absent", "nothing")  # absent attributes are skipped
    assert "nothing" not in timers.totals


def _run(process: float, plan: float, compiles: int) -> dict[str, Any]:
    return {
        "process_s": process,
        "phases": {"import torch": 1.0, "plan": plan},
        "report_totals": {"duration_s": plan, "compiles": compiles, "cache_loads": 0},
        "steps": [{"id": "s", "seconds": plan, "split": {"aot_load": plan / 2, "rest": plan / 2}}],
    }


def test_summary_states_both_ratios_against_their_targets(bench: ModuleType) -> None:
    """The warm run's plan and process times as percentages of the cold run's."""
    text = bench._summary({"cold": _run(100.0, 80.0, 24), "warm": _run(15.0, 4.0, 0)})
    assert (
        "warm: plan 4.00 s = 5.0 % of cold (target <= 10 %); "
        "process 15.00 s = 15.0 % of cold (target <= 20 %)"
    ) in text
    assert "AOT look-up + load" in text
