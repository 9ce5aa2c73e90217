"""The builtin and triton autotune backends."""

from __future__ import annotations

import json

import pytest

from warmplan.workers.base import AutotuneLoadError
from warmplan.workers.builtin import BuiltinWorker


def test_tune_export_load_round_trip(eager_worker: BuiltinWorker) -> None:
    """Tuning records a choice per bucket; export is deterministic; load installs it."""
    backend = eager_worker.autotune_backend("builtin")
    assert backend is not None
    assert backend.unavailable_reason() is None
    with backend.tuning():
        eager_worker.dummy_run("plain", 20)
        eager_worker.dummy_run("uniform_decode", 3)
    payload = backend.export()
    assert payload == backend.export()
    data = json.loads(payload)
    assert set(data["choices"]) == {"32", "4"}
    assert payload == json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    other = BuiltinWorker(eager_worker.config, compile=False)
    other_backend = other.autotune_backend("builtin")
    assert other_backend is not None
    other_backend.load(payload)
    assert other_backend.export() == payload


def test_tuned_choice_is_used(eager_worker: BuiltinWorker) -> None:
    """A loaded choice decides the implementation of its bucket; others keep the default."""
    backend = eager_worker.autotune_backend("builtin")
    assert backend is not None
    meta = dict(backend.metadata())
    backend.load(
        json.dumps(
            {"format": meta["format"], "metadata": meta, "choices": {"8": "matmul"}}
        ).encode()
    )
    eager_worker.dummy_run("plain", 7)
    assert eager_worker.runner.last.impl == "matmul"
    eager_worker.dummy_run("plain", 20)
    assert eager_worker.runner.last.impl == "sdpa"


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"{", "not JSON"),
        (b"[]", '"format" must be'),
        (b'{"format": "other"}', '"format" must be'),
    ],
)
def test_bad_payloads_are_refused(
    eager_worker: BuiltinWorker, payload: bytes, message: str
) -> None:
    """Malformed payloads raise AutotuneLoadError."""
    backend = eager_worker.autotune_backend("builtin")
    assert backend is not None
    with pytest.raises(AutotuneLoadError, match=message):
        backend.load(payload)


def test_bad_choice_is_refused(eager_worker: BuiltinWorker) -> None:
    """An unknown implementation or a mismatched environment is refused."""
    backend = eager_worker.autotune_backend("builtin")
    assert backend is not None
    meta = dict(backend.metadata())
    bad = {"format": meta["format"], "metadata": meta, "choices": {"8": "flash"}}
    with pytest.raises(AutotuneLoadError, match="must be one of sdpa, matmul"):
        backend.load(json.dumps(bad).encode())
    bad = {"format": meta["format"], "metadata": {**meta, "torch": "0"}, "choices": {}}
    with pytest.raises(AutotuneLoadError, match="tuned for"):
        backend.load(json.dumps(bad).encode())


def test_triton_unavailable_on_cpu(eager_worker: BuiltinWorker) -> None:
    """The triton backend says why it cannot run on CPU and refuses payloads."""
    backend = eager_worker.autotune_backend("triton")
    assert backend is not None
    assert "CUDA" in (backend.unavailable_reason() or "")
    assert backend.export() == b""
    with pytest.raises(AutotuneLoadError):
        backend.load(b"{}")
    assert eager_worker.autotune_backend("nope") is None


def test_flashinfer_unavailable_on_cpu_says_why(eager_worker: BuiltinWorker) -> None:
    """On a CPU the flashinfer backend exists but says the engine calls no FlashInfer op, and why."""
    backend = eager_worker.autotune_backend("flashinfer")
    assert backend is not None
    assert (
        backend.unavailable_reason()
        == "the built-in engine calls no FlashInfer op: FlashInfer GEMMs need CUDA, the engine runs on cpu"
    )
    with pytest.raises(AutotuneLoadError):
        backend.load(b"{}")
