"""A monitor source for FlashInfer autotune misses: a shape served with the fallback
tactic because no tuned entry covers it (outside the buckets that were tuned).

FlashInfer's ``AutoTuner.choose_one`` says so on its logger (``flashinfer.jit``)
once per op and profile, when the op has tuned entries but not for this shape:
``[AutoTuner]: No tuned config covers <op> input_shapes=(...); falling back to
runner=... tactic=-1 ...``. A handler on that logger turns each into an
``autotune_miss`` event: counted like a compile (a shape the warmup did not cover),
named by the op, keyed by the input shapes. Watching a log line costs nothing on the
serving path (the tuner's hits never log). Ops never tuned at all do not warn, so
they are not counted; each uncovered shape is counted once per process.

Never imports flashinfer: the handler sits on the logger by name.
"""

from __future__ import annotations

import logging
import re

from warmplan.monitor.events import CompileEvent, EventStore, short

LOGGER = "flashinfer.jit"
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

    def install(self) -> None:
        if not self._installed:
            logging.getLogger(LOGGER).addHandler(self._handler)
            self._installed = True

    def uninstall(self) -> None:
        if self._installed:
            logging.getLogger(LOGGER).removeHandler(self._handler)
            self._installed = False
