"""vLLM's ``kernel_warmup`` module with the names vLLM has. Each part records that
it was entered and, when a test installed vLLM's behaviour
(``vllm._fake.STATE.kernel_warmup_impl``, i.e. ``tests/vllm_reference.py``), runs it."""

from vllm._fake import STATE, record
from vllm.platforms import current_platform
from vllm.utils.flashinfer import has_flashinfer


def _impl(name):
    impl = STATE.kernel_warmup_impl
    return None if impl is None else getattr(impl, name)


def _deepseek_v4_sparse_mla_attention_warmup(worker):
    record("vllm", "_deepseek_v4_sparse_mla_attention_warmup", {})
    fn = _impl("deepseek_v4_sparse_mla_attention_warmup")
    if fn is not None:
        fn(worker)


def _deepseek_v4_request_prep_warmup(worker):
    record("vllm", "_deepseek_v4_request_prep_warmup", {})
    fn = _impl("deepseek_v4_request_prep_warmup")
    if fn is not None:
        fn(worker)


def flashinfer_autotune(runner):
    record("vllm", "flashinfer_autotune", {})
    fn = _impl("flashinfer_autotune")
    if fn is not None:
        fn(runner)


def deep_gemm_warmup(worker):
    record("vllm", "deep_gemm_warmup", {})


def kernel_warmup(worker):
    record("vllm", "kernel_warmup", {})
    _deepseek_v4_sparse_mla_attention_warmup(worker)
    _deepseek_v4_request_prep_warmup(worker)
    deep_gemm_warmup(worker)
    enable = worker.vllm_config.kernel_config.enable_flashinfer_autotune
    if enable is False:
        pass
    elif has_flashinfer() and current_platform.has_device_capability(90):
        flashinfer_autotune(worker.model_runner)
