"""Running a plan inside vLLM's ``kernel_warmup()``: after it, or instead of the
parts ``WARMPLAN_REPLACE`` names (or all of it)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from warmplan.log import get_logger
from warmplan.vllm_plugin.settings import replaced_functions, settings

log = get_logger("warmplan.vllm_plugin")

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


def wrap_kernel_warmup(original: Callable[..., Any]) -> Callable[..., Any]:
    if getattr(original, "__warmplan_wrapped__", False):
        return original
    module_globals: dict[str, Any] = getattr(original, "__globals__", {})

    @functools.wraps(original)
    def kernel_warmup(worker: Any, *args: Any, **kwargs: Any) -> Any:
        chosen = settings()
        if chosen is None:
            return original(worker, *args, **kwargs)
        plan, mode, report = chosen
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
