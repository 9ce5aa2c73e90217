"""Autotune and compile-cache sharing across real processes (gloo on CPU).

Each test starts ranks of ``rank_main.py`` as subprocesses with torchrun-style env,
so that per-rank env can simulate two nodes (separate cache roots, per-node
``LOCAL_RANK``) and a dead rank's peers can be watched reporting it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.multiproc.launch import RankResult, launch

pytestmark = pytest.mark.multiproc


def env(root: Path, rec: Path, **extra: str) -> dict[str, str]:
    return {"WARMPLAN_CACHE_ROOT": str(root), "WARMPLAN_FAKE_RECORD_DIR": str(rec), **extra}


def ok(results: list[RankResult]) -> list[dict[str, object]]:
    for r in results:
        assert r.returncode == 0, f"rank {r.rank} exited {r.returncode}: {r.stderr[-3000:]}"
        assert r.outcome is not None
    return [r.outcome for r in results if r.outcome is not None]


def tuned(rec: Path) -> dict[str, int]:
    return {p.name: len(p.read_text().splitlines()) for p in sorted(rec.glob("tuned.rank*"))}


def elapsed(r: RankResult) -> float:
    """Seconds the rank spent in the step before failing (printed by rank_main)."""
    line = next(x for x in r.stderr.splitlines() if x.startswith("ELAPSED "))
    return float(line.split()[1])


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_leader_two_ranks_tunes_once_then_loads(tmp_path: Path) -> None:
    """2 ranks on two simulated nodes: rank 0 tunes exactly once, both nodes get
    identical files and load the same results; a relaunch with node B's file
    truncated only loads, and repairs it."""
    a, b, rec = tmp_path / "A", tmp_path / "B", tmp_path / "rec"
    per_rank = [env(a, rec, LOCAL_RANK="0"), env(b, rec, LOCAL_RANK="0")]
    cold = ok(launch(2, {"policy": "leader"}, out=tmp_path / "o1", env_per_rank=per_rank))
    assert [o["decision"] for o in cold] == ["tune", "tune"]
    assert len({o["fingerprint"] for o in cold}) == 1
    assert [o["runs"] for o in cold] == [1, 1]
    assert tuned(rec) == {"tuned.rank0": 1}
    fa, fb = a / "autotune/fake/tune.json", b / "autotune/fake/tune.json"
    good = fa.read_bytes()
    assert fb.read_bytes() == good

    fb.write_bytes(good[: len(good) // 3])
    warm = ok(launch(2, {"policy": "leader"}, out=tmp_path / "o2", env_per_rank=per_rank))
    assert [o["decision"] for o in warm] == ["load", "load"]
    assert [o["fingerprint"] for o in warm] == [cold[0]["fingerprint"]] * 2
    assert [o["runs"] for o in warm] == [1, 1]
    assert tuned(rec) == {"tuned.rank0": 1}
    assert fb.read_bytes() == good
    assert files_under(a) == files_under(b) == ["autotune/fake/tune.json"]


def test_leader_four_ranks_on_two_nodes(tmp_path: Path) -> None:
    """4 ranks, two simulated nodes (ranks 0-1 root A, 2-3 root B): one tuning,
    byte-identical files on both nodes, one fingerprint."""
    a, b, rec = tmp_path / "A", tmp_path / "B", tmp_path / "rec"
    per_rank = [
        env(a, rec, LOCAL_RANK="0"),
        env(a, rec, LOCAL_RANK="1"),
        env(b, rec, LOCAL_RANK="0"),
        env(b, rec, LOCAL_RANK="1"),
    ]
    cold = ok(launch(4, {"policy": "leader"}, out=tmp_path / "o1", env_per_rank=per_rank))
    assert [o["decision"] for o in cold] == ["tune"] * 4
    assert len({o["fingerprint"] for o in cold}) == 1
    assert tuned(rec) == {"tuned.rank0": 1}
    assert sorted(p.name for p in rec.glob("loaded.rank*")) == [f"loaded.rank{r}" for r in range(4)]
    assert (a / "autotune/fake/tune.json").read_bytes() == (
        b / "autotune/fake/tune.json"
    ).read_bytes()
    assert files_under(a) == files_under(b) == ["autotune/fake/tune.json"]


def test_leader_killed_mid_tune(tmp_path: Path) -> None:
    """Rank 0 dies inside tuning: rank 1 exits non-zero in time naming rank 0; no files left."""
    root, rec = tmp_path / "root", tmp_path / "rec"
    per_rank = [env(root, rec, WARMPLAN_FAKE_DIE_IN_TUNING="1"), env(root, rec)]
    results = launch(
        2, {"policy": "leader", "timeout_s": 10}, out=tmp_path / "o", env_per_rank=per_rank
    )
    assert results[0].returncode == 17
    follower = results[1]
    assert follower.returncode == 2
    assert elapsed(follower) < 10
    assert "rank 1, step 'autotune-step': waiting for rank 0 to finish tuning" in follower.stderr
    assert "waiting for rank 0" in follower.stderr.split("finish tuning", 1)[1]
    assert not root.exists() or files_under(root) == []


def test_hung_leader_times_out(tmp_path: Path) -> None:
    """Rank 0 hangs in tuning: rank 1 fails after timeout_s naming rank 0."""
    root, rec = tmp_path / "root", tmp_path / "rec"
    per_rank = [env(root, rec, WARMPLAN_FAKE_TUNE_SECONDS="60"), env(root, rec)]
    results = launch(
        2,
        {"policy": "leader", "timeout_s": 3},
        out=tmp_path / "o",
        env_per_rank=per_rank,
        kill_when_done=[1],
    )
    follower = results[1]
    assert follower.returncode == 2
    assert 3 <= elapsed(follower) < 8
    assert "timed out after" in follower.stderr
    assert "waiting for rank 0" in follower.stderr
    assert not root.exists() or files_under(root) == []


def test_every_rank_tunes_on_each_rank(tmp_path: Path) -> None:
    """every_rank: each rank tunes once into its own file."""
    root, rec = tmp_path / "root", tmp_path / "rec"
    out = ok(
        launch(
            2,
            {"policy": "every_rank", "per_rank": True},
            out=tmp_path / "o",
            env_per_rank=[env(root, rec)] * 2,
        )
    )
    assert [o["decision"] for o in out] == ["tune", "tune"]
    assert tuned(rec) == {"tuned.rank0": 1, "tuned.rank1": 1}
    assert files_under(root) == ["autotune/fake/tune.rank0.json", "autotune/fake/tune.rank1.json"]


def test_builtin_backend_leader_end_to_end(tmp_path: Path) -> None:
    """The built-in engine's real backend under leader: both ranks load rank 0's timing choice."""
    root = tmp_path / "root"
    out = ok(
        launch(
            2,
            {"policy": "leader", "backend": "builtin"},
            out=tmp_path / "o",
            env_per_rank=[env(root, tmp_path / "rec")] * 2,
        )
    )
    assert [o["decision"] for o in out] == ["tune", "tune"]
    assert out[0]["fingerprint"] == out[1]["fingerprint"] is not None
    assert files_under(root) == ["autotune/builtin/tune.json"]


def test_compile_caches_shared_and_leader_failure(tmp_path: Path) -> None:
    """Rank 0's inductor cache reaches rank 1; a failing leader makes rank 1 fail fast."""
    per_rank = [
        {
            "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"ind{r}"),
            "TRITON_CACHE_DIR": str(tmp_path / f"tri{r}"),
        }
        for r in range(2)
    ]
    out = ok(launch(2, {"kind": "compile_cache"}, out=tmp_path / "o1", env_per_rank=per_rank))
    assert [o["role"] for o in out] == ["leader", "follower"]
    assert (tmp_path / "ind1/fxgraph/ab/graph.bin").read_bytes() == b"compiled" * 1000

    results = launch(
        2,
        {"kind": "compile_cache", "leader_fails": True, "timeout_s": 30},
        out=tmp_path / "o2",
        env_per_rank=per_rank,
    )
    assert [r.returncode for r in results] == [2, 2]
    assert elapsed(results[1]) < 15
    assert (
        "rank 1, step 'compile_cache': rank 0 failed while compiling for the shared caches: "
        "rank 0, step 'slot-mapping': injected failure"
    ) in results[1].stderr


def test_torch_world_collectives_and_a_hung_peer(tmp_path: Path) -> None:
    """TorchWorld moves None, b"", 10 MB and unicode; a hung peer's barrier names it."""
    results = launch(2, {"kind": "world"}, out=tmp_path / "o", kill_when_done=[0])
    assert results[0].returncode == 0, results[0].stderr[-2000:]
    got = results[0].outcome
    assert got is not None
    assert (got["none"], got["empty"], got["big_ok"], got["gather"]) == (
        True,
        True,
        True,
        ["é", "éé"],
    )
    assert "barrier timed out after" in str(got["timeout"])
    assert "waiting for rank 1" in str(got["timeout"])
