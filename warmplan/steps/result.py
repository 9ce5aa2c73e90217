"""What a step runner returns, and the runner signature."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from warmplan.resolve import ResolvedStep
from warmplan.workers.base import Worker


@dataclass(frozen=True, slots=True, kw_only=True)
class StepResult:
    """``covers_run``: the step ran its dummy run, so a step it ``replaces`` is covered."""

    covers_run: bool = False
    autotune: Mapping[str, Any] | None = None


class StepRunner(Protocol):
    """``run(rstep, worker, *, log) -> StepResult``: one step kind's implementation."""

    def __call__(self, rstep: ResolvedStep, worker: Worker, *, log: Any) -> StepResult: ...
