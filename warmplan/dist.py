"""The world as warmplan sees it: rank, local rank, world size, and the few
collectives that autotune and shared compile caches need.

``LocalWorld`` is the single-process world. The torch.distributed world lives in
``warmplan.dist_torch`` (imported only when a launcher set ``WORLD_SIZE``), and the
vLLM adapter wraps vLLM's world group in the same protocol.

Every collective takes a ``timeout_s``; a peer that dies or hangs makes the call
raise ``WorldTimeout`` naming the peer waited for.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

DEFAULT_TIMEOUT_S = 600.0


class WorldError(RuntimeError):
    """A collective failed; the message names the step and the rank waited for."""


class WorldTimeout(WorldError):
    """A collective did not complete within its timeout."""


@runtime_checkable
class World(Protocol):
    """Ranks and collectives. Every rank must call each collective in the same order."""

    @property
    def rank(self) -> int: ...

    @property
    def local_rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    def broadcast_bytes(
        self, data: bytes | None, *, src: int = 0, timeout_s: float
    ) -> bytes | None:
        """Send ``data`` from ``src`` to every rank; ``None`` travels as ``None``."""

    def all_gather_str(self, value: str, *, timeout_s: float) -> list[str]:
        """Every rank's ``value``, indexed by rank."""

    def barrier(self, *, timeout_s: float) -> None: ...


class LocalWorld:
    """The world of a single process: every collective is the identity."""

    rank = 0
    local_rank = 0
    world_size = 1

    def broadcast_bytes(
        self, data: bytes | None, *, src: int = 0, timeout_s: float
    ) -> bytes | None:
        return data

    def all_gather_str(self, value: str, *, timeout_s: float) -> list[str]:
        return [value]

    def barrier(self, *, timeout_s: float) -> None:
        return None


_current: World | None = None


def launched(env: Mapping[str, str] | None = None) -> bool:
    """Whether a launcher (torchrun, a job scheduler) started more than one rank."""
    e = os.environ if env is None else env
    try:
        return int(e.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        raise WorldError(f"WORLD_SIZE must be an integer: {e.get('WORLD_SIZE')!r}") from None


def current_world(*, timeout_s: float = DEFAULT_TIMEOUT_S) -> World:
    """The world this process belongs to, created on first use and then reused.

    ``LocalWorld`` when not launched (no ``WORLD_SIZE``, or ``WORLD_SIZE=1``); else a
    torch.distributed world initialised from the launcher's environment
    (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), with
    ``timeout_s`` as the process group's timeout. torch is imported only then.
    """
    global _current
    if _current is None:
        if launched():
            from warmplan.dist_torch import TorchWorld

            _current = TorchWorld.from_env(timeout_s=timeout_s)
        else:
            _current = LocalWorld()
    return _current


def set_current_world(world: World | None) -> None:
    """Install ``world`` as the process's world (the vLLM adapter, tests); ``None`` resets."""
    global _current
    _current = world
