"""The world: LocalWorld, current_world, one failure wording, and warmplan.world importable without torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from warmplan import world as world_module
from warmplan.testing import ThreadWorld
from warmplan.world import (
    LaunchError,
    LocalWorld,
    World,
    WorldError,
    WorldTimeout,
    all_gather_json,
    collective_failure,
    current_world,
    launched,
    set_current_world,
)


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
    with pytest.raises(LaunchError, match=r"^WORLD_SIZE must be a non-negative integer: 'two'$"):
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
    assert world_module._current is None


@pytest.mark.compiles  # starts an interpreter
def test_world_imports_without_torch() -> None:
    """warmplan.world, the old warmplan.dist path, the cache module and the test doubles never import torch."""
    code = (
        "import sys; import warmplan.world, warmplan.dist, warmplan.autotune.cache, warmplan.testing; "
        "w = warmplan.world.current_world(); assert 'torch' not in sys.modules, 'torch imported'"
    )
    env = {"PATH": "/usr/bin:/bin"}
    subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        env=env,
        cwd=str(__import__("pathlib").Path(__file__).parents[1]),
    )


def test_one_failure_wording() -> None:
    """A failed collective names what, the rank, whom it waited for, how long and why."""
    err = collective_failure(
        "barrier",
        rank=1,
        waiting_for="rank 0",
        timeout_s=3,
        elapsed=3.04,
        timed_out=True,
        cause="gloo: timeout",
    )
    assert isinstance(err, WorldTimeout)
    assert (
        str(err)
        == "barrier timed out after 3.0s (timeout 3s) on rank 1 waiting for rank 0: gloo: timeout"
    )
    err = collective_failure(
        "all_gather",
        rank=0,
        waiting_for="ranks 1, 2",
        timeout_s=600,
        elapsed=0.25,
        timed_out=False,
        cause="connection closed",
    )
    assert type(err) is WorldError
    assert (
        str(err)
        == "all_gather failed after 0.2s on rank 0 waiting for ranks 1, 2: connection closed"
    )


def test_thread_world_timeout_names_missing_ranks() -> None:
    """A ThreadWorld rank alone in a collective times out naming the ranks that never came."""
    worlds = ThreadWorld.group(3)
    with pytest.raises(WorldTimeout) as info:
        worlds[0].barrier(timeout_s=0.2)
    assert (
        str(info.value)
        == "barrier timed out after 0.2s (timeout 0.2s) on rank 0 waiting for ranks 1, 2"
    )


def test_all_gather_json_is_typed() -> None:
    """all_gather_json carries structured values, not string prefixes."""
    assert all_gather_json(LocalWorld(), {"ok": False, "value": "x"}, timeout_s=1) == [
        {"ok": False, "value": "x"}
    ]
