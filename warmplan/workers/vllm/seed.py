"""The seed's runner layout (``vllm.v1.worker.gpu_model_runner.GPUModelRunner``):
``input_batch.block_table`` with ``commit_block_table`` / ``compute_slot_mapping``,
``query_start_loc`` and ``positions`` buffers, and a ``_dummy_run`` that builds
mixed and single-prefill batches itself (``create_mixed_batch``,
``create_single_prefill``, ``profile_seq_lens``).

Calls are made the way the seed's DeepSeek-V4 warmup makes them
(``../shared/reference/vllm-kernel-warmup.txt``), so ``plans/dsv4.yaml`` through
this layout makes the same calls with the same arguments.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from warmplan.workers.base import SHAPES, Shape
from warmplan.workers.vllm.adapter import VllmWorker

# The `_dummy_run` keyword that turns each shape on; "plain" passes none.
_SHAPE_KEYWORD: dict[str, str | None] = {
    "mixed": "create_mixed_batch",
    "single_prefill": "create_single_prefill",
    "uniform_decode": "uniform_decode",
    "plain": None,
}


class SeedLayout(VllmWorker):
    """A worker whose runner has the seed's layout."""

    layout = "seed"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self._depth = 0  # preserve_state nesting
        self._saved_qsl: tuple[Any, torch.Tensor] | None = None

    def slot_mapping(self, num_tokens: int) -> None:
        """One request of ``num_tokens`` tokens through ``block_table.compute_slot_mapping``,
        exactly as the seed's ``_deepseek_v4_slot_mapping_warmup`` does for one size."""
        if num_tokens <= 0:
            raise ValueError(f"num_tokens must be >= 1: {num_tokens}")
        runner = self._runner
        with torch.inference_mode(), self._query_start_loc_saved():
            block_table = runner.input_batch.block_table
            device = runner.device
            positions_source = torch.arange(num_tokens, dtype=torch.int64, device=device)
            if hasattr(runner, "query_start_loc"):
                qsl = runner.query_start_loc
                qsl.np[0] = 0
                qsl.np[1] = num_tokens
                qsl.copy_to_gpu(2)
                query_start_loc = qsl.gpu[:2]
            else:
                query_start_loc = torch.tensor([0, num_tokens], dtype=torch.int32, device=device)
            saved_positions: torch.Tensor | None = None
            if hasattr(runner, "positions"):
                saved_positions = runner.positions[:num_tokens].clone()
                runner.positions[:num_tokens].copy_(positions_source)
                positions = runner.positions[:num_tokens]
            else:
                positions = positions_source
            try:
                block_table.commit_block_table(1)
                block_table.compute_slot_mapping(1, query_start_loc, positions)
            finally:
                if saved_positions is not None:
                    runner.positions[:num_tokens].copy_(saved_positions)

    def dummy_run_kwargs(
        self,
        shape: Shape,
        num_tokens: int,
        *,
        prior_context: int = 0,
        force_attention: bool = False,
    ) -> dict[str, Any]:
        """The keywords ``dummy_run`` passes to ``GPUModelRunner._dummy_run``: those
        the seed's warmup passes for that shape, and no default it leaves out."""
        if shape not in _SHAPE_KEYWORD:
            raise ValueError(
                f"unknown dummy-run shape {shape!r}; expected one of {', '.join(SHAPES)}"
            )
        if prior_context < 0:
            raise ValueError(f"prior_context must be >= 0: {prior_context}")
        kwargs: dict[str, Any] = {"num_tokens": num_tokens, "skip_eplb": True, "is_profile": True}
        if force_attention:
            kwargs["force_attention"] = True
        keyword = _SHAPE_KEYWORD[shape]
        if keyword is not None:
            kwargs[keyword] = True
        if prior_context:
            kwargs["profile_seq_lens"] = num_tokens + prior_context
        return kwargs

    def dummy_run(
        self,
        shape: Shape,
        num_tokens: int,
        *,
        prior_context: int = 0,
        force_attention: bool = False,
    ) -> None:
        """``runner._dummy_run(...)`` with the keywords of :meth:`dummy_run_kwargs`;
        a keyword the installed ``_dummy_run`` would not consume raises
        :class:`~warmplan.workers.vllm.common.UnsupportedByVllm`."""
        kwargs = self.dummy_run_kwargs(
            shape, num_tokens, prior_context=prior_context, force_attention=force_attention
        )
        self._check_keywords(kwargs, shape)
        self._refuse_collectives(f"a {shape!r} dummy run")
        with torch.inference_mode():
            self._runner._dummy_run(**kwargs)

    # -- state ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _query_start_loc_saved(self) -> Iterator[None]:
        # Inside preserve_state the first slot mapping snapshots query_start_loc[:2]
        # and preserve_state's exit restores it (vLLM snapshots once per fan of sizes
        # and restores after the last); outside, every call restores its own.
        runner = self._runner
        if not hasattr(runner, "query_start_loc"):
            yield
            return
        if self._depth > 0:
            if self._saved_qsl is None:
                self._saved_qsl = self._snapshot_qsl()
            yield
            return
        saved = self._snapshot_qsl()
        try:
            yield
        finally:
            self._restore_qsl(saved)

    def _snapshot_qsl(self) -> tuple[Any, torch.Tensor]:
        qsl = self._runner.query_start_loc
        return qsl.np[:2].copy(), qsl.gpu[:2].clone()

    def _restore_qsl(self, saved: tuple[Any, torch.Tensor]) -> None:
        saved_np, saved_gpu = saved
        qsl = self._runner.query_start_loc
        with torch.inference_mode():
            qsl.np[:2] = saved_np
            qsl.gpu[:2].copy_(saved_gpu)

    @contextlib.contextmanager
    def preserve_state(self) -> Iterator[None]:
        """Restore ``query_start_loc[:2]`` (host and device) on exit, also on error, if
        a slot mapping inside wrote it; ``positions`` is restored by each slot mapping.
        Dummy runs manage their own buffers, as in vLLM, and are not undone."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0 and self._saved_qsl is not None:
                saved, self._saved_qsl = self._saved_qsl, None
                self._restore_qsl(saved)
