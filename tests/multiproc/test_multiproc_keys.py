"""``compile_keys`` split across two real ranks (gloo on CPU, the built-in engine):
each rank compiles its share, the ranks exchange the artefacts
(``warmplan.world.exchange``), the rest load from disk, and serving the covered
shapes afterwards compiles nothing on either rank. Separate cache roots (the
exchange moves files) and one shared root (it finds them there and moves none);
a rank whose share fails fails both ranks with one message naming it. The
exchange's own rounds are also driven on ``ThreadWorld`` ranks (no processes)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from tests.multiproc import launch as launch_mod
from tests.multiproc.launch import RankResult, launch
from warmplan.testing import ThreadWorld
from warmplan.world.exchange import ExchangeError, exchange_artefacts, snapshot

pytestmark = [pytest.mark.multiproc, pytest.mark.compiles]

KEYS_MAIN = Path(__file__).with_name("keys_rank_main.py")

PLAN = """\
version: 1
name: keys-split
builtin:
  preset: sparse-mla
  num_layers: 1
  hidden_size: 64
  num_heads: 4
  num_kv_heads: 2
  head_dim: 16
  intermediate_size: 96
  vocab_size: 128
  block_size: 4
  num_blocks: 96
  max_model_len: 160
  max_num_tokens: 16
  max_num_batched_tokens: 16
  max_num_seqs: 8
  compile_sizes: [4, 16]
  kv_lora_rank: 32
  qk_rope_head_dim: 8
  index_topk: 8
  index_head_dim: 16
  index_num_heads: 2
  dtype: float32
steps:
  - {id: slot, kind: compile_keys, kernel: slot_mapping}
  - {id: chunk, kind: compile_keys, kernel: chunk_metadata}
  - {id: forward, kind: compile_keys, kernel: forward}
"""
# Covered shapes: decodes, prefill chunks with and without prior context, each padded
# to a compile size (4 or 16).
SERVE = [
    [[1, 5, True]] * 3,
    [[1, 5, True], [12, 0, False]],
    [[8, 8, False]],
    [[3, 0, False]],
    [[16, 0, False]],
]


@pytest.fixture
def keys_main(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch_mod, "RANK_MAIN", KEYS_MAIN)


def env(root: Path) -> dict[str, str]:
    return {
        "WARMPLAN_CACHE_ROOT": str(root),
        "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"),
        "TRITON_CACHE_DIR": str(root / "triton"),
    }


def ok(results: list[RankResult]) -> list[dict[str, Any]]:
    for r in results:
        assert r.returncode == 0, f"rank {r.rank} exited {r.returncode}: {r.stderr[-3000:]}"
        assert r.outcome is not None
    return [r.outcome for r in results if r.outcome is not None]


def check_split(
    outcomes: list[dict[str, Any]],
    kernels: tuple[tuple[str, int], ...] = (("slot", 3), ("chunk", 2), ("forward", 2)),
) -> list[dict[str, Any]]:
    """Each rank compiled exactly its share (together: every key once), loaded the
    rest, and served the covered shapes without a compile. Returns the split infos."""
    splits = []
    for sid, nkeys in kernels:
        compiled_by: dict[str, int] = {}
        for o in outcomes:
            keys = o["steps"][sid]["keys"]
            split = keys["split"]
            assert split is not None and split["ranks"] == 2
            splits.append(split)
            per_key = keys["keys"]
            assert len(per_key) == nkeys
            mine = [k for k in per_key if k["outcome"] == "compiled"]
            assert len(mine) == split["own_keys"], per_key
            assert all(k.get("rank") == o["rank"] for k in mine), per_key
            assert [k["outcome"] for k in per_key if k not in mine] == ["loaded"] * (
                nkeys - len(mine)
            ), per_key
            for k in mine:
                assert k["key"] not in compiled_by, f"{k['key']} compiled on both ranks"
                compiled_by[k["key"]] = o["rank"]
        assert len(compiled_by) == nkeys
        assert set(compiled_by.values()) == {0, 1}
    for o in outcomes:
        assert o["serve_compiles"] == 0, o["serve_events"]
    return splits


def test_split_over_separate_cache_roots_moves_the_artefacts(
    tmp_path: Path, keys_main: None
) -> None:
    """Two cache roots (two hosts, as far as the caches go): each rank compiles half
    of each kernel's keys, receives the other half's files, loads them, and serves
    every covered shape without a compile."""
    per_rank = [env(tmp_path / f"root{r}") for r in range(2)]
    job = {"plan": PLAN, "serve": SERVE}
    out = ok(launch(2, job, out=tmp_path / "o", env_per_rank=per_rank, wall_timeout_s=240))
    splits = check_split(out)
    assert all(s["shared"] is False for s in splits)
    assert all(s["bytes"] > 0 and s["files_received"] > 0 for s in splits)
    # Every AOT artefact is now on both roots.
    aot = [sorted(p.name for p in (tmp_path / f"root{r}" / "aot").rglob("*.bin")) for r in (0, 1)]
    assert aot[0] == aot[1] and len(aot[0]) == 7


def test_split_over_one_shared_root_moves_nothing(tmp_path: Path, keys_main: None) -> None:
    """One cache root for both ranks (one host): the files each rank needs are
    already there, so the exchange moves no bytes; the split holds as before."""
    root = tmp_path / "root"
    plan = PLAN.replace("  - {id: forward, kind: compile_keys, kernel: forward}\n", "")
    job = {"plan": plan, "slots": [1, 5, 16, 7, 12]}
    out = ok(launch(2, job, out=tmp_path / "o", env_per_rank=[env(root)] * 2, wall_timeout_s=240))
    splits = check_split(out, kernels=(("slot", 3), ("chunk", 2)))
    assert all(s["shared"] is True and s["bytes"] == 0 for s in splits)
    assert sum(s["files_present"] for s in splits) > 0
    assert len(list((root / "aot").rglob("*.bin"))) == 5


def test_a_failing_share_fails_every_rank_naming_it(tmp_path: Path, keys_main: None) -> None:
    """Rank 1's compile raises: both ranks exit 2 with the one message naming rank 1;
    rank 0 does not wait for a timeout."""
    plan = (
        PLAN.split("steps:")[0]
        + "steps:\n  - {id: chunk, kind: compile_keys, kernel: chunk_metadata}\n"
    )
    per_rank = [env(tmp_path / "r0"), {**env(tmp_path / "r1"), "WP_KEYS_FAIL": "1"}]
    results = launch(
        2, {"plan": plan}, out=tmp_path / "o", env_per_rank=per_rank, wall_timeout_s=120
    )
    assert [r.returncode for r in results] == [2, 2], [r.stderr[-2000:] for r in results]
    cause = (
        "compile-key exchange: rank 1 failed before the exchange: compiling its share "
        "of the keys: RuntimeError: injected compile failure"
    )
    for r in results:
        assert f"ERROR rank {r.rank}, step 'chunk': {cause}" in r.stderr, r.stderr[-2000:]


# -- the exchange's rounds on thread ranks -----------------------------------------------


def _run(worlds: list[ThreadWorld], fn: Any) -> list[Any]:
    got: list[Any] = [None] * len(worlds)

    def go(r: int) -> None:
        try:
            got[r] = fn(worlds[r])
        except Exception as exc:
            got[r] = exc

    threads = [threading.Thread(target=go, args=(r,)) for r in range(len(worlds))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return got


def test_exchange_moves_only_new_files_relative_to_each_role(tmp_path: Path) -> None:
    """Files new since the snapshot travel, keyed by role (the two ranks' directories
    differ); files that were there before stay; a file present with the same size is
    not asked for."""
    dirs = [[str(tmp_path / f"r{r}" / "aot"), str(tmp_path / f"r{r}" / "ind")] for r in range(2)]
    old = Path(dirs[0][1]) / "old.bin"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"x" * 10)
    snaps = [snapshot(d) for d in dirs]
    (Path(dirs[0][0]) / "k").mkdir(parents=True)
    (Path(dirs[0][0]) / "k" / "a.bin").write_bytes(b"a" * 100)
    Path(dirs[1][1]).mkdir(parents=True)
    (Path(dirs[1][1]) / "b.so").write_bytes(b"b" * 50)
    (Path(dirs[1][1]) / "same.bin").write_bytes(b"s" * 7)
    (Path(dirs[0][1]) / "same.bin").write_bytes(b"t" * 7)  # rank 0 has one already
    worlds = ThreadWorld.group(2)
    got = _run(
        worlds,
        lambda w: exchange_artefacts(w, dirs[w.rank], since=snaps[w.rank], timeout_s=10),
    )
    assert (tmp_path / "r1/aot/k/a.bin").read_bytes() == b"a" * 100
    assert (tmp_path / "r0/ind/b.so").read_bytes() == b"b" * 50
    assert not (tmp_path / "r1/ind/old.bin").exists()
    assert (tmp_path / "r0/ind/same.bin").read_bytes() == b"t" * 7  # same size: not asked for
    assert got[0]["files_received"] == 1 and got[0]["files_present"] == 1
    assert got[1]["files_received"] == 1 and got[0]["bytes"] == got[1]["bytes"] > 0
    assert got[0]["shared"] is False


def test_exchange_failure_anywhere_fails_every_rank(tmp_path: Path) -> None:
    """An error brought to the exchange, a peer that never comes: every
    rank raises, naming the rank, within the timeout."""
    dirs = [[str(tmp_path / f"r{r}")] for r in range(2)]
    got = _run(
        ThreadWorld.group(2),
        lambda w: exchange_artefacts(
            w, dirs[w.rank], error="boom" if w.rank == 1 else None, timeout_s=10
        ),
    )
    assert all(isinstance(g, ExchangeError) for g in got), got
    assert {str(g) for g in got} == {
        "compile-key exchange: rank 1 failed before the exchange: boom"
    }

    worlds = ThreadWorld.group(2)
    got = _run(
        worlds[:1],
        lambda w: exchange_artefacts(w, dirs[0], timeout_s=0.5),
    )
    assert isinstance(got[0], ExchangeError)
    assert "timed out" in str(got[0]) and "waiting for rank 1" in str(got[0])
