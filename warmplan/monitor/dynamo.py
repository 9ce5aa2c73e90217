"""The torch.compile source of the JIT monitor.

Dynamo's compile callbacks (``torch._dynamo.callback_handler``) bracket every frame
compilation; the counters in ``torch._dynamo.utils.counters`` say whether it produced
a graph and whether inductor/AOTAutograd loaded it from the on-disk cache. A frame
that hits ``torch._dynamo.config.recompile_limit`` runs eagerly from then on; dynamo
logs a warning once per frame, which becomes an ``eager_fallback`` event (counted as
a compile-miss: the shape was not covered); fallbacks counted but not logged are
reconciled from the counters. ``torch._dynamo.reset()`` clears every registered
callback, so the monitor re-registers at each ``attribute()`` and ``check()``.
Nothing raises inside a callback.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import re
import sys
import time
import types
from collections.abc import Mapping
from typing import Any

from warmplan.log import get_logger
from warmplan.monitor.events import CompileEvent, EventStore, PendingCompile, short

_log = get_logger("warmplan.monitor")

_RECOMPILE_LIMIT_RE = re.compile(r"recompile.limit|cache.size.limit", re.IGNORECASE)


def _describe_value(value: object) -> str | None:
    """``float32[4, 8]`` for a tensor, the value for a scalar, None otherwise."""
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape is not None and dtype is not None:
        dims = ", ".join(str(d) for d in tuple(shape))
        return f"{str(dtype).removeprefix('torch.')}[{dims}]"
    if isinstance(value, bool | int | float):
        return repr(value)
    return None


def _dynamo_frame_info() -> tuple[str | None, str | None]:
    """The name and argument shapes of the frame dynamo is compiling.

    Dynamo's callbacks get only a compile id; the frame is a local of
    ``torch._dynamo.convert_frame._compile`` further up this thread's stack.
    Any surprise gives ``(None, None)`` and the caller falls back to the id.
    """
    try:
        frame: types.FrameType | None = sys._getframe(1)
        while frame is not None:
            code = frame.f_code
            if code.co_name == "_compile" and "convert_frame" in code.co_filename:
                break
            frame = frame.f_back
        if frame is None:
            return None, None
        local = frame.f_locals
        compiled = local.get("code")
        name = compiled.co_name if isinstance(compiled, types.CodeType) else None
        target = local.get("frame")
        values: Mapping[str, Any] | None = getattr(target, "f_locals", None)
        if values is None and isinstance(local.get("locals"), Mapping):
            values = local["locals"]  # torch < 2.4 passed the frame's locals
        key = None
        if values is not None:
            argnames: tuple[str, ...] = ()
            if isinstance(compiled, types.CodeType):
                nargs = compiled.co_argcount + compiled.co_kwonlyargcount
                argnames = compiled.co_varnames[:nargs]
            parts = []
            for argname in argnames or tuple(values):
                text = _describe_value(values.get(argname))
                if text is not None:
                    parts.append(f"{argname}={text}")
            key = ", ".join(parts) or None
        return name, (None if key is None else short(key))
    except Exception:  # introspection is best effort
        return None, None


_DYNAMO_COUNTERS: tuple[tuple[str, str], ...] = (
    ("stats", "unique_graphs"),
    ("inductor", "fxgraph_cache_hit"),
    ("inductor", "fxgraph_cache_miss"),
    ("aot_autograd", "autograd_cache_hit"),
    ("aot_autograd", "autograd_cache_miss"),
)


def _dynamo_counters() -> Any | None:
    module = sys.modules.get("torch._dynamo.utils")
    return None if module is None else getattr(module, "counters", None)


def _snapshot(counters: Any | None) -> dict[tuple[str, str], int]:
    if counters is None:
        return {}
    out = {}
    for group, name in _DYNAMO_COUNTERS:
        try:
            out[(group, name)] = int(counters[group][name])
        except Exception:
            out[(group, name)] = 0
    return out


def _fallback_count(counters: Any | None) -> int:
    """How many recompile-limit fallbacks dynamo has counted (in 'unimplemented')."""
    if counters is None:
        return 0
    try:
        group = counters["unimplemented"]
        return sum(int(n) for reason, n in group.items() if _RECOMPILE_LIMIT_RE.search(str(reason)))
    except Exception:
        return 0


class _FallbackLogHandler(logging.Handler):
    """Turns dynamo's 'hit config.recompile_limit' warning into an event."""

    def __init__(self, source: DynamoSource) -> None:
        super().__init__(level=logging.WARNING)
        self._source = source

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:
            return
        if "hit config." not in message or not _RECOMPILE_LIMIT_RE.search(message):
            return
        name = re.search(r"function: '([^']+)'", message)
        reason = re.search(r"last reason: (.*)", message)
        self._source.on_eager_fallback(
            name.group(1) if name else "<unknown>",
            short(reason.group(1).strip()) if reason else "recompile limit",
        )


class DynamoSource:
    """Registers dynamo's compile callbacks and the eager-fallback log handler into an
    ``EventStore``."""

    def __init__(self, store: EventStore) -> None:
        self._store = store
        self.installed = False
        self._handler: Any | None = None
        self._log_handler: _FallbackLogHandler | None = None
        self._fallbacks_seen = 0

    def install(self) -> None:
        self.installed = True
        self.ensure()

    def ensure(self) -> None:
        """Register the compile callbacks (again, after a ``torch._dynamo.reset()``)."""
        if "torch" not in sys.modules:
            return
        if self._handler is None:
            try:
                dynamo = importlib.import_module("torch._dynamo")
            except Exception as exc:
                _log.debug("jit_monitor_dynamo_unavailable", error=repr(exc))
                return
            handler = getattr(dynamo, "callback_handler", None)
            if handler is None:
                callback = sys.modules.get("torch._dynamo.callback")
                handler = getattr(callback, "callback_handler", None)
            if handler is None:
                _log.debug("jit_monitor_dynamo_unavailable", error="no callback_handler")
                return
            self._handler = handler
            self._fallbacks_seen = _fallback_count(_dynamo_counters())
            self._log_handler = _FallbackLogHandler(self)
            logging.getLogger("torch._dynamo").addHandler(self._log_handler)
        handler = self._handler
        if self.on_start not in handler.start_callbacks:
            handler.register_start_callback(self.on_start)
        if self.on_end not in handler.end_callbacks:
            handler.register_end_callback(self.on_end)

    def uninstall(self) -> None:
        self.installed = False
        handler, self._handler = self._handler, None
        if handler is not None:
            with contextlib.suppress(ValueError):
                handler.remove_start_callback(self.on_start)
            with contextlib.suppress(ValueError):
                handler.remove_end_callback(self.on_end)
        log_handler, self._log_handler = self._log_handler, None
        if log_handler is not None:
            logging.getLogger("torch._dynamo").removeHandler(log_handler)
        with self._store.lock:
            self._store.in_progress.clear()

    def on_start(self, *args: Any, **kwargs: Any) -> None:
        try:
            info = args[0] if args else kwargs.get("args")
            trigger = getattr(getattr(info, "callback_trigger", None), "name", "DYNAMO")
            compile_id = getattr(info, "compile_id", None)
            name, key = _dynamo_frame_info() if trigger == "DYNAMO" else (None, None)
            if name is None:
                name = trigger.lower() if trigger != "DYNAMO" else "<frame>"
            if key is None:
                key = f"compile_id={compile_id}"
            pending = PendingCompile(
                start=time.perf_counter(),
                name=name,
                key=key,
                label=self._store.label(),
                counters=_snapshot(_dynamo_counters()),
                trigger=trigger,
            )
            with self._store.lock:
                self._store.in_progress.append(pending)
        except Exception as exc:  # never break a compile
            _log.debug("jit_monitor_hook_failed", error=repr(exc))

    def on_end(self, *args: Any, **kwargs: Any) -> None:
        try:
            with self._store.lock:
                if not self._store.in_progress:
                    return
                pending = self._store.in_progress.pop()
            duration = time.perf_counter() - pending.start
            now = _snapshot(_dynamo_counters())

            def delta(group: str, name: str) -> int:
                return max(0, now.get((group, name), 0) - pending.counters.get((group, name), 0))

            graphs = delta("stats", "unique_graphs")
            hits = delta("inductor", "fxgraph_cache_hit") + delta(
                "aot_autograd", "autograd_cache_hit"
            )
            misses = delta("inductor", "fxgraph_cache_miss") + delta(
                "aot_autograd", "autograd_cache_miss"
            )
            if (
                pending.trigger == "DYNAMO"
                and graphs == 0
                and hits == 0
                and misses == 0
                and pending.nested_compiles == 0
            ):
                return  # dynamo looked at the frame and made no graph: nothing was compiled
            cache_hit = hits > 0 and misses == 0 and pending.nested_compiles == 0
            self._store.record(
                CompileEvent(
                    kind="dynamo",
                    name=pending.name,
                    key=pending.key,
                    label=pending.label,
                    cache_hit=cache_hit,
                    duration_s=duration,
                )
            )
        except Exception as exc:  # never break a compile
            _log.debug("jit_monitor_hook_failed", error=repr(exc))

    def on_eager_fallback(self, name: str, reason: str) -> None:
        if not self.installed:
            return
        with self._store.lock:
            self._fallbacks_seen += 1
        self._store.record(
            CompileEvent(
                kind="eager_fallback",
                name=name,
                key=reason,
                label=self._store.label(),
                cache_hit=False,
                duration_s=None,
            )
        )

    def reconcile_fallbacks(self) -> None:
        """Count fallbacks dynamo counted but did not log (its logger set above WARNING)."""
        if self._handler is None:
            return
        counted = _fallback_count(_dynamo_counters())
        with self._store.lock:
            missing = counted - self._fallbacks_seen
            if missing <= 0:
                return
            self._fallbacks_seen = counted
        for _ in range(missing):
            self._store.record(
                CompileEvent(
                    kind="eager_fallback",
                    name="<unknown>",
                    key="recompile limit",
                    label=self._store.label(),
                    cache_hit=False,
                    duration_s=None,
                )
            )
