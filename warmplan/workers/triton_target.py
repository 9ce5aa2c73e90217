"""Triton for a GPU target, on a machine that may have no GPU.

Triton's binder (the specialisation of each argument and the cache key of a variant)
and its compiler down to a cubin need a *target* (``cuda``, capability, warp size),
not a device: only loading and launching need the driver. ``target_driver`` installs
a driver that answers the target and nothing else, so that compile keys can be
derived - and compiled into Triton's on-disk cache - for an sm90 fleet from a CPU
build machine, and so that tests pin warmplan's keys against Triton's own binder
without a GPU. It is restored on exit. On a machine with a GPU the real driver is
used and this module is not involved.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator
from typing import Any

_lock = threading.RLock()


def parse_target(text: str) -> tuple[str, int, int]:
    """``sm90`` / ``sm_90`` / ``9.0`` -> (``cuda``, 90, 32)."""
    m = re.fullmatch(r"(?:sm_?)?(\d+)(?:\.(\d+))?", text.strip())
    if not m:
        raise ValueError(f"expected a CUDA target such as sm90 or 9.0, found {text!r}")
    arch = int(m.group(1)) * 10 + int(m.group(2)) if m.group(2) is not None else int(m.group(1))
    return "cuda", arch, 32


class TargetDriver:
    """A Triton driver that knows its target and no device (enough for binding and
    compiling; ``launch`` paths are never reached: callers compile with ``warmup``)."""

    def __init__(self, backend: str, arch: int, warp_size: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget(backend, arch, warp_size)
        # The "device" keys each JITFunction's per-device caches: one per target, so
        # keys of sm80 and sm90 never share a binder.
        self.device = f"{backend}:{arch}"

    def is_active(self) -> bool:
        return True

    def get_current_device(self) -> str:
        return self.device

    def set_current_device(self, device: object) -> None:
        return None

    def get_current_target(self) -> Any:
        return self.target

    def get_current_stream(self, device: object = None) -> int:
        return 0

    def get_active_torch_device(self) -> Any:
        import torch

        return torch.device("cpu")

    def get_device_interface(self) -> Any:
        import torch

        return torch.cuda

    def map_python_to_cpp_type(self, ty: str) -> str:
        return ty


def gpu_present() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


@contextlib.contextmanager
def target_driver(target: str | None = None) -> Iterator[bool]:
    """Within: Triton binds and compiles for ``target`` (default sm90) when this
    machine has no GPU; with a GPU, the real driver (and its device) is kept.
    Yields whether the stand-in is active (then nothing can be loaded or launched)."""
    if gpu_present() and target is None:
        yield False
        return
    from triton.runtime import driver

    backend, arch, warp = parse_target(target or "sm90")
    with _lock:
        previous = getattr(driver, "_active", None)
        driver.set_active(TargetDriver(backend, arch, warp))
        try:
            yield True
        finally:
            # Put back what was there; ``None`` (no driver made yet) stays lazy, since
            # ``reset_active`` would create the default driver, which fails without a GPU.
            driver._active = previous


class CompileListener:
    """Chained onto Triton's compile listener (``knobs.compilation.listener``) while
    installed: which compiled kernel, by its hash, came from the on-disk cache
    (``hits``), and every compile's cache-hit flag in order (``events``). The listener
    that was there before is still called, and put back on exit; a Triton without
    the knob leaves both empty."""

    def __init__(self) -> None:
        self.hits: dict[str, bool] = {}
        self.events: list[bool] = []
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        try:
            from triton import knobs
        except ImportError:
            yield
            return
        compilation = getattr(knobs, "compilation", None)
        if compilation is None or not hasattr(compilation, "listener"):
            yield
            return
        previous = compilation.listener

        def listener(*args: Any, **kwargs: Any) -> Any:
            metadata = kwargs.get("metadata")
            h = (
                metadata.get("hash")
                if isinstance(metadata, dict)
                else getattr(metadata, "hash", None)
            )
            hit = bool(kwargs.get("cache_hit"))
            with self.lock:
                self.events.append(hit)
                if h is not None:
                    self.hits[str(h)] = hit
            return previous(*args, **kwargs) if previous is not None else None

        compilation.listener = listener
        try:
            yield
        finally:
            compilation.listener = previous
