"""``flashinfer.autotuner``, faked: ``autotune()``, ``AutoTuner`` (choose, save,
load, clear), ``set_autotune_process_group`` and ``_collect_metadata``, with
FlashInfer's file format, bucket rounding, skip_ops and metadata rule.

``FAKEFI_METADATA`` (JSON) overrides the running stack's metadata; each profile's
all-reduce is counted in ``AutoTuner.reduces`` and each fallback in ``misses``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from tests.fakes.fakefi import __version__

TACTICS = (0, 1, 2, 3)
RUNNER = "FakeRunner"
_group: Any = None


def set_autotune_process_group(group: Any) -> None:
    global _group
    _group = group


def get_autotune_process_group() -> Any:
    return _group


def _collect_metadata() -> dict[str, str]:
    meta = {
        "flashinfer_version": __version__,
        "cuda_version": "13.0",
        "cublas_version": "13.1.0",
        "cudnn_version": "91900",
        "cudnn_frontend_version": "unknown",
        "gpu": "Fake H200",
    }
    meta.update(json.loads(os.environ.get("FAKEFI_METADATA", "{}")))
    return meta


def _power_buckets(m: int) -> tuple[int, ...]:
    out, b = [], 1
    while b <= max(m, 1):
        out.append(b)
        b *= 2
    return tuple(out)


class AutoTuner:
    _instance: AutoTuner | None = None

    def __init__(self) -> None:
        self.profiling_cache: dict[str, tuple[str, int]] = {}
        self._file_configs: dict[str, tuple[str, int]] = {}
        self._dirty = False
        self.is_tuning_mode = False
        self.stack: list[tuple[tuple[int, ...] | None, bool, frozenset[str]]] = []
        self.reduces = 0
        self.misses: list[tuple[str, int]] = []
        self.chosen: dict[str, int] = {}

    @classmethod
    def get(cls) -> AutoTuner:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    # -- serving and tuning ----------------------------------------------------------
    def _bucket(self, m: int, max_m: int) -> int:
        buckets, round_up, _ = self.stack[-1] if self.stack else (None, False, frozenset())
        bs = tuple(sorted(buckets)) if buckets else _power_buckets(max_m)
        if round_up:
            return next((b for b in bs if b >= m), bs[-1])
        return next((b for b in reversed(bs) if b <= m), bs[0])

    def choose_one(self, op: str, m: int, *, max_m: int = 8192) -> int:
        """The tactic for ``op`` at ``m`` tokens (FlashInfer's ``choose_one``)."""
        skip = self.stack[-1][2] if self.stack else frozenset()
        if op in skip:
            return -1
        bucket = self._bucket(m, max_m)
        key = str((op, RUNNER, ((bucket, 64), (64, 64))))
        hit = self.profiling_cache.get(key) or self._file_configs.get(key)
        if hit is not None:
            return hit[1]
        if not self.is_tuning_mode:
            self.misses.append((op, m))
            return -1
        buckets = self.stack[-1][0] if self.stack and self.stack[-1][0] else (bucket,)
        for b in sorted(set(buckets)):
            k = str((op, RUNNER, ((b, 64), (64, 64))))
            if k in self.profiling_cache or k in self._file_configs:
                continue
            self.profiling_cache[k] = (RUNNER, self._profile(b))
            self._dirty = True
        self.chosen[key] = self.profiling_cache.get(key, (RUNNER, -1))[1]
        return self.chosen[key]

    def _profile(self, bucket: int) -> int:
        rank = dist.get_rank() if dist.is_initialized() else 0
        # True costs favour tactic 1; each rank's noise favours tactic (rank % 4) more.
        times = torch.tensor(
            [1.0 + 0.1 * abs(t - 1) + (0.0 if t == rank % 4 else 0.5) for t in TACTICS],
            dtype=torch.float64,
        )
        if _group is not None:
            dist.all_reduce(times, group=_group)
            times /= dist.get_world_size(_group)
            self.reduces += 1
        return int(torch.argmin(times))

    # -- files -------------------------------------------------------------------------
    def save_configs(self, path: str) -> None:
        entries = {**self._file_configs, **self.profiling_cache}
        doc: dict[str, Any] = {"_metadata": _collect_metadata()}
        doc.update({k: [r, t] for k, (r, t) in sorted(entries.items())})
        with open(path, "w") as f:
            json.dump(doc, f, indent=2)
        self._dirty = False

    def load_configs(self, path: str) -> bool:
        with open(path) as f:
            doc = json.load(f)
        saved = doc.pop("_metadata", None)
        if saved is not None:
            now = _collect_metadata()
            if any(saved.get(k) not in (v, "*") for k, v in now.items()):
                return False
        for k, v in doc.items():
            self._file_configs[k] = (v[0], v[1])
        return True

    def clear_cache(self) -> None:
        self.profiling_cache.clear()
        self._file_configs.clear()
        self._dirty = False


@contextlib.contextmanager
def autotune(
    tune_mode: bool = True,
    cache: str | None = None,
    tuning_buckets: tuple[int, ...] | None = None,
    round_up: bool | None = None,
    skip_ops: set[str] | None = None,
) -> Iterator[None]:
    tuner = AutoTuner.get()
    valid = True
    if cache is not None:
        tuner._file_configs.clear()
        if os.path.isfile(cache):
            valid = tuner.load_configs(cache)
    top = tuner.stack[-1] if tuner.stack else (None, False, frozenset())
    tuner.stack.append(
        (
            tuning_buckets if tuning_buckets is not None else top[0],
            round_up if round_up is not None else top[1],
            top[2] | frozenset(skip_ops or ()),
        )
    )
    old = tuner.is_tuning_mode
    tuner.is_tuning_mode = old or tune_mode
    try:
        yield
    finally:
        tuner.is_tuning_mode = old
        tuner.stack.pop()
        if cache is not None and valid and tune_mode and tuner._dirty:
            tuner.save_configs(cache)
