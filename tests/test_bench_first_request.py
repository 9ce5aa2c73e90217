"""bench/first_request.py's own logic: shape selection and merging warm runs.

The measurements themselves run in the benchmark (fresh processes, minutes); these
tests cover the parts that decide which numbers end up in the table.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from types import ModuleType
from typing import Any

import pytest

from tests._paths import ROOT


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "first_request_bench", ROOT / "bench" / "first_request.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def shape(label: str, step: str = "step") -> dict[str, Any]:
    return {"label": label, "step": step}


def test_words_match_labels_step_ids_and_prefixes(bench: ModuleType) -> None:
    decode_1, decode_16 = shape("uniform_decode 1", "decode"), shape("uniform_decode 16", "decode")
    assert bench._matches(decode_1, ["uniform_decode 1"])
    assert not bench._matches(decode_16, ["uniform_decode 1"])  # a label, not a substring
    assert bench._matches(decode_16, ["decode"])  # the step id
    assert bench._matches(decode_16, ["uniform_decode*"])
    assert bench._matches(decode_16, ["uniform_decode 1*"])
    assert not bench._matches(shape("slot_mapping 1", "slots"), ["uniform_decode*", "decode"])
    assert not bench._matches(decode_1, [])


def test_warm_runs_take_the_median_first_call_and_sum_compiles(
    bench: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    firsts = iter([[0.010, 0.200], [0.030, 0.100], [0.020, 0.300]])
    cache_dirs: list[str | None] = []

    def fake_child(
        spec: dict[str, Any], *, timeout_s: float, cache_dir: str | None = None
    ) -> dict[str, Any]:
        cache_dirs.append(cache_dir)
        run = next(firsts)
        return {
            "warmup_s": 5.0 if len(cache_dirs) == 1 else 1.0,
            "warmup_compiles": 3,
            "shapes": [
                {
                    **shape(f"s{i}"),
                    "first_s": first,
                    "steady_s": first / 2,
                    "idle_s": None,
                    "compiles": i,
                }
                for i, first in enumerate(run)
            ],
        }

    monkeypatch.setattr(bench, "_run_child", fake_child)
    args = argparse.Namespace(warm_runs=3, timeout=10.0)
    merged, warmup_s = bench._warm_runs({}, [shape("s0"), shape("s1")], args)
    assert warmup_s == 5.0  # the first run's, the one that started from empty caches
    assert [m["first_s"] for m in merged] == [0.020, 0.200]
    assert [m["first_runs_s"] for m in merged] == [[0.010, 0.030, 0.020], [0.200, 0.100, 0.300]]
    assert [m["steady_s"] for m in merged] == [0.010, 0.100]
    assert [m["idle_s"] for m in merged] == [None, None]
    assert [m["compiles"] for m in merged] == [0, 3]  # every run's compiles count
    assert len(set(cache_dirs)) == 1 and cache_dirs[0] is not None  # one shared cache dir


def test_primer_is_an_already_measured_shape_of_the_same_kind(bench: ModuleType) -> None:
    shapes = [
        {"kind": "slot_mapping", "shape": None, "label": "slot_mapping 1"},
        {"kind": "slot_mapping", "shape": None, "label": "slot_mapping 2"},
        {"kind": "dummy_run", "shape": "uniform_decode", "label": "uniform_decode 1"},
        {"kind": "dummy_run", "shape": "plain", "label": "plain 128"},
        {"kind": "dummy_run", "shape": "uniform_decode", "label": "uniform_decode 2"},
        {"kind": "slot_mapping", "shape": None, "label": "slot_mapping 3"},
    ]
    primers = [bench._primer(shapes, i) for i in range(len(shapes))]
    # first: nothing measured yet; first of its kind: the one before; then same kind/shape
    assert primers == [None, 0, 1, 2, 2, 1]
    assert all(p is None or p < i for i, p in enumerate(primers))  # never an unmeasured shape
