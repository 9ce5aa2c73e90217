"""The built-in engine's ahead-of-time artefacts: loaded by a restarted worker, refused
and rebuilt when they come from another environment, never a crash on a new shape."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from warmplan.monitor import JitMonitor
from warmplan.workers.builtin import BuiltinWorker
from warmplan.workers.builtin.aot import (
    MAGIC,
    AotFunction,
    AotStore,
    engine_key,
    environment,
)

CPU = torch.device("cpu")
NAME = "double-k"  # an AotFunction named "double" keeps key "k" in this file


def double(x: torch.Tensor) -> torch.Tensor:
    return x * 2 + 1


def _store(directory: Path) -> AotStore:
    return AotStore(str(directory), environment(CPU))


def _rewrite_header(path: Path, **env: Any) -> None:
    """Make the artefact at ``path`` claim another environment (payload untouched)."""
    raw = path.read_bytes()
    line, _, payload = raw[len(MAGIC) :].partition(b"\n")
    header = json.loads(line)
    header["env"].update(env)
    path.write_bytes(MAGIC + json.dumps(header).encode() + b"\n" + payload)


@pytest.fixture(scope="module")
def artefact_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One compiled artefact (``double`` at shape [4]), made once for the module."""
    directory = tmp_path_factory.mktemp("aot")
    store = _store(directory)
    store.get(NAME, double, (torch.ones(4),), dynamic=False)
    assert store.stats.compiles == 1
    return directory


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    (dst / f"{NAME}.bin").write_bytes((src / f"{NAME}.bin").read_bytes())
    return dst / f"{NAME}.bin"


def test_a_saved_artefact_is_loaded_not_compiled(artefact_dir: Path, tmp_path: Path) -> None:
    """A second store on the same directory loads the function and it computes the same."""
    _copy(artefact_dir, tmp_path)
    store = _store(tmp_path)
    fn = store.get(NAME, double, (torch.ones(4),), dynamic=False)
    assert (store.stats.loads, store.stats.compiles, store.notes) == (1, 0, [])
    assert torch.equal(fn(torch.arange(4.0)), torch.arange(4.0) * 2 + 1)


@pytest.mark.parametrize(
    ("field", "value", "said"),
    [
        ("torch", "2.11.0+cu130", "torch 2.11.0+cu130 (this process: "),
        ("triton", "3.5.0", "triton 3.5.0 (this process: None)"),
        ("flashinfer", "0.7.2.post1", "flashinfer 0.7.2.post1 (this process: None)"),
        ("gpu", "NVIDIA H200", "gpu NVIDIA H200 (this process: None)"),
        ("device", "cuda", "device cuda (this process: cpu)"),
    ],
)
def test_an_artefact_from_another_version_or_device_is_refused_and_rebuilt(
    artefact_dir: Path, tmp_path: Path, field: str, value: str, said: str
) -> None:
    """Another torch/Triton/FlashInfer version or another GPU: not loaded, recompiled
    with a note naming the difference, and the file replaced by this environment's."""
    path = _copy(artefact_dir, tmp_path)
    _rewrite_header(path, **{field: value})
    store = _store(tmp_path)
    fn = store.get(NAME, double, (torch.ones(4),), dynamic=False)
    assert (store.stats.loads, store.stats.refused, store.stats.compiles) == (0, 1, 1)
    assert len(store.notes) == 1
    assert store.notes[0].startswith(f"{path}: not loaded, recompiling: built with {field} ")
    assert said in store.notes[0]
    assert torch.equal(fn(torch.ones(4)), torch.full((4,), 3.0))
    again = _store(tmp_path)
    again.get(NAME, double, (torch.ones(4),), dynamic=False)
    assert (again.stats.loads, again.stats.compiles, again.notes) == (1, 0, [])


def test_a_corrupt_artefact_is_refused_and_rebuilt(artefact_dir: Path, tmp_path: Path) -> None:
    """A truncated payload fails its checksum: recompiled with a note, never unpickled."""
    path = _copy(artefact_dir, tmp_path)
    path.write_bytes(path.read_bytes()[:-100])
    store = _store(tmp_path)
    store.get(NAME, double, (torch.ones(4),), dynamic=False)
    assert (store.stats.refused, store.stats.compiles) == (1, 1)
    assert "does not match its checksum" in store.notes[0]


def test_torch_refusing_an_artefact_is_a_rebuild_not_a_crash(
    artefact_dir: Path, tmp_path: Path
) -> None:
    """A payload torch cannot load (here: not a pickle) is rebuilt with torch's reason."""
    path = _copy(artefact_dir, tmp_path)
    raw = path.read_bytes()
    line, _, _ = raw[len(MAGIC) :].partition(b"\n")
    header = json.loads(line)
    payload = b"not a pickle"
    import hashlib

    header["sha256"] = hashlib.sha256(payload).hexdigest()
    path.write_bytes(MAGIC + json.dumps(header).encode() + b"\n" + payload)
    store = _store(tmp_path)
    store.get(NAME, double, (torch.ones(4),), dynamic=False)
    assert (store.stats.refused, store.stats.compiles) == (1, 1)
    assert "torch refused it: " in store.notes[0]


def test_a_shape_outside_the_artefact_runs_the_jit_path_and_the_monitor_sees_it(
    artefact_dir: Path, tmp_path: Path
) -> None:
    """AOT functions never recompile: a call their guards reject runs the JIT function
    (whose compile the monitor counts), with the right result, never an error."""
    _copy(artefact_dir, tmp_path)
    jit = torch.compile(double, dynamic=False, backend="eager")
    fn = AotFunction(_store(tmp_path), "double", double, jit, lambda args: "k", dynamic=False)
    with JitMonitor() as monitor, monitor.attribute("call"):
        assert torch.equal(fn(torch.ones(4)), torch.full((4,), 3.0))
        assert monitor.compiles("call") == 0
        assert torch.equal(fn(torch.ones(5)), torch.full((5,), 3.0))
    assert fn.store.stats.guard_misses == 1
    assert monitor.compiles("call") == 1


def test_engine_key_has_no_host_address_or_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cache keys exclude volatile fields: host name, address and pid change nothing;
    a torch version or GPU does."""
    fp = {"preset": "dense", "dtype": "float32"}
    env = environment(CPU)
    key = engine_key(fp, env)
    monkeypatch.setattr(socket, "gethostname", lambda: "other-host")
    monkeypatch.setattr(os, "getpid", lambda: 4242)
    monkeypatch.setenv("HOSTNAME", "other-host")
    assert engine_key(fp, environment(CPU)) == key
    assert engine_key(fp, {**env, "torch": "2.11.0"}) != key
    assert engine_key(fp, {**env, "gpu": "NVIDIA H200"}) != key
    assert engine_key({**fp, "dtype": "bfloat16"}, env) != key
    assert set(env) == {
        "python",
        "torch",
        "triton",
        "flashinfer",
        "cuda",
        "device",
        "gpu",
        "capability",
    }


def test_a_restarted_engine_loads_every_function_and_compiles_nothing(
    tmp_path: Path, tiny: Callable[..., dict[str, Any]]
) -> None:
    """A second engine on the same AOT root (a restarted worker) loads what the first
    compiled: zero compiles, one load a function, the same logits."""
    cfg = tiny("sparse-mla", dtype="float32", compile_sizes=[4, 16])
    root = str(tmp_path / "aot")

    def warm(worker: BuiltinWorker) -> list[torch.Tensor]:
        out = []
        for specs in ([(1, 5, True)] * 3, [(1, 5, True), (12, 0, False)], [(8, 8, False)]):
            out.append(worker.runner.run_requests(specs).clone())
        return out

    first = BuiltinWorker(cfg, aot_root=root)
    with JitMonitor() as monitor, monitor.attribute("cold"):
        cold = warm(first)
    assert first.runner.aot is not None
    made = first.runner.aot.stats.compiles
    assert made >= 4  # two forward sizes, chunk metadata with and without prior context
    assert monitor.compiles("cold") == made
    second = BuiltinWorker(cfg, aot_root=root)
    with JitMonitor() as monitor, monitor.attribute("warm"):
        warm_out = warm(second)
    assert second.runner.aot is not None
    stats = second.runner.aot.stats
    assert (stats.compiles, stats.loads, stats.guard_misses) == (0, made, 0)
    assert monitor.compiles("warm") == 0
    assert monitor.cache_loads("warm") == made
    for a, b in zip(cold, warm_out, strict=True):
        torch.testing.assert_close(a, b)


def test_loading_runs_no_compile_worker_pool(
    artefact_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loads run with inductor's compile_threads at 1: a built artefact's kernels load
    in this process, never through a pool of compile workers the process then waits
    for at exit (8.6-10.5 s of a warm H200 process)."""
    from torch._inductor import config

    seen: list[int | None] = []
    real = torch.compiler.load_compiled_function

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(config.compile_threads)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.compiler, "load_compiled_function", spy)
    _copy(artefact_dir, tmp_path)
    store = _store(tmp_path)
    store.get(NAME, double, (torch.ones(4),), dynamic=False)
    assert (seen, store.stats.loads) == ([1], 1)
