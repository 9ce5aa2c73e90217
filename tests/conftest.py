"""Shared fixtures (a plan-writing helper), the fast lane, and the real-vLLM tier."""

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


# -- the fast lane ------------------------------------------------------------------
# `pytest -m "not compiles"` runs warmplan's logic in seconds. `compiles` marks what
# costs seconds a test: compiling kernels or graphs (torch.compile, Triton, the built-in
# engine), importing torch, or starting Python processes. These modules are marked
# whole, here; a test elsewhere marks itself. When the marker expression deselects
# `compiles`, these modules are not even collected: importing them imports torch.
COMPILING_MODULES = (
    "builtin/",
    "multiproc/",
    "vllm_real/",
    "test_monitor.py",
    "test_record.py",
    "test_reliability_cli.py",
    "test_reliability_plugin.py",
    "test_verify.py",
    "test_vllm_adapter.py",
    "test_vllm_contract.py",
    "test_vllm_jit_keys.py",
    "test_vllm_equivalence.py",
    "test_vllm_v2.py",
)
_TESTS = Path(__file__).parent


def _compiling(path: Path) -> bool:
    rel = path.relative_to(_TESTS).as_posix() if path.is_relative_to(_TESTS) else ""
    return any(rel == m.rstrip("/") or rel.startswith(m) for m in COMPILING_MODULES)


def _compiles_deselected(config: pytest.Config) -> bool:
    """Whether the -m expression drops every test marked `compiles`, whatever other
    registered markers it carries (so `-m gpu` still collects the GPU tests)."""
    import itertools

    from _pytest.mark.expression import Expression

    markexpr = config.getoption("markexpr", "")
    if not markexpr:
        return False
    expr = Expression.compile(markexpr)
    others = [line.split(":", 1)[0].strip() for line in config.getini("markers")]
    others = [name for name in others if name and name != "compiles"]
    for values in itertools.product((False, True), repeat=len(others)):
        present = {"compiles", *(n for n, v in zip(others, values, strict=True) if v)}
        if expr.evaluate(present.__contains__):
            return False
    return True


# The fast lane checks the same properties on fewer generated inputs (the full suite
# runs tests/test_reliability_fuzz.py's 150 a test); an explicit setting wins.
FAST_LANE_FUZZ_EXAMPLES = "25"


_OWN_CACHE_ROOT = pytest.StashKey[str]()


def pytest_unconfigure(config: pytest.Config) -> None:
    import shutil

    root = config.stash.get(_OWN_CACHE_ROOT, None)
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)


def pytest_configure(config: pytest.Config) -> None:
    import os
    import tempfile

    # The tests' caches (AOT artefacts, inductor's, Triton's) under a root of this
    # session, not the user's ~/.cache/warmplan: an artefact a run left there would
    # cover what a test expects to compile. An operator's setting wins.
    if not os.environ.get("WARMPLAN_CACHE_ROOT"):
        os.environ["WARMPLAN_CACHE_ROOT"] = tempfile.mkdtemp(prefix="warmplan-tests-")
        config.stash[_OWN_CACHE_ROOT] = os.environ["WARMPLAN_CACHE_ROOT"]

    if _compiles_deselected(config):
        os.environ.setdefault("WARMPLAN_FUZZ_EXAMPLES", FAST_LANE_FUZZ_EXAMPLES)


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if _compiling(collection_path) and _compiles_deselected(config):
        return True
    return None


def _mark_compiling(items: list[pytest.Item]) -> None:
    for item in items:
        slow = item.get_closest_marker("multiproc") or item.get_closest_marker("gpu")
        if slow or _compiling(Path(str(item.path))):
            item.add_marker(pytest.mark.compiles)


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

    _mark_compiling(items)
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
