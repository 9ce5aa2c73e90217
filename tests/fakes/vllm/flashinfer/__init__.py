"""The parts of FlashInfer vLLM's warmup imports. ``sparse_mla_sm120_decode_dsv4_autotune``
exists only while ``vllm._fake.STATE.flashinfer_has_dsv4_decode_autotune`` is true."""

import contextlib
import json

__version__ = "0.0.0+warmplan.fake"


@contextlib.contextmanager
def _sparse_mla_sm120_decode_dsv4_autotune(cache_path=None):
    from vllm._fake import STATE, record

    name = "flashinfer.sparse_mla_sm120_decode_dsv4_autotune"
    record("tuning", "enter", {"context": name, "cache": cache_path})
    STATE.tuning.append(name)
    try:
        yield
    finally:
        STATE.tuning.pop()
        if cache_path is not None and STATE.flashinfer_writes_cache:
            with open(cache_path, "w") as f:
                json.dump({"tuned_by": name, "ops": ["sparse_mla_sm120_decode"]}, f)
        record("tuning", "exit", {"context": name, "cache": cache_path})


def __getattr__(name):
    from vllm._fake import STATE

    if (
        name == "sparse_mla_sm120_decode_dsv4_autotune"
        and STATE.flashinfer_has_dsv4_decode_autotune
    ):
        return _sparse_mla_sm120_decode_dsv4_autotune
    raise AttributeError(name)
