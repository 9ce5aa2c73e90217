"""What a vLLM worker is to warmplan whatever its runner's layout: limits, facts,
the world group, reports, FlashInfer backends, and the layout chosen by what the
runner has (never by a version string).

:class:`VllmWorker` picks its layout when constructed::

    adapter = VllmWorker(worker)   # SeedLayout or V2Layout, by the runner's attributes

* the seed's layout (``vllm.v1.worker.gpu_model_runner``): ``input_batch.block_table``
  with ``compute_slot_mapping``, and a ``_dummy_run`` that builds mixed and
  single-prefill batches itself (:mod:`warmplan.workers.vllm.seed`);
* vLLM 0.34's V2 runner (``vllm.v1.worker.gpu.model_runner``): ``block_tables`` and
  ``input_buffers``; batches of a given shape go through ``execute_model`` with
  scheduler outputs, as vLLM's own warmups build them (:mod:`warmplan.workers.vllm.v2`).
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from warmplan.domains import KeyDomain
from warmplan.workers.base import (
    AutotuneBackend,
    CompileKey,
    EngineWarmup,
    Facts,
    JitKernelInfo,
    KeyResult,
    KeySet,
    Limits,
    Shape,
    StepUnsupported,
    WorkerInfo,
)
from warmplan.workers.vllm.common import (
    BACKEND_NAMES,
    UnsupportedByVllm,
    VllmFlashInferBackend,
    dist_version,
    flashinfer_version,
    vllm_version,
)
from warmplan.workers.vllm.jit_keys import VllmJitKeys, triton_cache_dirs
from warmplan.workers.vllm.warmups import VLLM_WARMUPS, available_warmups, run_warmup
from warmplan.world import World
from warmplan.world.vllm_group import VllmWorld

LAYOUTS = ("seed", "v2")

# Why a process-local warmup (vLLM's elastic-EP joining worker calls
# kernel_warmup(process_local_only=True)) skips a step: the other ranks are serving
# and would never enter the collective.
LOCAL_ONLY_REASON = (
    "process_local_only: vLLM runs this warmup for a worker joining a running "
    "group, whose other ranks would never enter its collectives"
)


def runner_layout(runner: Any) -> str:
    """``v2`` for vLLM's V2 runner (``block_tables`` and ``input_buffers``), else
    ``seed`` (``input_batch.block_table``, the layout the seed describes)."""
    if hasattr(runner, "block_tables") and hasattr(runner, "input_buffers"):
        return "v2"
    return "seed"


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return str(value)


def named_keywords(method: Any) -> tuple[frozenset[str], bool]:
    """The keywords ``method`` really consumes, and whether it swallows others.

    A ``**kwargs`` that forwards to the overridden method (a subclass wrapper) takes
    that method's keywords too: the method resolution order is walked until a
    definition without ``**kwargs``. A keyword only a trailing ``**kwargs`` takes is
    swallowed (vLLM 0.34's ``_dummy_run`` drops unknown keywords silently).
    """
    owner = getattr(method, "__self__", None)
    name = getattr(method, "__name__", "")
    functions = [method]
    if owner is not None and name:
        functions = [
            vars(cls)[name] for cls in type(owner).__mro__ if callable(vars(cls).get(name))
        ]
    names: set[str] = set()
    for fn in functions:
        params = inspect.signature(fn).parameters.values()
        names.update(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return frozenset(names - {"self"}), False
    return frozenset(names - {"self"}), True


class VllmWorker:
    """A vLLM ``Worker`` (``vllm.v1.worker.gpu_worker.Worker``, or anything shaped
    like it) as a warmplan Worker::

        warmplan.run_plan(warmplan.load_plan("plans/dsv4.yaml"), VllmWorker(worker))

    ``env`` is what plan gates read (default ``os.environ``). ``process_local_only``
    is vLLM's flag of the same name (a worker joining a running group): steps that
    would run collectives are skipped with that reason.
    """

    layout: str = ""

    def __new__(cls, worker: Any, **kwargs: Any) -> VllmWorker:
        if cls is VllmWorker:
            from warmplan.workers.vllm.seed import SeedLayout
            from warmplan.workers.vllm.v2 import V2Layout

            picked: type[VllmWorker] = (
                V2Layout if runner_layout(worker.model_runner) == "v2" else SeedLayout
            )
            return super().__new__(picked)
        return super().__new__(cls)

    def __init__(
        self,
        worker: Any,
        *,
        env: Mapping[str, str] | None = None,
        process_local_only: bool = False,
    ) -> None:
        self._worker = worker
        self._env: Mapping[str, str] = os.environ if env is None else env
        self._world: VllmWorld | None = None
        self._backends: dict[str, VllmFlashInferBackend] = {}
        self._dummy_run_keywords: tuple[frozenset[str], bool] | None = None
        self._jit_keys = VllmJitKeys(lambda: getattr(self._runner, "jit_warmup_registry", None))
        self.process_local_only = process_local_only

    @property
    def vllm_worker(self) -> Any:
        return self._worker

    @property
    def _runner(self) -> Any:
        return self._worker.model_runner

    # -- limits and facts ---------------------------------------------------------

    @property
    def limits(self) -> Limits:
        scheduler = self._worker.scheduler_config
        return Limits(
            max_num_tokens=int(getattr(self._runner, "max_num_tokens", 1)),
            max_num_batched_tokens=int(scheduler.max_num_batched_tokens),
            max_num_seqs=int(scheduler.max_num_seqs),
        )

    def attention_backends(self) -> tuple[str, ...]:
        """Every attention group's backend name, flattened, in vLLM's group order;
        a backend whose ``get_name()`` raises ``NotImplementedError`` has none."""
        names: list[str] = []
        for groups in getattr(self._runner, "attn_groups", None) or ():
            for group in groups:
                get_name = getattr(getattr(group, "backend", None), "get_name", None)
                if get_name is None:
                    continue
                try:
                    names.append(str(get_name()))
                except NotImplementedError:
                    continue
        return tuple(names)

    def flags(self) -> dict[str, bool]:
        """vLLM's kernel-config switches, as plan gates read them. A switch the
        installed vLLM lacks, or leaves ``None``, is absent (unset)."""
        flags: dict[str, bool] = {}
        kernel_config = getattr(getattr(self._worker, "vllm_config", None), "kernel_config", None)
        for name in (
            "enable_flashinfer_autotune",
            "enable_jit_warmup",
            "enable_cutedsl_warmup",
            "enable_rocm_aiter_gemm_warmup",
        ):
            value = getattr(kernel_config, name, None)
            if isinstance(value, bool):
                flags[name] = value
        return flags

    @property
    def facts(self) -> Facts:
        from vllm.platforms import current_platform

        if current_platform.is_cuda_alike():
            platform = "cuda"
        else:
            platform = str(getattr(current_platform, "device_name", None) or "cpu")
        # Whatever vLLM's platform reports, as vLLM's own gates read it (its
        # has_device_capability(90) does not ask for CUDA). As (major, minor), the
        # gate's family test (major*10+minor)//10 is is_device_capability_family()
        # and >= is has_device_capability().
        cap = current_platform.get_device_capability()
        capability = None if cap is None else (int(cap[0]), int(cap[1]))
        flags = self.flags()
        is_rocm = getattr(current_platform, "is_rocm", None)
        if callable(is_rocm) and is_rocm():
            flags["rocm"] = True  # absent (unset) elsewhere
        return Facts(
            platform=platform,
            device_capability=capability,
            attention_backends=self.attention_backends(),
            pooling=bool(getattr(self._runner, "is_pooling_model", False)),
            flags=flags,
            env=self._env,
        )

    @property
    def world(self) -> World:
        if self._world is None:
            from vllm.distributed.parallel_state import get_world_group

            self._world = VllmWorld(get_world_group())
        return self._world

    # -- reports and cache keys -------------------------------------------------------

    def describe(self) -> WorkerInfo:
        return WorkerInfo(
            engine="vllm",
            device=str(getattr(self._runner, "device", "unknown")),
            versions={
                "vllm": vllm_version(),
                "torch": torch.__version__,
                "triton": dist_version("triton", "pytorch-triton", "pytorch-triton-rocm"),
                "flashinfer": flashinfer_version(),
            },
            model=self.config_fingerprint(),
        )

    def config_fingerprint(self) -> Mapping[str, Any]:
        config = getattr(self._worker, "vllm_config", None)
        fields = {
            "model": ("model_config", "model"),
            "revision": ("model_config", "revision"),
            "dtype": ("model_config", "dtype"),
            "quantization": ("model_config", "quantization"),
            "max_model_len": ("model_config", "max_model_len"),
            "tensor_parallel_size": ("parallel_config", "tensor_parallel_size"),
            "pipeline_parallel_size": ("parallel_config", "pipeline_parallel_size"),
            "data_parallel_size": ("parallel_config", "data_parallel_size"),
            "enable_expert_parallel": ("parallel_config", "enable_expert_parallel"),
            "block_size": ("cache_config", "block_size"),
            "cache_dtype": ("cache_config", "cache_dtype"),
            "max_num_batched_tokens": ("scheduler_config", "max_num_batched_tokens"),
            "max_num_seqs": ("scheduler_config", "max_num_seqs"),
        }
        out: dict[str, Any] = {"engine": "vllm"}
        for key, (section, attr) in fields.items():
            value = getattr(getattr(config, section, None), attr, None)
            if value is not None:
                out[key] = _jsonable(value)
        max_num_tokens = getattr(self._runner, "max_num_tokens", None)
        if max_num_tokens is not None:
            out["max_num_tokens"] = int(max_num_tokens)
        out["attention_backends"] = list(self.attention_backends())
        return out

    # -- what every layout shares -------------------------------------------------------

    def _check_keywords(self, kwargs: Mapping[str, Any], shape: str) -> None:
        """Refuse a keyword the installed ``_dummy_run`` would not consume: a
        keyword only a ``**kwargs`` takes is dropped, and the run silently becomes
        another shape."""
        if self._dummy_run_keywords is None:
            self._dummy_run_keywords = named_keywords(self._runner._dummy_run)
        names, swallows = self._dummy_run_keywords
        for keyword in kwargs:
            if keyword in names:
                continue
            version = vllm_version()
            how = (
                f"would swallow {keyword!r} in **kwargs and never read it"
                if swallows
                else f"has no keyword {keyword!r}"
            )
            raise UnsupportedByVllm(
                f"vLLM {version}: {type(self._runner).__name__}._dummy_run {how}, "
                f"which a {shape!r} dummy run needs; it takes: {', '.join(sorted(names))}",
                keyword=keyword,
                vllm_version=version,
            )

    def _refuse_collectives(self, what: str) -> None:
        if self.process_local_only:
            raise StepUnsupported(f"{what}: {LOCAL_ONLY_REASON}")

    def synchronize(self) -> None:
        """``torch.accelerator.synchronize()``, as vLLM does after its warmups."""
        if torch.accelerator.is_available():
            torch.accelerator.synchronize()

    def autotune_backend(self, name: str) -> AutotuneBackend | None:
        if name not in BACKEND_NAMES:
            return None
        self._refuse_collectives(f"autotune backend {name!r}")
        backend = self._backends.get(name)
        if backend is None:
            backend = self._backends[name] = VllmFlashInferBackend(
                name,
                vllm_config=getattr(self._worker, "vllm_config", None),
                worker=self._worker,
            )
        return backend

    # -- vLLM's own named warmups (kernel_warmup()'s parts) -------------------------

    def engine_warmups(self) -> Mapping[str, EngineWarmup]:
        """The parts of the installed vLLM's ``kernel_warmup()`` that exist here, in
        its order (:data:`warmplan.workers.vllm.warmups.VLLM_WARMUPS`)."""
        return {w.name: w.info for w in available_warmups()}

    def run_engine_warmup(self, name: str) -> None:
        spec = next((w for w in VLLM_WARMUPS if w.name == name), None)
        if spec is None:
            raise StepUnsupported(
                f"vLLM {vllm_version()} has no warmup named {name!r}; it has: "
                f"{', '.join(self.engine_warmups())}"
            )
        if spec.collective:
            self._refuse_collectives(f"vLLM warmup {name!r}")
        run_warmup(spec, self._worker)

    # -- compile keys: the runner's jit_warmup_registry (warmplan.workers.vllm.jit_keys) --

    def jit_kernels(self) -> Mapping[str, JitKernelInfo]:
        """Every kernel registered on the runner's ``jit_warmup_registry``; none
        without one."""
        return self._jit_keys.jit_kernels()

    def compile_keys(
        self, kernel: str, domain: KeyDomain | None, *, mode: str = "replace"
    ) -> KeySet:
        return self._jit_keys.compile_keys(kernel, domain, mode=mode, env=self.limits.as_dict())

    def compile(self, keys: Sequence[CompileKey], *, threads: int = 1) -> list[KeyResult]:
        return self._jit_keys.compile(keys, threads=threads)

    def key_artefacts(self) -> Sequence[str]:
        return triton_cache_dirs()

    # -- the layout's own -----------------------------------------------------------

    def slot_mapping(self, num_tokens: int) -> None:
        raise NotImplementedError

    def dummy_run(
        self,
        shape: Shape,
        num_tokens: int,
        *,
        prior_context: int = 0,
        force_attention: bool = False,
    ) -> None:
        raise NotImplementedError

    def preserve_state(self) -> contextlib.AbstractContextManager[None]:
        raise NotImplementedError
