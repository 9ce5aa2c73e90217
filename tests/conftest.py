"""Shared fixtures: the repository root and a plan-writing helper."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def write_plan(tmp_path: Path) -> Callable[[str, str], Path]:
    """Write plan text to ``tmp_path/name`` and return its path."""

    def write(text: str, name: str = "plan.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


# -- the real vLLM ------------------------------------------------------------------
# Tests marked `vllm` run against the installed vLLM package (scripts/vllm-env.sh
# builds a venv with vLLM 0.34.0; `.ci/run` runs them there). Where vLLM is not
# installed they are deselected, not skipped; with WARMPLAN_REQUIRE_VLLM=1 its
# absence is an error, so CI's vLLM tier can never pass by running nothing.
REQUIRE_VLLM_ENV = "WARMPLAN_REQUIRE_VLLM"


def real_vllm_installed() -> bool:
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    return spec is not None and "tests/fakes" not in str(spec.origin)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import os

    marked = [item for item in items if item.get_closest_marker("vllm") is not None]
    if not marked or real_vllm_installed():
        return
    if os.environ.get(REQUIRE_VLLM_ENV) == "1":
        raise pytest.UsageError(
            f"{REQUIRE_VLLM_ENV}=1 but vLLM is not installed in {__import__('sys').prefix}: "
            "build the venv with scripts/vllm-env.sh"
        )
    config.hook.pytest_deselected(items=marked)
    items[:] = [item for item in items if item.get_closest_marker("vllm") is None]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """In the vLLM tier (WARMPLAN_REQUIRE_VLLM=1) a skipped `vllm` test fails."""
    import os

    outcome = yield
    report = outcome.get_result()
    if (
        report.skipped
        and os.environ.get(REQUIRE_VLLM_ENV) == "1"
        and item.get_closest_marker("vllm") is not None
    ):
        report.outcome = "failed"
        report.longrepr = f"{item.nodeid}: skipped in the vLLM tier, where nothing may skip"
