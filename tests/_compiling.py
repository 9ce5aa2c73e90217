"""A serving worker whose forward really compiles (torch.compile, aot_eager: fast on CPU)."""

from __future__ import annotations

from typing import Any

import torch

from warmplan.testing import RecordingWorker
from warmplan.workers.base import Batch, Shape


class CompilingWorker(RecordingWorker):
    """A serving worker whose forward is torch.compile'd at static sizes 1, 16, 64."""

    SIZES = (1, 16, 64)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(
            max_num_tokens=64, max_num_batched_tokens=64, max_num_seqs=16, platform="cpu", **kwargs
        )

        def forward(x: torch.Tensor) -> torch.Tensor:
            return (x * 2).sin().sum()

        self._forward = torch.compile(forward, backend="aot_eager", dynamic=False)

    def padded_num_tokens(self, n: int) -> int:
        return next((s for s in self.SIZES if s >= n), n)

    def dummy_run(
        self,
        shape: Shape,
        num_tokens: int,
        *,
        prior_context: int = 0,
        force_attention: bool = False,
    ) -> None:
        super().dummy_run(
            shape, num_tokens, prior_context=prior_context, force_attention=force_attention
        )
        self._forward(torch.ones(self.padded_num_tokens(num_tokens)))

    def execute(self, batch: Batch) -> None:
        super().execute(batch)
        self._forward(torch.ones(self.padded_num_tokens(batch.num_tokens)))
