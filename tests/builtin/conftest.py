"""Shared fixtures: tiny engines (eager for numerics, compiled for graph behaviour);
the configs are ``tests._engines``'s."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from tests._engines import tiny
from warmplan.workers.builtin import BuiltinWorker
from warmplan.workers.builtin.model import Decoder, DenseAttention, SparseMlaAttention


@pytest.fixture(name="tiny", scope="session")
def tiny_fixture() -> Callable[..., dict[str, Any]]:
    return tiny


@pytest.fixture(scope="module", params=["dense", "sparse-mla"])
def eager_worker(request: pytest.FixtureRequest) -> BuiltinWorker:
    return BuiltinWorker(tiny(request.param, dtype="float32"), compile=False)


@pytest.fixture(scope="session")
def compiled_dense() -> BuiltinWorker:
    return BuiltinWorker(tiny("dense", dtype="float32"))


# ---------------------------------------------------------------- the reference
# Plain torch, float64, one sequence at a time, no paging and no cache.


def _rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()


def _rope(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1]
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    f = pos.double()[:, None] * inv[None, :]
    shape = (pos.shape[0],) + (1,) * (x.dim() - 2) + (d // 2,)
    c, s = f.cos().view(shape), f.sin().view(shape)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def _dense(a: DenseAttention, h: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    n = h.shape[0]
    q = _rope((h @ a.wq.double()).view(n, a.h, a.d), pos)
    k = _rope((h @ a.wk.double()).view(n, a.kvh, a.d), pos)
    v = (h @ a.wv.double()).view(n, a.kvh, a.d)
    g = a.h // a.kvh
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    scores = torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(a.d)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    p = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    return torch.einsum("hij,jhd->ihd", p, v).reshape(n, -1) @ a.wo.double()


def _sparse(a: SparseMlaAttention, h: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    n = h.shape[0]
    q = (h @ a.wq.double()).view(n, a.h, a.d + a.r)
    q_lat = torch.einsum("nhd,hdc->nhc", q[..., : a.d], a.w_uk.double())
    q_full = torch.cat((q_lat, _rope(q[..., a.d :], pos)), -1)
    kv = h @ a.w_dkv.double()
    latent = torch.cat((_rms(kv[:, : a.c], a.kv_norm), _rope(kv[:, a.c :], pos)), -1)
    qi = (h @ a.w_iq.double()).view(n, a.ih, a.id)
    score = (
        torch.einsum("nhd,td->nht", qi, h @ a.w_ik.double()) * (h @ a.w_iw.double())[:, :, None]
    ).sum(1)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    score = score.masked_fill(~causal, float("-inf"))
    out = torch.empty(n, a.h, a.c, dtype=torch.float64)
    for i in range(n):
        keep = score[i, : i + 1].topk(min(a.topk, i + 1)).indices
        sel = latent[keep]
        p = (torch.einsum("hc,kc->hk", q_full[i], sel) * a.scale).softmax(-1)
        out[i] = p @ sel[:, : a.c]
    return torch.einsum("nhc,hcd->nhd", out, a.w_uv.double()).reshape(n, -1) @ a.wo.double()


@torch.no_grad()
def reference_logits(model: Decoder, token_ids: list[int]) -> torch.Tensor:
    """Logits ``[L, vocab]`` (float64) of the whole sequence, computed from scratch."""
    ids = torch.tensor(token_ids)
    pos = torch.arange(len(token_ids))
    x = model.embed.double()[ids]
    for layer in model.layers:
        h = _rms(x, layer.norm1)
        attn = layer.attn
        x = x + (
            _dense(attn, h, pos) if isinstance(attn, DenseAttention) else _sparse(attn, h, pos)
        )
        h = _rms(x, layer.norm2)
        gate, up = (h @ layer.mlp.w_gate_up.double()).chunk(2, -1)
        x = x + (torch.nn.functional.silu(gate) * up) @ layer.mlp.w_down.double()
    return _rms(x, model.norm) @ model.lm_head.double()


@pytest.fixture(name="reference", scope="session")
def reference_fixture() -> Callable[[Decoder, list[int]], torch.Tensor]:
    return reference_logits
