"""vLLM's FlashInfer helpers: ``has_flashinfer`` and the ``autotune`` context."""

import contextlib
import json

from vllm._fake import STATE, record


def has_flashinfer():
    return STATE.flashinfer_available


@contextlib.contextmanager
def autotune(tune_mode=True, cache=None):
    """FlashInfer's ``autotuner.autotune`` as vLLM re-exports it; with ``cache`` the
    tuned configs are written there when the context exits."""
    name = "flashinfer.autotune" if tune_mode else "flashinfer.autotune(tune_mode=False)"
    record("tuning", "enter", {"context": name, "cache": cache})
    STATE.tuning.append(name)
    try:
        yield
    finally:
        STATE.tuning.pop()
        if cache is not None and tune_mode and STATE.flashinfer_writes_cache:
            with open(cache, "w") as f:
                json.dump({"tuned_by": name, "ops": ["fake_gemm"]}, f)
        record("tuning", "exit", {"context": name, "cache": cache})
