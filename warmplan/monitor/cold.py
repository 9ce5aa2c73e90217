"""Cold beyond compiles: a kernel's first load onto the device, and autotune misses
reported by tuning backends other than FlashInfer.

A compile is not the only thing that makes a request slow after warmup:

* **device load** - Triton loads a compiled kernel's binary onto the device lazily,
  at its first launch (``CompiledKernel._init_handles``: ``load_binary``). A binary
  that came from the on-disk cache but was never launched during warmup is loaded
  while serving: a stall, and an allocation that can fail for memory hours in.
  ``ColdWatcher`` records each as a ``ColdEvent`` (kind ``device_load``) with the
  monitor's current label (the step or ``batch[N]``).
* **autotune miss** - a tuned op called with a shape outside what was tuned runs a
  default tactic, silently. FlashInfer's are seen by ``warmplan.monitor.flashinfer``;
  any other tuning backend calls ``report_autotune_miss(backend, op, key)``, which
  records the same ``autotune_miss`` ``CompileEvent`` into every installed watcher's
  event store (counted like a compile, raised in ``error`` mode).

Every watcher installed sees every event; the Triton hook is installed once for all
of them and removed with the last. Nothing raises inside a hook. This module never
imports torch; Triton only when it is installed.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

from warmplan.log import get_logger
from warmplan.monitor.events import CompileEvent, EventStore, short

ColdKind = Literal["device_load"]
COLD_KINDS: Final[tuple[ColdKind, ...]] = ("device_load",)

_log = get_logger("warmplan.monitor")


@dataclass(frozen=True, slots=True, kw_only=True)
class ColdEvent:
    """A kernel's first load onto the device: the kernel, its key (its hash's first 16
    characters), the label in progress and how long the load took."""

    kind: ColdKind
    name: str
    key: str
    label: str | None
    duration_s: float | None = None

    @property
    def cache_hit(self) -> bool:
        """Never a disk-cache load (the field a trace's ``compiles`` entries carry)."""
        return False

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "key": self.key,
            "label": self.label,
            "cache_hit": False,
            "duration_s": self.duration_s,
        }

    def describe(self) -> str:
        during = f" during {self.label!r}" if self.label is not None else ""
        return f"first device load of kernel {self.name!r} key {self.key!r}{during}"


def _no_label() -> str | None:
    return None


_active: list[ColdWatcher] = []
_guard = threading.Lock()
_triton_patch: tuple[Any, Any] | None = None  # (CompiledKernel, its own _init_handles)


def report_autotune_miss(backend: str, op: str, key: str) -> None:
    """Tell every installed watcher's monitor that ``backend`` served ``op`` at ``key``
    (a shape or bucket) with no tuned entry, so a default tactic ran: an
    ``autotune_miss`` event with the label in progress. For tuning backends; a
    backend that has never been tuned should not call it."""
    stores = {id(w.store): w.store for w in list(_active) if w.store is not None}
    for store in stores.values():
        try:
            store.record(
                CompileEvent(
                    kind="autotune_miss",
                    name=f"{backend}:{op}",
                    key=short(key),
                    label=store.label(),
                    cache_hit=False,
                    duration_s=None,
                )
            )
        except Exception as exc:  # a tuner's hot path must never fail for the monitor
            _log.debug("jit_cold_report_failed", error=repr(exc))


class ColdWatcher:
    """Records first device loads labelled with ``store``'s label in progress (the JIT
    monitor's ``store``), and routes ``report_autotune_miss`` into ``store``."""

    def __init__(self, store: EventStore | None = None) -> None:
        self.store = store
        self._label: Callable[[], str | None] = store.label if store is not None else _no_label
        self._events: list[ColdEvent] = []
        self._lock = threading.Lock()
        self.installed = False

    @property
    def events(self) -> list[ColdEvent]:
        """Every event so far, oldest first (a copy)."""
        with self._lock:
            return list(self._events)

    def count(self, label: str | None = None) -> int:
        """Device loads for ``label`` (all labels: ``None``)."""
        return sum(1 for e in self.events if label is None or e.label == label)

    def record(self, name: str, key: str, duration_s: float | None) -> None:
        try:
            label = self._label()
        except Exception:  # a broken label source must not lose the event
            label = None
        event = ColdEvent(
            kind="device_load", name=name, key=key, label=label, duration_s=duration_s
        )
        with self._lock:
            self._events.append(event)
        _log.debug("jit_cold_event", **event.to_dict())

    def install(self) -> None:
        """Start watching (idempotent); hooks Triton's lazy binary load when installed."""
        global _triton_patch
        with _guard:
            if self.installed:
                return
            self.installed = True
            _active.append(self)
            if _triton_patch is None:
                _triton_patch = _patch_triton()

    def uninstall(self) -> None:
        """Stop watching; the last watcher out restores Triton's own method."""
        global _triton_patch
        with _guard:
            if not self.installed:
                return
            self.installed = False
            _active.remove(self)
            if not _active and _triton_patch is not None:
                cls, original = _triton_patch
                cls._init_handles = original
                _triton_patch = None

    def __enter__(self) -> ColdWatcher:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.uninstall()


def _patch_triton() -> tuple[Any, Any] | None:
    if "triton" not in sys.modules and importlib.util.find_spec("triton") is None:
        return None
    try:
        compiler = importlib.import_module("triton.compiler.compiler")
    except Exception as exc:  # triton present but broken (no driver): nothing to watch
        _log.debug("jit_cold_triton_unavailable", error=repr(exc))
        return None
    cls = getattr(compiler, "CompiledKernel", None)
    original = getattr(cls, "_init_handles", None)
    if cls is None or original is None:
        return None

    def _init_handles(kernel: Any) -> Any:
        # The binary is loaded once: while the module handle is still None.
        first = getattr(kernel, "module", getattr(kernel, "cu_module", None)) is None
        started = time.perf_counter()
        result = original(kernel)
        if first:
            try:
                name = str(getattr(kernel, "name", None) or "<triton>")
                meta = getattr(kernel, "metadata", None)
                key = str(getattr(meta, "hash", None) or getattr(kernel, "hash", "?"))[:16]
                duration = time.perf_counter() - started
                for watcher in list(_active):
                    watcher.record(name, key, duration)
            except Exception as exc:
                _log.debug("jit_cold_hook_failed", error=repr(exc))
        return result

    cls._init_handles = _init_handles
    return cls, original
