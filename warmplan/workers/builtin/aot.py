"""Ahead-of-time compiled functions of the built-in engine, kept under the cache root.

A restarted worker should load what an earlier process compiled, not trace it again:
``torch.compile`` with warm on-disk caches still runs dynamo over the model for every
compile size and looks each graph up (0.6-2.4 s a size on an H200, issue 13). An
artefact made by ``torch.compile(fn, fullgraph=True).aot_compile(...)`` holds the
graph's guards and inductor's output; loading it runs neither dynamo nor inductor's
lowering.

One file per function and specialisation under
``<root>/<engine key>/<name>.bin``: a header line (JSON: format, the environment it
was built in, the payload's sha256) and torch's serialised function. The engine key
hashes what changes the compiled code (the engine config, dtype, device type, the
engine's own source) and never a host name, address or process id, so ranks and
restarted workers share artefacts. The environment (Python, torch, Triton,
FlashInfer, CUDA, GPU) is checked on load; an artefact from another one, a
truncated or corrupt file, or one torch refuses is not loaded: it is rebuilt and
replaced, with a note (``AotStore.notes``, and a log line).

AOT functions never recompile: a call their guards reject (a shape outside the
plan's compile sizes, another dtype) goes to the JIT path (``AotFunction``), which
the JIT monitor sees compile, with a warning naming the reason.

Over ~400 lines on purpose: the artefact store, its identity (what makes an
artefact foreign) and the guarded call are one contract: what is saved, what is
refused and what falls back to the JIT path must be read together.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import platform
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import torch

from warmplan.fsutil import replace_file
from warmplan.log import get_logger

FORMAT: Final = 1
MAGIC: Final = b"warmplan-aot\n"
# The engine's own code: a change in it changes the traced graphs.
_SOURCES: Final = ("model.py", "attention.py", "kernels.py", "runner.py")
# Largest artefact read back; bigger files are treated as corrupt (a planted file).
MAX_BYTES: Final = 1 << 30

_log = get_logger("warmplan.aot")


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # absent or broken optional install: not part of the build
        return None
    return str(getattr(mod, "__version__", "unknown"))


def environment(device: torch.device) -> dict[str, str | None]:
    """What an artefact is only valid in: versions and the device it ran on.

    No host name, address or process id: two hosts with the same software and GPU
    model share artefacts (issue 13: cache keys exclude volatile fields).
    """
    cuda = device.type == "cuda"
    gpu = capability = None
    if cuda:
        index = device.index if device.index is not None else torch.cuda.current_device()
        gpu = torch.cuda.get_device_name(index)
        capability = "{}.{}".format(*torch.cuda.get_device_capability(index))
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton") if cuda else None,
        "flashinfer": _version("flashinfer") if cuda else None,
        "cuda": torch.version.cuda if cuda else None,
        "device": device.type,
        "gpu": gpu,
        "capability": capability,
    }


def source_digest() -> str:
    """sha256 of the engine's source files that shape its compiled graphs."""
    here = Path(__file__).parent
    h = hashlib.sha256()
    for name in _SOURCES:
        h.update(name.encode())
        h.update((here / name).read_bytes())
    return h.hexdigest()


def engine_key(fingerprint: Mapping[str, Any], env: Mapping[str, str | None]) -> str:
    """The directory name of one engine's artefacts: its config fingerprint, the
    engine's source and the environment, hashed (16 hex digits)."""
    blob = json.dumps(
        {"config": dict(fingerprint), "source": source_digest(), "env": dict(env)},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _describe_mismatch(built: Mapping[str, Any], here: Mapping[str, Any]) -> str | None:
    diffs = [
        f"{k} {built.get(k)!s} (this process: {here.get(k)!s})"
        for k in sorted(set(built) | set(here))
        if built.get(k) != here.get(k)
    ]
    return "built with " + ", ".join(diffs) if diffs else None


@dataclass(slots=True)
class AotStats:
    """What the store did in this process (read by ``bench/warm_restart.py``)."""

    loads: int = 0
    compiles: int = 0
    refused: int = 0
    load_s: float = 0.0
    compile_s: float = 0.0
    save_s: float = 0.0
    guard_s: float = 0.0
    guard_misses: int = 0


@dataclass(slots=True)
class AotStore:
    """Loads, or compiles and saves, the engine's AOT functions under ``directory``."""

    directory: str
    env: dict[str, str | None]
    notes: list[str] = field(default_factory=list)
    stats: AotStats = field(default_factory=AotStats)

    @classmethod
    def for_engine(
        cls, root: str, fingerprint: Mapping[str, Any], device: torch.device
    ) -> AotStore:
        env = environment(device)
        return cls(os.path.join(root, "builtin", engine_key(fingerprint, env)), env)

    def path(self, name: str) -> str:
        return os.path.join(self.directory, f"{name}.bin")

    def get(
        self,
        name: str,
        fn: Callable[..., Any],
        example: Sequence[Any],
        *,
        dynamic: bool,
        mark_dynamic: Sequence[tuple[int, int]] = (),
    ) -> Any:
        """The AOT function ``name``: loaded when a valid artefact exists, else
        compiled from ``fn`` on ``example`` (``mark_dynamic``: (argument, dim) pairs
        that may vary) and saved. Returns torch's ``AOTCompiledFunction``.

        Only the example is marked: a loaded artefact's guards refuse a call whose
        tensors carry dynamo's dim marking, so calls into it must not be marked."""
        loaded = self._load(name)
        if loaded is not None:
            return loaded
        for index, dim in mark_dynamic:
            torch._dynamo.maybe_mark_dynamic(example[index], dim)
        start = time.perf_counter()
        with _bracket(f"warmplan-aot compile {name}"):
            compiled = aot_compile(fn, tuple(example), dynamic=dynamic)
        self.stats.compiles += 1
        self.stats.compile_s += time.perf_counter() - start
        start = time.perf_counter()
        try:
            self._save(name, compiled)
        except (OSError, RuntimeError, TypeError, AttributeError) as exc:
            # Not saving costs the next process a compile; it must not fail this one.
            self._note(f"{self.path(name)}: not saved: {exc}")
        self.stats.save_s += time.perf_counter() - start
        return compiled

    def _save(self, name: str, compiled: Any) -> None:
        buf = io.BytesIO()
        result = type(compiled).serialize(compiled)
        data: bytes = getattr(result, "serialized_data", result)  # torch 2.13 / older
        header = {"format": FORMAT, "env": self.env, "sha256": hashlib.sha256(data).hexdigest()}
        buf.write(MAGIC)
        buf.write(json.dumps(header, sort_keys=True).encode() + b"\n")
        buf.write(data)
        replace_file(self.path(name), buf.getvalue())

    def _load(self, name: str) -> Any | None:
        path = self.path(name)
        why = None
        start = time.perf_counter()
        try:
            raw = _read(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            why = f"unreadable: {exc}"
            raw = b""
        if why is None:
            header, payload, why = _parse(raw)
            if why is None:
                assert header is not None
                why = _describe_mismatch(header.get("env") or {}, self.env)
            if why is None:
                try:
                    with _bracket(f"warmplan-aot load {name}"), _in_process():
                        loaded = torch.compiler.load_compiled_function(io.BytesIO(payload))
                        _count_load()
                except Exception as exc:  # torch's own checks (SystemInfo), or a bad pickle
                    why = f"torch refused it: {type(exc).__name__}: {exc}"
                else:
                    self.stats.loads += 1
                    self.stats.load_s += time.perf_counter() - start
                    return loaded
        self.stats.refused += 1
        self._note(f"{path}: not loaded, recompiling: {why}")
        return None

    def _note(self, text: str) -> None:
        self.notes.append(text)
        _log.warning("aot.artefact_refused", note=text)


def aot_compile(fn: Callable[..., Any], example: tuple[Any, ...], *, dynamic: bool) -> Any:
    """``torch.compile(fn, fullgraph=True, dynamic=dynamic).aot_compile(...)``.

    torch 2.13 always offers ``aot_compile``; torch 2.10-2.11 only under
    ``torch._dynamo.config.enable_aot_compile`` (as vLLM sets it); without either,
    ``torch._dynamo.aot_compile.aot_compile_fullgraph`` with inductor.
    """
    config = torch._dynamo.config
    patch = (
        config.patch(enable_aot_compile=True)
        if hasattr(config, "enable_aot_compile")
        else contextlib.nullcontext()
    )
    # No duck sizing: two dynamic sizes that happen to be equal in the example (17
    # tokens in a block table of 17 rows) would get one symbol, and the artefact a
    # guard that they stay equal - so one compile key's artefact would serve only
    # the example's coincidence, and the next size of its class would miss it.
    from torch.fx.experimental import _config as fx_config

    no_duck = (
        fx_config.patch(use_duck_shape=False)  # type: ignore[attr-defined]
        if hasattr(fx_config, "use_duck_shape")
        else contextlib.nullcontext()
    )
    with patch, no_duck:
        optimized: Any = torch.compile(fn, fullgraph=True, dynamic=dynamic)
        method = getattr(optimized, "aot_compile", None)
        if method is not None:
            return method((example, {}))
        import inspect

        from torch._dynamo.aot_compile import aot_compile_fullgraph
        from torch._dynamo.hooks import Hooks

        extra = (
            {"dynamic": dynamic}
            if "dynamic" in inspect.signature(aot_compile_fullgraph).parameters
            else {}
        )
        inductor: Any = getattr(torch, "_TorchCompileInductorWrapper")  # noqa: B009  # untyped
        backend = inductor("default", None, dynamic)
        return aot_compile_fullgraph(fn, (example, {}), Hooks(), backend, **extra)


def _read(path: str) -> bytes:
    """The file's bytes; a non-regular file or one over ``MAX_BYTES`` is an OSError."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        import stat

        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"not a regular file: {path}")
        if st.st_size > MAX_BYTES:
            raise OSError(f"{st.st_size} bytes, more than {MAX_BYTES}")
        return f.read()


def _parse(raw: bytes) -> tuple[dict[str, Any] | None, bytes, str | None]:
    """(header, payload, None), or (None, b"", why the file is not an artefact)."""
    if not raw.startswith(MAGIC):
        return None, b"", "not a warmplan AOT artefact"
    line, sep, payload = raw[len(MAGIC) :].partition(b"\n")
    try:
        header = json.loads(line) if sep else None
    except ValueError:
        header = None
    if not isinstance(header, dict):
        return None, b"", "its header is not readable"
    if header.get("format") != FORMAT:
        return None, b"", f"format {header.get('format')!r}, expected {FORMAT}"
    if header.get("sha256") != hashlib.sha256(payload).hexdigest():
        return None, b"", "its payload does not match its checksum (truncated or corrupt)"
    return header, payload, None


@contextlib.contextmanager
def _bracket(compile_id: str) -> Iterator[None]:
    """Run inside dynamo's compile callbacks, so the JIT monitor attributes an AOT
    compile (or load) to the step in progress like any torch.compile."""
    from torch._dynamo.callback import CallbackTrigger, callback_handler

    with callback_handler.install_callbacks(CallbackTrigger.DYNAMO, compile_id):
        yield


def _in_process() -> contextlib.AbstractContextManager[Any]:
    """Load kernels in this process, not through inductor's compile-worker pool.

    Loading an artefact re-runs inductor's output module, whose kernels go through
    ``AsyncCompile``; with ``compile_threads > 1`` the first one starts the pool of
    compile workers (one per core, each importing torch) to load binaries that are
    already built, and the process then waits for them at exit: 8.6-10.5 s of a
    warm H200 process's 23-29 s (issue 13). Compiles keep the pool.
    """
    from torch._inductor import config

    patch: contextlib.AbstractContextManager[Any] = config.patch(compile_threads=1)
    return patch


def _count_load() -> None:
    """Count a load as what it is, an AOTAutograd cache entry read from a bundle:
    torch does not count these, and the monitor tells loads from compiles by this
    counter (``warmplan.monitor.dynamo``)."""
    from torch._dynamo.utils import counters

    counters["aot_autograd"]["autograd_cache_hit"] += 1


class AotFunction:
    """One engine function, ahead of time per specialisation, else the JIT path.

    ``key_of(args)`` names the specialisation of a call (``None``: not one the plan
    can cover, run ``jit``); the first call of a key loads or compiles its artefact.
    A call the artefact's guards reject runs ``jit`` (the monitor sees that compile)
    and logs why, once per key.
    """

    def __init__(
        self,
        store: AotStore,
        name: str,
        fn: Callable[..., Any],
        jit: Callable[..., Any],
        key_of: Callable[[Sequence[Any]], str | None],
        *,
        dynamic: bool,
        mark_dynamic: Sequence[tuple[int, int]] = (),
    ) -> None:
        self.store = store
        self.name = name
        self._fn = fn
        self._jit = jit
        self._key_of = key_of
        self._dynamic = dynamic
        self._mark = tuple(mark_dynamic)
        self._compiled: dict[str, Any] = {}
        self._warned: set[str] = set()

    def _get(self, key: str, args: Sequence[Any]) -> Any:
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self.store.get(
                f"{self.name}-{key}",
                self._fn,
                args,
                dynamic=self._dynamic,
                mark_dynamic=self._mark,
            )
            if hasattr(compiled, "guard_check"):
                compiled.disable_guard_check()  # checked at each call, once
            self._compiled[key] = compiled
        return compiled

    def prepare(self, *args: Any) -> tuple[str | None, str]:
        """Load or compile the artefact a call with ``args`` would use, without the
        call (a compile key warmed without a launch). Returns the key and what it
        took: ``present`` (already in this process), ``loaded`` or ``compiled``;
        a key of ``None`` means the call would run the JIT path (nothing prepared)."""
        key = self._key_of(args)
        if key is None:
            return None, "present"
        if key in self._compiled:
            return key, "present"
        before = self.store.stats.compiles
        self._get(key, args)
        return key, "compiled" if self.store.stats.compiles > before else "loaded"

    def __call__(self, *args: Any) -> Any:
        key = self._key_of(args)
        if key is None:
            return self._run_jit(args)
        compiled = self._get(key, args)
        check = getattr(compiled, "guard_check", None)
        if check is None:  # a torch without guard_check: the call checks, and raises
            try:
                return compiled(*args)
            except RuntimeError as exc:
                if "GuardManager check failed" not in str(exc):
                    raise
                return self._miss(key, args, str(exc))
        start = time.perf_counter()
        ok = check(*args)
        self.store.stats.guard_s += time.perf_counter() - start
        if not ok:
            return self._miss(key, args, None, compiled)
        return compiled(*args)

    def _miss(self, key: str, args: Sequence[Any], reason: str | None, compiled: Any = None) -> Any:
        """A call the artefact's guards reject: say why (once per key), run the JIT path."""
        self.store.stats.guard_misses += 1
        if key not in self._warned:
            self._warned.add(key)
            if reason is None:
                try:
                    verbose = compiled._artifacts.guard_manager.check_verbose(
                        compiled.prepare_f_locals(*args)
                    )
                    reason = str(getattr(verbose, "verbose_code_parts", verbose))
                except Exception as exc:  # the reason is a courtesy; the fallback is not
                    reason = f"(reason unavailable: {exc!r})"
            _log.warning(
                "aot.guard_miss",
                function=self.name,
                key=key,
                reason=reason[:400],
                note="running the JIT path (torch.compile); the monitor counts its compile",
            )
        return self._run_jit(args)

    def _run_jit(self, args: Sequence[Any]) -> Any:
        for index, dim in self._mark:
            torch._dynamo.maybe_mark_dynamic(args[index], dim)
        return self._jit(*args)
