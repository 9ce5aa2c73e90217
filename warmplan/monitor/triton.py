"""The Triton source of the JIT monitor.

``triton.knobs.compilation.listener`` fires inside every ``triton.compile``
(``cache_hit`` tells a compile from an on-disk cache load);
``triton.knobs.runtime.jit_post_compile_hook`` fires after a ``@triton.jit`` launch
compiled a new specialisation and gives its specialisation key. Releases before the
knobs module (< 3.4) have ``JITFunction.compiled_hook`` instead. Hooks already
installed are chained, and restored by ``uninstall``. A Triton compile inside a
torch.compile frame folds into that frame's event. Nothing raises inside a hook.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Mapping
from typing import Any

from warmplan.log import get_logger
from warmplan.monitor.events import CompileEvent, EventStore, short

_log = get_logger("warmplan.monitor")


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
    return short(", ".join(parts))


class TritonSource:
    """Hooks Triton's compile listener and post-compile hook into an ``EventStore``."""

    def __init__(self, store: EventStore) -> None:
        self._store = store
        self.installed = False
        self._knobs: Any | None = None
        self._legacy_jit: Any | None = None
        self._prev_listener: Any | None = None
        self._prev_post_hook: Any | None = None
        self._listener_active = False
        self._last_listener_event: int | None = None

    def forget(self) -> None:
        """Drop the listener's pointer into events the store no longer has."""
        self._last_listener_event = None

    def install(self) -> None:
        self.installed = True
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

    def uninstall(self) -> None:
        self.installed = False
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
        if self.installed:
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
        if self._store.fold_into_compile(cache_hit=cache_hit):
            # Part of the torch.compile in progress: one event for the whole frame.
            self._last_listener_event = None
            return
        event = CompileEvent(
            kind="triton",
            name=name,
            key=key,
            label=self._store.label(),
            cache_hit=cache_hit,
            duration_s=duration,
        )
        index = self._store.record(event)
        # Only a hash for a key: the post-compile hook that follows has a better one.
        self._last_listener_event = None if structured else index

    def _triton_post_hook(self, *args: Any, **kwargs: Any) -> Any:
        prev = self._prev_post_hook
        if self.installed:
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
                self._store.rekey(index, short(key_value))
            return
        event = CompileEvent(
            kind="triton",
            name=str(name or "<triton>"),
            key=short(key_value or "?"),
            label=self._store.label(),
            cache_hit=False,
            duration_s=None,
        )
        if not self._store.fold_into_compile(cache_hit=False):
            self._store.record(event)
