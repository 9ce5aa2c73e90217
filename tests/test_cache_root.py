"""One cache root for inductor, Triton, FlashInfer and warmplan (fast lane: no torch)."""

from __future__ import annotations

from pathlib import Path

from warmplan.cache_root import unify


def test_unify_puts_every_cache_under_one_root_and_keeps_the_operators(tmp_path: Path) -> None:
    """Inductor, Triton and FlashInfer under the root; a variable already set wins."""
    env = {"TRITON_CACHE_DIR": "/mine/triton"}
    dirs = unify(str(tmp_path), env)
    assert env == {
        "TRITON_CACHE_DIR": "/mine/triton",
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
        "FLASHINFER_WORKSPACE_BASE": str(tmp_path / "flashinfer"),
    }
    assert dirs == {
        "inductor": str(tmp_path / "inductor"),
        "triton": "/mine/triton",
        "flashinfer": str(tmp_path / "flashinfer"),
        "aot": str(tmp_path / "aot"),
    }
