"""EngineConfig: the built-in engine's configuration, typed and validated.

The keys a plan's ``builtin`` block may hold are data in ``warmplan.builtin_keys``
(``CONFIG_FIELDS``, ``config_json_schema()``), a leaf the plan schema embeds too;
``EngineConfig`` validates against the same entries. This module never imports torch.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from warmplan.builtin_keys import (
    CONFIG_FIELDS,
    CONFIG_KEYS,
    DEVICES,
    DTYPES,
    GEMM_BACKENDS,
    PRESETS,
    Device,
    DType,
    Preset,
    config_json_schema,
)
from warmplan.builtin_keys import TOKENS as _TOKENS
from warmplan.workers.base import Facts

__all__ = [
    "CONFIG_FIELDS",
    "CONFIG_KEYS",
    "DEVICES",
    "DTYPES",
    "GEMM_BACKENDS",
    "PRESETS",
    "DType",
    "Device",
    "EngineConfig",
    "Preset",
    "config_json_schema",
]

DENSE_BACKEND: Final = "BUILTIN_PAGED_GQA"
SPARSE_MLA_BACKEND: Final = "BUILTIN_SPARSE_MLA"
ATTENTION_BACKENDS: Final[dict[str, str]] = {
    "dense": DENSE_BACKEND,
    "sparse-mla": SPARSE_MLA_BACKEND,
}


# Keys that do not change what a kernel computes or how it is tuned.
_FINGERPRINT_EXCLUDED: Final[frozenset[str]] = frozenset({"device", "seed"})


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
                if value > snippet["maximum"]:
                    raise ValueError(f'"{name}" must be <= {snippet["maximum"]}: {value}')
        sizes = self.compile_sizes
        most = _TOKENS["maximum"]
        if not isinstance(sizes, tuple) or any(
            isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= most for s in sizes
        ):
            raise ValueError(f'"compile_sizes" must be integers from 1 to {most}: {sizes!r}')
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
        """The attention backend name the engine reports (``facts.attention_backends``)."""
        return ATTENTION_BACKENDS[self.preset]


# --------------------------------------------------------------------------- before any work

DECODE_CONTEXT: Final = 16
"""Tokens already cached before each synthetic decode of a dummy run."""

Spec = tuple[int, int, bool]
"""One request of a batch: ``(num_new, context, decode)``."""


def dummy_specs(
    config: EngineConfig, shape: str, num_tokens: int, prior_context: int = 0
) -> list[Spec]:
    """The synthetic batch of a dummy run, as ``(num_new, context, decode)`` specs.

    * ``mixed``: ``min(n // 2, max_num_seqs - 1)`` decodes (each after
      ``DECODE_CONTEXT`` cached tokens) plus one prefill of the rest, which has
      ``prior_context`` cached tokens;
    * ``single_prefill``: one prefill of ``n`` tokens after ``prior_context``;
    * ``uniform_decode``: ``min(n, max_num_seqs)`` decodes;
    * ``plain``: one prefill of ``n`` tokens without context (a profile run).
    """
    if num_tokens < 1:
        raise ValueError(f"dummy_run needs num_tokens >= 1: {num_tokens}")
    if prior_context < 0:
        raise ValueError(f"prior_context must be >= 0: {prior_context}")
    if shape == "mixed":
        dec = min(num_tokens // 2, config.max_num_seqs - 1)
        return [(1, DECODE_CONTEXT, True)] * dec + [(num_tokens - dec, prior_context, False)]
    if shape == "single_prefill":
        return [(num_tokens, prior_context, False)]
    if shape == "uniform_decode":
        return [(1, DECODE_CONTEXT, True)] * min(num_tokens, config.max_num_seqs)
    if shape == "plain":
        return [(num_tokens, 0, False)]
    raise ValueError(
        f"unknown shape {shape!r}; expected one of mixed, single_prefill, uniform_decode, plain"
    )


def check_batch(config: EngineConfig, what: str, specs: list[Spec]) -> None:
    """Raise ``ValueError`` naming the config field to change when the batch ``specs``
    (``what`` says whose) cannot run on an engine of ``config``: more tokens than
    ``max_num_tokens``, a sequence longer than ``max_model_len``, more KV cache blocks
    than the pool holds. Pure arithmetic: it runs before any work."""
    c = config
    new = sum(m for m, _, _ in specs)
    if new > c.max_num_tokens:
        raise ValueError(
            f'{what} runs {new} tokens in one batch, more than "max_num_tokens" ({c.max_num_tokens}); '
            f'raise "max_num_tokens" to at least {new}'
        )
    longest = max(m + ctx for m, ctx, _ in specs)
    if longest > c.max_model_len:
        raise ValueError(
            f'{what} needs a sequence of {longest} tokens, longer than "max_model_len" '
            f'({c.max_model_len}); raise "max_model_len" to at least {longest}'
        )
    need = sum(-(-(m + ctx) // c.block_size) for m, ctx, _ in specs)
    pool = c.num_blocks - 1  # block 0 is the null block
    if need > pool:
        cached = sum(ctx for _, ctx, _ in specs)
        raise ValueError(
            f"{what} needs {need} KV cache blocks of {c.block_size} ({new} new + {cached} cached "
            f'tokens), the pool holds {pool}; raise "num_blocks" to at least {need + 1}'
        )


def facts_for(config: EngineConfig, platform: str, capability: tuple[int, int] | None) -> Facts:
    """The facts an engine of ``config`` reports on ``platform`` (torch-free, so that a
    plan can be resolved against them before torch is imported)."""
    return Facts(
        platform=platform,
        device_capability=capability,
        attention_backends=(config.attention_backend,),
        pooling=False,
        flags={},
        env=dict(os.environ),
    )


class _ResolvedStep(Protocol):
    """What ``check_steps`` reads of a resolved step (``warmplan.steps.base.ResolvedStep``)."""

    @property
    def id(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def applied(self) -> tuple[int, ...]: ...
    @property
    def skipped(self) -> str | None: ...
    def forward(self) -> tuple[Any, int]: ...


def check_steps(config: EngineConfig, steps: Iterable[_ResolvedStep]) -> None:
    """Raise ``ValueError`` naming the step and the config field to change when a
    resolved step's batches cannot run on an engine of ``config`` (``check_batch``
    for every applied count of every step that runs). Arithmetic only: it runs before
    the engine is built."""
    for rstep in steps:
        if rstep.skipped is not None:
            continue
        shape, prior = rstep.forward()
        for n in rstep.applied:
            if shape is not None:
                specs = dummy_specs(config, shape, n, prior)
                what = f"step {rstep.id!r} ({shape} of {n} tokens" + (
                    f" after {prior} cached)" if prior else ")"
                )
            elif rstep.kind == "slot_mapping":
                specs, what = [(n, 0, False)], f"step {rstep.id!r} (slot mapping of {n} tokens)"
            else:
                continue
            check_batch(config, what, specs)


_GB: Final = 1e9


def memory_needs(config: EngineConfig, dtype_bytes: int) -> dict[str, int]:
    """Bytes the engine allocates, by what sizes them (an estimate within a small
    factor: weights, KV cache, block table, one batch's activations)."""
    c = config
    heads = c.num_heads * c.head_dim
    per_layer = 4 * c.hidden_size * heads + 3 * c.hidden_size * c.intermediate_size
    per_token = (
        2 * c.num_kv_heads * c.head_dim
        if c.preset == "dense"
        else c.kv_lora_rank + c.qk_rope_head_dim + c.index_head_dim
    )
    widest = c.vocab_size + 2 * c.intermediate_size + 4 * c.hidden_size + 3 * heads
    return {
        '"vocab_size" x "hidden_size" (embedding and output weights)': 2
        * c.vocab_size
        * c.hidden_size
        * dtype_bytes,
        '"num_layers" x "hidden_size" x "intermediate_size" (layer weights)': c.num_layers
        * per_layer
        * dtype_bytes,
        '"num_blocks" x "block_size" (KV cache)': c.num_layers
        * c.num_blocks
        * c.block_size
        * per_token
        * dtype_bytes,
        '"max_num_seqs" x "max_model_len" (block table)': (c.max_num_seqs + 1)
        * c.max_blocks_per_seq
        * 8,
        '"max_num_tokens" (one batch\'s activations)': c.max_num_tokens * widest * 4,
    }


def check_memory(config: EngineConfig, *, dtype_bytes: int, available: int, where: str) -> None:
    """Raise ``ValueError`` naming the field that sizes the largest part when the
    engine would need more than ``available`` bytes on ``where`` (before allocating)."""
    needs = memory_needs(config, dtype_bytes)
    total = sum(needs.values())
    if total <= available:
        return
    part, size = max(needs.items(), key=lambda kv: kv[1])
    field_name = part.split('"')[1]
    raise ValueError(
        f"the engine would need about {total / _GB:.1f} GB, more than the "
        f"{available / _GB:.1f} GB available on {where}; the largest part is {part}: "
        f'{size / _GB:.1f} GB; lower "{field_name}"'
    )
