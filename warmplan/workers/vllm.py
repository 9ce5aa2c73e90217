"""The vLLM adapter: warmplan's Worker protocol over vLLM's ``Worker`` and
``GPUModelRunner``, and the plugin hook that runs a plan inside vLLM's own warmup.

Everything here speaks vLLM's names (``max_num_tokens``, ``_dummy_run``,
``input_batch.block_table``, ``query_start_loc``, ``get_world_group()``) and calls
them the way vLLM's DeepSeek-V4 warmup in
``vllm/model_executor/warmup/kernel_warmup.py`` does, so that ``plans/dsv4.yaml``
run through :class:`VllmWorker` makes the same calls with the same arguments.

Every ``import vllm`` of warmplan lives in this module, inside functions: importing
it needs torch but not vLLM, and tests stand a fake ``vllm`` package in vLLM's place.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import inspect
import json
import os
import shutil
import sys
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from warmplan.dist import World, WorldError, WorldTimeout
from warmplan.errors import UserError, WarmplanError
from warmplan.log import get_logger
from warmplan.workers.base import (
    SHAPES,
    AutotuneBackend,
    AutotuneLoadError,
    Facts,
    Limits,
    Shape,
    WorkerInfo,
)

log = get_logger(__name__)

__all__ = [
    "BACKEND_NAMES",
    "MODE_ENV",
    "PLAN_ENV",
    "REPORT_ENV",
    "UnsupportedByVllm",
    "VllmFlashInferBackend",
    "VllmWorker",
    "VllmWorld",
    "WarmplanWorkerExtension",
    "register",
]

# The `_dummy_run` keyword that turns each shape on; "plain" passes none.
_SHAPE_KEYWORD: dict[str, str | None] = {
    "mixed": "create_mixed_batch",
    "single_prefill": "create_single_prefill",
    "uniform_decode": "uniform_decode",
    "plain": None,
}

# "flashinfer": FlashInfer's general autotuner (vLLM's flashinfer_autotune).
# "flashinfer_dsv4_decode": the DeepSeek-V4 SM120 sparse-MLA decode autotuner
# (vLLM's _deepseek_v4_sparse_mla_decode_autotune), a separate FlashInfer context.
BACKEND_NAMES: tuple[str, ...] = ("flashinfer", "flashinfer_dsv4_decode")


class UnsupportedByVllm(WarmplanError):
    """The installed vLLM cannot do what a step asks (a keyword its API lacks).

    Raised before anything ran; the executor names the step it came from.
    """

    exit_code = 2

    def __init__(self, message: str, *, keyword: str, vllm_version: str) -> None:
        self.keyword = keyword
        self.vllm_version = vllm_version
        super().__init__(message)


def _vllm_version() -> str:
    try:
        import vllm

        return str(getattr(vllm, "__version__", "unknown"))
    except ImportError:
        return "not installed"


def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _flashinfer_version() -> str | None:
    version = _dist_version("flashinfer-python", "flashinfer")
    if version is not None:
        return version
    module = sys.modules.get("flashinfer")
    if module is None and importlib.util.find_spec("flashinfer") is not None:
        try:
            module = importlib.import_module("flashinfer")
        except ImportError:
            module = None
    return None if module is None else str(getattr(module, "__version__", "unknown"))


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return str(value)


class VllmWorld:
    """vLLM's world group (``get_world_group()``) as a :class:`warmplan.dist.World`.

    vLLM's ``GroupCoordinator`` takes no per-call timeout. ``barrier`` therefore uses
    ``torch.distributed.monitored_barrier`` on the group's gloo ``cpu_group`` when
    torch.distributed is up, which does honour ``timeout_s`` and names the ranks that
    did not arrive; otherwise it calls the group's own ``barrier()``. Broadcasts go
    through the group's ``broadcast_object`` and are bounded by the process group's
    own timeout, set when vLLM created it. A failing collective raises
    :class:`WorldError` (:class:`WorldTimeout` when it timed out) naming the ranks.
    """

    def __init__(self, group: Any) -> None:
        self._group = group

    @property
    def rank(self) -> int:
        return int(self._group.rank_in_group)

    @property
    def local_rank(self) -> int:
        return int(self._group.local_rank)

    @property
    def world_size(self) -> int:
        return int(self._group.world_size)

    def _torch_cpu_group(self) -> Any | None:
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return None
        cpu_group = getattr(self._group, "cpu_group", None)
        return cpu_group if isinstance(cpu_group, dist.ProcessGroup) else None

    def _failed(self, what: str, exc: BaseException) -> WorldError:
        text = str(exc)
        cls = (
            WorldTimeout if "timed out" in text.lower() or "timeout" in text.lower() else WorldError
        )
        return cls(f"rank {self.rank}/{self.world_size}: {what} failed: {text}")

    def broadcast_bytes(
        self, data: bytes | None, *, src: int = 0, timeout_s: float
    ) -> bytes | None:
        if self.world_size == 1:
            return data
        try:
            out = self._group.broadcast_object(data if self.rank == src else None, src=src)
        except Exception as exc:
            raise self._failed(f"broadcast from rank {src}", exc) from exc
        if out is not None and not isinstance(out, bytes):
            raise WorldError(
                f"rank {self.rank}: broadcast from rank {src} returned {type(out).__name__}, expected bytes or None"
            )
        return out

    def all_gather_str(self, value: str, *, timeout_s: float) -> list[str]:
        if self.world_size == 1:
            return [value]
        cpu_group = self._torch_cpu_group()
        try:
            if cpu_group is not None:
                out: list[Any] = [None] * self.world_size
                torch.distributed.all_gather_object(out, value, group=cpu_group)
                return [str(v) for v in out]
            # No torch.distributed group to hand: one broadcast per rank, in rank order.
            return [
                str(self._group.broadcast_object(value if r == self.rank else None, src=r))
                for r in range(self.world_size)
            ]
        except Exception as exc:
            raise self._failed("all_gather", exc) from exc

    def barrier(self, *, timeout_s: float) -> None:
        if self.world_size == 1:
            return
        cpu_group = self._torch_cpu_group()
        try:
            if cpu_group is not None and torch.distributed.get_backend(cpu_group) == "gloo":
                torch.distributed.monitored_barrier(
                    group=cpu_group, timeout=timedelta(seconds=timeout_s), wait_all_ranks=True
                )
            else:
                self._group.barrier()
        except Exception as exc:
            raise self._failed(f"barrier (timeout {timeout_s:g}s)", exc) from exc


class VllmFlashInferBackend:
    """FlashInfer autotuning the way vLLM drives it.

    ``flashinfer``: ``vllm.utils.flashinfer.autotune(tune_mode=True, cache=FILE)``
    (FlashInfer's ``autotuner.autotune`` when vLLM has no such helper), as vLLM's
    ``flashinfer_autotune`` does. ``flashinfer_dsv4_decode``:
    ``flashinfer.sparse_mla_sm120_decode_dsv4_autotune(cache_path=FILE)``, as vLLM's
    DeepSeek-V4 SM120 decode autotune does. Either way FlashInfer writes the tuned
    configs to FILE when the context exits; ``export`` returns that file's bytes and
    ``load`` hands a payload to ``AutoTuner.get().load_configs``.
    """

    def __init__(self, name: str) -> None:
        if name not in BACKEND_NAMES:
            raise ValueError(
                f"unknown FlashInfer backend {name!r}; expected one of {', '.join(BACKEND_NAMES)}"
            )
        self._name = name
        self._dir: str | None = None
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> str:
        return _flashinfer_version() or "unavailable"

    def _workdir(self) -> Path:
        with self._lock:
            if self._dir is None:
                self._dir = tempfile.mkdtemp(prefix=f"warmplan-{self._name}-")
                weakref.finalize(self, shutil.rmtree, self._dir, True)
            return Path(self._dir)

    @property
    def _tuned_file(self) -> Path:
        return self._workdir() / "tuned.json"

    def unavailable_reason(self) -> str | None:
        try:
            from vllm.utils.flashinfer import has_flashinfer
        except ImportError:
            has_flashinfer = None
        if has_flashinfer is not None and not has_flashinfer():
            return "vLLM reports FlashInfer unavailable (vllm.utils.flashinfer.has_flashinfer() is False)"
        try:
            from flashinfer.autotuner import AutoTuner  # noqa: F401
        except ImportError as exc:
            return f"flashinfer.autotuner.AutoTuner cannot be imported: {exc}"
        if self._name == "flashinfer_dsv4_decode":
            try:
                from flashinfer import sparse_mla_sm120_decode_dsv4_autotune  # noqa: F401
            except ImportError:
                return "this FlashInfer build does not expose sparse_mla_sm120_decode_dsv4_autotune"
        return None

    def metadata(self) -> Mapping[str, str]:
        return {
            "backend": self._name,
            "flashinfer": self.version,
            "vllm": _vllm_version(),
            "torch": torch.__version__,
        }

    def _context(self, cache: str) -> contextlib.AbstractContextManager[Any]:
        if self._name == "flashinfer_dsv4_decode":
            from flashinfer import sparse_mla_sm120_decode_dsv4_autotune

            ctx: contextlib.AbstractContextManager[Any] = sparse_mla_sm120_decode_dsv4_autotune(
                cache_path=cache
            )
            return ctx
        try:
            from vllm.utils.flashinfer import autotune
        except ImportError:
            from flashinfer.autotuner import autotune
        return autotune(tune_mode=True, cache=cache)  # type: ignore[no-any-return]

    @contextlib.contextmanager
    def tuning(self) -> Iterator[None]:
        path = self._tuned_file
        path.unlink(missing_ok=True)  # export() returns this tuning's results only
        with torch.inference_mode(), self._context(str(path)):
            yield

    def export(self) -> bytes:
        path = self._tuned_file
        return path.read_bytes() if path.exists() else b""

    def load(self, payload: bytes) -> None:
        if not payload:
            return
        path = self._workdir() / "loaded.json"
        path.write_bytes(payload)
        try:
            from flashinfer.autotuner import AutoTuner

            loaded = AutoTuner.get().load_configs(str(path))
        except Exception as exc:
            raise AutotuneLoadError(
                f"FlashInfer refused the tuning payload ({len(payload)} bytes): {exc}"
            ) from exc
        if loaded is False:  # FlashInfer would fall back to untuned defaults silently
            raise AutotuneLoadError(
                f"FlashInfer's AutoTuner.load_configs rejected the tuning payload ({len(payload)} bytes)"
            )


class VllmWorker:
    """A vLLM ``Worker`` (``vllm.v1.worker.gpu_worker.Worker``, or anything shaped
    like it) as a warmplan Worker::

        warmplan.run_plan(warmplan.load_plan("plans/dsv4.yaml"), VllmWorker(worker))

    ``env`` is what plan gates read (default ``os.environ``).
    """

    def __init__(self, worker: Any, *, env: Mapping[str, str] | None = None) -> None:
        self._worker = worker
        self._env: Mapping[str, str] = os.environ if env is None else env
        self._world: VllmWorld | None = None
        self._backends: dict[str, VllmFlashInferBackend] = {}
        self._depth = 0  # preserve_state nesting
        self._saved_qsl: tuple[Any, torch.Tensor] | None = None
        self._dummy_run_keywords: frozenset[str] | None = None
        self._dummy_run_takes_any = False

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
        flags: dict[str, bool] = {}
        kernel_config = getattr(getattr(self._worker, "vllm_config", None), "kernel_config", None)
        enable = getattr(kernel_config, "enable_flashinfer_autotune", None)
        if isinstance(enable, bool):  # None (vLLM's "not set") and absent stay unset
            flags["enable_flashinfer_autotune"] = enable
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
                "vllm": _vllm_version(),
                "torch": torch.__version__,
                "triton": _dist_version("triton", "pytorch-triton", "pytorch-triton-rocm"),
                "flashinfer": _flashinfer_version(),
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

    # -- the two warmup actions -------------------------------------------------------

    def slot_mapping(self, num_tokens: int) -> None:
        """One request of ``num_tokens`` tokens through ``block_table.compute_slot_mapping``,
        exactly as vLLM's ``_deepseek_v4_slot_mapping_warmup`` does for one size."""
        if num_tokens <= 0:
            raise ValueError(f"num_tokens must be >= 1: {num_tokens}")
        runner = self._runner
        with torch.inference_mode(), self._query_start_loc_saved():
            block_table = runner.input_batch.block_table
            device = runner.device
            positions_source = torch.arange(num_tokens, dtype=torch.int64, device=device)
            if hasattr(runner, "query_start_loc"):
                qsl = runner.query_start_loc
                qsl.np[0] = 0
                qsl.np[1] = num_tokens
                qsl.copy_to_gpu(2)
                query_start_loc = qsl.gpu[:2]
            else:
                query_start_loc = torch.tensor([0, num_tokens], dtype=torch.int32, device=device)
            saved_positions: torch.Tensor | None = None
            if hasattr(runner, "positions"):
                saved_positions = runner.positions[:num_tokens].clone()
                runner.positions[:num_tokens].copy_(positions_source)
                positions = runner.positions[:num_tokens]
            else:
                positions = positions_source
            try:
                block_table.commit_block_table(1)
                block_table.compute_slot_mapping(1, query_start_loc, positions)
            finally:
                if saved_positions is not None:
                    runner.positions[:num_tokens].copy_(saved_positions)

    def dummy_run_kwargs(
        self,
        shape: Shape,
        num_tokens: int,
        *,
        prior_context: int = 0,
        force_attention: bool = False,
    ) -> dict[str, Any]:
        """The keywords ``dummy_run`` passes to ``GPUModelRunner._dummy_run``: those
        vLLM's warmup passes for that shape, and no default it leaves out."""
        if shape not in _SHAPE_KEYWORD:
            raise ValueError(
                f"unknown dummy-run shape {shape!r}; expected one of {', '.join(SHAPES)}"
            )
        if prior_context < 0:
            raise ValueError(f"prior_context must be >= 0: {prior_context}")
        kwargs: dict[str, Any] = {"num_tokens": num_tokens, "skip_eplb": True, "is_profile": True}
        if force_attention:
            kwargs["force_attention"] = True
        keyword = _SHAPE_KEYWORD[shape]
        if keyword is not None:
            kwargs[keyword] = True
        if prior_context:
            kwargs["profile_seq_lens"] = num_tokens + prior_context
        return kwargs

    def _check_dummy_run_keywords(self, kwargs: Mapping[str, Any], shape: str) -> None:
        if self._dummy_run_keywords is None:
            params = inspect.signature(self._runner._dummy_run).parameters.values()
            self._dummy_run_takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
            self._dummy_run_keywords = frozenset(
                p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            )
        if self._dummy_run_takes_any:
            return
        for keyword in kwargs:
            if keyword not in self._dummy_run_keywords:
                version = _vllm_version()
                raise UnsupportedByVllm(
                    f"vLLM {version}: {type(self._runner).__name__}._dummy_run has no keyword "
                    f"{keyword!r}, which a {shape!r} dummy run needs; it takes: "
                    f"{', '.join(sorted(self._dummy_run_keywords))}",
                    keyword=keyword,
                    vllm_version=version,
                )

    def dummy_run(
        self,
        shape: Shape,
        num_tokens: int,
        *,
        prior_context: int = 0,
        force_attention: bool = False,
    ) -> None:
        """``runner._dummy_run(...)`` with the keywords of :meth:`dummy_run_kwargs`;
        a keyword the installed ``_dummy_run`` lacks raises :class:`UnsupportedByVllm`."""
        kwargs = self.dummy_run_kwargs(
            shape, num_tokens, prior_context=prior_context, force_attention=force_attention
        )
        self._check_dummy_run_keywords(kwargs, shape)
        with torch.inference_mode():
            self._runner._dummy_run(**kwargs)

    # -- state ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _query_start_loc_saved(self) -> Iterator[None]:
        # Inside preserve_state the first slot mapping snapshots query_start_loc[:2]
        # and preserve_state's exit restores it (vLLM snapshots once per fan of sizes
        # and restores after the last); outside, every call restores its own.
        runner = self._runner
        if not hasattr(runner, "query_start_loc"):
            yield
            return
        if self._depth > 0:
            if self._saved_qsl is None:
                self._saved_qsl = self._snapshot_qsl()
            yield
            return
        saved = self._snapshot_qsl()
        try:
            yield
        finally:
            self._restore_qsl(saved)

    def _snapshot_qsl(self) -> tuple[Any, torch.Tensor]:
        qsl = self._runner.query_start_loc
        return qsl.np[:2].copy(), qsl.gpu[:2].clone()

    def _restore_qsl(self, saved: tuple[Any, torch.Tensor]) -> None:
        saved_np, saved_gpu = saved
        qsl = self._runner.query_start_loc
        with torch.inference_mode():
            qsl.np[:2] = saved_np
            qsl.gpu[:2].copy_(saved_gpu)

    @contextlib.contextmanager
    def preserve_state(self) -> Iterator[None]:
        """Restore ``query_start_loc[:2]`` (host and device) on exit, also on error, if
        a slot mapping inside wrote it; ``positions`` is restored by each slot mapping.
        Dummy runs manage their own buffers, as in vLLM, and are not undone."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0 and self._saved_qsl is not None:
                saved, self._saved_qsl = self._saved_qsl, None
                self._restore_qsl(saved)

    def synchronize(self) -> None:
        """``torch.accelerator.synchronize()``, as vLLM does after its slot-mapping fan."""
        if torch.accelerator.is_available():
            torch.accelerator.synchronize()

    def autotune_backend(self, name: str) -> AutotuneBackend | None:
        if name not in BACKEND_NAMES:
            return None
        backend = self._backends.get(name)
        if backend is None:
            backend = self._backends[name] = VllmFlashInferBackend(name)
        return backend


# -- the plugin ------------------------------------------------------------------------

PLAN_ENV = "WARMPLAN_PLAN"
MODE_ENV = "WARMPLAN_MODE"
REPORT_ENV = "WARMPLAN_REPORT"
MONITOR_ENV = "WARMPLAN_JIT_MONITOR"
MODES = ("after", "replace")
MONITOR_MODES = ("off", "warn", "error")

_KERNEL_WARMUP_MODULE = "vllm.model_executor.warmup.kernel_warmup"
_GPU_WORKER_MODULE = "vllm.v1.worker.gpu_worker"
# What WARMPLAN_MODE=replace switches off inside vLLM's kernel_warmup: the parts
# plans/dsv4.yaml stands for (the DeepSeek-V4 sparse-MLA attention warmup, which
# holds the SM120 decode autotune, the request-prep slot-mapping warmup, and
# FlashInfer's autotune). The rest (DeepGEMM, mHC, FlashInfer attention) still runs.
REPLACED_VLLM_FUNCTIONS = (
    "_deepseek_v4_sparse_mla_attention_warmup",
    "_deepseek_v4_request_prep_warmup",
    "flashinfer_autotune",
)

_registered = False
_register_lock = threading.Lock()


def _settings(environ: Mapping[str, str] | None = None) -> tuple[str, str, str | None] | None:
    env = os.environ if environ is None else environ
    plan = env.get(PLAN_ENV)
    if not plan:
        return None
    mode = env.get(MODE_ENV) or "after"
    if mode not in MODES:
        raise UserError(f"{MODE_ENV} must be one of {', '.join(MODES)}: {mode!r}")
    return plan, mode, env.get(REPORT_ENV) or None


def report_as_dict(report: Any) -> dict[str, Any]:
    """A report (the executor's ``Report``) as a JSON-ready dict."""
    for attr in ("as_dict", "to_dict"):
        method = getattr(report, attr, None)
        if callable(method):
            return dict(method())
    import dataclasses

    if dataclasses.is_dataclass(report) and not isinstance(report, type):
        return dataclasses.asdict(report)
    if isinstance(report, Mapping):
        return dict(report)
    raise TypeError(f"cannot turn a {type(report).__name__} into a report dict")


def _write_report(report: Any, template: str, rank: int) -> str:
    from warmplan.fsutil import atomic_write

    path = Path(template.replace("{rank}", str(rank))).expanduser()
    atomic_write(path, json.dumps(report_as_dict(report), indent=1, sort_keys=True, default=str).encode() + b"\n")
    return str(path)


def run_plan_file(worker: Any, plan_path: str, report_template: str | None = None) -> Any:
    """Load ``plan_path``, run it on vLLM ``worker``, write the report; return it."""
    from warmplan.executor import run_plan
    from warmplan.plan import load_plan

    adapter = VllmWorker(worker)
    plan = load_plan(plan_path)
    log.info("warmplan.vllm.plan", plan=plan_path, rank=adapter.world.rank)
    report = run_plan(plan, adapter)
    if report_template:
        written = _write_report(report, report_template, adapter.world.rank)
        log.info("warmplan.vllm.report", path=written)
    return report


def _wrap_kernel_warmup(original: Callable[..., Any]) -> Callable[..., Any]:
    if getattr(original, "__warmplan_wrapped__", False):
        return original
    module_globals: dict[str, Any] = getattr(original, "__globals__", {})

    @functools.wraps(original)
    def kernel_warmup(worker: Any, *args: Any, **kwargs: Any) -> Any:
        settings = _settings()
        if settings is None:
            return original(worker, *args, **kwargs)
        plan, mode, report = settings
        if mode == "after":
            result = original(worker, *args, **kwargs)
            run_plan_file(worker, plan, report)
            return result
        return _run_replacing(original, module_globals, worker, plan, report, args, kwargs)

    kernel_warmup.__warmplan_wrapped__ = True  # type: ignore[attr-defined]
    return kernel_warmup


def _run_replacing(
    original: Callable[..., Any],
    module_globals: dict[str, Any],
    worker: Any,
    plan: str,
    report: str | None,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    # The plan runs where the first replaced vLLM function would have run; all of
    # them are no-ops for this call. kernel_warmup looks them up in its module's
    # globals at call time, so swapping the globals is enough.
    present = [name for name in REPLACED_VLLM_FUNCTIONS if name in module_globals]
    done = False

    def stand_in(*_a: Any, **_k: Any) -> None:
        nonlocal done
        if not done:
            done = True
            run_plan_file(worker, plan, report)

    if not present:
        log.warning(
            "warmplan.vllm.replace.nothing_to_replace", functions=list(REPLACED_VLLM_FUNCTIONS)
        )
    log.info("warmplan.vllm.replace", replaced=present)
    saved = {name: module_globals[name] for name in present}
    module_globals.update(dict.fromkeys(present, stand_in))
    try:
        result = original(worker, *args, **kwargs)
    finally:
        module_globals.update(saved)
    if not done:
        stand_in()
    return result


def _monitor_mode(environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    mode = env.get(MONITOR_ENV) or "off"
    if mode not in MONITOR_MODES:
        raise UserError(f"{MONITOR_ENV} must be one of {', '.join(MONITOR_MODES)}: {mode!r}")
    return mode


_MONITOR_HINT = (
    "a shape no warmup covered: record the traffic and run `warmplan verify PLAN --trace T "
    "--suggest` for the plan entries that cover it"
)


def _wrap_worker_class(worker_cls: Any) -> None:
    """Arm warmplan's JIT monitor once a worker's whole warmup is over (kernel warmup
    *and* CUDA-graph capture, which compiles too), and watch every ``execute_model``:
    ``warn`` logs each compile while serving, ``error`` raises at the end of the step
    that compiled (``JitCompileError``, naming the kernel and its key)."""
    warm = getattr(worker_cls, "compile_or_warm_up_model", None)
    if callable(warm) and not getattr(warm, "__warmplan_wrapped__", False):

        @functools.wraps(warm)
        def compile_or_warm_up_model(self: Any, *args: Any, **kwargs: Any) -> Any:
            result = warm(self, *args, **kwargs)
            mode = _monitor_mode()
            if mode != "off":
                from warmplan.monitor import JitMonitor

                monitor = JitMonitor(mode="off", hint=lambda event: _MONITOR_HINT)
                monitor.install()
                monitor.arm(mode)  # type: ignore[arg-type]
                self._warmplan_monitor = monitor
                self._warmplan_steps = 0
                log.info("warmplan.vllm.jit_monitor", mode=mode)
            return result

        compile_or_warm_up_model.__warmplan_wrapped__ = True  # type: ignore[attr-defined]
        worker_cls.compile_or_warm_up_model = compile_or_warm_up_model
    run = getattr(worker_cls, "execute_model", None)
    if callable(run) and not getattr(run, "__warmplan_wrapped__", False):

        @functools.wraps(run)
        def execute_model(self: Any, *args: Any, **kwargs: Any) -> Any:
            monitor = getattr(self, "_warmplan_monitor", None)
            if monitor is None:
                return run(self, *args, **kwargs)
            step = self._warmplan_steps = getattr(self, "_warmplan_steps", 0) + 1
            with monitor.attribute(f"serving step {step}"):
                return run(self, *args, **kwargs)

        execute_model.__warmplan_wrapped__ = True  # type: ignore[attr-defined]
        worker_cls.execute_model = execute_model


def _patch_module(module: ModuleType) -> None:
    original = getattr(module, "kernel_warmup", None)
    if callable(original):
        setattr(module, "kernel_warmup", _wrap_kernel_warmup(original))  # noqa: B010 - mypy cannot see the attribute
    worker_cls = getattr(module, "Worker", None) if module.__name__ == _GPU_WORKER_MODULE else None
    if isinstance(worker_cls, type):
        _wrap_worker_class(worker_cls)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Wraps ``kernel_warmup`` in a module the moment that module is first imported."""

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names

    def find_spec(
        self, fullname: str, path: Any = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.names:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        create = getattr(self._loader, "create_module", None)
        return None if create is None else create(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _patch_module(module)


def register() -> None:
    """vLLM's ``vllm.general_plugins`` entry point.

    With ``WARMPLAN_PLAN`` set, every vLLM worker runs that plan inside its kernel
    warmup (``Worker.compile_or_warm_up_model`` -> ``kernel_warmup``), before CUDA
    graph capture. ``WARMPLAN_MODE=after`` (default) runs vLLM's warmup, then the
    plan; ``replace`` runs the plan instead of vLLM's DeepSeek-V4 and FlashInfer
    autotune parts. ``WARMPLAN_REPORT`` (``{rank}`` replaced) receives each rank's
    report. vLLM calls plugins in every process, and more than once: this is idempotent.
    """
    global _registered
    settings = _settings()  # a bad WARMPLAN_MODE fails here, at startup
    _monitor_mode()  # and so does a bad WARMPLAN_JIT_MONITOR
    if settings is None:
        return
    with _register_lock:
        if _registered:
            return
        _registered = True
        # gpu_worker does `from ...kernel_warmup import kernel_warmup`: its own
        # attribute must be wrapped too, whichever module is imported first.
        names = frozenset({_KERNEL_WARMUP_MODULE, _GPU_WORKER_MODULE})
        for name in sorted(names):
            module = sys.modules.get(name)
            if module is not None:
                _patch_module(module)
        if not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
            sys.meta_path.insert(0, _PatchOnImport(names))
    log.info("warmplan.vllm.registered", plan=settings[0], mode=settings[1])


def _unregister_for_tests() -> None:
    """Undo :func:`register` (tests only): drop the import hook, unwrap modules."""
    global _registered
    with _register_lock:
        _registered = False
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _PatchOnImport)]
        for name in (_KERNEL_WARMUP_MODULE, _GPU_WORKER_MODULE):
            module = sys.modules.get(name)
            fn = getattr(module, "kernel_warmup", None)
            if module is not None and fn is not None and getattr(fn, "__warmplan_wrapped__", False):
                setattr(module, "kernel_warmup", fn.__wrapped__)  # noqa: B010 - mypy cannot see the attribute
            worker_cls = getattr(module, "Worker", None)
            for attr in ("compile_or_warm_up_model", "execute_model"):
                method = getattr(worker_cls, attr, None)
                if getattr(method, "__warmplan_wrapped__", False):
                    setattr(worker_cls, attr, method.__wrapped__)  # type: ignore[union-attr]


class WarmplanWorkerExtension:
    """For ``vllm serve --worker-extension-cls warmplan.vllm_plugin.WarmplanWorkerExtension``:
    vLLM mixes it into its ``Worker``, and ``llm.collective_rpc("warmplan_run",
    args=(plan_yaml,))`` runs a plan on every worker and returns each one's report."""

    def warmplan_run(self, plan_text: str) -> dict[str, Any]:
        from warmplan.executor import run_plan
        from warmplan.plan import load_plan

        plan = load_plan(plan_text, name="<collective_rpc warmplan_run>")
        return report_as_dict(run_plan(plan, VllmWorker(self)))
