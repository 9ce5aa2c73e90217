"""The JIT monitor: counts compilations and says which step or batch caused each.

The package: ``events`` (the event store, modes, ``CompileEvent``), ``triton`` and
``dynamo`` (one source each), and here ``JitMonitor``, which owns a store and both
sources, and the ``Monitor`` protocol the executor holds. Three sources are watched,
each only when its framework is importable:

* **Triton** - ``triton.knobs.compilation.listener`` fires inside every
  ``triton.compile`` (``cache_hit`` tells a compile from an on-disk cache load);
  ``triton.knobs.runtime.jit_post_compile_hook`` fires after a ``@triton.jit``
  launch compiled a new specialisation and gives its specialisation key. Releases
  before the knobs module (< 3.4) have ``JITFunction.compiled_hook`` instead.
  Hooks already installed are chained, and restored by ``uninstall``.
* **torch.compile** - dynamo's compile callbacks
  (``torch._dynamo.callback_handler``) bracket every frame compilation; the
  counters in ``torch._dynamo.utils.counters`` say whether it produced a graph and
  whether inductor/AOTAutograd loaded it from the on-disk cache. Triton kernels
  compiled *inside* a dynamo compilation are folded into that one event.
* **eager fallback** - a frame that hits ``torch._dynamo.config.recompile_limit``
  runs eagerly from then on; dynamo logs a warning once per frame, which becomes an
  ``eager_fallback`` event (counted as a compile-miss: the shape was not covered).
  Later calls of that frame are silent: dynamo no longer looks at it.
* **FlashInfer autotune misses** - a shape FlashInfer serves with its fallback
  tactic because no tuned entry covers it (``warmplan.monitor.flashinfer``: its
  tuner's warning on its ``flashinfer.jit`` logger becomes an ``autotune_miss``
  event, counted like a compile: a shape the warmup did not cover).

Nothing raises inside a framework hook (dynamo and inductor may swallow or wrap
it). In ``error`` mode the first real compile is recorded and raised as
:class:`JitCompileError` when the ``attribute()`` block it happened in ends, or by
:meth:`JitMonitor.check`.

``torch._dynamo.reset()`` clears every registered compile callback; the monitor
re-registers its own at each ``attribute()`` and ``check()``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

from warmplan.monitor.cold import ColdWatcher
from warmplan.monitor.dynamo import DynamoSource
from warmplan.monitor.events import (
    MONITOR_MODES,
    CompileEvent,
    EventKind,
    EventStore,
    Hint,
    JitCompileError,
    MonitorMode,
    check_mode,
)
from warmplan.monitor.flashinfer import FlashInferSource
from warmplan.monitor.triton import TritonSource

__all__ = [
    "MONITOR_MODES",
    "CompileEvent",
    "EventKind",
    "Hint",
    "JitCompileError",
    "JitMonitor",
    "Monitor",
    "MonitorMode",
    "NoMonitor",
]


class Monitor(Protocol):
    """What the executor asks of a monitor: attribute a step's compiles to it, count
    them, arm for serving, and uninstall."""

    def attribute(self, label: str) -> contextlib.AbstractContextManager[None]: ...

    def compiles(self, label: str | None = None) -> int: ...

    def cache_loads(self, label: str | None = None) -> int: ...

    def device_loads(self, label: str | None = None) -> int: ...

    def arm(self, mode: MonitorMode) -> None: ...

    def uninstall(self) -> None: ...


class NoMonitor:
    """Stands in where nothing can compile (a process that never imported torch or
    Triton): attributes nothing, counts nothing."""

    @contextlib.contextmanager
    def attribute(self, label: str) -> Iterator[None]:
        yield

    def compiles(self, label: str | None = None) -> int:
        return 0

    def cache_loads(self, label: str | None = None) -> int:
        return 0

    def device_loads(self, label: str | None = None) -> int:
        return 0

    def arm(self, mode: MonitorMode) -> None:
        check_mode(mode)

    def uninstall(self) -> None:
        return None


class JitMonitor:
    """Counts Triton and torch.compile compilations, attributed to a label.

    ::

        with JitMonitor() as monitor:
            with monitor.attribute("slot-mapping"):
                worker.slot_mapping(16)
            monitor.compiles("slot-mapping")    # real compiles in that block
            monitor.arm("error")                 # serving from here on
            with monitor.attribute("batch[0]"):
                worker.execute(batch)            # raises JitCompileError on a compile
    """

    def __init__(
        self,
        *,
        mode: MonitorMode = "off",
        hint: Hint | None = None,
        quiet_sources: tuple[str, ...] = (),
    ) -> None:
        self.store = EventStore(mode=mode, hint=hint, quiet_sources=quiet_sources)
        self.triton = TritonSource(self.store)
        self.dynamo = DynamoSource(self.store)
        self.flashinfer = FlashInferSource(self.store)
        self.cold = ColdWatcher(self.store)  # kernels loaded onto the device late
        self.installed = False

    @property
    def mode(self) -> MonitorMode:
        return self.store.mode

    @property
    def events(self) -> list[CompileEvent]:
        """Every event so far, oldest first (a copy)."""
        self.dynamo.reconcile_fallbacks()
        return self.store.events()

    def compiles(self, label: str | None = None) -> int:
        """Real compiles (eager fallbacks included) for ``label``, or for all labels."""
        return sum(1 for e in self._select(label) if not e.cache_hit)

    def cache_loads(self, label: str | None = None) -> int:
        """On-disk cache loads for ``label``, or for all labels."""
        return sum(1 for e in self._select(label) if e.cache_hit)

    def device_loads(self, label: str | None = None) -> int:
        """Kernels first loaded onto the device during ``label`` (all labels: ``None``)."""
        return self.cold.count(label)

    def clear(self) -> None:
        """Forget recorded events and any pending error."""
        self.store.clear()
        self.triton.forget()

    def arm(self, mode: MonitorMode) -> None:
        """Set the mode for what comes next: ``warn`` logs, ``error`` raises."""
        check_mode(mode)
        self.store.mode = mode

    def install(self) -> None:
        """Hook Triton (when importable) and dynamo (when torch is imported). Idempotent."""
        if self.installed:
            return
        self.installed = True
        self.triton.install()
        self.dynamo.install()
        self.flashinfer.install()
        self.cold.install()

    def uninstall(self) -> None:
        """Remove this monitor's hooks and restore the ones it chained to."""
        if not self.installed:
            return
        self.installed = False
        self.triton.uninstall()
        self.dynamo.uninstall()
        self.flashinfer.uninstall()
        self.cold.uninstall()

    def __enter__(self) -> JitMonitor:
        self.install()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.uninstall()
        if exc_type is None:
            self.check()

    @contextlib.contextmanager
    def attribute(self, label: str) -> Iterator[None]:
        """Events during the block get ``label``; raises a pending ``JitCompileError`` at its end."""
        if self.installed:
            self.dynamo.ensure()
            self.flashinfer.ensure()
        self.store.push_label(label)
        try:
            yield
        finally:
            self.dynamo.reconcile_fallbacks()  # while the label still applies
            self.store.pop_label()
        self.check()

    def check(self) -> None:
        """Raise the first ``JitCompileError`` recorded in ``error`` mode, once."""
        if self.installed:
            self.dynamo.ensure()
        self.dynamo.reconcile_fallbacks()
        error = self.store.take_error()
        if error is not None:
            raise error

    def _select(self, label: str | None) -> list[CompileEvent]:
        events = self.events
        return events if label is None else [e for e in events if e.label == label]
