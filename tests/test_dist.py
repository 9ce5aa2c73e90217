"""The world: LocalWorld, current_world, and dist.py importable without torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from warmplan import dist
from warmplan.dist import LocalWorld, World, WorldError, current_world, launched, set_current_world


def test_local_world_collectives_are_identity() -> None:
    """A single process's collectives return what they were given."""
    w = LocalWorld()
    assert isinstance(w, World)
    assert (w.rank, w.local_rank, w.world_size) == (0, 0, 1)
    assert w.broadcast_bytes(b"x", timeout_s=1) == b"x"
    assert w.broadcast_bytes(None, timeout_s=1) is None
    assert w.all_gather_str("a", timeout_s=1) == ["a"]
    w.barrier(timeout_s=1)


@pytest.mark.parametrize(
    ("env", "expected"), [({}, False), ({"WORLD_SIZE": "1"}, False), ({"WORLD_SIZE": "4"}, True)]
)
def test_launched(env: dict[str, str], expected: bool) -> None:
    """Only WORLD_SIZE > 1 means a launcher started several ranks."""
    assert launched(env) is expected


def test_bad_world_size_is_named() -> None:
    """A non-integer WORLD_SIZE is an error that repeats the value."""
    with pytest.raises(WorldError, match="WORLD_SIZE must be an integer: 'two'"):
        launched({"WORLD_SIZE": "two"})


def test_current_world_is_local_when_not_launched(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without WORLD_SIZE, current_world() is a LocalWorld and is reused."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    set_current_world(None)
    try:
        w = current_world()
        assert isinstance(w, LocalWorld)
        assert current_world() is w
    finally:
        set_current_world(None)
    assert dist._current is None


def test_dist_imports_without_torch() -> None:
    """warmplan.dist and the cache module never import torch."""
    code = (
        "import sys; import warmplan.dist, warmplan.autotune.cache, warmplan.autotune.fake; "
        "w = warmplan.dist.current_world(); assert 'torch' not in sys.modules, 'torch imported'"
    )
    env = {"PATH": "/usr/bin:/bin"}
    subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        env=env,
        cwd=str(__import__("pathlib").Path(__file__).parents[1]),
    )
