"""vLLM's ``GPUModelRunner``: the attributes warmup reads and a recording ``_dummy_run``."""

import functools
from types import SimpleNamespace

import torch

from vllm._fake import STATE, CpuGpuBuffer, record
from vllm.v1.worker.block_table import BlockTable


class _Backend:
    def __init__(self, name):
        self._name = name

    def get_name(self):
        if self._name is None:
            raise NotImplementedError
        return self._name


def _recorded(fn):
    """Record exactly the arguments the caller passed (defaults left out), then run."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        record(
            "runner",
            "_dummy_run",
            {
                "args": list(args),
                "kwargs": dict(kwargs),
                "tuning": STATE.tuning[-1] if STATE.tuning else None,
            },
        )
        with torch.inference_mode():  # vLLM decorates _dummy_run with inference_mode
            return fn(self, *args, **kwargs)

    return wrapper


class GPUModelRunner:
    def __init__(
        self,
        vllm_config,
        *,
        max_num_tokens=8192,
        backends=("V4_FLASHMLA_SPARSE",),
        pooling=False,
        has_query_start_loc=True,
        has_positions=True,
        device=None,
    ):
        self.vllm_config = vllm_config
        self.scheduler_config = vllm_config.scheduler_config
        self.model_config = vllm_config.model_config
        self.device = torch.device("cpu") if device is None else device
        size = max_num_tokens or 8192
        if max_num_tokens is not None:
            self.max_num_tokens = max_num_tokens
        self.max_num_reqs = vllm_config.scheduler_config.max_num_seqs
        self.is_pooling_model = pooling
        self.attn_groups = [[SimpleNamespace(backend=_Backend(name))] for name in backends]
        self.input_batch = SimpleNamespace(block_table=BlockTable(self))
        if has_query_start_loc:
            self.query_start_loc = CpuGpuBuffer(
                self.max_num_reqs + 1, dtype=torch.int32, device=self.device, name="query_start_loc"
            )
            # Recognisable contents: a leak or a missed restore changes them.
            self.query_start_loc.np[:4] = [7, 11, 13, 17]
            self.query_start_loc.gpu[:4] = torch.tensor([7, 11, 13, 17], dtype=torch.int32)
        if has_positions:
            self.positions = torch.arange(size, dtype=torch.int64, device=self.device) * 3 + 5

    @_recorded
    def _dummy_run(
        self,
        num_tokens,
        cudagraph_runtime_mode=None,
        force_attention=False,
        uniform_decode=False,
        allow_microbatching=True,
        skip_eplb=False,
        is_profile=False,
        create_mixed_batch=False,
        remove_lora=True,
        is_graph_capturing=False,
        num_active_loras=0,
        profile_seq_lens=None,
        create_single_prefill=False,
    ):
        # A real dummy run prepares its own batch in the runner's buffers and
        # leaves it there; do the same so that restores are observable.
        qsl = getattr(self, "query_start_loc", None)
        if qsl is not None:
            qsl.np[:3] = [0, 1, num_tokens]
            qsl.gpu[:3] = torch.tensor([0, 1, num_tokens], dtype=torch.int32)
        return None, None

    def capture_model(self):
        record("vllm", "capture_model", {})
        # Graph capture compiles too (here: the fake forward at its capture size), and
        # it runs after kernel warmup: a JIT monitor must be armed only after it.
        _run_forward(CAPTURE_SIZE)
        return 0

    def execute_model(self, scheduler_output=None):
        """A serving step of ``scheduler_output`` tokens (an int here): the fake
        forward, torch.compile'd with static shapes, compiles once per new size."""
        record("runner", "execute_model", {"num_tokens": scheduler_output})
        return _run_forward(int(scheduler_output or CAPTURE_SIZE))

    def get_model(self):
        return SimpleNamespace()


CAPTURE_SIZE = 8


def _fake_forward_impl(x):
    return (x * 2 + 1).sum()


_fake_forward = torch.compile(_fake_forward_impl, dynamic=False)


def _run_forward(num_tokens):
    # The tests report an accelerator through torch.accelerator.is_available (vLLM's
    # warmup asks it); dynamo asks it too when it compiles, so answer truly here.
    accel = torch.accelerator
    reported = accel.is_available
    accel.is_available = torch.cuda.is_available
    try:
        return _fake_forward(torch.zeros(num_tokens))
    finally:
        accel.is_available = reported
