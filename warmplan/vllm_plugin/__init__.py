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

import importlib
import importlib.abc
import importlib.machinery
import sys
import threading
from types import ModuleType
from typing import Any

from warmplan.errors import UserError
from warmplan.log import get_logger
from warmplan.vllm_plugin.serving import arm_monitor, scheduled_of, serving_step, wrap_worker_class
from warmplan.vllm_plugin.settings import (
    GPU_WORKER_MODULE,
    KERNEL_WARMUP_HOLDERS,
    KERNEL_WARMUP_MODULE,
    MODE_ENV,
    PLAN_ENV,
    RECORD_ENV,
    REPLACE_ENV,
    REPORT_ENV,
    SEED_REPLACED,
    V034_REPLACED,
    monitor_mode,
    record_settings,
    replaced_functions,
    settings,
)
from warmplan.vllm_plugin.warmup import report_as_dict, run_plan_file, wrap_kernel_warmup

log = get_logger(__name__)

__all__ = [
    "KERNEL_WARMUP_HOLDERS",
    "MODE_ENV",
    "PLAN_ENV",
    "RECORD_ENV",
    "REPLACE_ENV",
    "REPORT_ENV",
    "SEED_REPLACED",
    "V034_REPLACED",
    "WarmplanWorkerExtension",
    "arm_monitor",
    "register",
    "replaced_functions",
    "run_plan_file",
    "scheduled_of",
    "serving_step",
]

_registered = False
_register_lock = threading.Lock()

# -- patching vLLM's modules as they are imported -------------------------------------------


def _patch_module(module: ModuleType) -> None:
    original = getattr(module, "kernel_warmup", None)
    if callable(original):
        setattr(module, "kernel_warmup", wrap_kernel_warmup(original))  # noqa: B010 - mypy cannot see the attribute
    worker_cls = getattr(module, "Worker", None) if module.__name__ == GPU_WORKER_MODULE else None
    if isinstance(worker_cls, type):
        wrap_worker_class(worker_cls)


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
    chosen = settings()
    watching = monitor_mode() != "off" or record_settings() is not None
    if chosen is None and not watching:
        return
    if chosen is not None and chosen[1] == "replace":
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
        plan=None if chosen is None else chosen[0],
        mode=None if chosen is None else chosen[1],
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
