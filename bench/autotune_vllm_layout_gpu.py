"""GPU check: FlashInfer autotune under policy together in vLLM's cache layout,
cold tune vs warm load, and the table loaded the way vLLM 0.34 loads it.

    python bench/autotune_vllm_layout_gpu.py PHASE DIR

PHASE: ``tune``/``load`` (policy together, vLLM's layout), ``vllm_load`` (vLLM's
loader), ``foreign`` (the file's cuda_version changed first), ``serve`` (load, then
M = 128 and 1000 outside autotune under warmplan's monitor: 1000 is not tuned),
``leader_tune``/``leader_load`` (policy leader, warmplan's file, run after load).

DIR is ``VLLM_FLASHINFER_AUTOTUNE_CACHE_DIR``. The worker's run is
``flashinfer.mm_bf16(a, b, backend="cublaslt")`` at M = 256, tuned at FlashInfer's
hybrid buckets up to 256 with round_up, as vLLM tunes. One JSON line per phase.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import structlog

from warmplan.autotune.flashinfer import FlashInferBackend
from warmplan.autotune.table import hybrid_buckets, parse_table
from warmplan.steps.autotune import ResolvedAutotune, run_autotune, vllm_file
from warmplan.testing import RecordingWorker
from warmplan.workers.base import Facts, WorkerInfo


class MmWorker(RecordingWorker):
    def __init__(self, backend: FlashInferBackend) -> None:
        super().__init__(platform="cpu", backends={backend.name: backend})
        import torch

        self.torch = torch
        self.b = torch.randn(2048, 1024, device="cuda", dtype=torch.bfloat16).t()
        self.mm_calls = 0

    @property
    def facts(self) -> Facts:
        return Facts(platform="cuda", device_capability=self.torch.cuda.get_device_capability())

    def describe(self) -> WorkerInfo:
        return WorkerInfo(engine="mm", device=self.torch.cuda.get_device_name(), versions={})

    def dummy_run(self, shape: Any, num_tokens: int, **kw: Any) -> None:
        import flashinfer

        a = self.torch.randn(num_tokens, 1024, device="cuda", dtype=self.torch.bfloat16)
        flashinfer.mm_bf16(a, self.b, backend="cublaslt")
        self.mm_calls += 1
        self.torch.cuda.synchronize()


def main() -> None:
    phase, d = sys.argv[1], sys.argv[2]
    os.environ["VLLM_FLASHINFER_AUTOTUNE_CACHE_DIR"] = d
    import torch

    backend = FlashInferBackend()
    cap = torch.cuda.get_device_capability()
    path = vllm_file(backend.version, cap, "gpu", 0).path
    info: dict[str, Any] = {"phase": phase, "path": path, "flashinfer": backend.version}
    if phase == "foreign":
        doc = json.loads(Path(path).read_text())
        doc["_metadata"]["cuda_version"] = "12.8"
        with open(path, "w") as f:
            json.dump(doc, f)
    if phase == "vllm_load":
        from flashinfer.autotuner import AutoTuner

        t = time.perf_counter()
        ok = AutoTuner.get().load_configs(path)  # as vLLM's _load_shared_autotune_cache
        info.update(
            loaded=ok,
            seconds=round(time.perf_counter() - t, 3),
            file_configs=len(AutoTuner.get()._file_configs),
        )
    else:
        leader = phase.startswith("leader")
        step = ResolvedAutotune(
            id="fi-mm",
            kind="autotune",
            requested=(256,),
            applied=(256,),
            clamp_to="max_num_batched_tokens",
            limit=256,
            shape="plain",
            backend="flashinfer",
            policy="leader" if leader else "together",
            timeout_s=300,
            cache_path=os.path.join(d, "warmplan", "fi.json") if leader else path,
            config_hash="gpu",
            identity="warmplan" if leader else "vllm",
            run_after_load=leader,
            passes=((256, hybrid_buckets(256)),),
            round_up=True,
        )
        worker = MmWorker(backend)
        t = time.perf_counter()
        out = run_autotune(step, worker, log=structlog.get_logger())
        info.update(
            seconds=round(time.perf_counter() - t, 3),
            decision=out.decision,
            ran_run=out.ran_run,
            ignored=out.ignored,
            reason=out.reason,
            mm_calls=worker.mm_calls,
            coverage=out.table.coverage if out.table else None,
            entries=out.table.entries if out.table else None,
        )
        if os.path.exists(path) and not leader:
            info["file_metadata"] = parse_table(Path(path).read_bytes()).metadata
        if phase == "serve":
            from warmplan.monitor import JitMonitor

            with JitMonitor() as monitor:
                for m in (128, 1000):
                    with monitor.attribute(f"serve[{m}]"):
                        worker.dummy_run("plain", m)
                info["served"] = {
                    f"serve[{m}]": monitor.compiles(f"serve[{m}]") for m in (128, 1000)
                }
                info["events"] = [e.describe() for e in monitor.events]
    print("RESULT " + json.dumps(info), flush=True)


if __name__ == "__main__":
    main()
