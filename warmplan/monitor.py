"""The JIT monitor: counts compilations and says which step or batch caused each.

Three sources are watched, each only when its framework is importable:

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

Nothing raises inside a framework hook (dynamo and inductor may swallow or wrap
it). In ``error`` mode the first real compile is recorded and raised as
:class:`JitCompileError` when the ``attribute()`` block it happened in ends, or by
:meth:`JitMonitor.check`.

``torch._dynamo.reset()`` clears every registered compile callback; the monitor
re-registers its own at each ``attribute()`` and ``check()``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import re
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from warmplan.errors import WarmplanError
from warmplan.log import get_logger

MonitorMode = Literal["off", "warn", "error"]
MONITOR_MODES: tuple[MonitorMode, ...] = ("off", "warn", "error")

EventKind = Literal["triton", "dynamo", "eager_fallback"]

Hint = Callable[["CompileEvent"], "str | None"]

_log = get_logger(__name__)

_MAX_KEY = 400
_RECOMPILE_LIMIT_RE = re.compile(r"recompile.limit|cache.size.limit", re.IGNORECASE)


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


def _short(value: object, limit: int = _MAX_KEY) -> str:
    try:
        text = value if isinstance(value, str) else repr(value)
    except Exception:  # a hostile __repr__ must not break a compile
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
        return name, (None if key is None else _short(key))
    except Exception:  # introspection is best effort
        return None, None


def _triton_key(src: Any) -> str | None:
    """``x_ptr:*fp32/16, n:i32, BLOCK=64`` - a kernel variant's specialisation, by name.

    Triton compiles one variant per argument type, per 16-byte alignment of each
    pointer and divisibility by 16 of each int (``/16``), per int equal to 1 and per
    constexpr value (``=value``). Read from the ``ASTSource`` the listener gets;
    ``None`` when it has no signature (an IR source).
    """
    signature = getattr(src, "signature", None)
    if not isinstance(signature, Mapping) or not signature:
        return None
    constants = getattr(src, "constexprs", None) or getattr(src, "constants", None) or {}
    attrs = getattr(src, "attrs", None) or {}
    if not isinstance(constants, Mapping) or not isinstance(attrs, Mapping):
        return None
    parts = []
    for i, (param, kind) in enumerate(signature.items()):
        for where in ((i,), i, param):
            if where in constants:
                parts.append(f"{param}={constants[where]!r}")
                break
        else:
            flags = attrs.get((i,)) or attrs.get(i) or ()
            aligned = any(
                isinstance(f, list | tuple) and len(f) == 2 and f[0] == "tt.divisibility"
                for f in flags
            )
            parts.append(f"{param}:{kind}" + ("/16" if aligned else ""))
    return _short(", ".join(parts))


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


@dataclass(slots=True)
class _PendingDynamo:
    start: float
    name: str
    key: str
    label: str | None
    counters: dict[tuple[str, str], int]
    trigger: str
    nested_compiles: int = 0
    nested_loads: int = 0


class _FallbackLogHandler(logging.Handler):
    """Turns dynamo's 'hit config.recompile_limit' warning into an event."""

    def __init__(self, monitor: JitMonitor) -> None:
        super().__init__(level=logging.WARNING)
        self._monitor = monitor

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:
            return
        if "hit config." not in message or not _RECOMPILE_LIMIT_RE.search(message):
            return
        name = re.search(r"function: '([^']+)'", message)
        reason = re.search(r"last reason: (.*)", message)
        self._monitor._on_eager_fallback(
            name.group(1) if name else "<unknown>",
            _short(reason.group(1).strip()) if reason else "recompile limit",
        )


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
        self._check_mode(mode)
        self._mode: MonitorMode = mode
        self._hint = hint
        # Event kinds recorded and counted but never logged or raised: another
        # monitor (vLLM's own, for Triton) already reports them.
        self._quiet = frozenset(quiet_sources)
        self._lock = threading.RLock()
        self._events: list[CompileEvent] = []
        self._labels: list[str] = []
        self._pending_error: JitCompileError | None = None
        self._installed = False
        # Triton
        self._knobs: Any | None = None
        self._legacy_jit: Any | None = None
        self._prev_listener: Any | None = None
        self._prev_post_hook: Any | None = None
        self._listener_active = False
        self._last_listener_event: int | None = None
        # dynamo
        self._dynamo_handler: Any | None = None
        self._dynamo_stack: list[_PendingDynamo] = []
        self._log_handler: _FallbackLogHandler | None = None
        self._fallbacks_seen = 0

    # -- public API ---------------------------------------------------------

    @property
    def mode(self) -> MonitorMode:
        return self._mode

    @property
    def installed(self) -> bool:
        return self._installed

    @property
    def events(self) -> list[CompileEvent]:
        """Every event so far, oldest first (a copy)."""
        self._reconcile_fallbacks()
        with self._lock:
            return list(self._events)

    def compiles(self, label: str | None = None) -> int:
        """Real compiles (eager fallbacks included) for ``label``, or for all labels."""
        return sum(1 for e in self._select(label) if not e.cache_hit)

    def cache_loads(self, label: str | None = None) -> int:
        """On-disk cache loads for ``label``, or for all labels."""
        return sum(1 for e in self._select(label) if e.cache_hit)

    def clear(self) -> None:
        """Forget recorded events and any pending error."""
        with self._lock:
            self._events.clear()
            self._pending_error = None
            self._last_listener_event = None

    def arm(self, mode: MonitorMode) -> None:
        """Set the mode for what comes next: ``warn`` logs, ``error`` raises."""
        self._check_mode(mode)
        self._mode = mode

    def install(self) -> None:
        """Hook Triton (when importable) and dynamo (when torch is imported). Idempotent."""
        if self._installed:
            return
        self._installed = True
        self._install_triton()
        self._ensure_dynamo()

    def uninstall(self) -> None:
        """Remove this monitor's hooks and restore the ones it chained to."""
        if not self._installed:
            return
        self._installed = False
        self._uninstall_triton()
        self._uninstall_dynamo()

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
        if self._installed:
            self._ensure_dynamo()
        with self._lock:
            self._labels.append(label)
        try:
            yield
        finally:
            self._reconcile_fallbacks()  # while the label still applies
            with self._lock:
                self._labels.pop()
        self.check()

    def check(self) -> None:
        """Raise the first ``JitCompileError`` recorded in ``error`` mode, once."""
        if self._installed:
            self._ensure_dynamo()
        self._reconcile_fallbacks()
        with self._lock:
            error, self._pending_error = self._pending_error, None
        if error is not None:
            raise error

    # -- recording ------------------------------------------------------------

    @staticmethod
    def _check_mode(mode: str) -> None:
        if mode not in MONITOR_MODES:
            raise ValueError(f"monitor mode must be one of {', '.join(MONITOR_MODES)}: {mode!r}")

    def _select(self, label: str | None) -> list[CompileEvent]:
        events = self.events
        return events if label is None else [e for e in events if e.label == label]

    def _label(self) -> str | None:
        with self._lock:
            return self._labels[-1] if self._labels else None

    def _record(self, event: CompileEvent) -> int:
        with self._lock:
            self._events.append(event)
            index = len(self._events) - 1
        if self._mode == "off" or event.kind in self._quiet:
            return index
        hint = self._safe_hint(event)
        fields = event.to_dict() | {"hint": hint}
        if event.cache_hit:
            _log.info("jit_cache_load_after_warmup", **fields)
        elif self._mode == "warn":
            _log.warning("jit_compile_after_warmup", **fields)
        else:
            _log.error("jit_compile_after_warmup", **fields)
            with self._lock:
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

    # -- Triton ---------------------------------------------------------------

    def _install_triton(self) -> None:
        if "triton" not in sys.modules and importlib.util.find_spec("triton") is None:
            return
        try:
            triton = importlib.import_module("triton")
        except Exception as exc:  # triton present but broken (no driver): nothing to watch
            _log.debug("jit_monitor_triton_unavailable", error=repr(exc))
            return
        knobs = getattr(triton, "knobs", None)
        if knobs is not None:
            self._knobs = knobs
            compilation = getattr(knobs, "compilation", None)
            if compilation is not None and hasattr(compilation, "listener"):
                self._prev_listener = compilation.listener
                compilation.listener = self._triton_listener
                self._listener_active = True
            runtime = knobs.runtime
            self._prev_post_hook = runtime.jit_post_compile_hook
            runtime.jit_post_compile_hook = self._triton_post_hook
            return
        try:
            from triton.runtime.jit import JITFunction
        except ImportError:
            return
        if hasattr(JITFunction, "compiled_hook"):
            self._legacy_jit = JITFunction
            self._prev_post_hook = JITFunction.compiled_hook
            JITFunction.compiled_hook = self._triton_post_hook

    def _uninstall_triton(self) -> None:
        knobs, self._knobs = self._knobs, None
        if knobs is not None:
            if self._listener_active and knobs.compilation.listener == self._triton_listener:
                knobs.compilation.listener = self._prev_listener
            if knobs.runtime.jit_post_compile_hook == self._triton_post_hook:
                knobs.runtime.jit_post_compile_hook = self._prev_post_hook
        legacy, self._legacy_jit = self._legacy_jit, None
        if legacy is not None and legacy.compiled_hook == self._triton_post_hook:
            legacy.compiled_hook = self._prev_post_hook
        # A hook installed after ours still calls ours; once uninstalled it only chains.
        self._listener_active = False

    def _triton_listener(self, *args: Any, **kwargs: Any) -> Any:
        prev = self._prev_listener
        if self._installed:
            self._on_triton_compile(
                src=kwargs.get("src"),
                metadata=kwargs.get("metadata"),
                times=kwargs.get("times"),
                cache_hit=bool(kwargs.get("cache_hit", False)),
            )
        if prev is not None:
            return prev(*args, **kwargs)
        return None

    def _on_triton_compile(self, *, src: Any, metadata: Any, times: Any, cache_hit: bool) -> None:
        meta = metadata if isinstance(metadata, Mapping) else {}
        name = str(getattr(src, "name", None) or meta.get("name") or "<triton>")
        key = _triton_key(src)
        structured = key is not None
        if key is None:
            key = str(meta.get("hash", "?"))[:16]
        duration = None
        total = getattr(times, "total", None)
        if isinstance(total, int | float):
            duration = float(total) / 1e6  # CompileTimes are microseconds
        with self._lock:
            if self._dynamo_stack:
                # Part of the torch.compile in progress: one event for the whole frame.
                pending = self._dynamo_stack[-1]
                if cache_hit:
                    pending.nested_loads += 1
                else:
                    pending.nested_compiles += 1
                self._last_listener_event = None
                return
        event = CompileEvent(
            kind="triton",
            name=name,
            key=key,
            label=self._label(),
            cache_hit=cache_hit,
            duration_s=duration,
        )
        index = self._record(event)
        # Only a hash for a key: the post-compile hook that follows has a better one.
        self._last_listener_event = None if structured else index

    def _triton_post_hook(self, *args: Any, **kwargs: Any) -> Any:
        prev = self._prev_post_hook
        if self._installed:
            try:
                self._on_triton_post(kwargs)
            except Exception as exc:
                _log.debug("jit_monitor_hook_failed", error=repr(exc))
        if prev is not None:
            return prev(*args, **kwargs)
        return None

    def _on_triton_post(self, kwargs: Mapping[str, Any]) -> None:
        compile_info = kwargs.get("compile")
        key_value = kwargs.get("key")
        if key_value is None and isinstance(compile_info, Mapping):
            key_value = compile_info.get("key")
        fn = kwargs.get("fn")
        name = getattr(fn, "name", None) or getattr(
            getattr(fn, "jit_function", None), "__name__", None
        )
        if self._listener_active:
            # The listener already recorded this compile (it knows cache_hit); when it
            # had no signature to name the key by, take the hook's specialisation key.
            index, self._last_listener_event = self._last_listener_event, None
            if index is not None and key_value is not None:
                with self._lock:
                    if index < len(self._events):
                        self._events[index] = replace(self._events[index], key=_short(key_value))
                    if (
                        self._pending_error is not None
                        and self._pending_error.event.kind == "triton"
                    ):
                        old = self._pending_error
                        self._pending_error = JitCompileError(self._events[index], old.hint)
            return
        event = CompileEvent(
            kind="triton",
            name=str(name or "<triton>"),
            key=_short(key_value or "?"),
            label=self._label(),
            cache_hit=False,
            duration_s=None,
        )
        with self._lock:
            nested = bool(self._dynamo_stack)
            if nested:
                self._dynamo_stack[-1].nested_compiles += 1
        if not nested:
            self._record(event)

    # -- dynamo ---------------------------------------------------------------

    def _ensure_dynamo(self) -> None:
        """Register the compile callbacks (again, after a ``torch._dynamo.reset()``)."""
        if "torch" not in sys.modules:
            return
        if self._dynamo_handler is None:
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
            self._dynamo_handler = handler
            self._fallbacks_seen = _fallback_count(_dynamo_counters())
            self._log_handler = _FallbackLogHandler(self)
            logging.getLogger("torch._dynamo").addHandler(self._log_handler)
        handler = self._dynamo_handler
        if self._dynamo_start not in handler.start_callbacks:
            handler.register_start_callback(self._dynamo_start)
        if self._dynamo_end not in handler.end_callbacks:
            handler.register_end_callback(self._dynamo_end)

    def _uninstall_dynamo(self) -> None:
        handler, self._dynamo_handler = self._dynamo_handler, None
        if handler is not None:
            with contextlib.suppress(ValueError):
                handler.remove_start_callback(self._dynamo_start)
            with contextlib.suppress(ValueError):
                handler.remove_end_callback(self._dynamo_end)
        log_handler, self._log_handler = self._log_handler, None
        if log_handler is not None:
            logging.getLogger("torch._dynamo").removeHandler(log_handler)
        with self._lock:
            self._dynamo_stack.clear()

    def _dynamo_start(self, *args: Any, **kwargs: Any) -> None:
        try:
            info = args[0] if args else kwargs.get("args")
            trigger = getattr(getattr(info, "callback_trigger", None), "name", "DYNAMO")
            compile_id = getattr(info, "compile_id", None)
            name, key = _dynamo_frame_info() if trigger == "DYNAMO" else (None, None)
            if name is None:
                name = trigger.lower() if trigger != "DYNAMO" else "<frame>"
            if key is None:
                key = f"compile_id={compile_id}"
            pending = _PendingDynamo(
                start=time.perf_counter(),
                name=name,
                key=key,
                label=self._label(),
                counters=_snapshot(_dynamo_counters()),
                trigger=trigger,
            )
            with self._lock:
                self._dynamo_stack.append(pending)
        except Exception as exc:  # never break a compile
            _log.debug("jit_monitor_hook_failed", error=repr(exc))

    def _dynamo_end(self, *args: Any, **kwargs: Any) -> None:
        try:
            with self._lock:
                if not self._dynamo_stack:
                    return
                pending = self._dynamo_stack.pop()
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
            self._record(
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

    def _on_eager_fallback(self, name: str, reason: str) -> None:
        if not self._installed:
            return
        with self._lock:
            self._fallbacks_seen += 1
        self._record(
            CompileEvent(
                kind="eager_fallback",
                name=name,
                key=reason,
                label=self._label(),
                cache_hit=False,
                duration_s=None,
            )
        )

    def _reconcile_fallbacks(self) -> None:
        """Count fallbacks dynamo counted but did not log (its logger set above WARNING)."""
        if self._dynamo_handler is None:
            return
        counted = _fallback_count(_dynamo_counters())
        with self._lock:
            missing = counted - self._fallbacks_seen
            if missing <= 0:
                return
            self._fallbacks_seen = counted
        for _ in range(missing):
            self._record(
                CompileEvent(
                    kind="eager_fallback",
                    name="<unknown>",
                    key="recompile limit",
                    label=self._label(),
                    cache_hit=False,
                    duration_s=None,
                )
            )
