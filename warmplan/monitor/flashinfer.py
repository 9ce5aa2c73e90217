"""A monitor source for FlashInfer autotune misses: a shape served with the fallback
tactic because no tuned entry covers it (outside the buckets that were tuned).

FlashInfer's ``AutoTuner.choose_one`` says so on its logger once per op and profile, when the op has tuned entries but not for this shape:
``[AutoTuner]: No tuned config covers <op> input_shapes=(...); falling back to
runner=... tactic=-1 ...``. A handler on that logger turns each into an
``autotune_miss`` event: counted like a compile (a shape the warmup did not cover),
named by the op, keyed by the input shapes. Watching a log line costs nothing on the
serving path (the tuner's hits never log). Ops never tuned at all do not warn, so
they are not counted; each uncovered shape is counted once per process.

FlashInfer's logger is a ``logging.Logger`` subclass it instantiates itself
(``flashinfer.jit.core.logger = FlashInferJITLogger("flashinfer.jit")``), outside
``logging``'s registry, so ``logging.getLogger("flashinfer.jit")`` is another object:
the handler goes on the object the imported ``flashinfer.jit.core`` and
``flashinfer.autotuner`` hold (and on the registry's, for a FlashInfer that
registers it). ``ensure()`` attaches to them once FlashInfer has been imported; the
monitor calls it at every ``attribute()``. Never imports flashinfer itself.
"""

from __future__ import annotations

import logging
import re
import sys

from warmplan.monitor.events import CompileEvent, EventStore, short

LOGGER = "flashinfer.jit"
_MODULES = ("flashinfer.jit.core", "flashinfer.autotuner")
_MISS = re.compile(
    r"No tuned config covers (?P<op>\S+) input_shapes=(?P<shapes>.*?); falling back", re.DOTALL
)


class _MissHandler(logging.Handler):
    def __init__(self, store: EventStore) -> None:
        super().__init__(level=logging.WARNING)
        self._store = store

    def emit(self, record: logging.LogRecord) -> None:
        try:
            match = _MISS.search(record.getMessage())
            if match is None:
                return
            self._store.record(
                CompileEvent(
                    kind="autotune_miss",
                    name=match.group("op"),
                    key=short(match.group("shapes")),
                    label=self._store.label(),
                    cache_hit=False,
                    duration_s=None,
                )
            )
        except Exception:  # never raise inside FlashInfer's logging
            return


class FlashInferSource:
    """Records FlashInfer autotune misses into ``store`` while installed."""

    def __init__(self, store: EventStore) -> None:
        self._handler = _MissHandler(store)
        self._installed = False
        self._on: list[logging.Logger] = []

    def _loggers(self) -> list[logging.Logger]:
        found = [logging.getLogger(LOGGER)]
        for name in _MODULES:
            candidate = getattr(sys.modules.get(name), "logger", None)
            if isinstance(candidate, logging.Logger):
                found.append(candidate)
        return found

    def ensure(self) -> None:
        """Attach to FlashInfer's logger objects that exist now and lack the handler."""
        if not self._installed:
            return
        for logger in self._loggers():
            if not any(logger is seen for seen in self._on):
                logger.addHandler(self._handler)
                self._on.append(logger)

    def install(self) -> None:
        self._installed = True
        self.ensure()

    def uninstall(self) -> None:
        for logger in self._on:
            logger.removeHandler(self._handler)
        self._on.clear()
        self._installed = False
