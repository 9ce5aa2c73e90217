"""The world as warmplan sees it: rank, local rank, world size, and the few
collectives that autotune and shared compile caches need.

``LocalWorld`` is the single-process world. The torch.distributed world is
``warmplan.world.distributed.TorchWorld`` (imported only when a launcher set
``WORLD_SIZE``); the vLLM adapter wraps vLLM's world group in the same protocol, and
``warmplan.testing.ThreadWorld`` is one whose ranks are threads, for tests.

Every collective takes a ``timeout_s``; a peer that dies or hangs makes the call
raise ``WorldTimeout`` naming the peer waited for. Every world words its failures
through ``collective_failure``, so they read alike whichever world failed.
This package never imports torch (``distributed`` does, on use).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

from warmplan.errors import UserError, WarmplanError

DEFAULT_TIMEOUT_S = 600.0  # how long ranks wait for each other unless a plan says otherwise


class WorldError(RuntimeError):
    """A collective failed; the message names the step and the rank waited for."""


class WorldTimeout(WorldError):
    """A collective did not complete within its timeout."""


class LaunchError(UserError):
    """The launcher's variables (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
    ``MASTER_PORT``) do not describe a world: exit 1, naming the variable."""


class JoinError(WorldTimeout, WarmplanError):
    """This rank could not join the process group within its timeout (a master that
    never started, a peer that never came): exit 2, like a failed step."""

    exit_code = 2


def launch_env(env: Mapping[str, str] | None = None) -> tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` from the launcher's variables, checked:
    integers, ``0 <= rank < world_size``, ``local_rank >= 0``; ``LaunchError``
    naming the variable otherwise. Unset variables mean a single process."""
    e = os.environ if env is None else env

    def number(name: str, default: str) -> int:
        raw = e.get(name, default)
        if not re.fullmatch(r"\s*[0-9]{1,9}\s*", raw):
            raise LaunchError(f"{name} must be a non-negative integer: {raw!r}")
        return int(raw)

    world_size = number("WORLD_SIZE", "1")
    if world_size < 1:
        raise LaunchError(f"WORLD_SIZE must be >= 1: {world_size}")
    rank = number("RANK", "0")
    local_rank = number("LOCAL_RANK", "0")
    if rank >= world_size:
        raise LaunchError(f"RANK must be < WORLD_SIZE ({world_size}): {rank}")
    if world_size > 1 and "MASTER_PORT" in e:
        port = number("MASTER_PORT", "0")
        if not 0 < port < 65536:
            raise LaunchError(f"MASTER_PORT must be from 1 to 65535: {port}")
    return rank, local_rank, world_size


def ranks_text(ranks: Iterable[int]) -> str:
    """``rank 1`` or ``ranks 1, 3``."""
    ranks = list(ranks)
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def collective_failure(
    what: str,
    *,
    rank: int,
    waiting_for: str,
    timeout_s: float,
    elapsed: float | None = None,
    timed_out: bool,
    cause: str = "",
) -> WorldError:
    """The one wording of a failed collective: what, on which rank, waiting for whom
    (``ranks_text`` or a phrase), after how long, and the underlying cause.

    ``{what} timed out after 3.0s (timeout 3s) on rank 1 waiting for rank 0: cause``
    """
    took = f" after {elapsed if elapsed is not None else timeout_s:.1f}s"
    tail = f": {cause}" if cause else ""
    if timed_out:
        return WorldTimeout(
            f"{what} timed out{took} (timeout {timeout_s:g}s) on rank {rank} waiting for {waiting_for}{tail}"
        )
    return WorldError(f"{what} failed{took} on rank {rank} waiting for {waiting_for}{tail}")


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
    """Whether a launcher (torchrun, a job scheduler) started more than one rank;
    ``LaunchError`` when its variables are not a world."""
    return launch_env(env)[2] > 1


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
            from warmplan.world.distributed import TorchWorld

            _current = TorchWorld.from_env(timeout_s=timeout_s)
        else:
            _current = LocalWorld()
    return _current


def set_current_world(world: World | None) -> None:
    """Install ``world`` as the process's world (the vLLM adapter, tests); ``None`` resets."""
    global _current
    _current = world


def all_gather_json(world: World, value: Any, *, timeout_s: float) -> list[Any]:
    """Every rank's JSON-serialisable ``value``, indexed by rank: typed gathers over
    ``all_gather_str``, so that no caller encodes meaning in string prefixes."""
    return [json.loads(v) for v in world.all_gather_str(json.dumps(value), timeout_s=timeout_s)]
