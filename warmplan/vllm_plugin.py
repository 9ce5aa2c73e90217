"""vLLM's entry points into warmplan.

* :func:`register` - the ``vllm.general_plugins`` entry point (``pyproject.toml``):
  with ``WARMPLAN_PLAN`` set, every worker runs that plan inside its kernel warmup.
* :class:`WarmplanWorkerExtension` - for ``--worker-extension-cls``: ``warmplan_run``
  over ``collective_rpc``.

Settings (environment, read in every vLLM process):

``WARMPLAN_PLAN``
    the plan file; unset, the plugin changes nothing.
``WARMPLAN_MODE``
    ``after`` (default): vLLM's ``kernel_warmup()``, then the plan. ``replace``: the
    plan instead of the parts ``WARMPLAN_REPLACE`` names.
``WARMPLAN_REPLACE``
    with ``replace``: ``all`` (the plan is the whole ``kernel_warmup()``, as
    ``plans/vllm-0.34.yaml`` is), or a comma list of vLLM warmup names
    (``warmplan.workers.vllm.WARMUP_NAMES``) or functions of
    ``kernel_warmup``'s module. Default: the DeepSeek-V4 and FlashInfer-autotune
    parts ``plans/dsv4.yaml`` stands for. Checked against the installed vLLM at
    registration: a part it cannot switch off is an error, never a warning.
``WARMPLAN_REPORT``
    where each rank writes its report (``{rank}`` replaced).
``WARMPLAN_JIT_MONITOR``
    ``off`` / ``warn`` / ``error``: watch serving for compiles after warmup.

The plan runs with ``process_local_only`` as vLLM passed it: a worker joining a
running group (elastic EP) skips every step that would run collectives.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import importlib.abc
import importlib.machinery
import os
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from warmplan.errors import UserError
from warmplan.log import get_logger

log = get_logger(__name__)

__all__ = [
    "MODE_ENV",
    "PLAN_ENV",
    "REPLACE_ENV",
    "REPORT_ENV",
    "WarmplanWorkerExtension",
    "register",
]

PLAN_ENV = "WARMPLAN_PLAN"
MODE_ENV = "WARMPLAN_MODE"
REPLACE_ENV = "WARMPLAN_REPLACE"
REPORT_ENV = "WARMPLAN_REPORT"
MONITOR_ENV = "WARMPLAN_JIT_MONITOR"
MODES = ("after", "replace")
MONITOR_MODES = ("off", "warn", "error")

KERNEL_WARMUP_MODULE = "vllm.model_executor.warmup.kernel_warmup"
GPU_WORKER_MODULE = "vllm.v1.worker.gpu_worker"
# Every module that binds kernel_warmup by name (`from ... import kernel_warmup`):
# its own attribute must be wrapped too, whichever module is imported first.
KERNEL_WARMUP_HOLDERS = (
    KERNEL_WARMUP_MODULE,
    GPU_WORKER_MODULE,
    "vllm.distributed.elastic_ep.elastic_execute",  # a joining worker (0.34)
)

# What WARMPLAN_MODE=replace switches off by default: the parts plans/dsv4.yaml
# stands for. The seed's kernel_warmup module holds the first set, 0.34's the second.
SEED_REPLACED = (
    "_deepseek_v4_sparse_mla_attention_warmup",
    "_deepseek_v4_request_prep_warmup",
    "flashinfer_autotune",
)
V034_REPLACED = ("deepseek_v4_sparse_mla_attention_warmup", "flashinfer_autotune")
REPLACE_ALL = "all"

_registered = False
_register_lock = threading.Lock()


def _env(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def _settings(environ: Mapping[str, str] | None = None) -> tuple[str, str, str | None] | None:
    env = _env(environ)
    plan = env.get(PLAN_ENV)
    if not plan:
        return None
    mode = env.get(MODE_ENV) or "after"
    if mode not in MODES:
        raise UserError(f"{MODE_ENV} must be one of {', '.join(MODES)}: {mode!r}")
    return plan, mode, env.get(REPORT_ENV) or None


def _monitor_mode(environ: Mapping[str, str] | None = None) -> str:
    mode = _env(environ).get(MONITOR_ENV) or "off"
    if mode not in MONITOR_MODES:
        raise UserError(f"{MONITOR_ENV} must be one of {', '.join(MONITOR_MODES)}: {mode!r}")
    return mode


# -- what replace mode switches off -------------------------------------------------------


def replaced_functions(
    module_globals: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> tuple[str, ...] | None:
    """The names in ``kernel_warmup``'s module that replace mode switches off
    (``None``: the whole ``kernel_warmup``). Raises :class:`UserError` naming every
    part the installed vLLM cannot switch off."""
    from warmplan.workers.vllm.warmups import KERNEL_WARMUP, VLLM_WARMUPS

    raw = (_env(environ).get(REPLACE_ENV) or "").strip()
    if raw == REPLACE_ALL:
        return None
    if raw:
        wanted = [part.strip() for part in raw.split(",") if part.strip()]
    elif all(name in module_globals for name in SEED_REPLACED):
        wanted = list(SEED_REPLACED)
    else:
        wanted = list(V034_REPLACED)
    by_name = {w.name: w for w in VLLM_WARMUPS}
    names: list[str] = []
    problems: list[str] = []
    for part in wanted:
        spec = by_name.get(part)
        if spec is None:
            attribute = part
        elif spec.targets and spec.targets[0][0] == KERNEL_WARMUP:
            attribute = spec.targets[0][1]
        elif spec.targets:
            # Imported into kernel_warmup's module under its own name, or inside the
            # call (then it is not a global and cannot be switched off alone).
            attribute = spec.targets[0][1]
        else:
            problems.append(f"{part!r} is a runner method kernel_warmup calls directly")
            continue
        if callable(module_globals.get(attribute)):
            names.append(attribute)
        else:
            problems.append(f"{part!r}: kernel_warmup's module has no function {attribute!r}")
    if problems:
        from warmplan.workers.vllm.common import vllm_version

        raise UserError(
            f"{REPLACE_ENV}: vLLM {vllm_version()} cannot switch off "
            + "; ".join(problems)
            + f". Name parts kernel_warmup calls by a module-level name, or set {REPLACE_ENV}={REPLACE_ALL}"
            " to run the plan instead of the whole kernel_warmup()."
        )
    return tuple(dict.fromkeys(names))


# -- running a plan ------------------------------------------------------------------------


def report_as_dict(report: Any) -> dict[str, Any]:
    """A report (the executor's ``Report``) as a JSON-ready dict."""
    return dict(report.to_dict())


def run_plan_file(
    worker: Any,
    plan_path: str,
    report_template: str | None = None,
    *,
    process_local_only: bool = False,
) -> Any:
    """Load ``plan_path``, run it on vLLM ``worker``, write the report; return it."""
    from warmplan.executor import run_plan
    from warmplan.plan import load_plan
    from warmplan.report import report_path
    from warmplan.workers.vllm import VllmWorker

    adapter = VllmWorker(worker, process_local_only=process_local_only)
    plan = load_plan(Path(plan_path))
    log.info(
        "warmplan.vllm.plan",
        plan=plan_path,
        rank=adapter.world.rank,
        layout=adapter.layout,
        process_local_only=process_local_only,
    )
    report = run_plan(plan, adapter)
    if report_template:
        written = report_path(str(Path(report_template).expanduser()), adapter.world.rank)
        report.write(written)
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
        local_only = bool(kwargs.get("process_local_only", False))
        if mode == "after":
            result = original(worker, *args, **kwargs)
            run_plan_file(worker, plan, report, process_local_only=local_only)
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
    # globals at call time, so swapping the globals is enough. A plan step that
    # names one of them (engine_warmup) still reaches the original.
    from warmplan.workers.vllm.warmups import KERNEL_WARMUP, ORIGINALS

    local_only = bool(kwargs.get("process_local_only", False))
    present = replaced_functions(module_globals)
    if present is None:
        log.info("warmplan.vllm.replace", replaced="kernel_warmup")
        run_plan_file(worker, plan, report, process_local_only=local_only)
        return None
    done = False

    def stand_in(*_a: Any, **_k: Any) -> None:
        nonlocal done
        if not done:
            done = True
            run_plan_file(worker, plan, report, process_local_only=local_only)

    log.info("warmplan.vllm.replace", replaced=list(present))
    saved = {name: module_globals[name] for name in present}
    ORIGINALS.update({(KERNEL_WARMUP, name): fn for name, fn in saved.items()})
    module_globals.update(dict.fromkeys(present, stand_in))
    try:
        result = original(worker, *args, **kwargs)
    finally:
        module_globals.update(saved)
        for name in saved:
            ORIGINALS.pop((KERNEL_WARMUP, name), None)
    if not done:
        stand_in()
    return result


# -- the JIT monitor after warmup -------------------------------------------------------------

_MONITOR_HINT = (
    "a shape no warmup covered: record the traffic and run `warmplan verify PLAN --trace T "
    "--suggest` for the plan entries that cover it"
)


def _vllm_monitor_active() -> bool:
    """vLLM 0.34 arms its own JIT monitor (Triton, CuTe DSL, TileLang) at the end
    of warmup when ``enable_jit_warmup`` is on."""
    module = sys.modules.get("vllm.utils.jit_monitor")
    is_active = getattr(module, "is_active", None)
    return bool(is_active()) if callable(is_active) else False


def _arm_monitor(worker: Any) -> None:
    """After the whole warmup: warmplan's JIT monitor (``WARMPLAN_JIT_MONITOR``) and
    the recorder (``WARMPLAN_RECORD``), which needs the monitor's events too."""
    mode = _monitor_mode()
    record = _record_settings()
    if mode == "off" and record is None:
        return
    from warmplan.monitor import JitMonitor

    # One report per compile: where vLLM's own monitor already reports Triton
    # compiles, warmplan's counts and attributes them quietly and reports the rest
    # (torch.compile recompiles, which vLLM's does not watch).
    quiet = ("triton",) if _vllm_monitor_active() else ()
    monitor = JitMonitor(mode="off", hint=lambda event: _MONITOR_HINT, quiet_sources=quiet)
    monitor.install()
    monitor.arm(mode)  # type: ignore[arg-type]
    worker._warmplan_monitor = monitor
    worker._warmplan_steps = 0
    worker._warmplan_recorder = None if record is None else _open_recorder(worker, record)
    worker._warmplan_cold = None
    if record is not None:
        # A binary loaded onto the device late (a cached kernel first launched while
        # serving) is cold too: recorded with the batch that paid for it.
        from warmplan.monitor.cold import ColdWatcher

        worker._warmplan_cold = ColdWatcher(monitor.store)
        worker._warmplan_cold.install()
    log.info(
        "warmplan.vllm.jit_monitor",
        mode=mode,
        reported_by_vllm=list(quiet),
        recording=None if record is None else str(worker._warmplan_recorder.path),
    )


# -- recording what the worker serves ------------------------------------------------------

RECORD_ENV = "WARMPLAN_RECORD"
RECORD_SAMPLE_ENV = "WARMPLAN_RECORD_SAMPLE"
RECORD_MAX_MB_ENV = "WARMPLAN_RECORD_MAX_MB"


def _positive_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise UserError(f"{name} must be a whole number >= 1: {raw!r}")
    return value


def _record_settings(environ: Mapping[str, str] | None = None) -> tuple[str, int, int] | None:
    """``(path template, sample every N, max MB)`` when ``WARMPLAN_RECORD`` is set."""
    env = _env(environ)
    path = env.get(RECORD_ENV)
    if not path:
        return None
    return (
        path,
        _positive_int(env, RECORD_SAMPLE_ENV, 1),
        _positive_int(env, RECORD_MAX_MB_ENV, 64),
    )


def _open_recorder(worker: Any, settings: tuple[str, int, int]) -> Any:
    from warmplan.record import TraceRecorder
    from warmplan.report import report_path
    from warmplan.workers.vllm import VllmWorker

    template, sample_every, max_mb = settings
    adapter = VllmWorker(worker)
    rank = adapter.world.rank
    path = report_path(str(Path(template).expanduser()), rank)
    recorder = TraceRecorder(
        path,
        sample_every=sample_every,
        max_bytes=max_mb * 1024 * 1024,
        header={"engine": "vllm", "rank": rank, "limits": adapter.limits.as_dict()},
    )
    atexit.register(recorder.close)
    return recorder


def scheduled_of(scheduler_output: Any) -> list[tuple[int, int]]:
    """Each scheduled request's ``(new tokens, computed tokens)`` in a vLLM
    ``SchedulerOutput``: new requests carry ``num_computed_tokens`` (a prefix-cache
    hit), running ones their count in ``scheduled_cached_reqs``."""
    scheduled = dict(getattr(scheduler_output, "num_scheduled_tokens", None) or {})
    out: list[tuple[int, int]] = []
    for request in getattr(scheduler_output, "scheduled_new_reqs", None) or ():
        tokens = scheduled.pop(request.req_id, 0)
        out.append((int(tokens), int(request.num_computed_tokens)))
    cached = getattr(scheduler_output, "scheduled_cached_reqs", None)
    for req_id, computed in zip(
        getattr(cached, "req_ids", None) or (),
        getattr(cached, "num_computed_tokens", None) or (),
        strict=False,
    ):
        out.append((int(scheduled.pop(req_id, 0)), int(computed)))
    return out


def serving_step(worker: Any, run: Callable[..., Any], args: Any, kwargs: Any) -> Any:
    """One ``execute_model`` after warmup: attributed to ``serving step N`` for the
    monitor; recorded with the compiles it caused when ``WARMPLAN_RECORD`` is set."""
    monitor = getattr(worker, "_warmplan_monitor", None)
    if monitor is None:
        return run(*args, **kwargs)
    step = worker._warmplan_steps = getattr(worker, "_warmplan_steps", 0) + 1
    recorder = getattr(worker, "_warmplan_recorder", None)
    cold = getattr(worker, "_warmplan_cold", None)
    before = len(monitor.events) if recorder is not None else 0
    cold_before = len(cold.events) if cold is not None else 0
    try:
        with monitor.attribute(f"serving step {step}"):
            return run(*args, **kwargs)
    finally:
        if recorder is not None:
            scheduler_output = args[0] if args else kwargs.get("scheduler_output")
            from warmplan.record import batch_of

            batch = batch_of(scheduled_of(scheduler_output))
            if batch.num_tokens:
                late = cold.events[cold_before:] if cold is not None else []
                recorder.record_batch(batch, compiles=[*monitor.events[before:], *late], step=step)


def _wrap_worker_class(worker_cls: Any) -> None:
    """Arm warmplan's JIT monitor once a worker's whole warmup is over (kernel warmup
    *and* CUDA-graph capture, which compiles too), and watch every ``execute_model``:
    ``warn`` logs each compile while serving, ``error`` raises at the end of the step
    that compiled (``JitCompileError``, naming the kernel and its key); with
    ``WARMPLAN_RECORD``, each step's batch is written to a trace with its compiles."""
    warm = getattr(worker_cls, "compile_or_warm_up_model", None)
    if callable(warm) and not getattr(warm, "__warmplan_wrapped__", False):

        @functools.wraps(warm)
        def compile_or_warm_up_model(self: Any, *args: Any, **kwargs: Any) -> Any:
            result = warm(self, *args, **kwargs)
            _arm_monitor(self)
            return result

        compile_or_warm_up_model.__warmplan_wrapped__ = True  # type: ignore[attr-defined]
        worker_cls.compile_or_warm_up_model = compile_or_warm_up_model
    run = getattr(worker_cls, "execute_model", None)
    if callable(run) and not getattr(run, "__warmplan_wrapped__", False):

        @functools.wraps(run)
        def execute_model(self: Any, *args: Any, **kwargs: Any) -> Any:
            return serving_step(self, functools.partial(run, self), args, kwargs)

        execute_model.__warmplan_wrapped__ = True  # type: ignore[attr-defined]
        worker_cls.execute_model = execute_model


# -- patching vLLM's modules as they are imported -------------------------------------------


def _patch_module(module: ModuleType) -> None:
    original = getattr(module, "kernel_warmup", None)
    if callable(original):
        setattr(module, "kernel_warmup", _wrap_kernel_warmup(original))  # noqa: B010 - mypy cannot see the attribute
    worker_cls = getattr(module, "Worker", None) if module.__name__ == GPU_WORKER_MODULE else None
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
    graph capture; see the module's docstring for the settings. vLLM calls plugins
    in every process, and more than once: this is idempotent. A bad setting, or a
    ``replace`` the installed vLLM cannot honour, fails here, at startup.
    """
    global _registered
    settings = _settings()
    watching = _monitor_mode() != "off" or _record_settings() is not None
    if settings is None and not watching:
        return
    if settings is not None and settings[1] == "replace":
        try:
            module = importlib.import_module(KERNEL_WARMUP_MODULE)
        except ImportError as exc:
            raise UserError(
                f"{MODE_ENV}=replace: vLLM's {KERNEL_WARMUP_MODULE} cannot be imported: {exc}"
            ) from exc
        original = getattr(module.kernel_warmup, "__wrapped__", module.kernel_warmup)
        replaced_functions(getattr(original, "__globals__", vars(module)))
    with _register_lock:
        if _registered:
            return
        _registered = True
        names = frozenset(KERNEL_WARMUP_HOLDERS)
        for name in sorted(names):
            loaded = sys.modules.get(name)
            if loaded is not None:
                _patch_module(loaded)
        if not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
            sys.meta_path.insert(0, _PatchOnImport(names))
    log.info(
        "warmplan.vllm.registered",
        plan=None if settings is None else settings[0],
        mode=None if settings is None else settings[1],
    )


def _unregister_for_tests() -> None:
    """Undo :func:`register` (tests only): drop the import hook, unwrap modules."""
    global _registered
    with _register_lock:
        _registered = False
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _PatchOnImport)]
        for name in KERNEL_WARMUP_HOLDERS:
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
        from warmplan.plan import parse_plan
        from warmplan.workers.vllm import VllmWorker

        plan = parse_plan(plan_text, file="<collective_rpc warmplan_run>")
        return report_as_dict(run_plan(plan, VllmWorker(self)))
