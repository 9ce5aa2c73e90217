"""Share compile caches across ranks: rank 0 compiles, the others unpack its caches.

``share_compile_caches`` runs ``leader_work`` (the compile-heavy steps) on rank 0,
packs its inductor and Triton cache directories into an in-memory tarball and
broadcasts it; the other ranks unpack it into their own cache directories before
their own steps, so their first compiles are disk-cache hits. Each file is unpacked
to a temp name and renamed into place, so a concurrent reader never sees half a
file; members with absolute paths, ``..``, links or devices are rejected. If
``leader_work`` fails on rank 0, an error marker is broadcast so the followers fail
at once, naming rank 0 and the step.

Directories: inductor's is ``torch._inductor.runtime.cache_dir_utils.cache_dir()``
(``TORCHINDUCTOR_CACHE_DIR``, default ``/tmp/torchinductor_$USER``); Triton's is
``TRITON_CACHE_DIR``, else ``triton.knobs.cache.dir``, else ``~/.triton/cache``; the
built-in engine's AOT artefacts are ``<cache root>/aot`` (``warmplan.cache_root``,
which also puts the other two under the cache root when the operator has not).
"""

from __future__ import annotations

import contextlib
import getpass
import os
import re
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from warmplan.cache_root import AOT_DIR
from warmplan.errors import StepError
from warmplan.fsutil import default_cache_root
from warmplan.world import World, WorldError
from warmplan.world.exchange import (
    MAX_FILE_BYTES,
    MAX_SHARE_BYTES,
    UnsafeArchive,
    pack,
    unpack,
)

STEP_ID = "compile_cache"
_OK = b"O"
_ERR = b"E"


@dataclass(frozen=True, slots=True, kw_only=True)
class CompileShareOutcome:
    """``role`` of this rank, the tarball's size and the seconds spent sharing."""

    role: Literal["leader", "follower", "single"]
    bytes: int
    seconds: float


def inductor_cache_dir() -> str:
    """Inductor's cache directory, resolved the way inductor resolves it.

    Uses ``torch._inductor.runtime.cache_dir_utils.cache_dir()`` when inductor is
    already imported (it is, in any worker that compiles); otherwise the same rule
    without paying inductor's import: ``TORCHINDUCTOR_CACHE_DIR``, else
    ``<tempdir>/torchinductor_<user>``.
    """
    if "torch._inductor" in sys.modules:
        with contextlib.suppress(ImportError):
            from torch._inductor.runtime.cache_dir_utils import cache_dir

            return str(cache_dir())
    env = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if env:
        return os.path.abspath(env)
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid_{os.getuid()}"
    return os.path.join(
        tempfile.gettempdir(), "torchinductor_" + re.sub(r'[\\/:*?"<>|]', "_", user)
    )


def triton_cache_dir() -> str:
    """Triton's on-disk kernel cache directory."""
    env = os.environ.get("TRITON_CACHE_DIR")
    if env:
        return os.path.abspath(env)
    with contextlib.suppress(Exception):
        import triton

        knob = triton.knobs.cache.dir
        if knob:
            return str(knob)
    return os.path.join(os.path.expanduser("~"), ".triton", "cache")


def cache_dirs() -> dict[str, str]:
    """The directories shared, by archive prefix: inductor's, Triton's and the built-in
    engine's ahead-of-time artefacts (``<cache root>/aot``); one inside another (or the
    same) is packed once, under the first of them."""
    dirs = {
        "inductor": inductor_cache_dir(),
        "triton": triton_cache_dir(),
        "aot": os.path.join(default_cache_root(), AOT_DIR),
    }
    real = {name: os.path.realpath(d) for name, d in dirs.items()}
    names = list(dirs)
    for i, name in enumerate(names):
        for other in names:
            if other == name or other not in dirs:
                continue
            inside = real[name].startswith(real[other] + os.sep)
            same_but_later = real[name] == real[other] and names.index(other) < i
            if inside or same_but_later:
                del dirs[name]
                break
    return dirs


# The packing and the checked unpacking live with the rank exchange
# (``warmplan.world.exchange``); re-exported here, where they began.
__all__ = [
    "MAX_FILE_BYTES",
    "MAX_SHARE_BYTES",
    "CompileShareOutcome",
    "UnsafeArchive",
    "cache_dirs",
    "inductor_cache_dir",
    "pack",
    "share_compile_caches",
    "triton_cache_dir",
    "unpack",
]


def share_compile_caches(
    world: World, *, leader_work: Callable[[], None], timeout_s: float, log: Any
) -> CompileShareOutcome:
    """Rank 0 runs ``leader_work`` and sends its compile caches; the others receive them."""
    start = time.monotonic()
    if world.world_size == 1:
        leader_work()
        return CompileShareOutcome(role="single", bytes=0, seconds=time.monotonic() - start)
    rank = world.rank
    if rank == 0:
        skipped: list[str] = []
        try:
            leader_work()
            data = pack(cache_dirs(), skipped=skipped)
        except BaseException as exc:
            # Tell the followers before raising, so they fail fast instead of timing out.
            text = str(exc) or type(exc).__name__
            with contextlib.suppress(WorldError):
                world.broadcast_bytes(
                    _ERR + text.encode("utf-8", "replace"), src=0, timeout_s=timeout_s
                )
            raise
        try:
            world.broadcast_bytes(_OK + data, src=0, timeout_s=timeout_s)
        except WorldError as exc:
            raise StepError(STEP_ID, f"sending compile caches: {exc}", rank=rank) from exc
        if skipped:
            log.warning(
                "compile_cache.skipped",
                files=len(skipped),
                reason=f"larger than {MAX_FILE_BYTES} bytes, or past {MAX_SHARE_BYTES} in all",
            )
        log.info("compile_cache.sent", bytes=len(data), seconds=round(time.monotonic() - start, 3))
        return CompileShareOutcome(role="leader", bytes=len(data), seconds=time.monotonic() - start)
    try:
        msg = world.broadcast_bytes(None, src=0, timeout_s=timeout_s)
    except WorldError as exc:
        raise StepError(STEP_ID, f"waiting for rank 0's compile caches: {exc}", rank=rank) from exc
    if not msg or msg[:1] == _ERR:
        text = msg[1:].decode("utf-8", "replace") if msg else "nothing was sent"
        raise StepError(
            STEP_ID, f"rank 0 failed while compiling for the shared caches: {text}", rank=rank
        )
    data = msg[1:]
    try:
        files = unpack(data, cache_dirs())
    except (tarfile.TarError, UnsafeArchive, OSError) as exc:
        raise StepError(STEP_ID, f"unpacking rank 0's compile caches: {exc}", rank=rank) from exc
    log.info(
        "compile_cache.received",
        bytes=len(data),
        files=files,
        seconds=round(time.monotonic() - start, 3),
    )
    return CompileShareOutcome(role="follower", bytes=len(data), seconds=time.monotonic() - start)
