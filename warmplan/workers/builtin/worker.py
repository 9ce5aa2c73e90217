"""BuiltinWorker: the Worker (and ServingWorker) protocol over the built-in engine."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from warmplan.domains import KeyDomain
from warmplan.workers.base import (
    SHAPES,
    AutotuneBackend,
    Batch,
    CompileKey,
    Facts,
    JitKernelInfo,
    KeyResult,
    KeySet,
    Limits,
    Shape,
    WorkerInfo,
)
from warmplan.workers.builtin.autotune import (
    BuiltinAutotuneBackend,
    TritonAutotuneBackend,
    flashinfer_backend,
)
from warmplan.workers.builtin.config import (
    EngineConfig,
    check_memory,
    check_steps,
    facts_for,
)
from warmplan.workers.builtin.jit_keys import KeyCompiler, KeyModel
from warmplan.workers.builtin.runner import ModelRunner

if TYPE_CHECKING:
    from warmplan.steps.base import ResolvedStep
    from warmplan.world import World


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # a broken optional install is reported as absent
        return None
    return str(getattr(mod, "__version__", "unknown"))


class BuiltinWorker:
    """The reference paged-KV engine as a warmplan worker.

    ``compile=False`` runs the forward and the metadata kernels eagerly (same code,
    no ``torch.compile``), for numerics tests. ``aot_root``: a directory of
    ahead-of-time compiled functions to load from and save to (a restarted worker
    loads instead of tracing; ``warmplan.workers.builtin.aot``); ``None`` compiles
    just in time.
    """

    def __init__(
        self,
        config: EngineConfig | Mapping[str, Any] | None = None,
        *,
        world: World | None = None,
        compile: bool = True,
        aot_root: str | None = None,
    ) -> None:
        if not isinstance(config, EngineConfig):
            config = EngineConfig.from_mapping(config)
        self.config = config
        _check_memory(config)
        try:
            self.runner = ModelRunner(config, compile=compile, aot_root=aot_root)
        except (RuntimeError, MemoryError) as exc:  # torch's allocation failures
            raise ValueError(f"cannot allocate the engine: {exc}") from None
        if world is None:
            from warmplan.world import LocalWorld

            world = LocalWorld()
        self._world: World = world
        self._key_cases: dict[str, dict[str, Any]] = {}
        self._key_variants: dict[str, list[Any]] = {}
        self._backends: dict[str, AutotuneBackend] = {
            "builtin": BuiltinAutotuneBackend(self.runner),
            "triton": TritonAutotuneBackend(self.runner),
            "flashinfer": flashinfer_backend(self.runner),
        }

    @property
    def limits(self) -> Limits:
        return limits_of(self.config)

    @property
    def facts(self) -> Facts:
        return facts_of(self.config, self.runner.device)

    @property
    def world(self) -> World:
        return self._world

    def describe(self) -> WorkerInfo:
        return WorkerInfo(
            engine="builtin",
            device=_device_name(self.runner.device),
            versions={
                "torch": torch.__version__,
                "triton": _version("triton"),
                "flashinfer": _version("flashinfer"),
            },
            model=self.config.as_dict(),
        )

    def config_fingerprint(self) -> Mapping[str, Any]:
        out = self.config.fingerprint()
        out["dtype"] = str(self.runner.dtype).removeprefix("torch.")
        return out

    def slot_mapping(self, num_tokens: int) -> None:
        self.runner.slot_mapping(num_tokens)

    def dummy_run(
        self,
        shape: Shape,
        num_tokens: int,
        *,
        prior_context: int = 0,
        force_attention: bool = False,
    ) -> None:
        """Run a synthetic batch through the serving path (``ModelRunner.dummy_specs``).

        The engine always builds full attention metadata, so ``force_attention``
        changes nothing here; it is accepted for the protocol.
        """
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")
        self.runner.dummy_run(shape, num_tokens, prior_context)

    def execute(self, batch: Batch) -> None:
        """Run a real batch's shape exactly as serving would (synthetic token ids)."""
        specs = [(1, _decode_context(), True)] * batch.decode
        specs += [(chunk.tokens, chunk.context, False) for chunk in batch.prefill]
        self.runner.run_requests(specs)

    def preserve_state(self) -> contextlib.AbstractContextManager[None]:
        return self.runner.preserve_state()

    def synchronize(self) -> None:
        self.runner.synchronize()

    def autotune_backend(self, name: str) -> AutotuneBackend | None:
        return self._backends.get(name)

    # ------------------------------------------------------------------ compile keys

    def _key_model(self) -> KeyModel:
        r = self.runner
        return KeyModel(self.config, triton=r.kernels.use_triton, choose_impl=r.tuner.choose)

    def jit_kernels(self) -> Mapping[str, JitKernelInfo]:
        return self._key_model().kernels()

    def compile_keys(
        self, kernel: str, domain: KeyDomain | None, *, mode: str = "replace"
    ) -> KeySet:
        model = self._key_model()
        keyset, cases = model.keyset(kernel, domain, mode, self.limits)
        self._key_cases.update(cases)
        self._key_variants.update(model.variants)
        return keyset

    def compile(self, keys: Sequence[CompileKey], *, threads: int = 1) -> list[KeyResult]:
        model = self._key_model()
        model.variants.update(self._key_variants)
        compiler = KeyCompiler(self.runner, model)
        with self.runner.preserve_state():
            return compiler.compile(keys, self._key_cases, threads)

    def key_artefacts(self) -> Sequence[str]:
        """Where compiled keys live: the AOT store, inductor's and Triton's caches."""
        out = []
        if self.runner.aot is not None:
            out.append(self.runner.aot.directory)
        out.extend(d for d in (_inductor_dir(), _triton_dir()) if d)
        return out

    def check_fits(self, steps: Sequence[ResolvedStep]) -> None:
        """Raise ``ValueError`` naming the step and the config field to change when a
        step's applied batches cannot run on this engine (``config.check_steps``)."""
        check_steps(self.config, steps)

    def padded_num_tokens(self, num_tokens: int) -> int:
        """The compile size a batch of ``num_tokens`` runs at (for ``verify --suggest``)."""
        return self.runner.padded_size(num_tokens)


def _inductor_dir() -> str | None:
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir
    except ImportError:
        return None
    return str(cache_dir())


def _triton_dir() -> str | None:
    if os.environ.get("TRITON_CACHE_DIR"):
        return os.environ["TRITON_CACHE_DIR"]
    try:
        from triton import knobs
    except ImportError:
        return None
    return str(knobs.cache.dir) if getattr(knobs.cache, "dir", None) else None


def limits_of(config: EngineConfig) -> Limits:
    """The limits an engine of ``config`` reports (no engine needed)."""
    return Limits(
        max_num_tokens=config.max_num_tokens,
        max_num_batched_tokens=config.max_num_batched_tokens,
        max_num_seqs=config.max_num_seqs,
    )


def facts_of(config: EngineConfig, device: torch.device | None = None) -> Facts:
    """The facts an engine of ``config`` on ``device`` reports (no engine needed:
    a plan can be resolved against them before the engine is built)."""
    if device is None:
        from warmplan.workers.builtin.runner import resolve_device

        device = resolve_device(config.device)
    capability = None
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        capability = (major, minor)
    return facts_for(config, device.type, capability)


def _check_memory(config: EngineConfig) -> None:
    """Refuse, before allocating, a config that cannot fit in this device's free memory."""
    from warmplan.workers.builtin.runner import resolve_device, resolve_dtype

    device = resolve_device(config.device)
    dtype_bytes = resolve_dtype(config.dtype, device).itemsize
    cuda = device.type == "cuda"
    available = torch.cuda.mem_get_info(device)[0] if cuda else _host_available()
    check_memory(config, dtype_bytes=dtype_bytes, available=available, where=device.type)


def _host_available() -> int:
    """MemAvailable from /proc/meminfo, else physical memory (bytes)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        return 1 << 62


def _device_name(device: torch.device) -> str:
    """``cuda:0 (NVIDIA H200)`` on CUDA, else the device type."""
    if device.type != "cuda":
        return str(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def _decode_context() -> int:
    from warmplan.workers.builtin.config import DECODE_CONTEXT

    return DECODE_CONTEXT
