"""The records a validated plan is made of: ``Plan`` and ``CompileCacheSpec``. Each
step is a record of its kind (``warmplan.steps.<kind>``), every one a ``StepSpec``."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from warmplan.autotune import DEFAULT_TIMEOUT_S
from warmplan.steps.base import StepSpec
from warmplan.steps.common import Gates

Step = StepSpec  # a record of one of the registered kinds (``warmplan.steps.STEPS``)


@dataclass(frozen=True, slots=True, kw_only=True)
class CompileCacheSpec:
    """``compile_cache``: whether rank 0 shares its compile caches, and how long
    the other ranks wait for them."""

    share: bool = False
    timeout_s: float = DEFAULT_TIMEOUT_S


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """A validated plan. ``source`` is the text it was read from."""

    version: int
    name: str
    description: str = ""
    when: Gates = field(default_factory=Gates)
    builtin: Mapping[str, Any] = field(default_factory=dict)
    compile_cache: CompileCacheSpec = field(default_factory=CompileCacheSpec)
    steps: tuple[Step, ...]
    path: str | None = None
    source: str = ""

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.source.encode()).hexdigest()

    def step(self, step_id: str) -> Step:
        for step in self.steps:
            if step.id == step_id:
                return step
        raise KeyError(f"no step {step_id!r}; steps: {', '.join(s.id for s in self.steps)}")
