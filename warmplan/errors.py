"""The errors a user can cause, and how the CLI maps them to exit codes.

``UserError`` (exit 1): a bad plan, a bad option, an unsatisfiable request. Its
message is printed as it is, without a traceback.
``StepError`` (exit 2): a step failed while running; the message names the step
(and the rank, across ranks) and what failed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from warmplan.report import Report


class WarmplanError(Exception):
    """Base of every error warmplan reports to a user without a traceback."""

    exit_code = 1


class UserError(WarmplanError):
    """Something the user can fix: a plan, an option, a path."""

    exit_code = 1


class PlanError(UserError):
    """One or more problems in plan files; ``problems`` holds one message each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class StepError(WarmplanError):
    """A step failed while it ran; the message names the step and what failed."""

    exit_code = 2

    def __init__(self, step_id: str, message: str, *, rank: int | None = None) -> None:
        self.step_id = step_id
        self.rank = rank
        self.report: Report | None = None  # the partial report, when the executor raised it
        where = f"step {step_id!r}" if rank is None else f"rank {rank}, step {step_id!r}"
        super().__init__(f"{where}: {message}")
