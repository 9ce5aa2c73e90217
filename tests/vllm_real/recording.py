"""A recording vLLM 0.34 worker and V2 model runner, for the real vLLM package on a
CPU: shaped like ``vllm.v1.worker.gpu_worker.Worker`` and
``vllm.v1.worker.gpu.model_runner.GPUModelRunner`` where vLLM 0.34's own warmup
functions and warmplan's V2 adapter touch them, with vLLM's real records
(``SchedulerOutput``, ``NewRequestData``, ``FullAttentionSpec``).

Every ``_dummy_run``, ``execute_model`` (the scheduler output reduced to what makes
the batch: requests, scheduled and computed tokens, block ids), ``sample_tokens``,
KV-connector toggle and JIT-registry warmup is recorded in ``events``, so that
vLLM's function and warmplan's plan run on two fresh workers can be compared call
for call. Only the model forward is missing: ``vllm._C`` is not on a CPU install.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch

Event = tuple[str, Any]


def _summary(scheduler_output: Any) -> dict[str, Any]:
    """What a scheduler output asks the runner to do, in plain data."""
    new = [
        {
            "req_id": r.req_id,
            "prompt_len": len(r.prompt_token_ids or ()),
            "num_computed_tokens": r.num_computed_tokens,
            "block_ids": [list(b) for b in r.block_ids],
            "max_tokens": getattr(r.sampling_params, "max_tokens", None),
        }
        for r in scheduler_output.scheduled_new_reqs
    ]
    cached = scheduler_output.scheduled_cached_reqs
    return {
        "new": new,
        "cached": list(getattr(cached, "req_ids", [])),
        "cached_computed": list(getattr(cached, "num_computed_tokens", [])),
        "scheduled": dict(scheduler_output.num_scheduled_tokens),
        "total": scheduler_output.total_num_scheduled_tokens,
        "finished": sorted(scheduler_output.finished_req_ids),
    }


class _Backend:
    def __init__(self, name: str) -> None:
        self._name = name

    def get_name(self) -> str:
        return self._name


@dataclass
class Recorder:
    events: list[Event] = field(default_factory=list)

    def add(self, kind: str, data: Any = None) -> None:
        self.events.append((kind, data))


class RecordingRunner:
    """The V2 runner's attributes that warmup reads; the layout is detected by
    ``block_tables`` and ``input_buffers``."""

    def __init__(self, rec: Recorder, config: Any, *, backends: tuple[str, ...]) -> None:
        from vllm.v1.kv_cache_interface import FullAttentionSpec

        self._rec = rec
        self.vllm_config = config
        self.model_config = config.model_config
        self.scheduler_config = config.scheduler_config
        self.cache_config = config.cache_config
        self.speculative_config = None
        self.speculator = None
        self.lora_config = None
        self.max_num_reqs = config.scheduler_config.max_num_seqs
        self.max_num_tokens = config.scheduler_config.max_num_batched_tokens
        self.max_model_len = config.model_config.max_model_len
        self.decode_query_len = 1
        self.num_speculative_steps = 0
        self.is_pooling_model = False
        self.is_encoder_decoder = False
        self.extensible_kv_cache = None
        self.adaptive_verification = None
        self.rejection_sampler = None
        self.device = torch.device("cpu")
        self.block_tables = SimpleNamespace(redirect_writes_to_null_block=False)
        self.input_buffers = SimpleNamespace()
        self.model_state = SimpleNamespace(max_encoder_len=0)
        spec = FullAttentionSpec(block_size=16, num_kv_heads=1, head_size=64, dtype=torch.bfloat16)
        self.kv_cache_config = SimpleNamespace(
            num_blocks=config.num_gpu_blocks,
            kv_cache_groups=[SimpleNamespace(kv_cache_spec=spec)],
        )
        self.attn_groups = [[SimpleNamespace(backend=_Backend(name))] for name in backends]
        self.kv_connector = SimpleNamespace(set_disabled=lambda off: rec.add("kv_connector", off))
        self.jit_warmup_registry = SimpleNamespace(warmup=lambda: rec.add("jit_warmup_registry"))
        self._model = torch.nn.Module()

    def get_model(self) -> torch.nn.Module:
        return self._model

    def _dummy_run(
        self,
        num_tokens: int,
        *args: Any,
        skip_attn: bool = False,
        uniform_decode: bool = False,
        context_len: int = 0,
        skip_eplb: bool = False,
        is_profile: bool = False,
        valid_dummy_state_slots: bool = False,
        randomize_inputs: bool = False,
        **kwargs: Any,
    ) -> tuple[None, None]:
        if uniform_decode:
            assert num_tokens % self.decode_query_len == 0
        self._rec.add(
            "dummy_run",
            {
                "num_tokens": num_tokens,
                "skip_attn": skip_attn,
                "uniform_decode": uniform_decode,
                "context_len": context_len,
                "skip_eplb": skip_eplb,
                "is_profile": is_profile,
                "randomize_inputs": randomize_inputs,
                "swallowed": sorted(kwargs),
            },
        )
        return None, None


class RecordingWorker:
    """``Worker.execute_model`` / ``sample_tokens`` record what they were given."""

    def __init__(self, rec: Recorder, config: Any, *, backends: tuple[str, ...]) -> None:
        self.vllm_config = config
        self.model_config = config.model_config
        self.scheduler_config = config.scheduler_config
        self.cache_config = config.cache_config
        self.device = torch.device("cpu")
        self.model_runner = RecordingRunner(rec, config, backends=backends)
        self._rec = rec

    def get_model(self) -> torch.nn.Module:
        return self.model_runner.get_model()

    def execute_model(self, scheduler_output: Any) -> None:
        self._rec.add("execute_model", _summary(scheduler_output))

    def sample_tokens(self, grammar_output: Any) -> None:
        self._rec.add("sample_tokens", grammar_output is not None)


def make_config(
    *,
    max_num_seqs: int = 64,
    max_num_batched_tokens: int = 8192,
    max_model_len: int = 16384,
    num_gpu_blocks: int = 4096,
    enable_flashinfer_autotune: bool = True,
    enable_jit_warmup: bool = True,
    model_type: str = "deepseek_v4",
) -> Any:
    """The parts of a ``VllmConfig`` 0.34's warmup reads, as plain records."""
    model_config = SimpleNamespace(
        max_model_len=max_model_len,
        model="deepseek-ai/DeepSeek-V4",
        hf_config=SimpleNamespace(model_type=model_type, architectures=["DeepseekV4ForCausalLM"]),
        hf_text_config=SimpleNamespace(model_type=model_type),
        get_vocab_size=lambda: 129280,
        is_multimodal_model=False,
    )
    return SimpleNamespace(
        model_config=model_config,
        scheduler_config=SimpleNamespace(
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens
        ),
        cache_config=SimpleNamespace(
            block_size=16, enable_extensible_kv_cache=False, cache_dtype="auto"
        ),
        parallel_config=SimpleNamespace(decode_context_parallel_size=1),
        kernel_config=SimpleNamespace(
            enable_flashinfer_autotune=enable_flashinfer_autotune,
            enable_jit_warmup=enable_jit_warmup,
            enable_cutedsl_warmup=False,
            enable_rocm_aiter_gemm_warmup=False,
        ),
        compilation_config=SimpleNamespace(cudagraph_capture_sizes=[1, 2, 4, 8]),
        attention_config=SimpleNamespace(hisparse_config=None),
        num_lookahead_tokens=0,
        num_gpu_blocks=num_gpu_blocks,
        use_flashinfer_replayssm=False,
        watermark_config=None,
        is_mm_encoder_only=False,
    )


def make_worker(
    backends: tuple[str, ...] = ("FLASHMLA_SPARSE_DSV4",),
    *,
    rec: Recorder | None = None,
    **config: Any,
) -> tuple[RecordingWorker, Recorder]:
    """A fresh worker recording into ``rec`` (a new recorder by default)."""
    rec = Recorder() if rec is None else rec
    return RecordingWorker(rec, make_config(**config), backends=backends), rec


def normalised(events: list[Event], prefixes: tuple[str, ...]) -> list[Event]:
    """``events`` with request ids stripped of the warmup's own prefix (vLLM's DSv4
    warmup names its requests ``_sparse_mla_v2_warmup_*``, the mixed-batch warmup
    ``_v2_mixed_warmup_*``, warmplan keeps vLLM's default)."""

    def strip(value: Any) -> Any:
        if isinstance(value, str):
            for prefix in prefixes:
                if value.startswith(prefix):
                    return "<req>" + value[len(prefix) :]
            return value
        if isinstance(value, dict):
            return {strip(k): strip(v) for k, v in value.items()}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return [(kind, strip(data)) for kind, data in events]


def single_rank_group(rec: Recorder | None = None) -> Any:
    """A one-rank ``GroupCoordinator`` stand-in (world, TP and PP groups)."""

    def barrier() -> None:
        if rec is not None:
            rec.add("barrier")

    return SimpleNamespace(
        rank_in_group=0,
        world_size=1,
        local_rank=0,
        cpu_group=None,
        barrier=barrier,
        broadcast_object=lambda obj=None, src=0: obj,
        cpu_all_reduce_=lambda tensor: tensor,
    )


def install_single_rank_groups(monkeypatch: Any) -> None:
    """vLLM's world, TP and PP groups as one rank, as a single-GPU server has them."""
    from vllm.distributed import parallel_state

    for name in ("_WORLD", "_TP", "_PP"):
        monkeypatch.setattr(parallel_state, name, single_rank_group(), raising=False)


def record_synchronize(monkeypatch: Any, rec_of: Any) -> None:
    """``torch.accelerator.synchronize`` recorded as a ``sync`` event on whichever
    recorder ``rec_of()`` returns (and ``is_available`` true, as on a GPU)."""
    monkeypatch.setattr(torch.accelerator, "synchronize", lambda *a, **k: rec_of().add("sync"))
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
