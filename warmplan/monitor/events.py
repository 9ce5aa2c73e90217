"""The monitor's event store: ``CompileEvent``, the labels events are attributed to,
the mode (``off`` / ``warn`` / ``error``), and the pending ``JitCompileError``. The
sources (``warmplan.monitor.triton``, ``warmplan.monitor.dynamo``) record into it.
This module never imports torch or Triton."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

from warmplan.errors import WarmplanError
from warmplan.log import get_logger

MonitorMode = Literal["off", "warn", "error"]
MONITOR_MODES: tuple[MonitorMode, ...] = ("off", "warn", "error")

EventKind = Literal["triton", "dynamo", "eager_fallback", "autotune_miss"]

Hint = Callable[["CompileEvent"], "str | None"]

_log = get_logger("warmplan.monitor")

_MAX_KEY = 400


@dataclass(frozen=True, slots=True, kw_only=True)
class CompileEvent:
    """One compilation (or disk-cache load) seen by the monitor.

    ``name`` is the kernel (Triton) or function (dynamo) compiled; ``key`` its
    specialisation key (Triton) or input shapes (dynamo); ``label`` the step or
    batch in progress (``JitMonitor.attribute``); ``cache_hit`` is true for a load
    from an on-disk cache rather than a real compile.
    """

    kind: EventKind
    name: str
    key: str
    label: str | None
    cache_hit: bool
    duration_s: float | None

    @property
    def is_compile(self) -> bool:
        """A real compile (or an eager fallback), not a disk-cache load."""
        return not self.cache_hit

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "key": self.key,
            "label": self.label,
            "cache_hit": self.cache_hit,
            "duration_s": self.duration_s,
        }

    def describe(self) -> str:
        """``triton kernel '_k' key '...' during 'batch[3]'`` - for messages."""
        what = {
            "triton": "triton kernel",
            "dynamo": "torch.compile of",
            "eager_fallback": ("eager fallback (recompile limit) of"),
            "autotune_miss": "FlashInfer autotune miss (fallback tactic, shape not tuned) of",
        }[self.kind]
        during = f" during {self.label!r}" if self.label is not None else ""
        return f"{what} {self.name!r} key {self.key!r}{during}"


class JitCompileError(WarmplanError):
    """A real compilation happened after warmup while the monitor was armed ``error``."""

    exit_code = 2

    def __init__(self, event: CompileEvent, hint: str | None = None) -> None:
        self.event = event
        self.hint = hint
        message = f"JIT compilation after warmup: {event.describe()}"
        if hint:
            message += f"; {hint}"
        super().__init__(message)


def short(value: object, limit: int = _MAX_KEY) -> str:
    """``value`` as text, cut to ``limit`` characters (keys can be huge)."""
    try:
        text = value if isinstance(value, str) else repr(value)
    except Exception:  # a hostile __repr__ must not break a compile
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(slots=True)
class PendingCompile:
    """A torch.compile frame in progress: Triton compiles inside it fold into it."""

    start: float
    name: str
    key: str
    label: str | None
    counters: dict[tuple[str, str], int]
    trigger: str
    nested_compiles: int = 0
    nested_loads: int = 0


class EventStore:
    """Every event, the label stack, the mode and the first pending error; thread-safe."""

    def __init__(
        self, *, mode: MonitorMode, hint: Hint | None, quiet_sources: tuple[str, ...]
    ) -> None:
        check_mode(mode)
        self.mode: MonitorMode = mode
        self._hint = hint
        # Event kinds recorded and counted but never logged or raised: another
        # monitor (vLLM's own, for Triton) already reports them.
        self._quiet = frozenset(quiet_sources)
        self.lock = threading.RLock()
        self._events: list[CompileEvent] = []
        self._labels: list[str] = []
        self._pending_error: JitCompileError | None = None
        self.in_progress: list[PendingCompile] = []  # torch.compile frames, innermost last

    def events(self) -> list[CompileEvent]:
        with self.lock:
            return list(self._events)

    def clear(self) -> None:
        with self.lock:
            self._events.clear()
            self._pending_error = None

    def push_label(self, label: str) -> None:
        with self.lock:
            self._labels.append(label)

    def pop_label(self) -> None:
        with self.lock:
            self._labels.pop()

    def label(self) -> str | None:
        with self.lock:
            return self._labels[-1] if self._labels else None

    def take_error(self) -> JitCompileError | None:
        with self.lock:
            error, self._pending_error = self._pending_error, None
        return error

    def fold_into_compile(self, *, cache_hit: bool) -> bool:
        """Count a Triton compile into the torch.compile in progress, if there is one."""
        with self.lock:
            if not self.in_progress:
                return False
            pending = self.in_progress[-1]
            if cache_hit:
                pending.nested_loads += 1
            else:
                pending.nested_compiles += 1
            return True

    def rekey(self, index: int, key: str) -> None:
        """Give event ``index`` a better key (and the pending error, if it is that event)."""
        with self.lock:
            if index < len(self._events):
                self._events[index] = replace(self._events[index], key=key)
                if self._pending_error is not None and self._pending_error.event.kind == "triton":
                    old = self._pending_error
                    self._pending_error = JitCompileError(self._events[index], old.hint)

    def record(self, event: CompileEvent) -> int:
        """Keep ``event``; log it (``warn``) or hold it as the pending error (``error``)."""
        with self.lock:
            self._events.append(event)
            index = len(self._events) - 1
        if self.mode == "off" or event.kind in self._quiet:
            return index
        hint = self._safe_hint(event)
        fields = event.to_dict() | {"hint": hint}
        if event.cache_hit:
            _log.info("jit_cache_load_after_warmup", **fields)
        elif self.mode == "warn":
            _log.warning("jit_compile_after_warmup", **fields)
        else:
            _log.error("jit_compile_after_warmup", **fields)
            with self.lock:
                if self._pending_error is None:
                    self._pending_error = JitCompileError(event, hint)
        return index

    def _safe_hint(self, event: CompileEvent) -> str | None:
        if self._hint is None:
            return None
        try:
            return self._hint(event)
        except Exception as exc:  # a broken hint must not hide the compile
            return f"(hint failed: {exc!r})"


def check_mode(mode: str) -> None:
    if mode not in MONITOR_MODES:
        raise ValueError(f"monitor mode must be one of {', '.join(MONITOR_MODES)}: {mode!r}")
