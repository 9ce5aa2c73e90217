"""Reliability of autotune on a bad cache directory: a cache file that cannot be
written fails every rank before anyone tunes (minutes of tuning would be lost at the
write), naming the file; a cache directory that can be created is fine."""

from __future__ import annotations

import threading
from pathlib import Path

import structlog

from warmplan.errors import StepError
from warmplan.steps.autotune import ResolvedAutotune, run_autotune
from warmplan.testing import FakeBackend, RecordingWorker, ThreadWorld

LOG = structlog.get_logger("test")


def step(path: Path) -> ResolvedAutotune:
    return ResolvedAutotune(
        id="tune",
        kind="autotune",
        requested=(8,),
        applied=(8,),
        clamp_to="max_num_batched_tokens",
        limit=8,
        shape="plain",
        backend="fake",
        policy="leader",
        on_missing="tune",
        timeout_s=5.0,
        cache_path=str(path),
        config_hash="cfg",
    )


def run_two(path: Path) -> tuple[list[object], list[FakeBackend]]:
    worlds = ThreadWorld.group(2)
    backends = [FakeBackend(rank=r) for r in range(2)]
    workers = [
        RecordingWorker(world=worlds[r], backends={"fake": backends[r]}, platform="cpu")
        for r in range(2)
    ]
    results: list[object] = [None, None]

    def go(r: int) -> None:
        try:
            results[r] = run_autotune(step(path), workers[r], log=LOG)
        except StepError as exc:
            results[r] = exc

    threads = [threading.Thread(target=go, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results, backends


def test_unwritable_cache_dir_fails_every_rank_before_tuning(tmp_path: Path) -> None:
    """A cache root under a regular file (or a read-only file system): both ranks
    fail at once, nobody tuned, the message names the file."""
    (tmp_path / "afile").write_text("")
    path = tmp_path / "afile" / "c" / "x.json"
    results, backends = run_two(path)
    assert [str(r) for r in results] == [
        f"rank {r}, step 'tune': rank 0 cannot write the cache file {path} ({tmp_path}/afile is "
        "not a directory); tuning would be lost, so nothing was tuned: make the cache root "
        "writable, or set --cache-root"
        for r in range(2)
    ]
    assert [b.tuned_count for b in backends] == [0, 0]


def test_missing_cache_dirs_are_created(tmp_path: Path) -> None:
    """A cache directory that does not exist yet is no obstacle: it is created."""
    path = tmp_path / "new" / "deeper" / "x.json"
    results, backends = run_two(path)
    assert [getattr(r, "decision", r) for r in results] == ["tune", "tune"]
    assert [b.tuned_count for b in backends] == [1, 0]
    assert path.is_file()
