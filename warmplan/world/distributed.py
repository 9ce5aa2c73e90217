"""The torch.distributed world: ``TorchWorld`` implements ``warmplan.world.World``.

Bytes travel as a length tensor and a ``uint8`` tensor over a gloo group (the default
group on CPU; on CUDA the default group is NCCL and a gloo group is made beside it),
so no pickle and no numpy are involved.

Timeouts: every collective passes its own ``timeout_s`` to gloo through the options
object (``BroadcastOptions.timeout`` etc.), which gloo honours per call; barriers use
``monitored_barrier``. Before each collective a rank marks its arrival in the
rendezvous store, so a failure can name the ranks that never arrived; a broadcast
names its source. A dead peer usually surfaces at once as a closed connection
(``WorldError``); a hung one as ``WorldTimeout`` after ``timeout_s``.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from warmplan.world import (
    JoinError,
    WorldError,
    collective_failure,
    launch_env,
    ranks_text,
)

T = TypeVar("T")

_ARRIVE_PREFIX = "warmplan/arrive"


def _td(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=max(0.001, float(seconds)))


class TorchWorld:
    """A ``World`` on an initialised torch.distributed default group."""

    def __init__(self, *, local_rank: int, gloo_group: Any = None) -> None:
        if not dist.is_initialized():
            raise WorldError("torch.distributed is not initialised")
        self._rank = dist.get_rank()
        self._world_size = dist.get_world_size()
        self._local_rank = local_rank
        self._group: Any = gloo_group if gloo_group is not None else dist.group.WORLD
        self._seq = 0
        self.hostname = socket.gethostname()
        try:
            self._store: Any = dist.distributed_c10d._get_default_store()
        except Exception:
            self._store = None

    @classmethod
    def from_env(cls, *, timeout_s: float, env: Mapping[str, str] | None = None) -> TorchWorld:
        """Initialise the default group from the launcher's environment (``env://``)."""
        e = os.environ if env is None else env
        rank, local_rank, world_size = launch_env(e)
        owned = not dist.is_initialized()
        if owned:
            on_cuda = torch.cuda.is_available()
            backend = "cuda:nccl,cpu:gloo" if on_cuda else "gloo"
            if on_cuda:
                torch.cuda.set_device(local_rank)
            start = time.monotonic()
            try:
                dist.init_process_group(backend=backend, timeout=_td(timeout_s))
            except Exception as exc:
                text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise JoinError(
                    f"rank {rank} of {world_size} could not join the process group at "
                    f"{e.get('MASTER_ADDR')}:{e.get('MASTER_PORT')} within "
                    f"{time.monotonic() - start:.1f}s (timeout {timeout_s:g}s): {text}"
                ) from exc
        gloo = None
        if dist.get_backend() != "gloo":
            gloo = dist.new_group(backend="gloo", timeout=_td(timeout_s))
        world = cls(local_rank=local_rank, gloo_group=gloo)
        if owned:
            atexit.register(world.close)
        return world

    def close(self) -> None:
        """Destroy the process group (when this world initialised it, ``from_env``
        registers this to run at exit) and let go of the group and store objects.

        Left to the interpreter's teardown, gloo's objects are destroyed with their
        threads still joinable now and then, and the rank aborts (``terminate called
        without an active exception``, SIGABRT) instead of exiting with its code: on
        the 2-core CPU, two ranks that exit through ``current_world`` without this
        aborted in 5 of 16 processes, with it in none of 24. Destroying is local to the
        rank (no collective), so a peer that already exited or died does not hold it
        up (4-24 ms after the peer was gone). Collectives after ``close`` raise
        ``WorldError``."""
        self._group = None
        self._store = None
        with contextlib.suppress(Exception):
            if dist.is_initialized():
                dist.destroy_process_group()

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def local_rank(self) -> int:
        return self._local_rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def process_group(self) -> Any:
        """The gloo group the collectives run on (FlashInfer's tuning reduces over it)."""
        return self._group

    # -- failure naming -------------------------------------------------------------

    def _arrive(self, what: str) -> str:
        self._seq += 1
        key = f"{_ARRIVE_PREFIX}/{self._seq}"
        if self._store is not None:
            with contextlib.suppress(Exception):
                self._store.set(f"{key}/{self._rank}", what)
        return key

    def _missing(self, key: str) -> list[int] | None:
        """Ranks whose arrival marker for ``key`` is absent; ``None`` if unknowable."""
        if self._store is None:
            return None
        try:
            return [r for r in range(self._world_size) if not self._store.check([f"{key}/{r}"])]
        except Exception:
            return None

    def _run(self, what: str, timeout_s: float, src: int | None, fn: Callable[[], T]) -> T:
        if self._group is None:
            raise WorldError(f"{what} on rank {self._rank}: this world was closed")
        key = self._arrive(what)
        start = time.monotonic()
        try:
            return fn()
        except Exception as exc:
            elapsed = time.monotonic() - start
            if src is not None and src != self._rank:
                waited = ranks_text([src])
            else:
                # The source itself waits for the others: name those that never came.
                missing = self._missing(key)
                if missing is None:
                    waited = "rank 0 (the rendezvous store is unreachable)"
                elif missing:
                    waited = ranks_text(missing)
                else:
                    waited = "a peer that failed during the collective"
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            timed_out = (
                elapsed >= 0.95 * timeout_s
                or "timed out" in text.lower()
                or "timeout" in text.lower()
            )
            raise collective_failure(
                what,
                rank=self._rank,
                waiting_for=waited,
                timeout_s=timeout_s,
                elapsed=elapsed,
                timed_out=timed_out,
                cause=text,
            ) from exc

    # -- collectives ----------------------------------------------------------------

    def _broadcast_tensor(self, t: torch.Tensor, src: int, timeout_s: float) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = (
            dist.get_group_rank(self._group, src) if self._group is not dist.group.WORLD else src
        )
        opts.rootTensor = 0
        opts.timeout = _td(timeout_s)
        self._group.broadcast([t], opts).wait()

    def broadcast_bytes(
        self, data: bytes | None, *, src: int = 0, timeout_s: float
    ) -> bytes | None:
        """Send ``data`` from ``src`` to every rank; ``None`` travels as ``None``."""
        deadline = time.monotonic() + timeout_s

        def go() -> bytes | None:
            header = torch.zeros(1, dtype=torch.int64)
            if self._rank == src:
                header[0] = -1 if data is None else len(data)
            self._broadcast_tensor(header, src, timeout_s)
            n = int(header[0])
            if n < 0:
                return None
            if n == 0:
                return b""
            # The tensor shares memory with ``buf`` (torch.frombuffer), so reading the
            # result back costs one copy and needs no numpy.
            buf = bytearray(data) if self._rank == src and data is not None else bytearray(n)
            body = torch.frombuffer(buf, dtype=torch.uint8)
            self._broadcast_tensor(body, src, max(0.001, deadline - time.monotonic()))
            return data if self._rank == src else bytes(buf)

        return self._run(f"broadcast from rank {src}", timeout_s, src, go)

    def all_gather_str(self, value: str, *, timeout_s: float) -> list[str]:
        """Every rank's ``value``, indexed by rank."""
        deadline = time.monotonic() + timeout_s
        raw = value.encode("utf-8")

        def gather(t: torch.Tensor, out: list[torch.Tensor], timeout: float) -> None:
            opts = _allgather_options()
            opts.timeout = _td(timeout)
            self._group.allgather([out], [t], opts).wait()

        def go() -> list[str]:
            lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(self._world_size)]
            gather(torch.tensor([len(raw)], dtype=torch.int64), lengths, timeout_s)
            sizes = [int(x[0]) for x in lengths]
            width = max(1, *sizes)
            mine = bytearray(raw) + bytearray(width - len(raw))
            bufs = [bytearray(width) for _ in range(self._world_size)]
            gather(
                torch.frombuffer(mine, dtype=torch.uint8),
                [torch.frombuffer(b, dtype=torch.uint8) for b in bufs],
                max(0.001, deadline - time.monotonic()),
            )
            return [bytes(b[:n]).decode("utf-8") for b, n in zip(bufs, sizes, strict=True)]

        return self._run("all_gather", timeout_s, None, go)

    def barrier(self, *, timeout_s: float) -> None:
        """Wait for every rank; ``monitored_barrier`` names the ranks that did not come."""
        self._run(
            "barrier",
            timeout_s,
            None,
            lambda: dist.monitored_barrier(
                group=self._group, timeout=_td(timeout_s), wait_all_ranks=True
            ),
        )


def _allgather_options() -> Any:
    options: Any = getattr(dist, "AllgatherOptions", None)
    if options is None:
        from torch._C._distributed_c10d import AllgatherOptions

        options = AllgatherOptions
    return options()
