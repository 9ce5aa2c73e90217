"""warmplan: declarative, YAML-driven kernel warmup for LLM inference workers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from warmplan.executor import run_plan
    from warmplan.plan import Plan, load_plan
    from warmplan.report import Report
    from warmplan.resolve import ResolvedPlan, resolve

__all__ = ["Plan", "Report", "ResolvedPlan", "__version__", "load_plan", "resolve", "run_plan"]

_LAZY = {
    "load_plan": "warmplan.plan",
    "Plan": "warmplan.plan",
    "resolve": "warmplan.resolve",
    "ResolvedPlan": "warmplan.resolve",
    "run_plan": "warmplan.executor",
    "Report": "warmplan.report",
}


def __getattr__(name: str) -> Any:
    # Lazy so that `import warmplan` (and `warmplan validate`) never imports torch.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'warmplan' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
