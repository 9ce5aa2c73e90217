"""Tiny built-in engine configs the tests share (CPU, seconds to compile)."""

from __future__ import annotations

from typing import Any

TINY: dict[str, Any] = {
    "num_layers": 2,
    "hidden_size": 64,
    "num_heads": 4,
    "num_kv_heads": 2,
    "head_dim": 16,
    "intermediate_size": 96,
    "vocab_size": 128,
    "block_size": 4,
    "num_blocks": 96,
    "max_model_len": 160,
    "max_num_tokens": 64,
    "max_num_batched_tokens": 64,
    "max_num_seqs": 8,
    "compile_sizes": [4, 8, 16, 32],
    "kv_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "index_topk": 8,
    "index_head_dim": 16,
    "index_num_heads": 2,
    "device": "cpu",
}


def tiny(preset: str, **overrides: Any) -> dict[str, Any]:
    """The tiny test config of ``preset`` with ``overrides``."""
    return {**TINY, "preset": preset, **overrides}
