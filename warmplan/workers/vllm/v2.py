"""vLLM 0.34's V2 runner (``vllm.v1.worker.gpu.model_runner.GPUModelRunner``).

Its ``_dummy_run(num_tokens, *args, skip_attn, uniform_decode, context_len,
skip_eplb, is_profile, ..., **kwargs)`` splits the tokens evenly over
``min(num_tokens, max_num_reqs)`` requests and drops unknown keywords, so the shapes
that are not an even split go through ``worker.execute_model`` with scheduler
outputs, as vLLM's own warmups build them:

=============== ==================================================================
shape           on the V2 runner
=============== ==================================================================
mixed           ``vllm.v1.worker.gpu.warmup.run_mixed_prefill_decode_warmup``, as
                vLLM's mixed-batch attention and DSv4 warmups call it (a plain
                dummy run when ``max_num_reqs < 2``, as they do)
single_prefill  one request of ``tokens`` scheduled tokens after ``prior_context``
                computed ones, then a step that finishes it (the way
                ``run_context_prefill_warmup`` builds a request with cached context)
uniform_decode  ``_dummy_run(n, uniform_decode=True)``, ``n`` rounded down to a
                multiple of ``decode_query_len`` (vLLM asserts it)
plain           ``_dummy_run(n)``; prior context through ``context_len``
=============== ==================================================================

``force_attention`` needs no keyword: the V2 dummy run builds attention metadata
unless ``skip_attn``. The slot-mapping step is skipped: the V2 runner computes slot
mappings with ``compute_slot_mappings`` over its whole padded buffer, and the
Triton kernel's integer arguments (buffer width, strides, CP rank) do not vary with
the token count, so a fan of sizes compiles nothing a first forward does not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from warmplan.log import get_logger
from warmplan.workers.base import SHAPES, Shape, StepUnsupported
from warmplan.workers.vllm.adapter import VllmWorker
from warmplan.workers.vllm.common import UnsupportedByVllm, vllm_version

log = get_logger(__name__)

SLOT_MAPPING_REASON = (
    "vLLM's V2 runner computes slot mappings over its whole padded buffer "
    "(BlockTables.compute_slot_mappings): the kernel does not specialise on the "
    "token count, so the first forward compiles the only variant"
)

REQ_PREFIX = "_warmplan_"


class V2Layout(VllmWorker):
    """A worker whose runner is vLLM's V2 ``GPUModelRunner``."""

    layout = "v2"

    def flags(self) -> dict[str, bool]:
        """The kernel-config switches, and what ``kernel_warmup()`` tests besides
        them: FlashInfer present, DeepGEMM supported and not ``skip``ped
        (``VLLM_DEEP_GEMM_WARMUP``), the FlashInfer PCIe IPC all-reduce switched on."""
        flags = super().flags()
        try:
            from vllm.utils.flashinfer import has_flashinfer

            flags["has_flashinfer"] = bool(has_flashinfer())
        except ImportError:
            pass
        try:
            import vllm.envs as envs
            from vllm.utils.deep_gemm import is_deep_gemm_supported

            flags["deep_gemm_warmup"] = bool(
                is_deep_gemm_supported() and envs.VLLM_DEEP_GEMM_WARMUP != "skip"
            )
            flags["flashinfer_pcie_ipc_allreduce"] = bool(
                envs.VLLM_ALLREDUCE_USE_FLASHINFER_PCIE_IPC
            )
        except (ImportError, AttributeError):
            pass
        return flags

    def slot_mapping(self, num_tokens: int) -> None:
        raise StepUnsupported(SLOT_MAPPING_REASON)

    def dummy_run(
        self,
        shape: Shape,
        num_tokens: int,
        *,
        prior_context: int = 0,
        force_attention: bool = False,
        randomize_inputs: bool = False,
    ) -> None:
        """``randomize_inputs``: random token ids instead of zeros, so that MoE routing
        is not degenerate while tuning (vLLM's FlashInfer autotune passes it); only the
        dummy-run shapes (plain, uniform decode) have ids to randomise."""
        if shape not in SHAPES:
            raise ValueError(
                f"unknown dummy-run shape {shape!r}; expected one of {', '.join(SHAPES)}"
            )
        if prior_context < 0:
            raise ValueError(f"prior_context must be >= 0: {prior_context}")
        if num_tokens <= 0:
            raise ValueError(f"num_tokens must be >= 1: {num_tokens}")
        self._refuse_collectives(f"a {shape!r} dummy run")
        extra = {"randomize_inputs": True} if randomize_inputs else {}
        if extra and shape in ("mixed", "single_prefill"):
            version = vllm_version()
            raise UnsupportedByVllm(
                f"vLLM {version}: a {shape!r} batch runs scheduled requests whose prompts "
                "are fixed token ids; randomize_inputs applies to plain and uniform_decode "
                "dummy runs (the shape vLLM's FlashInfer autotune uses is plain)",
                keyword="randomize_inputs",
                vllm_version=version,
            )
        with torch.inference_mode():
            if shape == "mixed":
                self._mixed(num_tokens, prior_context)
            elif shape == "single_prefill":
                self._single_prefill(num_tokens, prior_context)
            elif shape == "uniform_decode":
                self._uniform_decode(num_tokens, prior_context, **extra)
            else:
                self._plain(num_tokens, prior_context, **extra)

    # -- the shapes -----------------------------------------------------------------

    def _dummy(self, shape: str, **kwargs: Any) -> None:
        kwargs = {"skip_eplb": True, "is_profile": True, **kwargs}
        self._check_keywords(kwargs, shape)
        self._runner._dummy_run(**kwargs)

    def _plain(self, num_tokens: int, prior_context: int, **extra: Any) -> None:
        if prior_context:
            extra["context_len"] = prior_context
        self._dummy("plain", num_tokens=num_tokens, **extra)

    def _uniform_decode(self, num_tokens: int, prior_context: int, **extra: Any) -> None:
        query_len = int(getattr(self._runner, "decode_query_len", 1) or 1)
        rounded = num_tokens - num_tokens % query_len
        if rounded == 0:
            raise StepUnsupported(
                f"a uniform decode batch is a multiple of decode_query_len "
                f"({query_len}); {num_tokens} tokens round down to none"
            )
        if rounded != num_tokens:
            log.info(
                "vllm.decode_rounded", requested=num_tokens, ran=rounded, decode_query_len=query_len
            )
        if prior_context:
            extra["context_len"] = prior_context
        self._dummy("uniform_decode", num_tokens=rounded, uniform_decode=True, **extra)

    def _mixed(self, num_tokens: int, prior_context: int) -> None:
        if prior_context:
            version = vllm_version()
            raise UnsupportedByVllm(
                f"vLLM {version}: the V2 runner's mixed prefill+decode warmup "
                "(run_mixed_prefill_decode_warmup) starts every prefill from an empty "
                "prefix; a mixed batch with prior_context cannot be built",
                keyword="prior_context",
                vllm_version=version,
            )
        runner = self._runner
        if int(runner.max_num_reqs) < 2:
            # vLLM's own mixed warmups fall back to a plain dummy run here.
            self._dummy("mixed", num_tokens=num_tokens)
            return
        from vllm.v1.worker.gpu.warmup import run_mixed_prefill_decode_warmup

        worker = self._worker
        ran = run_mixed_prefill_decode_warmup(
            runner, worker.execute_model, worker.sample_tokens, num_tokens
        )
        if not ran:
            raise StepUnsupported(
                f"vLLM declined the mixed prefill+decode warmup of {num_tokens} tokens "
                "(a pooling model, fewer than 3 tokens, or too few KV cache blocks)"
            )

    def _single_prefill(self, num_tokens: int, prior_context: int) -> None:
        from vllm import SamplingParams
        from vllm.v1.core.sched.output import NewRequestData, SchedulerOutput
        from vllm.v1.worker.extensible_kv_cache import (
            ensure_kv_cache_blocks,
            num_committable_kv_blocks,
        )
        from vllm.v1.worker.gpu.warmup import _warmup_block_counter

        runner = self._runner
        if runner.is_pooling_model:
            raise StepUnsupported("a pooling model samples no token after a prefill")
        total = prior_context + num_tokens
        max_model_len = int(runner.max_model_len)
        if total > max_model_len - 1:
            raise ValueError(
                f"a prefill of {num_tokens} tokens after {prior_context} of prior context "
                f"needs max_model_len > {total} (room to sample one token); the worker's "
                f"is {max_model_len}"
            )
        block_count = _warmup_block_counter(runner)
        specs = [g.kv_cache_spec for g in runner.kv_cache_config.kv_cache_groups]
        counts = [block_count(total, spec) for spec in specs]
        available = num_committable_kv_blocks(runner) - 1  # block 0 is the null block
        if sum(counts) > available:
            raise ValueError(
                f"a prefill of {total} tokens needs {sum(counts)} KV cache blocks; "
                f"{available} can be addressed"
            )
        ensure_kv_cache_blocks(runner, 1 + sum(counts))
        next_block = 1
        block_ids: list[list[int]] = []
        for count in counts:
            block_ids.append(list(range(next_block, next_block + count)))
            next_block += count
        vocab = int(runner.model_config.get_vocab_size())
        token_ids = [i % vocab for i in range(total)]
        req_id = f"{REQ_PREFIX}prefill_"
        step = SchedulerOutput.make_empty()
        step.num_spec_tokens_to_schedule = runner.num_speculative_steps
        step.scheduled_new_reqs = [
            NewRequestData(
                req_id=req_id,
                prompt_token_ids=token_ids,
                mm_features=[],
                sampling_params=SamplingParams(max_tokens=1, temperature=0.0),
                pooling_params=None,
                block_ids=tuple(block_ids),
                num_computed_tokens=prior_context,
                lora_request=None,
                prefill_token_ids=token_ids,
            )
        ]
        step.num_scheduled_tokens = {req_id: num_tokens}
        step.total_num_scheduled_tokens = num_tokens
        finish = SchedulerOutput.make_empty()
        finish.finished_req_ids = {req_id}
        with self._kv_connector_off():
            try:
                self._run_step(step, sample=True)
            finally:
                self._run_step(finish, sample=False)

    # -- helpers ----------------------------------------------------------------------

    def _run_step(self, scheduler_output: Any, *, sample: bool) -> None:
        """One synthetic step through the worker (pipeline-parallel sends included),
        waited for: the runner reuses staging buffers two steps later."""
        self._worker.execute_model(scheduler_output)
        if sample:
            self._worker.sample_tokens(None)
        self.synchronize()

    @contextlib.contextmanager
    def _kv_connector_off(self) -> Iterator[None]:
        connector = getattr(self._runner, "kv_connector", None)
        if connector is None:
            yield
            return
        connector.set_disabled(True)
        try:
            yield
        finally:
            connector.set_disabled(False)

    @contextlib.contextmanager
    def preserve_state(self) -> Iterator[None]:
        """Nothing to snapshot: every V2 step goes through vLLM's own request
        lifecycle, and each synthetic request is finished before the step returns,
        also when it raises."""
        yield
