"""warmplan's FlashInfer autotune cache against the real vLLM 0.34 package (CI's
vLLM tier): vLLM's own helpers (``flashinfer_autotune_cache``: root, config hash,
per-rank file name) name exactly the file warmplan writes for the same config;
vLLM's own loader (``_load_shared_autotune_cache``) loads it; a file vLLM's writer
put in its layout is read by warmplan; a foreign one is ignored naming the field.

FlashInfer is CUDA-only, so ``flashinfer.autotuner`` is the FlashInfer-shaped fake
(``tests.fakes.fakefi``) and ``flashinfer.jit.env`` names a workspace, both installed
in ``sys.modules`` for the test only; vLLM's functions run for real.
"""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import structlog

pytestmark = [pytest.mark.vllm, pytest.mark.compiles]

LOG = structlog.get_logger("test")
WORKSPACE = ("0.7.2.post1", "90a")


@pytest.fixture
def vllm_fi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """vLLM with a fake FlashInfer (its autotuner and JIT workspace), a CPU config,
    world rank 3 and ``$VLLM_CACHE_ROOT`` under ``tmp_path``."""
    import vllm.distributed.parallel_state as ps
    import vllm.utils.flashinfer as vfi
    from vllm.config import DeviceConfig, VllmConfig

    import tests.fakes.fakefi as fakefi
    import tests.fakes.fakefi.autotuner as fake_autotuner

    fake_autotuner.AutoTuner._instance = None
    fi = types.ModuleType("flashinfer")
    fi.__version__ = WORKSPACE[0]  # type: ignore[attr-defined]
    fi.__path__ = []  # type: ignore[attr-defined]
    fi.__spec__ = importlib.machinery.ModuleSpec("flashinfer", None, is_package=True)
    jit = types.ModuleType("flashinfer.jit")
    env = types.ModuleType("flashinfer.jit.env")
    env.FLASHINFER_WORKSPACE_DIR = tmp_path / "fi-home" / ".cache" / "flashinfer" / Path(*WORKSPACE)  # type: ignore[attr-defined]
    jit.env = env  # type: ignore[attr-defined]
    fi.jit = jit  # type: ignore[attr-defined]
    fi.autotuner = fake_autotuner  # type: ignore[attr-defined]
    for name, mod in (
        ("flashinfer", fi),
        ("flashinfer.jit", jit),
        ("flashinfer.jit.env", env),
        ("flashinfer.autotuner", fake_autotuner),
    ):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path / "vllm-cache"))
    monkeypatch.delenv("VLLM_FLASHINFER_AUTOTUNE_CACHE_DIR", raising=False)

    monkeypatch.setattr(ps, "get_world_group", lambda: SimpleNamespace(rank_in_group=3))
    monkeypatch.setattr(vfi, "has_flashinfer", lambda: True)
    config = VllmConfig(device_config=DeviceConfig(device="cpu"))
    assert fakefi.__version__  # the fake package is importable
    return SimpleNamespace(config=config, tuner=fake_autotuner.AutoTuner, tmp=tmp_path)


def vllm_path(config: Any) -> Path:
    from vllm.model_executor.warmup.flashinfer_autotune_cache import (
        resolve_rank_flashinfer_autotune_file,
    )

    return Path(resolve_rank_flashinfer_autotune_file(SimpleNamespace(vllm_config=config)))


def run_step(config: Any, *, run_after_load: bool = False) -> Any:
    """warmplan's autotune step, policy together, identity vllm, on rank 3 of 4."""
    from warmplan.steps.autotune import ResolvedAutotune, run_autotune
    from warmplan.testing import RecordingWorker, ThreadWorld
    from warmplan.workers.vllm.common import VllmFlashInferBackend

    class Worker(RecordingWorker):
        def dummy_run(self, shape: Any, num_tokens: int, **kw: Any) -> None:
            super().dummy_run(shape, num_tokens, **kw)
            sys.modules["flashinfer.autotuner"].AutoTuner.get().choose_one("fake_gemm", num_tokens)

    class OneOfFour:  # rank 3 of a world whose other ranks agree (a 1-rank exchange)
        def __init__(self) -> None:
            self._w = ThreadWorld.group(1)[0]
            self.rank, self.local_rank, self.world_size = 3, 3, 1

        def __getattr__(self, name: str) -> Any:
            return getattr(self._w, name)

    backend = VllmFlashInferBackend("flashinfer", vllm_config=config)
    worker = Worker(world=OneOfFour(), backends={"flashinfer": backend}, platform="cpu")  # type: ignore[arg-type]
    step = ResolvedAutotune(
        id="fi",
        kind="autotune",
        requested=(256,),
        applied=(256,),
        clamp_to="max_num_batched_tokens",
        limit=256,
        shape="plain",
        backend="flashinfer",
        policy="together",
        timeout_s=10,
        cache_path="/nonexistent/warmplan-computed-path.json",
        config_hash="warmplan",
        identity="vllm",
        run_after_load=run_after_load,
        passes=((256, (64, 128, 256)),),
        round_up=True,
    )
    return run_autotune(step, worker, log=LOG), worker


def test_vllm_helpers_name_the_file_warmplan_writes(vllm_fi: Any) -> None:
    """Inside vLLM, warmplan tunes into exactly the file vLLM's helpers name for this
    config and rank, and vLLM's own loader accepts it."""
    from vllm.model_executor.warmup.flashinfer_autotune_cache import (
        flashinfer_autotune_cache_hash,
        flashinfer_autotune_root,
    )
    from vllm.model_executor.warmup.kernel_warmup import _load_shared_autotune_cache

    from warmplan.workers.vllm.common import VllmFlashInferBackend

    want = vllm_path(vllm_fi.config)
    assert want == (
        vllm_fi.tmp / "vllm-cache" / "flashinfer_autotune_cache" / Path(*WORKSPACE)
        / flashinfer_autotune_cache_hash(SimpleNamespace(vllm_config=vllm_fi.config))
        / "autotune_configs_dp0_rank3.json"
    )  # fmt: skip
    named = VllmFlashInferBackend("flashinfer", vllm_config=vllm_fi.config).vllm_cache_file(3)
    assert (named.path, named.source) == (str(want), "vllm")
    assert Path(named.root) == flashinfer_autotune_root()

    out, _ = run_step(vllm_fi.config)
    assert (out.decision, out.cache_path) == ("tune", str(want))
    assert want.is_file()

    vllm_fi.tuner._instance = None
    tuner = vllm_fi.tuner.get()
    group = SimpleNamespace(world_size=1)
    assert _load_shared_autotune_cache(want, tuner, group) is True
    assert sorted(tuner._file_configs) == sorted(
        k for k in json.loads(want.read_text()) if not k.startswith("_")
    )


def test_warmplan_reads_a_file_vllm_wrote(vllm_fi: Any) -> None:
    """A table vLLM's writer put in its layout is loaded by warmplan (every rank
    matching: no tuning forward), and its coverage reported."""
    from vllm.model_executor.warmup.flashinfer_autotune_cache import (
        write_flashinfer_autotune_cache,
    )

    from warmplan.autotune.table import parse_table

    table = {"_metadata": sys.modules["flashinfer.autotuner"]._collect_metadata()}
    for m in (64, 128, 256):
        table[str(("fake_gemm", "FakeRunner", ((m, 64), (64, 64))))] = ["FakeRunner", 1]
    path = vllm_path(vllm_fi.config)
    write_flashinfer_autotune_cache(path, json.dumps(table).encode())

    out, worker = run_step(vllm_fi.config)
    assert (out.decision, out.ran_run, out.cache_path) == ("load", False, str(path))
    assert worker.calls_named("dummy_run") == []
    assert out.table == parse_table(path.read_bytes())
    assert out.table.coverage == {"fake_gemm": [64, 128, 256]}
    assert len(vllm_fi.tuner.get()._file_configs) == 3


def test_a_foreign_vllm_file_is_ignored_naming_the_field(vllm_fi: Any) -> None:
    """A table in vLLM's layout tuned under another FlashInfer is ignored, saying
    which field differs, and tuned afresh (vLLM's own loader would only warn)."""
    from vllm.model_executor.warmup.flashinfer_autotune_cache import (
        write_flashinfer_autotune_cache,
    )

    meta = {
        **sys.modules["flashinfer.autotuner"]._collect_metadata(),
        "flashinfer_version": "0.6.9",
    }
    table = {
        "_metadata": meta,
        str(("fake_gemm", "FakeRunner", ((64, 64), (64, 64)))): ["FakeRunner", 1],
    }
    path = vllm_path(vllm_fi.config)
    write_flashinfer_autotune_cache(path, json.dumps(table).encode())
    out, _ = run_step(vllm_fi.config)
    assert out.decision == "tune"
    assert out.ignored == "ignored: flashinfer_version differs: file has '0.6.9', running '0.7.2'"
