"""vLLM's environment variables, read lazily from os.environ as vLLM does."""

import os


def _bool(name, default):
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


def __getattr__(name):
    if name == "VLLM_ENABLE_DEEPSEEK_V4_SPARSE_MLA_WARMUP":
        return _bool(name, True)
    if name == "VLLM_USE_DEEP_GEMM":
        return _bool(name, False)
    if name == "VLLM_DISABLE_FLASHINFER_AUTOTUNE_CACHE":
        return _bool(name, False)
    if name == "VLLM_FLASHINFER_AUTOTUNE_CACHE_DIR":
        return os.environ.get(name)
    if name == "VLLM_CACHE_ROOT":
        return os.environ.get(name, os.path.expanduser("~/.cache/vllm"))
    raise AttributeError(name)
