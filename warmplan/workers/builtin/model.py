"""The decoder: embedding, ``num_layers`` pre-norm blocks, final norm, LM head.

Weights are drawn from ``config.seed`` (no downloads), so two engines built from one
config compute the same function. Each layer owns its KV cache tensors (never views
of a shared buffer; see ``attention``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from warmplan.workers.builtin.attention import (
    dense_attention,
    index_topk,
    sparse_mla_attention,
    visible_mask,
)
from warmplan.workers.builtin.config import EngineConfig

EPS = 1e-6


def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS) * weight.float()).to(x.dtype)


def rope_tables(max_len: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[max_len, dim // 2]`` (float32)."""
    inv = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv)
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x ``[N, ..., d]``, cos/sin ``[N, d // 2]``."""
    half = x.shape[-1] // 2
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (half,)
    c, s = cos.view(shape), sin.view(shape)
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


class _Params:
    """Draws weights from one generator, in a fixed order."""

    def __init__(self, seed: int, dtype: torch.dtype, device: torch.device) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.dtype = dtype
        self.device = device

    def __call__(self, *shape: int, fan_in: int | None = None) -> nn.Parameter:
        std = 1.0 / math.sqrt(fan_in if fan_in is not None else shape[0])
        t = torch.randn(*shape, generator=self.gen) * std
        return nn.Parameter(t.to(device=self.device, dtype=self.dtype), requires_grad=False)

    def ones(self, n: int) -> nn.Parameter:
        w = 1.0 + 0.1 * torch.randn(n, generator=self.gen)
        return nn.Parameter(w.to(device=self.device, dtype=self.dtype), requires_grad=False)


@torch.library.custom_op("warmplan::flashinfer_mm_bf16", mutates_args=())
def flashinfer_mm_bf16(a: torch.Tensor, b_nk: torch.Tensor) -> torch.Tensor:
    """``a @ b_nk.T`` through FlashInfer's ``mm_bf16`` on cuBLASLt.

    A custom op, so compiled graphs call it as one opaque node and FlashInfer's
    autotuner (``flashinfer.autotuner.autotune``) sees every call at run time. The
    weight is kept ``[N, K]`` contiguous: ``b_nk.T`` is the column-major ``[K, N]``
    operand mm_bf16 expects.
    """
    import flashinfer

    out: torch.Tensor = flashinfer.mm_bf16(a.contiguous(), b_nk.t(), backend="cublaslt")
    return out


@flashinfer_mm_bf16.register_fake
def _(a: torch.Tensor, b_nk: torch.Tensor) -> torch.Tensor:
    return a.new_empty((a.shape[0], b_nk.shape[0]))


def flashinfer_gemm_usable(device: torch.device, dtype: torch.dtype) -> str | None:
    """``None`` when FlashInfer's bf16 GEMM can run here, else why not."""
    if device.type != "cuda":
        return f"FlashInfer GEMMs need CUDA, the engine runs on {device.type}"
    if dtype != torch.bfloat16:
        return f"FlashInfer's mm_bf16 needs bfloat16, the engine runs {str(dtype).removeprefix('torch.')}"
    import importlib.util

    if importlib.util.find_spec("flashinfer") is None:
        return "flashinfer is not installed (pip install 'warmplan[flashinfer]')"
    return None


class Mlp(nn.Module):
    """SwiGLU MLP with a fused gate/up projection.

    With ``flashinfer=True`` both products run through FlashInfer's ``mm_bf16``
    (cuBLASLt), the op the ``flashinfer`` autotune backend tunes on this engine.
    """

    def __init__(self, cfg: EngineConfig, p: _Params, *, flashinfer: bool = False) -> None:
        super().__init__()
        self.w_gate_up = p(cfg.hidden_size, 2 * cfg.intermediate_size)
        self.w_down = p(cfg.intermediate_size, cfg.hidden_size)
        self.flashinfer = flashinfer
        if flashinfer:
            # [N, K] copies for mm_bf16's column-major operand (same values).
            self.register_buffer(
                "w_gate_up_nk", self.w_gate_up.detach().t().contiguous(), persistent=False
            )
            self.register_buffer(
                "w_down_nk", self.w_down.detach().t().contiguous(), persistent=False
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.flashinfer:
            gate, up = flashinfer_mm_bf16(x, self.w_gate_up_nk).chunk(2, dim=-1)
            fused: torch.Tensor = flashinfer_mm_bf16(
                torch.nn.functional.silu(gate) * up, self.w_down_nk
            )
            return fused
        gate, up = (x @ self.w_gate_up).chunk(2, dim=-1)
        out: torch.Tensor = (torch.nn.functional.silu(gate) * up) @ self.w_down
        return out


class DenseAttention(nn.Module):
    """GQA self-attention with a paged K/V cache (two tensors of its own)."""

    k_cache: torch.Tensor
    v_cache: torch.Tensor

    def __init__(self, cfg: EngineConfig, p: _Params, num_slots: int) -> None:
        super().__init__()
        self.h, self.kvh, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.wq = p(cfg.hidden_size, self.h * self.d)
        self.wk = p(cfg.hidden_size, self.kvh * self.d)
        self.wv = p(cfg.hidden_size, self.kvh * self.d)
        self.wo = p(self.h * self.d, cfg.hidden_size)
        self.scale = 1.0 / math.sqrt(self.d)
        zeros = torch.zeros(num_slots, self.kvh, self.d, dtype=p.dtype, device=p.device)
        self.register_buffer("k_cache", zeros, persistent=False)
        self.register_buffer("v_cache", zeros.clone(), persistent=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slot_mapping: torch.Tensor,
        kv_slots: torch.Tensor,
        mask: torch.Tensor,
        impl: str,
    ) -> torch.Tensor:
        n = x.shape[0]
        q = apply_rope((x @ self.wq).view(n, self.h, self.d), cos, sin)
        k = apply_rope((x @ self.wk).view(n, self.kvh, self.d), cos, sin)
        v = (x @ self.wv).view(n, self.kvh, self.d)
        self.k_cache.index_copy_(0, slot_mapping, k)
        self.v_cache.index_copy_(0, slot_mapping, v)
        out = dense_attention(
            q, self.k_cache[kv_slots], self.v_cache[kv_slots], mask, self.scale, impl
        )
        result: torch.Tensor = out.reshape(n, self.h * self.d) @ self.wo
        return result


class SparseMlaAttention(nn.Module):
    """DeepSeek-V3.2-style sparse MLA: a latent cache, an indexer, top-k attention.

    Per token the cache holds the compressed latent ``c_kv`` (``kv_lora_rank``) plus
    the rotary key (``qk_rope_head_dim``) in one tensor, and the indexer key in
    another. Queries are absorbed into latent space (``W_uk``), attend over the
    ``index_topk`` cached tokens the indexer keeps, and are expanded by ``W_uv``.
    """

    latent_cache: torch.Tensor
    index_cache: torch.Tensor

    def __init__(self, cfg: EngineConfig, p: _Params, num_slots: int) -> None:
        super().__init__()
        self.h, self.d = cfg.num_heads, cfg.head_dim
        self.c, self.r = cfg.kv_lora_rank, cfg.qk_rope_head_dim
        self.ih, self.id, self.topk = cfg.index_num_heads, cfg.index_head_dim, cfg.index_topk
        hs = cfg.hidden_size
        self.wq = p(hs, self.h * (self.d + self.r))
        self.w_uk = p(self.h, self.d, self.c, fan_in=self.d)
        self.w_dkv = p(hs, self.c + self.r)
        self.kv_norm = p.ones(self.c)
        self.w_uv = p(self.h, self.c, self.d, fan_in=self.c)
        self.wo = p(self.h * self.d, hs)
        self.w_iq = p(hs, self.ih * self.id)
        self.w_ik = p(hs, self.id)
        self.w_iw = p(hs, self.ih)
        self.scale = 1.0 / math.sqrt(self.d + self.r)
        latent = torch.zeros(num_slots, self.c + self.r, dtype=p.dtype, device=p.device)
        self.register_buffer("latent_cache", latent, persistent=False)
        index = torch.zeros(num_slots, self.id, dtype=p.dtype, device=p.device)
        self.register_buffer("index_cache", index, persistent=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slot_mapping: torch.Tensor,
        kv_slots: torch.Tensor,
        mask: torch.Tensor,
        impl: str,
    ) -> torch.Tensor:
        n = x.shape[0]
        q = (x @ self.wq).view(n, self.h, self.d + self.r)
        q_nope, q_pe = q[..., : self.d], apply_rope(q[..., self.d :], cos, sin)
        q_lat = torch.einsum("nhd,hdc->nhc", q_nope, self.w_uk)
        kv = x @ self.w_dkv
        c_kv = rms_norm(kv[:, : self.c], self.kv_norm)
        k_pe = apply_rope(kv[:, self.c :], cos, sin)
        self.latent_cache.index_copy_(0, slot_mapping, torch.cat((c_kv, k_pe), dim=-1))
        self.index_cache.index_copy_(0, slot_mapping, x @ self.w_ik)
        indices, valid = index_topk(
            (x @ self.w_iq).view(n, self.ih, self.id),
            x @ self.w_iw,
            self.index_cache[kv_slots],
            mask,
            self.topk,
        )
        selected = self.latent_cache[kv_slots][indices]
        o_lat = sparse_mla_attention(
            torch.cat((q_lat, q_pe), dim=-1), selected, valid, self.c, self.scale, impl
        )
        out = torch.einsum("nhc,hcd->nhd", o_lat, self.w_uv)
        result: torch.Tensor = out.reshape(n, self.h * self.d) @ self.wo
        return result


class DecoderLayer(nn.Module):
    def __init__(
        self, cfg: EngineConfig, p: _Params, num_slots: int, *, flashinfer: bool = False
    ) -> None:
        super().__init__()
        self.norm1 = p.ones(cfg.hidden_size)
        attn_cls = DenseAttention if cfg.preset == "dense" else SparseMlaAttention
        self.attn: DenseAttention | SparseMlaAttention = attn_cls(cfg, p, num_slots)
        self.norm2 = p.ones(cfg.hidden_size)
        self.mlp = Mlp(cfg, p, flashinfer=flashinfer)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slot_mapping: torch.Tensor,
        kv_slots: torch.Tensor,
        mask: torch.Tensor,
        impl: str,
    ) -> torch.Tensor:
        x = x + self.attn(rms_norm(x, self.norm1), cos, sin, slot_mapping, kv_slots, mask, impl)
        out: torch.Tensor = x + self.mlp(rms_norm(x, self.norm2))
        return out


class Decoder(nn.Module):
    """The whole model; ``forward`` is what ``torch.compile`` sees."""

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(
        self,
        cfg: EngineConfig,
        *,
        device: torch.device,
        dtype: torch.dtype,
        num_slots: int,
        flashinfer_gemm: bool = False,
    ) -> None:
        super().__init__()
        p = _Params(cfg.seed, dtype, device)
        self.embed = p(cfg.vocab_size, cfg.hidden_size, fan_in=1)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, p, num_slots, flashinfer=flashinfer_gemm)
            for _ in range(cfg.num_layers)
        )
        self.norm = p.ones(cfg.hidden_size)
        self.lm_head = p(cfg.hidden_size, cfg.vocab_size)
        rot = cfg.head_dim if cfg.preset == "dense" else cfg.qk_rope_head_dim
        cos, sin = rope_tables(cfg.max_model_len, rot)
        self.register_buffer("cos", cos.to(device), persistent=False)
        self.register_buffer("sin", sin.to(device), persistent=False)

    def kv_caches(self) -> dict[str, torch.Tensor]:
        """Every cache tensor by a stable name (for snapshots)."""
        return {
            name: buf
            for name, buf in self.named_buffers()
            if name.endswith(("k_cache", "v_cache", "latent_cache", "index_cache"))
        }

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        kv_slots: torch.Tensor,
        kv_lo: torch.Tensor,
        kv_hi: torch.Tensor,
        impl: str,
    ) -> torch.Tensor:
        """Logits ``[N, vocab]`` (float32) of ``N`` tokens; writes their K/V to the caches."""
        x = self.embed[input_ids]
        mask = visible_mask(kv_lo, kv_hi, kv_slots.shape[0])
        cos, sin = self.cos[positions], self.sin[positions]
        for layer in self.layers:
            x = layer(x, cos, sin, slot_mapping, kv_slots, mask, impl)
        logits: torch.Tensor = (rms_norm(x, self.norm) @ self.lm_head).float()
        return logits
