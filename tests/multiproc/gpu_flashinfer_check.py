"""GPU check (not collected by pytest): FlashInfer autotune through warmplan, end to end.

    python tests/multiproc/gpu_flashinfer_check.py tune DIR   # process 1: tune + write
    python tests/multiproc/gpu_flashinfer_check.py load DIR   # process 2: load, no tuning

The worker's run is ``flashinfer.mm_bf16(a, b, backend="cublaslt")`` for M = tokens.
Prints one JSON line per phase.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import structlog

from warmplan.autotune.flashinfer import FlashInferBackend
from warmplan.steps.autotune import ResolvedAutotune, run_autotune
from warmplan.testing import RecordingWorker
from warmplan.workers.base import Facts, WorkerInfo


class MmWorker(RecordingWorker):
    def __init__(self, backend: FlashInferBackend) -> None:
        super().__init__(platform="cpu", backends={backend.name: backend})
        import torch

        self.torch = torch
        self.b = torch.randn(
            2048, 1024, device="cuda", dtype=torch.bfloat16
        ).t()  # (K, N) column-major
        self.mm_calls = 0

    @property
    def facts(self) -> Facts:
        return Facts(platform="cuda", device_capability=self.torch.cuda.get_device_capability())

    def describe(self) -> WorkerInfo:
        return WorkerInfo(engine="mm", device=self.torch.cuda.get_device_name(), versions={})

    def dummy_run(
        self, shape: Any, num_tokens: int, *, prior_context: int = 0, force_attention: bool = False
    ) -> None:
        import flashinfer

        a = self.torch.randn(num_tokens, 1024, device="cuda", dtype=self.torch.bfloat16)
        out = flashinfer.mm_bf16(a, self.b, backend="cublaslt")
        ref = a.float() @ self.b.float()
        assert (out.float() - ref).abs().max().item() < 1.0
        self.mm_calls += 1
        self.torch.cuda.synchronize()


def main() -> None:
    phase, d = sys.argv[1], sys.argv[2]
    backend = FlashInferBackend()
    info: dict[str, Any] = {
        "phase": phase,
        "version": backend.version,
        "unavailable": backend.unavailable_reason(),
    }
    if info["unavailable"] is None:
        step = ResolvedAutotune(
            id="fi-mm",
            kind="autotune",
            requested=(256,),
            applied=(256,),
            clamp_to="max_num_batched_tokens",
            limit=256,
            shape="plain",
            backend="flashinfer",
            policy="leader",
            timeout_s=120,
            cache_path=os.path.join(d, "fi.json"),
            config_hash="gpu",
        )
        worker = MmWorker(backend)
        t = time.perf_counter()
        out = run_autotune(step, worker, log=structlog.get_logger())
        info.update(
            seconds=round(time.perf_counter() - t, 3),
            decision=out.decision,
            fingerprint=out.fingerprint,
            reason=out.reason,
            mm_calls=worker.mm_calls,
            metadata=dict(backend.metadata()),
        )
        from flashinfer.autotuner import AutoTuner

        tuner = AutoTuner.get()
        info["file_configs"] = len(getattr(tuner, "_file_configs", {}) or {})
        if os.path.exists(step.cache_path or ""):
            import base64

            with open(step.cache_path or "") as f:
                doc = json.load(f)
            payload = json.loads(base64.b64decode(doc["payload_b64"]))
            info["payload_keys"] = [k for k in payload if not k.startswith("_")][:4]
            info["payload_metadata"] = payload.get("_metadata")
    print("RESULT " + json.dumps(info), flush=True)


if __name__ == "__main__":
    main()
