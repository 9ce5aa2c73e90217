"""The FlashInfer backend against a fake ``flashinfer`` module (no GPU, no flashinfer)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from warmplan.autotune.flashinfer import FlashInferBackend
from warmplan.steps.autotune import ResolvedAutotune, run_autotune
from warmplan.testing import RecordingWorker
from warmplan.workers.base import AutotuneLoadError

META = {"flashinfer_version": "0.7.2", "cudnn_frontend_version": "1.12.0", "gpu": "NVIDIA H200"}


class FakeTuner:
    """Mimics flashinfer.autotuner.AutoTuner: profiles into memory, saves/loads JSON."""

    def __init__(self) -> None:
        self.is_tuning_mode = False
        self.profiled: dict[str, Any] = {}
        self.file_configs: dict[str, Any] = {}
        self.metadata = dict(META)

    def choose(self, key: str) -> None:
        if self.is_tuning_mode:
            self.profiled[key] = ["CublasLtRunner", 3]

    def save_configs(self, path: str) -> None:
        doc = {"_metadata": dict(self.metadata), **self.profiled}
        Path(path).write_text(json.dumps(doc))

    def load_configs(self, path: str) -> bool:
        doc = json.loads(Path(path).read_text())
        if doc.get("_metadata") != self.metadata:
            return False
        self.file_configs = {k: v for k, v in doc.items() if not k.startswith("_")}
        return True


def install(
    monkeypatch: pytest.MonkeyPatch, *, with_cache_param: bool = True, with_save: bool = True
) -> FakeTuner:
    tuner = FakeTuner()
    at = types.ModuleType("flashinfer.autotuner")

    class AutoTuner:
        @staticmethod
        def get() -> FakeTuner:
            return tuner

    if with_cache_param:

        @contextlib.contextmanager
        def autotune(tune_mode: bool = True, cache: str | None = None) -> Iterator[None]:
            tuner.is_tuning_mode = tune_mode
            try:
                yield
            finally:
                tuner.is_tuning_mode = False
                if cache and tune_mode and tuner.profiled:
                    tuner.save_configs(cache)
    else:

        @contextlib.contextmanager
        def autotune(tune_mode: bool = True) -> Iterator[None]:  # type: ignore[misc]
            tuner.is_tuning_mode = tune_mode
            try:
                yield
            finally:
                tuner.is_tuning_mode = False

    at.AutoTuner = AutoTuner  # type: ignore[attr-defined]
    at.autotune = autotune  # type: ignore[attr-defined]
    at._collect_metadata = lambda: dict(tuner.metadata)  # type: ignore[attr-defined]
    if not with_save:
        monkeypatch.delattr(FakeTuner, "save_configs")
    fi = types.ModuleType("flashinfer")
    fi.__version__ = "0.7.2"  # type: ignore[attr-defined]
    fi.__path__ = []  # type: ignore[attr-defined]
    fi.autotuner = at  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "flashinfer", fi)
    monkeypatch.setitem(sys.modules, "flashinfer.autotuner", at)
    return tuner


class MmWorker(RecordingWorker):
    """A worker whose run calls a 'FlashInfer GEMM' that consults the tuner."""

    def __init__(self, tuner: FakeTuner, backend: FlashInferBackend) -> None:
        super().__init__(platform="cpu", backends={backend.name: backend})
        self.tuner = tuner

    def dummy_run(
        self, shape: Any, num_tokens: int, *, prior_context: int = 0, force_attention: bool = False
    ) -> None:
        super().dummy_run(shape, num_tokens)
        self.tuner.choose(f"('bf16_gemm', 'CublasLtRunner', (({num_tokens}, 4096),))")


def step(path: Path) -> ResolvedAutotune:
    return ResolvedAutotune(
        id="fi",
        kind="autotune",
        requested=(64,),
        applied=(64,),
        clamp_to="max_num_batched_tokens",
        limit=512,
        shape="plain",
        backend="flashinfer",
        policy="leader",
        cache_path=str(path),
        config_hash="c",
    )


def test_absent_flashinfer_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without flashinfer installed the backend says so instead of failing."""
    monkeypatch.setitem(sys.modules, "flashinfer", None)
    reason = FlashInferBackend().unavailable_reason()
    assert reason is not None
    assert reason.startswith("flashinfer is not installed")


@pytest.mark.compiles  # the backend's metadata imports torch
def test_tune_then_load_in_a_fresh_process_state(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Tuning exports FlashInfer's JSON; a fresh tuner loads it from the warmplan cache."""
    tuner = install(monkeypatch)
    backend = FlashInferBackend(require_cuda=False)
    assert backend.unavailable_reason() is None
    out = run_autotune(
        step(tmp_path / "fi.json"), MmWorker(tuner, backend), log=structlog.get_logger()
    )
    assert out.decision == "tune"
    doc = json.loads((tmp_path / "fi.json").read_text())
    assert doc["metadata"]["flashinfer.flashinfer"] == "0.7.2"
    assert "flashinfer.packages" in doc["metadata"]
    assert tuner.file_configs == tuner.profiled != {}

    tuner2 = install(monkeypatch)
    backend2 = FlashInferBackend(require_cuda=False)
    out2 = run_autotune(
        step(tmp_path / "fi.json"), MmWorker(tuner2, backend2), log=structlog.get_logger()
    )
    assert (out2.decision, out2.fingerprint) == ("load", out.fingerprint)
    assert tuner2.profiled == {}
    assert list(tuner2.file_configs) == list(tuner.profiled)


def test_load_configs_false_raises_and_explains(monkeypatch: pytest.MonkeyPatch) -> None:
    """load_configs() returning False is an error naming the metadata that differs."""
    tuner = install(monkeypatch)
    payload = json.dumps(
        {"_metadata": {**META, "cudnn_frontend_version": "unknown"}, "k": ["R", 1]}
    ).encode()
    with pytest.raises(AutotuneLoadError) as info:
        FlashInferBackend(require_cuda=False).load(payload)
    assert "every lookup would fall back to untuned defaults" in str(info.value)
    assert "cudnn_frontend_version: file has 'unknown', this rank has '1.12.0'" in str(info.value)
    assert tuner.file_configs == {}


def test_old_flashinfer_without_cache_param_exports_via_save_configs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before 0.6.6 (no cache=): tune in memory, export with save_configs."""
    tuner = install(monkeypatch, with_cache_param=False)
    backend = FlashInferBackend(require_cuda=False)
    assert backend.unavailable_reason() is None
    with backend.tuning():
        tuner.choose("k1")
    assert json.loads(backend.export())["k1"] == ["CublasLtRunner", 3]


def test_old_flashinfer_without_any_export_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    """No cache= and no save_configs: unavailable, with the version needed."""
    install(monkeypatch, with_cache_param=False, with_save=False)
    reason = FlashInferBackend(require_cuda=False).unavailable_reason()
    assert reason is not None
    assert "need flashinfer >= 0.6.6" in reason


def test_tuning_leaves_no_temp_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The private temp file used for cache= is removed after tuning and loading."""
    tuner = install(monkeypatch)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    backend = FlashInferBackend(require_cuda=False)
    with backend.tuning():
        tuner.choose("k")
    backend.load(backend.export())
    assert os.listdir(tmp_path) == []
