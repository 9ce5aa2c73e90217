"""Attention over the paged KV cache: dense GQA and DeepSeek-style sparse MLA.

Both read the cache through ``kv_slots``: the flattened slots of every request's
cached positions (request after request), so one batch's attention is one masked
attention of each token against the ``[kv_lo, kv_hi]`` range of ``kv_slots`` that is
its own request's causal prefix. ``kv_slots`` has a dynamic length; the token count
is static per compile size.

Each function has two real implementations, chosen by ``impl`` (a Python string the
compiled graph specialises on, so the choice is part of the compile key):
``"sdpa"`` (``scaled_dot_product_attention``) and ``"matmul"`` (explicit
matmul-softmax-matmul). The builtin autotune backend times both per token bucket.

The cache is written with ``index_copy_`` directly on each layer's own cache
tensor. Writing through a view of a larger tensor inside the compiled region makes
inductor copy the whole cache on every call (1.8 ms against 0.18 ms at one token on
CPU), so caches are never views.
"""

from __future__ import annotations

from typing import Final

import torch
import torch.nn.functional as F

# The names live in the torch-free config, so a plan resolves without torch.
from warmplan.workers.builtin.config import ATTENTION_BACKENDS as ATTENTION_BACKENDS
from warmplan.workers.builtin.config import DENSE_BACKEND as DENSE_BACKEND
from warmplan.workers.builtin.config import SPARSE_MLA_BACKEND as SPARSE_MLA_BACKEND

ATTENTION_IMPLS: Final[tuple[str, ...]] = ("sdpa", "matmul")
DEFAULT_IMPL: Final = "sdpa"


def backend_name(preset: str) -> str:
    """The attention backend name a preset reports in ``facts.attention_backends``."""
    try:
        return ATTENTION_BACKENDS[preset]
    except KeyError:
        raise KeyError(
            f"unknown preset {preset!r}; expected one of {', '.join(ATTENTION_BACKENDS)}"
        ) from None


def visible_mask(kv_lo: torch.Tensor, kv_hi: torch.Tensor, kv_len: int) -> torch.Tensor:
    """``[tokens, kv_len]`` bool: token i sees kv entries ``kv_lo[i] .. kv_hi[i]``."""
    j = torch.arange(kv_len, device=kv_lo.device)
    return (j[None, :] >= kv_lo[:, None]) & (j[None, :] <= kv_hi[:, None])


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    impl: str,
) -> torch.Tensor:
    """GQA attention. q ``[N, H, D]``, k/v ``[T, KVH, D]``, mask ``[N, T]`` -> ``[N, H, D]``."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1).transpose(0, 1)
    v = v.repeat_interleave(groups, dim=1).transpose(0, 1)
    qh = q.transpose(0, 1)
    if impl == "sdpa":
        out = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, scale=scale)
    else:
        scores = torch.matmul(qh.float(), k.float().transpose(1, 2)) * scale
        scores = scores.masked_fill(~mask, float("-inf"))
        out = torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(q.dtype)
    return out.transpose(0, 1)


def index_topk(
    q_index: torch.Tensor,
    weights: torch.Tensor,
    k_index: torch.Tensor,
    mask: torch.Tensor,
    topk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The indexer: score every visible cached token per query, keep the ``topk`` best.

    q_index ``[N, IH, ID]``, weights ``[N, IH]``, k_index ``[T, ID]``. Scores are
    ``sum_h w_h * (q_h . k)`` in float32 (DeepSeek-V3.2 applies a ReLU to ``q_h . k``;
    it is left out here because it makes exact ties at zero, and a tie broken
    differently would make the paged and the reference selection disagree).
    Returns (indices ``[N, topk]`` into ``k_index``, valid ``[N, topk]``).
    """
    scores = torch.einsum("nhd,td->nht", q_index.float(), k_index.float())
    scores = (scores * weights.float()[:, :, None]).sum(dim=1)
    scores = scores.masked_fill(~mask, float("-inf"))
    values, indices = scores.topk(topk, dim=1)
    return indices, values > float("-inf")


def sparse_mla_attention(
    q: torch.Tensor,
    selected: torch.Tensor,
    valid: torch.Tensor,
    latent_dim: int,
    scale: float,
    impl: str,
) -> torch.Tensor:
    """MQA over the selected latents. q ``[N, H, C+R]``, selected ``[N, K, C+R]`` -> ``[N, H, C]``."""
    values = selected[..., :latent_dim]
    if impl == "sdpa":
        heads = q.shape[1]
        out = F.scaled_dot_product_attention(
            q[:, :, None, :],
            selected[:, None, :, :].expand(-1, heads, -1, -1),
            values[:, None, :, :].expand(-1, heads, -1, -1),
            attn_mask=valid[:, None, None, :],
            scale=scale,
        )
        return out[:, :, 0, :]
    scores = torch.einsum("nhc,nkc->nhk", q.float(), selected.float()) * scale
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    return torch.einsum("nhk,nkc->nhc", torch.softmax(scores, dim=-1), values.float()).to(q.dtype)
