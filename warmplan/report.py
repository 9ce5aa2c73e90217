"""The report of running a plan on one rank (``--report FILE``), and its one writer.

Operators and CI read it, so its fields are a contract: ``docs/report.md`` documents
them and tests cover them. ``Report.write`` is the only way a report reaches a file
(atomically: temp file + rename); ``report_path`` fills ``{rank}`` in a template.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from warmplan.errors import UserError
from warmplan.fsutil import atomic_write

REPORT_VERSION = 1


@dataclass(slots=True, kw_only=True)
class StepReport:
    """One step's line in the report."""

    id: str
    kind: str
    requested: list[int]
    applied: list[int]
    skipped: str | None
    duration_s: float = 0.0
    compiles: int = 0
    cache_loads: int = 0
    device_loads: int = 0  # kernels first loaded onto the device during the step
    shape: str | None = None
    prior_context: int = 0
    autotune: dict[str, Any] | None = None
    keys: dict[str, Any] | None = None  # compile_keys steps: per kernel, per key
    error: str | None = None


@dataclass(slots=True, kw_only=True)
class Report:
    """The result of running a plan on one rank (``--report FILE``)."""

    plan: dict[str, Any]
    worker: dict[str, Any]
    steps: list[StepReport] = field(default_factory=list)
    duration_s: float = 0.0
    compile_cache: dict[str, Any] | None = None
    failed: str | None = None

    @property
    def totals(self) -> dict[str, Any]:
        return {
            "duration_s": round(self.duration_s, 6),
            "compiles": sum(s.compiles for s in self.steps),
            "cache_loads": sum(s.cache_loads for s in self.steps),
            "device_loads": sum(s.device_loads for s in self.steps),
            "steps_run": sum(1 for s in self.steps if s.skipped is None and s.error is None),
            "steps_skipped": sum(1 for s in self.steps if s.skipped is not None),
        }

    def step(self, step_id: str) -> StepReport:
        for s in self.steps:
            if s.id == step_id:
                return s
        raise KeyError(
            f"no step {step_id!r} in the report; steps: {', '.join(s.id for s in self.steps)}"
        )

    def to_dict(self) -> dict[str, Any]:
        steps = []
        for s in self.steps:
            d = asdict(s)
            d["duration_s"] = round(s.duration_s, 6)
            steps.append(d)
        out: dict[str, Any] = {
            "report_version": REPORT_VERSION,
            "plan": self.plan,
            "worker": self.worker,
            "steps": steps,
            "totals": self.totals,
            "failed": self.failed,
        }
        if self.compile_cache is not None:
            out["compile_cache"] = self.compile_cache
        return out

    def write(self, path: str | os.PathLike[str]) -> None:
        """Write the report as JSON atomically (temp file + rename)."""
        try:
            atomic_write(
                path, json.dumps(self.to_dict(), indent=2, sort_keys=False).encode() + b"\n"
            )
        except OSError as exc:
            raise UserError(f"cannot write the report {path}: {exc.strerror or exc}") from None


def report_path(template: str, rank: int) -> str:
    """The report file of ``rank``: ``{rank}`` in ``template`` replaced by it."""
    return template.replace("{rank}", str(rank))
