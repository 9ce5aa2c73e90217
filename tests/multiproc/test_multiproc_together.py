"""Policy ``together`` across real processes (gloo on CPU) with a FlashInfer-shaped
fake tuner (``tests.fakes.fakefi``) whose per-rank timing noise makes ranks pick
different tactics unless FlashInfer's process group mean-reduces their timings."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from tests.multiproc.launch import RankResult, launch
from warmplan.autotune.cache import encode_cache

pytestmark = pytest.mark.multiproc

JOB = {"backend": "flashinfer", "policy": "together", "per_rank": True, "tokens": 300}


def env(root: Path) -> dict[str, str]:
    return {"WARMPLAN_CACHE_ROOT": str(root)}


def ok(results: list[RankResult]) -> list[dict[str, object]]:
    for r in results:
        assert r.returncode == 0, f"rank {r.rank} exited {r.returncode}: {r.stderr[-3000:]}"
        assert r.outcome is not None
    return [r.outcome for r in results if r.outcome is not None]


def rank_file(root: Path, rank: int) -> Path:
    return root / "autotune" / "flashinfer" / f"tune.rank{rank}.json"


def test_together_every_rank_picks_the_same_tactic(tmp_path: Path) -> None:
    """Cold, 2 ranks: both tune under the reduction and pick the same tactic for
    every op and bucket; each keeps its own file. every_rank (no reduction) on the
    same tuner picks different tactics, so the check can fail."""
    root = tmp_path / "cache"
    per_rank = [env(root), env(root)]
    cold = ok(launch(2, JOB, out=tmp_path / "o1", env_per_rank=per_rank))
    assert [o["decision"] for o in cold] == ["tune", "tune"]
    assert cold[0]["tactics"] == cold[1]["tactics"] and cold[0]["tactics"]
    assert set(cold[0]["tactics"].values()) == {1}  # type: ignore[union-attr]
    assert all(int(o["reduces"]) > 0 for o in cold)  # type: ignore[call-overload]
    assert rank_file(root, 0).exists() and rank_file(root, 1).exists()

    alone = ok(
        launch(
            2,
            {**JOB, "policy": "every_rank"},
            out=tmp_path / "o2",
            env_per_rank=[env(tmp_path / "c2"), env(tmp_path / "c2")],
        )
    )
    assert alone[0]["tactics"] != alone[1]["tactics"]


def test_together_unanimous_hit_runs_no_tuning_forward(tmp_path: Path) -> None:
    """Warm, every rank's file matches: every rank loads, none runs the tuning
    forward or a reduction, and the outcome says what was skipped."""
    root = tmp_path / "cache"
    per_rank = [env(root), env(root)]
    ok(launch(2, JOB, out=tmp_path / "o1", env_per_rank=per_rank))
    warm = ok(launch(2, JOB, out=tmp_path / "o2", env_per_rank=per_rank))
    assert [o["decision"] for o in warm] == ["load", "load"]
    assert [o["runs"] for o in warm] == [0, 0]
    assert [o["ran_run"] for o in warm] == [False, False]
    assert [o["reduces"] for o in warm] == [0, 0]
    assert all("was not run" in str(o["run_skipped"]) for o in warm)
    assert all(o["loaded"] for o in warm)


def test_together_partial_hit_makes_every_rank_tune(tmp_path: Path) -> None:
    """Rank 1's file is missing: both ranks tune together (rank 0 drops what it had),
    none hangs, and the reason names rank 1."""
    root = tmp_path / "cache"
    per_rank = [env(root), env(root)]
    ok(launch(2, JOB, out=tmp_path / "o1", env_per_rank=per_rank))
    rank_file(root, 1).unlink()
    again = launch(2, JOB, out=tmp_path / "o2", env_per_rank=per_rank, wall_timeout_s=60)
    outs = ok(again)
    assert [o["decision"] for o in outs] == ["tune", "tune"]
    assert all(o["loaded"] == [] for o in outs)
    assert outs[0]["tactics"] == outs[1]["tactics"]
    assert "rank 1: no cache file at" in str(outs[0]["reason"])
    assert max(r.seconds for r in again) < 50


def test_together_foreign_file_is_ignored_with_the_field(tmp_path: Path) -> None:
    """Rank 1's table was tuned with another CUDA: it is reported ignored, naming the
    field, and both ranks tune (the log line: test_autotune_together.py)."""
    root = tmp_path / "cache"
    per_rank = [env(root), env(root)]
    ok(launch(2, JOB, out=tmp_path / "o1", env_per_rank=per_rank))
    f = rank_file(root, 1)
    doc = json.loads(f.read_text())
    inner = json.loads(base64.b64decode(doc["payload_b64"]))
    inner["_metadata"]["cuda_version"] = "12.8"
    f.write_bytes(encode_cache(doc["metadata"], json.dumps(inner).encode()))
    results = launch(2, JOB, out=tmp_path / "o2", env_per_rank=per_rank)
    outs = ok(results)
    assert [o["decision"] for o in outs] == ["tune", "tune"]
    want = "ignored: cuda_version differs: file has '12.8', running '13.0'"
    assert outs[1]["ignored"] == want
    assert outs[0]["ignored"] is None
