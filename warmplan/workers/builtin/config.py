"""EngineConfig: the built-in engine's configuration, typed and validated.

``CONFIG_FIELDS`` is the single source of truth for the keys a plan's ``builtin``
block may hold: each entry maps a key to ``(json_schema_snippet, description)``.
``config_json_schema()`` turns it into the JSON Schema object the plan schema embeds.
This module never imports torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

Preset = Literal["dense", "sparse-mla"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda"]

PRESETS: Final[tuple[str, ...]] = ("dense", "sparse-mla")
DTYPES: Final[tuple[str, ...]] = ("auto", "float32", "bfloat16", "float16")
DEVICES: Final[tuple[str, ...]] = ("auto", "cpu", "cuda")
GEMM_BACKENDS: Final[tuple[str, ...]] = ("auto", "torch", "flashinfer")

_POS_INT: Final[dict[str, Any]] = {"type": "integer", "minimum": 1}

CONFIG_FIELDS: Final[dict[str, tuple[dict[str, Any], str]]] = {
    "preset": (
        {"enum": list(PRESETS)},
        "Model family: dense GQA paged attention or DeepSeek-style sparse MLA.",
    ),
    "num_layers": (_POS_INT, "Number of decoder layers."),
    "hidden_size": (_POS_INT, "Model (residual stream) width."),
    "num_heads": (_POS_INT, "Attention query heads."),
    "num_kv_heads": (_POS_INT, "Key/value heads (dense preset; must divide num_heads)."),
    "head_dim": (_POS_INT, "Per-head width of queries and values (even, for RoPE)."),
    "intermediate_size": (_POS_INT, "MLP hidden width."),
    "vocab_size": (_POS_INT, "Vocabulary size."),
    "dtype": (
        {"enum": list(DTYPES)},
        "Weight/activation dtype; auto = float32 on CPU, bfloat16 on CUDA.",
    ),
    "device": ({"enum": list(DEVICES)}, "Where the engine runs; auto = cuda when available."),
    "block_size": (_POS_INT, "Tokens per KV-cache block."),
    "num_blocks": (
        _POS_INT,
        "KV-cache blocks in the pool (block 0 is the null block padding writes to).",
    ),
    "max_model_len": (_POS_INT, "Longest sequence (context + new tokens) a request may have."),
    "max_num_tokens": (
        _POS_INT,
        "Most tokens in one forward pass (slot-mapping warmup clamps to it).",
    ),
    "max_num_batched_tokens": (_POS_INT, "Most tokens the scheduler batches in one step."),
    "max_num_seqs": (_POS_INT, "Most requests in one step."),
    "compile_sizes": (
        {"type": "array", "items": _POS_INT, "uniqueItems": True},
        "Static-shape graph sizes; a batch is padded up to the next one, larger batches use the dynamic graph.",
    ),
    "seed": ({"type": "integer", "minimum": 0}, "Seed the weights are drawn from (no downloads)."),
    "gemm_backend": (
        {"enum": list(GEMM_BACKENDS)},
        "MLP matrix products: torch, or FlashInfer's mm_bf16 (cuBLASLt, autotunable; CUDA and bfloat16 only); auto = flashinfer where it can run.",
    ),
    "kv_lora_rank": (_POS_INT, "sparse-mla: width of the compressed latent KV cached per token."),
    "qk_rope_head_dim": (_POS_INT, "sparse-mla: rotary part of each query/key (even)."),
    "index_topk": (_POS_INT, "sparse-mla: cached tokens the indexer keeps per query."),
    "index_head_dim": (_POS_INT, "sparse-mla: width of the indexer's keys and queries."),
    "index_num_heads": (_POS_INT, "sparse-mla: indexer heads whose weighted scores are summed."),
}

CONFIG_KEYS: Final[dict[str, str]] = {key: desc for key, (_, desc) in CONFIG_FIELDS.items()}

# Keys that do not change what a kernel computes or how it is tuned.
_FINGERPRINT_EXCLUDED: Final[frozenset[str]] = frozenset({"device", "seed"})


def config_json_schema() -> dict[str, Any]:
    """The JSON Schema of a ``builtin`` config mapping (unknown keys rejected)."""
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            key: {**snippet, "description": desc} for key, (snippet, desc) in CONFIG_FIELDS.items()
        },
    }


def _default_compile_sizes() -> tuple[int, ...]:
    return (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineConfig:
    """The built-in engine's configuration; small defaults so CPU runs are fast."""

    preset: Preset = "dense"
    num_layers: int = 2
    hidden_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 256
    vocab_size: int = 512
    dtype: DType = "auto"
    device: Device = "auto"
    block_size: int = 16
    num_blocks: int = 256
    max_model_len: int = 2048
    max_num_tokens: int = 512
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 16
    compile_sizes: tuple[int, ...] = field(default_factory=_default_compile_sizes)
    seed: int = 0
    gemm_backend: str = "auto"
    kv_lora_rank: int = 64
    qk_rope_head_dim: int = 16
    index_topk: int = 64
    index_head_dim: int = 32
    index_num_heads: int = 2

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f'"preset" must be one of {", ".join(PRESETS)}: {self.preset!r}')
        if self.dtype not in DTYPES:
            raise ValueError(f'"dtype" must be one of {", ".join(DTYPES)}: {self.dtype!r}')
        if self.gemm_backend not in GEMM_BACKENDS:
            raise ValueError(
                f'"gemm_backend" must be one of {", ".join(GEMM_BACKENDS)}: {self.gemm_backend!r}'
            )
        if self.device not in DEVICES:
            raise ValueError(f'"device" must be one of {", ".join(DEVICES)}: {self.device!r}')
        for name, (snippet, _) in CONFIG_FIELDS.items():
            value = getattr(self, name)
            if snippet.get("type") == "integer":
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f'"{name}" must be an integer: {value!r}')
                if value < snippet["minimum"]:
                    raise ValueError(f'"{name}" must be >= {snippet["minimum"]}: {value}')
        sizes = self.compile_sizes
        if not isinstance(sizes, tuple) or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes
        ):
            raise ValueError(f'"compile_sizes" must be positive integers: {sizes!r}')
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f'"num_heads" ({self.num_heads}) must be a multiple of "num_kv_heads": {self.num_kv_heads}'
            )
        if self.head_dim % 2 or self.qk_rope_head_dim % 2:
            raise ValueError(
                f'"head_dim" and "qk_rope_head_dim" must be even: {self.head_dim}, {self.qk_rope_head_dim}'
            )
        if self.max_num_batched_tokens > self.max_num_tokens:
            raise ValueError(
                f'"max_num_batched_tokens" must be <= "max_num_tokens" ({self.max_num_tokens}): '
                f"{self.max_num_batched_tokens}"
            )
        if self.num_blocks < 2:
            raise ValueError(
                f'"num_blocks" must be >= 2 (block 0 is the null block): {self.num_blocks}'
            )

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> EngineConfig:
        """Build a config from a plan's mapping; unknown keys are rejected, listing valid ones."""
        data = dict(data or {})
        unknown = sorted(set(data) - set(CONFIG_FIELDS))
        if unknown:
            raise ValueError(
                f"unknown builtin config key(s) {', '.join(map(repr, unknown))}; "
                f"expected one of {', '.join(CONFIG_FIELDS)}"
            )
        if "compile_sizes" in data:
            sizes = data["compile_sizes"]
            if not isinstance(sizes, list | tuple):
                raise ValueError(f'"compile_sizes" must be a list of integers: {sizes!r}')
            data["compile_sizes"] = tuple(sizes)
        return cls(**data)

    def as_dict(self) -> dict[str, Any]:
        """Every field, JSON-able (compile_sizes as a list)."""
        out = dataclasses.asdict(self)
        out["compile_sizes"] = list(self.compile_sizes)
        return out

    def fingerprint(self) -> dict[str, Any]:
        """The fields that change compiled kernels or tuning results."""
        return {k: v for k, v in self.as_dict().items() if k not in _FINGERPRINT_EXCLUDED}

    @property
    def effective_compile_sizes(self) -> tuple[int, ...]:
        """Sorted, deduplicated compile sizes, clamped to ``max_num_tokens``."""
        return tuple(sorted({s for s in self.compile_sizes if s <= self.max_num_tokens}))

    @property
    def max_blocks_per_seq(self) -> int:
        return -(-self.max_model_len // self.block_size)

    @property
    def attention_backend(self) -> str:
        from warmplan.workers.builtin.attention import backend_name

        return backend_name(self.preset)
