"""vLLM's world group (``vllm.distributed.parallel_state.get_world_group()``) as a
rank world, so that warmplan's collectives inside a vLLM worker go through the
group vLLM set up. Imports vLLM nowhere: the adapter hands the group in."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import torch

from warmplan.world import WorldError, collective_failure, ranks_text

__all__ = ["VllmWorld"]


class VllmWorld:
    """vLLM's world group (``get_world_group()``) as a :class:`warmplan.world.World`.

    vLLM's ``GroupCoordinator`` takes no per-call timeout. ``barrier`` therefore uses
    ``torch.distributed.monitored_barrier`` on the group's gloo ``cpu_group`` when
    torch.distributed is up, which does honour ``timeout_s`` and names the ranks that
    did not arrive; otherwise it calls the group's own ``barrier()``. Broadcasts go
    through the group's ``broadcast_object`` and are bounded by the process group's
    own timeout, set when vLLM created it. A failing collective raises
    :class:`WorldError` (:class:`WorldTimeout` when it timed out) naming the ranks.
    """

    def __init__(self, group: Any) -> None:
        self._group = group

    @property
    def rank(self) -> int:
        return int(self._group.rank_in_group)

    @property
    def local_rank(self) -> int:
        return int(self._group.local_rank)

    @property
    def world_size(self) -> int:
        return int(self._group.world_size)

    @property
    def process_group(self) -> Any | None:
        """The group's gloo ``cpu_group`` (FlashInfer's tuning reduces over it), if any."""
        return self._torch_cpu_group()

    def _torch_cpu_group(self) -> Any | None:
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return None
        cpu_group = getattr(self._group, "cpu_group", None)
        return cpu_group if isinstance(cpu_group, dist.ProcessGroup) else None

    def _failed(
        self, what: str, exc: BaseException, *, waiting_for: str, timeout_s: float, t0: float
    ) -> WorldError:
        text = str(exc)
        return collective_failure(
            what,
            rank=self.rank,
            waiting_for=waiting_for,
            timeout_s=timeout_s,
            elapsed=time.monotonic() - t0,
            timed_out="timed out" in text.lower() or "timeout" in text.lower(),
            cause=text,
        )

    def _others(self) -> str:
        return ranks_text(r for r in range(self.world_size) if r != self.rank)

    def broadcast_bytes(
        self, data: bytes | None, *, src: int = 0, timeout_s: float
    ) -> bytes | None:
        if self.world_size == 1:
            return data
        t0 = time.monotonic()
        try:
            out = self._group.broadcast_object(data if self.rank == src else None, src=src)
        except Exception as exc:
            raise self._failed(
                f"broadcast from rank {src}",
                exc,
                waiting_for=f"rank {src}",
                timeout_s=timeout_s,
                t0=t0,
            ) from exc
        if out is not None and not isinstance(out, bytes):
            raise WorldError(
                f"rank {self.rank}: broadcast from rank {src} returned {type(out).__name__}, expected bytes or None"
            )
        return out

    def all_gather_str(self, value: str, *, timeout_s: float) -> list[str]:
        if self.world_size == 1:
            return [value]
        cpu_group = self._torch_cpu_group()
        t0 = time.monotonic()
        try:
            if cpu_group is not None:
                out: list[Any] = [None] * self.world_size
                torch.distributed.all_gather_object(out, value, group=cpu_group)
                return [str(v) for v in out]
            # No torch.distributed group to hand: one broadcast per rank, in rank order.
            return [
                str(self._group.broadcast_object(value if r == self.rank else None, src=r))
                for r in range(self.world_size)
            ]
        except Exception as exc:
            raise self._failed(
                "all_gather", exc, waiting_for=self._others(), timeout_s=timeout_s, t0=t0
            ) from exc

    def barrier(self, *, timeout_s: float) -> None:
        if self.world_size == 1:
            return
        cpu_group = self._torch_cpu_group()
        t0 = time.monotonic()
        try:
            if cpu_group is not None and torch.distributed.get_backend(cpu_group) == "gloo":
                torch.distributed.monitored_barrier(
                    group=cpu_group, timeout=timedelta(seconds=timeout_s), wait_all_ranks=True
                )
            else:
                self._group.barrier()
        except Exception as exc:
            raise self._failed(
                "barrier", exc, waiting_for=self._others(), timeout_s=timeout_s, t0=t0
            ) from exc
