"""The built-in engine's config keys, as data: the keys a plan's ``builtin`` block (and
``--model-config``) may hold, each with its JSON Schema snippet and description.

A leaf, so that the plan schema can embed the block without importing the engine;
the engine (``warmplan.workers.builtin.config.EngineConfig``) validates against the
same entries. ``CONFIG_FIELDS`` maps each key to ``(json_schema_snippet, description)``.
"""

from __future__ import annotations

from typing import Any, Final, Literal

Preset = Literal["dense", "sparse-mla"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda"]

PRESETS: Final[tuple[str, ...]] = ("dense", "sparse-mla")
DTYPES: Final[tuple[str, ...]] = ("auto", "float32", "bfloat16", "float16")
DEVICES: Final[tuple[str, ...]] = ("auto", "cpu", "cuda")
GEMM_BACKENDS: Final[tuple[str, ...]] = ("auto", "torch", "flashinfer")


def pos_int(maximum: int) -> dict[str, Any]:
    """A positive integer up to ``maximum``: bounds far above any model this engine
    stands in for, so that a typo fails validation instead of allocating."""
    return {"type": "integer", "minimum": 1, "maximum": maximum}


WIDTH: Final = pos_int(1 << 16)  # widths and per-head sizes
HEADS: Final = pos_int(1024)
TOKENS: Final = pos_int(1 << 24)  # token counts, as a plan's (warmplan.steps.common)

CONFIG_FIELDS: Final[dict[str, tuple[dict[str, Any], str]]] = {
    "preset": (
        {"enum": list(PRESETS)},
        "Model family: dense GQA paged attention or DeepSeek-style sparse MLA.",
    ),
    "num_layers": (pos_int(1024), "Number of decoder layers."),
    "hidden_size": (WIDTH, "Model (residual stream) width."),
    "num_heads": (HEADS, "Attention query heads."),
    "num_kv_heads": (HEADS, "Key/value heads (dense preset; must divide num_heads)."),
    "head_dim": (pos_int(1024), "Per-head width of queries and values (even, for RoPE)."),
    "intermediate_size": (pos_int(1 << 18), "MLP hidden width."),
    "vocab_size": (pos_int(1 << 20), "Vocabulary size."),
    "dtype": (
        {"enum": list(DTYPES)},
        "Weight/activation dtype; auto = float32 on CPU, bfloat16 on CUDA.",
    ),
    "device": ({"enum": list(DEVICES)}, "Where the engine runs; auto = cuda when available."),
    "block_size": (pos_int(1024), "Tokens per KV-cache block."),
    "num_blocks": (
        TOKENS,
        "KV-cache blocks in the pool (block 0 is the null block padding writes to).",
    ),
    "max_model_len": (TOKENS, "Longest sequence (context + new tokens) a request may have."),
    "max_num_tokens": (
        TOKENS,
        "Most tokens in one forward pass (slot-mapping warmup clamps to it).",
    ),
    "max_num_batched_tokens": (TOKENS, "Most tokens the scheduler batches in one step."),
    "max_num_seqs": (pos_int(1 << 16), "Most requests in one step."),
    "compile_sizes": (
        {"type": "array", "items": TOKENS, "maxItems": 1024, "uniqueItems": True},
        "Static-shape graph sizes; a batch is padded up to the next one, larger batches use the dynamic graph.",
    ),
    "seed": (
        {"type": "integer", "minimum": 0, "maximum": (1 << 63) - 1},
        "Seed the weights are drawn from (no downloads).",
    ),
    "gemm_backend": (
        {"enum": list(GEMM_BACKENDS)},
        "MLP matrix products: torch, or FlashInfer's mm_bf16 (cuBLASLt, autotunable; CUDA and bfloat16 only); auto = flashinfer where it can run.",
    ),
    "kv_lora_rank": (WIDTH, "sparse-mla: width of the compressed latent KV cached per token."),
    "qk_rope_head_dim": (pos_int(1024), "sparse-mla: rotary part of each query/key (even)."),
    "index_topk": (TOKENS, "sparse-mla: cached tokens the indexer keeps per query."),
    "index_head_dim": (pos_int(1024), "sparse-mla: width of the indexer's keys and queries."),
    "index_num_heads": (HEADS, "sparse-mla: indexer heads whose weighted scores are summed."),
}

CONFIG_KEYS: Final[dict[str, str]] = {key: desc for key, (_, desc) in CONFIG_FIELDS.items()}


def config_json_schema() -> dict[str, Any]:
    """The JSON Schema of a ``builtin`` config mapping (unknown keys rejected)."""
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            key: {**snippet, "description": desc} for key, (snippet, desc) in CONFIG_FIELDS.items()
        },
    }
