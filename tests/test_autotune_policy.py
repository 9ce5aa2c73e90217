"""Autotune policies through run_autotune, with ranks as threads (ThreadWorld)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from warmplan.autotune import default_on_missing
from warmplan.autotune.cache import encode_cache
from warmplan.errors import StepError
from warmplan.steps.autotune import AutotuneOutcome, ResolvedAutotune, run_autotune
from warmplan.testing import FakeBackend, RecordingWorker, ThreadWorld
from warmplan.world import LocalWorld, World

LOG = structlog.get_logger("test")


def make_step(path: Path | str, **kw: Any) -> ResolvedAutotune:
    """A resolved autotune step; ``on_missing`` defaults as resolution does, by policy."""
    kw.setdefault("on_missing", default_on_missing(kw.get("policy", "leader")))
    base = ResolvedAutotune(
        id="fi-autotune",
        kind="autotune",
        requested=(8192,),
        applied=(512,),
        clamp_to="max_num_batched_tokens",
        limit=512,
        shape="plain",
        backend="fake",
        policy="leader",
        timeout_s=5.0,
        cache_path=str(path),
        config_hash="cfg",
    )
    return replace(base, **kw)


def worker_for(world: World, backend: FakeBackend | None) -> RecordingWorker:
    backends = {} if backend is None else {"fake": backend}
    return RecordingWorker(world=world, backends=backends, platform="cpu")


Result = AutotuneOutcome | StepError


def run_ranks(
    n: int,
    step_for: Callable[[int], ResolvedAutotune],
    *,
    backend_for: Callable[[int], FakeBackend | None] | None = None,
    local_ranks: Sequence[int] | None = None,
) -> tuple[list[Result], list[FakeBackend | None], list[RecordingWorker]]:
    worlds = ThreadWorld.group(n, local_ranks=list(local_ranks) if local_ranks else None)
    backends = [backend_for(r) if backend_for else FakeBackend(rank=r) for r in range(n)]
    workers = [worker_for(worlds[r], backends[r]) for r in range(n)]
    results: list[Result | None] = [None] * n

    def go(r: int) -> None:
        try:
            with workers[r].preserve_state():
                results[r] = run_autotune(step_for(r), workers[r], log=LOG)
        except StepError as exc:
            results[r] = exc

    threads = [threading.Thread(target=go, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(r is not None for r in results)
    return [r for r in results if r is not None], backends, workers


def runs(worker: RecordingWorker) -> int:
    return len(worker.calls_named("dummy_run"))


def test_single_process_cold_then_warm(tmp_path: Path) -> None:
    """One process: the first run tunes and writes the file, the second loads it."""
    path = tmp_path / "c.json"
    backend = FakeBackend()
    worker = worker_for(LocalWorld(), backend)
    cold = run_autotune(make_step(path), worker, log=LOG)
    assert (cold.decision, cold.ran_run, cold.cache_path) == ("tune", True, str(path))
    assert cold.reason == f"no cache file at {path}"
    assert backend.tuned_count == 1
    assert runs(worker) == 1
    assert worker.calls_named("dummy_run")[0].args["num_tokens"] == 512

    backend2 = FakeBackend()
    worker2 = worker_for(LocalWorld(), backend2)
    warm = run_autotune(make_step(path), worker2, log=LOG)
    assert (warm.decision, warm.ran_run, warm.reason) == ("load", True, None)
    assert warm.fingerprint == cold.fingerprint
    assert backend2.tuned_count == 0
    assert backend2.loaded is not None
    assert runs(worker2) == 1


def test_leader_two_nodes_tunes_once_and_all_hold_identical_files(tmp_path: Path) -> None:
    """Four ranks on two simulated nodes: only rank 0 tunes; both nodes' files are identical."""
    paths = [tmp_path / "A" / "c.json"] * 2 + [tmp_path / "B" / "c.json"] * 2
    results, backends, workers = run_ranks(
        4, lambda r: make_step(paths[r]), local_ranks=[0, 1, 0, 1]
    )
    assert [type(r) for r in results] == [AutotuneOutcome] * 4
    outs = [r for r in results if isinstance(r, AutotuneOutcome)]
    assert [o.decision for o in outs] == ["tune"] * 4
    assert len({o.fingerprint for o in outs}) == 1
    assert [b.tuned_count for b in backends if b] == [1, 0, 0, 0]
    assert all(b is not None and b.loaded is not None for b in backends)
    assert [runs(w) for w in workers] == [1, 1, 1, 1]
    assert (tmp_path / "A" / "c.json").read_bytes() == (tmp_path / "B" / "c.json").read_bytes()

    results, backends, workers = run_ranks(
        4, lambda r: make_step(paths[r]), local_ranks=[0, 1, 0, 1]
    )
    outs = [r for r in results if isinstance(r, AutotuneOutcome)]
    assert [o.decision for o in outs] == ["load"] * 4
    assert [b.tuned_count for b in backends if b] == [0, 0, 0, 0]


def test_leader_repairs_a_stale_file_on_another_node(tmp_path: Path) -> None:
    """Rank 0's hit is broadcast; node B's corrupt file is rewritten, nobody tunes."""
    a, b = tmp_path / "A" / "c.json", tmp_path / "B" / "c.json"
    run_ranks(1, lambda r: make_step(a))
    b.parent.mkdir()
    b.write_bytes(b"{torn")
    results, backends, _ = run_ranks(2, lambda r: make_step([a, b][r]), local_ranks=[0, 0])
    assert [getattr(r, "decision", r) for r in results] == ["load", "load"]
    assert b.read_bytes() == a.read_bytes()
    assert all(x is not None and x.tuned_count == 0 for x in backends)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b'{"warmplan_autotune_cache": 1, "metad', "does not parse (corrupt or truncated)"),
        (b"", "does not parse"),
        (None, "metadata mismatch: config_hash: file has 'other', this rank has 'cfg'"),
    ],
)
def test_unusable_file_is_retuned_with_reason(
    tmp_path: Path, content: bytes | None, reason: str
) -> None:
    """Corrupt, truncated and mismatched files are never loaded: tune, and say why."""
    path = tmp_path / "c.json"
    if content is None:
        meta = {
            "warmplan_format": "1",
            "backend": "fake",
            "backend_version": "1",
            "device": "none",
            "arch": "cpu",
            "config_hash": "other",
            "fake.fake_version": "1",
        }
        content = encode_cache(meta, b'{"tactics": {}}')
    path.write_bytes(content)
    backend = FakeBackend()
    with capture_logs() as logs:
        out = run_autotune(make_step(path), worker_for(LocalWorld(), backend), log=LOG)
    assert out.decision == "tune"
    assert out.reason is not None
    assert reason in out.reason
    assert backend.tuned_count == 1
    assert any(e["event"] == "autotune.cache_unusable" and reason in e["reason"] for e in logs)
    again = run_autotune(make_step(path), worker_for(LocalWorld(), FakeBackend()), log=LOG)
    assert again.decision == "load"  # the file was rewritten whole, with this rank's metadata


def test_on_missing_skip_runs_nothing(tmp_path: Path) -> None:
    """leader with on_missing=skip: no tuning, no run, decision skip on every rank."""
    results, _backends, workers = run_ranks(
        2, lambda r: make_step(tmp_path / "c.json", on_missing="skip")
    )
    assert [(getattr(o, "decision", None), getattr(o, "ran_run", None)) for o in results] == [
        ("skip", False)
    ] * 2
    assert [runs(w) for w in workers] == [0, 0]
    assert not (tmp_path / "c.json").exists()


def test_on_missing_fail_fails_every_rank(tmp_path: Path) -> None:
    """leader with on_missing=fail: a StepError on every rank naming rank 0's reason."""
    results, _, _ = run_ranks(2, lambda r: make_step(tmp_path / "c.json", on_missing="fail"))
    assert [str(e) for e in results] == [
        f"rank {r}, step 'fi-autotune': no usable autotune cache on rank 0 and on_missing=fail: "
        f"no cache file at {tmp_path / 'c.json'}"
        for r in range(2)
    ]


def test_backend_missing_on_one_rank_skips_everywhere(tmp_path: Path) -> None:
    """A backend absent on rank 1 only: every rank skips and the replaced step runs."""
    results, _, workers = run_ranks(
        2,
        lambda r: make_step(tmp_path / "c.json"),
        backend_for=lambda r: FakeBackend() if r == 0 else None,
    )
    for out in results:
        assert isinstance(out, AutotuneOutcome)
        assert (out.decision, out.ran_run) == ("skip", False)
        assert out.reason == "rank 1: worker has no autotune backend 'fake'"
    assert [runs(w) for w in workers] == [0, 0]


def test_backend_unavailable_reason(tmp_path: Path) -> None:
    """unavailable_reason() is reported as the skip reason."""
    out = run_autotune(
        make_step(tmp_path / "c.json"),
        worker_for(LocalWorld(), FakeBackend(unavailable="no GPU")),
        log=LOG,
    )
    assert (out.decision, out.ran_run, out.reason) == (
        "skip",
        False,
        "rank 0: backend 'fake' unavailable: no GPU",
    )


def test_unwritable_cache_dir_fails_every_rank_naming_the_path(tmp_path: Path) -> None:
    """Rank 0 cannot write: every rank fails with a message naming the path."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a directory should be")
    path = blocker / "c.json"
    results, _, _ = run_ranks(2, lambda r: make_step(path))
    for r, err in enumerate(results):
        assert isinstance(err, StepError)
        assert f"cannot write the cache file {path}" in str(err)
        assert str(err).startswith(f"rank {r}, step 'fi-autotune': ")


def test_follower_load_failure_fails_every_rank(tmp_path: Path) -> None:
    """A follower whose backend refuses the payload makes every rank fail, naming it."""

    class Refusing(FakeBackend):
        def load(self, payload: bytes) -> None:
            from warmplan.workers.base import AutotuneLoadError

            raise AutotuneLoadError("cudnn-frontend present on one side only")

    results, _, _ = run_ranks(
        2,
        lambda r: make_step(tmp_path / "c.json"),
        backend_for=lambda r: Refusing(rank=r) if r else FakeBackend(),
    )
    for err in results:
        assert isinstance(err, StepError)
        assert "loading the autotune cache failed on rank 1" in str(err)
        assert "cudnn-frontend present on one side only" in str(err)


def test_follower_names_a_hung_leader(tmp_path: Path) -> None:
    """A leader that never arrives: the follower fails within timeout_s naming rank 0."""
    worlds = ThreadWorld.group(2)
    worker = worker_for(worlds[1], FakeBackend(rank=1))
    with pytest.raises(StepError) as info:
        run_autotune(make_step(tmp_path / "c.json", timeout_s=0.3), worker, log=LOG)
    assert str(info.value).startswith(
        "rank 1, step 'fi-autotune': agreeing on backend availability: "
    )
    assert "waiting for rank 0" in str(info.value)


def test_every_rank_needs_a_path_per_rank(tmp_path: Path) -> None:
    """every_rank with one shared path on a host: a clear error about {rank}."""
    results, _, _ = run_ranks(2, lambda r: make_step(tmp_path / "c.json", policy="every_rank"))
    for err in results:
        assert isinstance(err, StepError)
        assert "put {rank} in the cache path template" in str(err)


def test_every_rank_tunes_each_then_loads_each(tmp_path: Path) -> None:
    """every_rank: each rank tunes its own file once; the next launch loads them."""

    def step(r: int) -> ResolvedAutotune:
        return make_step(tmp_path / f"c.rank{r}.json", policy="every_rank")

    results, backends, _ = run_ranks(2, step)
    assert [getattr(o, "decision", o) for o in results] == ["tune", "tune"]
    assert [b.tuned_count for b in backends if b] == [1, 1]
    results, backends, _ = run_ranks(2, step)
    assert [getattr(o, "decision", o) for o in results] == ["load", "load"]
    assert [b.tuned_count for b in backends if b] == [0, 0]


def test_load_only_never_tunes(tmp_path: Path) -> None:
    """load_only: missing -> skip (default) or fail; present -> load; never writes."""
    path = tmp_path / "c.json"
    results, backends, workers = run_ranks(2, lambda r: make_step(path, policy="load_only"))
    assert [getattr(o, "decision", o) for o in results] == ["skip", "skip"]
    assert [runs(w) for w in workers] == [0, 0]
    assert not path.exists()
    results, _, _ = run_ranks(2, lambda r: make_step(path, policy="load_only", on_missing="fail"))
    assert all(isinstance(e, StepError) and "on_missing=fail" in str(e) for e in results)
    run_ranks(1, lambda r: make_step(path))  # a leader run writes it
    results, backends, workers = run_ranks(2, lambda r: make_step(path, policy="load_only"))
    assert [getattr(o, "decision", o) for o in results] == ["load", "load"]
    assert [b.tuned_count for b in backends if b] == [0, 0]
    assert [runs(w) for w in workers] == [1, 1]


def test_load_only_rejects_on_missing_tune(tmp_path: Path) -> None:
    """load_only with on_missing=tune is a contradiction, said plainly."""
    with pytest.raises(
        StepError, match="policy load_only never tunes; on_missing must be skip or fail"
    ):
        run_autotune(
            make_step(tmp_path / "c.json", policy="load_only", on_missing="tune"),
            worker_for(LocalWorld(), FakeBackend()),
            log=LOG,
        )


def test_leader_tuning_failure_reaches_followers(tmp_path: Path) -> None:
    """The leader's run raising: followers fail at once naming rank 0, nothing written."""
    worlds = ThreadWorld.group(2)
    workers = [
        RecordingWorker(
            world=worlds[0],
            backends={"fake": FakeBackend()},
            platform="cpu",
            fail_on={"dummy_run": 1},
        ),
        worker_for(worlds[1], FakeBackend(rank=1)),
    ]
    results: list[Any] = [None, None]

    def go(r: int) -> None:
        try:
            results[r] = run_autotune(make_step(tmp_path / "c.json"), workers[r], log=LOG)
        except StepError as exc:
            results[r] = exc

    threads = [threading.Thread(target=go, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert isinstance(results[0], StepError)
    assert str(results[0]).startswith("rank 0, step 'fi-autotune': tuning raised InjectedFailure")
    assert isinstance(results[1], StepError)
    assert str(results[1]).startswith(
        "rank 1, step 'fi-autotune': rank 0 failed while tuning: InjectedFailure"
    )
    assert list(tmp_path.iterdir()) == []
