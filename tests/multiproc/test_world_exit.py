"""A rank of a gloo world that leaves through the interpreter's normal exit exits with
its own code. Without the process group destroyed at exit (``TorchWorld.from_env``
registers it), gloo's threads are torn down by C++ static destructors, and now and
then a rank aborts instead (SIGABRT, ``terminate called without an active exception``):
a failed step's exit 2 became -6 in CI. Several launches, since the abort is a race."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.multiproc import launch as launch_mod
from tests.multiproc.launch import launch

pytestmark = [pytest.mark.multiproc]

EXIT_MAIN = Path(__file__).with_name("exit_rank_main.py")


@pytest.mark.parametrize("code", [0, 2])
def test_ranks_exit_with_their_code_not_an_abort(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    monkeypatch.setattr(launch_mod, "RANK_MAIN", EXIT_MAIN)
    for attempt in range(4):
        results = launch(2, {"code": code}, out=tmp_path / f"a{attempt}", wall_timeout_s=60)
        assert [r.returncode for r in results] == [code, code], [r.stderr[-800:] for r in results]
        assert not any("terminate called" in r.stderr for r in results)


def test_a_closed_world_refuses_collectives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``close`` lets go of the group: a collective after it is a ``WorldError`` naming
    the rank, not a call into a destroyed group; the atexit ``close`` after it is a
    no-op and the rank still exits with its code."""
    monkeypatch.setattr(launch_mod, "RANK_MAIN", EXIT_MAIN)
    results = launch(2, {"code": 3, "close": True}, out=tmp_path / "o", wall_timeout_s=60)
    assert [r.returncode for r in results] == [3, 3], [r.stderr[-800:] for r in results]
    for r in results:
        assert f"all_gather on rank {r.rank}: this world was closed" in r.stderr, r.stderr
