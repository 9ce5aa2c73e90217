"""vLLM's GPU ``Worker``: it imports ``kernel_warmup`` by name, as the real one does,
so a plugin that wants to wrap it must patch this module's attribute."""

from types import SimpleNamespace

from vllm._fake import record
from vllm.model_executor.warmup.kernel_warmup import kernel_warmup


def make_vllm_config(
    *,
    max_num_batched_tokens=8192,
    max_num_seqs=256,
    enable_flashinfer_autotune=None,
    has_kernel_config_flag=True,
    model="deepseek-ai/DeepSeek-V4-Fake",
    tensor_parallel_size=1,
    pipeline_parallel_size=1,
):
    kernel_config = SimpleNamespace()
    if has_kernel_config_flag:
        kernel_config.enable_flashinfer_autotune = enable_flashinfer_autotune
    return SimpleNamespace(
        scheduler_config=SimpleNamespace(
            max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs
        ),
        model_config=SimpleNamespace(
            model=model, dtype="bfloat16", max_model_len=32768, quantization=None, revision=None
        ),
        parallel_config=SimpleNamespace(
            tensor_parallel_size=tensor_parallel_size,
            pipeline_parallel_size=pipeline_parallel_size,
            data_parallel_size=1,
            enable_expert_parallel=False,
        ),
        cache_config=SimpleNamespace(block_size=64, cache_dtype="auto"),
        compilation_config=SimpleNamespace(cudagraph_capture_sizes=[1, 2, 4, 8]),
        kernel_config=kernel_config,
    )


class Worker:
    def __init__(self, vllm_config, model_runner, rank=0, local_rank=0):
        self.vllm_config = vllm_config
        self.scheduler_config = vllm_config.scheduler_config
        self.model_config = vllm_config.model_config
        self.parallel_config = vllm_config.parallel_config
        self.model_runner = model_runner
        self.rank = rank
        self.local_rank = local_rank

    def get_model(self):
        return self.model_runner.get_model()

    def compile_or_warm_up_model(self):
        record("vllm", "compile_or_warm_up_model", {})
        kernel_warmup(self)
        self.model_runner.capture_model()

    def execute_model(self, scheduler_output=None):
        record("vllm", "execute_model", {})
        return self.model_runner.execute_model(scheduler_output)
