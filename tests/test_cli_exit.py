"""The command's exit: as a program it freezes the GC's objects before the interpreter
tears down (issue 13: 1.6-2.0 s of a warm run's exit); called in-process it does not."""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator

import pytest

from tests._paths import PLANS
from warmplan.cli import main

PLAN = str(PLANS / "builtin-smoke.yaml")


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


@pytest.mark.usefixtures("unfrozen")
def test_as_the_program_main_freezes_before_exit(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """main() reading sys.argv (the console script, python -m warmplan) freezes."""
    monkeypatch.setattr(sys, "argv", ["warmplan", "validate", PLAN])
    assert main() == 0
    assert gc.get_freeze_count() > 0


@pytest.mark.usefixtures("unfrozen")
def test_in_process_main_leaves_the_gc_alone(capsys: pytest.CaptureFixture[str]) -> None:
    """main(argv) from a caller's process freezes nothing: frozen objects are never freed."""
    assert main(["validate", PLAN]) == 0
    assert gc.get_freeze_count() == 0
