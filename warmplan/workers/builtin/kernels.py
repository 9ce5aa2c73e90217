"""The engine's metadata kernels: slot mapping and prefill-chunk metadata.

On CUDA these are Triton kernels; elsewhere they are torch functions run through
``torch.compile`` (inductor's C++ backend). Both specialise the way warmup must know
about:

* slot mapping - Triton specialises every plain int argument into one variant for
  ``== 1``, one for ``% 16 == 0`` and one for the rest (plus per 16-byte pointer
  alignment). ``num_tokens`` is passed as such a plain int, as vLLM's
  ``_compute_slot_mapping_kernel`` does, so a plan's fan of token counts decides
  which variants exist before serving. On CPU inductor has no such rule, so the
  dispatch reproduces it: one static graph for a single token and one
  dynamic-shape graph each for the ``% 16 == 0`` and the other counts. After 1, 16
  and 17 tokens nothing new compiles on CPU; more sizes in a fan are cheap no-ops
  there (on CUDA they are not: alignment classes differ too).
* prefill-chunk metadata - ``HAS_PRIOR_CONTEXT`` is a ``tl.constexpr`` (a static
  bool on CPU) chosen per call, as in vLLM's ``_build_prefill_chunk_metadata_kernel``:
  a second chunk (context already cached) is a separate compiled variant.

Triton's kernels are defined wherever it imports, and run only on CUDA. With an ``AotStore`` the compiled
torch versions are loaded ahead of time (``warmplan.workers.builtin.aot``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

# The Triton kernels are defined wherever Triton imports (their compile keys can be
# derived and compiled for a GPU target from a CPU machine: warmplan.workers.builtin.
# jit_keys); TRITON_IMPORT_ERROR says why they cannot *run* here.
TRITON_IMPORT_ERROR: str | None
try:
    import triton
    import triton.language as tl

    TRITON_IMPORT_ERROR = None if torch.cuda.is_available() else "CUDA is not available"
except ImportError as exc:  # no triton installed
    triton = None
    tl = None
    TRITON_IMPORT_ERROR = str(exc)

if TYPE_CHECKING:
    from warmplan.workers.builtin.aot import AotStore


def size_class(num_tokens: int) -> str:
    """Triton's specialisation class of an int argument: ``one``, ``div16`` or ``other``."""
    if num_tokens == 1:
        return "one"
    return "div16" if num_tokens % 16 == 0 else "other"


def next_power_of_two(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


# ---------------------------------------------------------------- torch versions


def slot_mapping_torch(
    block_table: torch.Tensor, req_idx: torch.Tensor, positions: torch.Tensor, block_size: int
) -> torch.Tensor:
    """``slot = block_table[req, pos // block_size] * block_size + pos % block_size``."""
    blocks = block_table[req_idx, torch.div(positions, block_size, rounding_mode="floor")]
    return blocks * block_size + torch.remainder(positions, block_size)


def chunk_metadata_torch(
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    kv_start: torch.Tensor,
    num_tokens: int,
    req_offset: int,
    has_prior_context: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per prefill token: (position, request index, first and last visible kv index)."""
    tokens = torch.arange(num_tokens, device=query_start_loc.device, dtype=torch.int64)
    chunk = torch.searchsorted(query_start_loc[1:], tokens, right=True)
    positions = tokens - query_start_loc[chunk]
    if has_prior_context:
        positions = positions + context_lens[chunk]
    lo = kv_start[chunk]
    return positions, chunk + req_offset, lo, lo + positions


def chunk_metadata_static(
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    kv_start: torch.Tensor,
    token_index: torch.Tensor,
    req_offset: torch.Tensor,
    has_prior_context: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``chunk_metadata_torch`` over whole, fixed-size buffers (the compiled CPU path).

    ``query_start_loc`` holds all ``max_num_seqs + 1`` entries, padded with its last
    value; ``context_lens`` / ``kv_start`` are indexed by request (``req_offset`` is
    the first prefill request, a 0-d tensor); ``token_index`` is ``arange`` of the
    token buffer. Every shape is fixed and no int is an argument, so the only
    compiled variants are the two of ``has_prior_context`` (dynamo would otherwise
    specialise on one chunk vs several, and on an int offset of 0 or 1). Entries past
    the prefill tokens are garbage the caller does not copy.
    """
    last = query_start_loc.numel() - 2
    chunk = torch.searchsorted(query_start_loc[1:], token_index, right=True).clamp(max=last)
    positions = token_index - query_start_loc[chunk]
    req = chunk + req_offset
    safe = req.clamp(max=context_lens.numel() - 1)
    if has_prior_context:
        positions = positions + context_lens[safe]
    lo = kv_start[safe]
    return positions, req, lo, lo + positions


# Three top-level functions, three code objects: dynamo keeps its compile cache per
# code object, so each class gets its own graph(s) rather than sharing guards.
def _slot_mapping_one(
    bt: torch.Tensor, req: torch.Tensor, pos: torch.Tensor, bs: int
) -> torch.Tensor:
    return slot_mapping_torch(bt, req, pos, bs)


def _slot_mapping_div16(
    bt: torch.Tensor, req: torch.Tensor, pos: torch.Tensor, bs: int
) -> torch.Tensor:
    return slot_mapping_torch(bt, req, pos, bs)


def _slot_mapping_other(
    bt: torch.Tensor, req: torch.Tensor, pos: torch.Tensor, bs: int
) -> torch.Tensor:
    return slot_mapping_torch(bt, req, pos, bs)


# ---------------------------------------------------------------- Triton versions

if triton is not None:
    _SLOT_CONFIGS = [
        triton.Config({"BLOCK": 64}, num_warps=1),
        triton.Config({"BLOCK": 128}, num_warps=2),
        triton.Config({"BLOCK": 256}, num_warps=4),
        triton.Config({"BLOCK": 1024}, num_warps=4),
    ]

    # Autotune results on disk (Triton's cache, under the cache root): a restarted
    # worker reads each size bucket's choice instead of benchmarking the four configs
    # again (issue 13: 21 slot-mapping calls took 3.8 s warm with 0 compiles).
    _AUTOTUNE_DISK: dict[str, bool] = (
        {"cache_results": True}
        if "cache_results" in inspect.signature(triton.autotune).parameters
        else {}
    )

    # num_tokens stays a plain int (not constexpr, not do_not_specialize): Triton's
    # ==1 / %16 specialisation is what the warmup fan exists for. size_bucket only
    # keys the autotuner; it is excluded from specialisation so it adds no variants.
    @triton.autotune(configs=_SLOT_CONFIGS, key=["size_bucket"], **_AUTOTUNE_DISK)  # type: ignore[untyped-decorator]
    @triton.jit(do_not_specialize=["size_bucket"])  # type: ignore[untyped-decorator]
    def _slot_mapping_kernel(  # type: ignore[no-untyped-def]  # Triton signatures are untyped
        bt_ptr,
        req_ptr,
        pos_ptr,
        out_ptr,
        num_tokens,
        bt_stride,
        size_bucket,
        block_size: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < num_tokens
        req = tl.load(req_ptr + offs, mask=mask, other=0)
        pos = tl.load(pos_ptr + offs, mask=mask, other=0)
        blk = tl.load(bt_ptr + req * bt_stride + pos // block_size, mask=mask, other=0)
        tl.store(out_ptr + offs, blk * block_size + pos % block_size, mask=mask)

    # Only HAS_PRIOR_CONTEXT may pick the variant (as in vLLM's
    # _build_prefill_chunk_metadata_kernel). The kernel gets whole buffers plus the
    # index of the first prefill request, which is not specialised: sliced pointers
    # would add 16-byte-alignment variants and a plain int its ==1 / %16 classes, so
    # the number of decodes riding with a prefill would choose kernels no plan names.
    @triton.jit(do_not_specialize=["req_offset"])  # type: ignore[untyped-decorator]
    def _chunk_metadata_kernel(  # type: ignore[no-untyped-def]  # Triton signatures are untyped
        qsl_ptr,
        ctx_ptr,
        kvs_ptr,
        pos_out,
        req_out,
        lo_out,
        hi_out,
        req_offset,
        HAS_PRIOR_CONTEXT: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # One program per prefill chunk c; request req_offset + c. Token t of the
        # prefill region is token req_offset + t of the step (decodes come first,
        # one token each).
        c = tl.program_id(0)
        start = tl.load(qsl_ptr + c)
        end = tl.load(qsl_ptr + c + 1)
        kv0 = tl.load(kvs_ptr + req_offset + c)
        for off in range(start, end, BLOCK):
            t = off + tl.arange(0, BLOCK)
            mask = t < end
            pos = t - start
            if HAS_PRIOR_CONTEXT:
                pos += tl.load(ctx_ptr + req_offset + c)
            dst = req_offset + t
            tl.store(pos_out + dst, pos, mask=mask)
            tl.store(req_out + dst, (t * 0 + c + req_offset).to(tl.int64), mask=mask)
            tl.store(lo_out + dst, (t * 0 + kv0).to(tl.int64), mask=mask)
            tl.store(hi_out + dst, kv0 + pos, mask=mask)


def triton_module() -> Any:
    """The ``triton`` module, or ``None`` when it is not installed."""
    return triton


def triton_autotuners() -> dict[str, Any]:
    """The engine's ``triton.autotune`` kernels by name (empty without Triton)."""
    if triton is None or TRITON_IMPORT_ERROR is not None:
        return {}
    return {"slot_mapping": _slot_mapping_kernel}


class Kernels:
    """The metadata kernels of one engine: Triton on CUDA, compiled torch elsewhere.

    ``compiled=False`` runs the plain torch functions eagerly (tests of numerics);
    ``aot`` loads the compiled torch functions ahead of time (not the Triton kernels:
    Triton's own disk cache holds those).
    """

    def __init__(
        self, device: torch.device, *, compiled: bool = True, aot: AotStore | None = None
    ) -> None:
        self.use_triton = device.type == "cuda" and triton is not None
        self.compiled = compiled
        self._slot: dict[str, Callable[..., torch.Tensor]] = {}
        self._meta: Callable[..., Any] = chunk_metadata_torch
        self._token_index: torch.Tensor | None = None
        if compiled and not self.use_triton:
            self._slot = {
                "one": torch.compile(_slot_mapping_one, dynamic=False),
                "div16": torch.compile(_slot_mapping_div16, dynamic=True),
                "other": torch.compile(_slot_mapping_other, dynamic=True),
            }
            self._meta = torch.compile(chunk_metadata_static, dynamic=False)
            if aot is not None:
                self._aot_wrap(aot)

    def _aot_wrap(self, aot: AotStore) -> None:
        from warmplan.workers.builtin.aot import AotFunction

        fns = {"one": _slot_mapping_one, "div16": _slot_mapping_div16, "other": _slot_mapping_other}
        for cls, fn in fns.items():

            def slot_key(args: Sequence[object], cls: str = cls) -> str | None:
                return cls

            self._slot[cls] = AotFunction(
                aot, f"slot_mapping-{cls}", fn, self._slot[cls], slot_key, dynamic=cls != "one"
            )

        def meta_key(args: Sequence[object]) -> str | None:
            return f"prior{int(bool(args[-1]))}"

        self._meta = AotFunction(
            aot, "chunk_metadata", chunk_metadata_static, self._meta, meta_key, dynamic=False
        )

    def slot_mapping(
        self,
        block_table: torch.Tensor,
        req_idx: torch.Tensor,
        positions: torch.Tensor,
        out: torch.Tensor,
        block_size: int,
    ) -> None:
        """Write the slots of ``positions.numel()`` tokens into ``out[:num_tokens]``."""
        num_tokens = positions.numel()
        if num_tokens == 0:
            return
        if self.use_triton:
            grid = lambda meta: (triton.cdiv(num_tokens, meta["BLOCK"]),)  # noqa: E731
            _slot_mapping_kernel[grid](
                block_table,
                req_idx,
                positions,
                out,
                num_tokens,
                block_table.stride(0),
                next_power_of_two(num_tokens),
                block_size=block_size,
            )
            return
        fn = self._slot.get(size_class(num_tokens), slot_mapping_torch)
        out[:num_tokens].copy_(fn(block_table, req_idx, positions, block_size))

    def chunk_metadata(
        self,
        query_start_loc: torch.Tensor,
        context_lens: torch.Tensor,
        kv_start: torch.Tensor,
        num_chunks: int,
        num_tokens: int,
        req_offset: int,
        out: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> bool:
        """Fill (positions, req_idx, kv_lo, kv_hi) of the ``num_tokens`` prefill tokens.

        Every argument is a whole step buffer, never a slice (see the Triton kernel):
        ``query_start_loc[: num_chunks + 1]`` holds the chunks' token offsets within
        the prefill region; prefill chunk ``c`` is request ``req_offset + c`` of
        ``context_lens`` / ``kv_start``; prefill token ``t`` is written at
        ``req_offset + t`` of each ``out`` buffer (the decodes, one token each, come
        first). Returns the ``HAS_PRIOR_CONTEXT`` variant used.
        """
        reqs = slice(req_offset, req_offset + num_chunks)
        has_prior = bool((context_lens[reqs] > 0).any().item())
        if num_tokens == 0:
            return has_prior
        if self.use_triton:
            pos, req, lo, hi = out
            _chunk_metadata_kernel[(num_chunks,)](
                query_start_loc,
                context_lens,
                kv_start,
                pos,
                req,
                lo,
                hi,
                req_offset,
                HAS_PRIOR_CONTEXT=has_prior,
                BLOCK=128,
            )
            return has_prior
        if self.compiled:
            qsl = query_start_loc.clone()
            qsl[num_chunks + 1 :] = qsl[num_chunks]
            tokens = self._token_index
            if tokens is None or tokens.numel() != out[0].numel() or tokens.device != out[0].device:
                tokens = self._token_index = torch.arange(
                    out[0].numel(), dtype=torch.int64, device=out[0].device
                )
            offset = torch.tensor(req_offset, dtype=torch.int64, device=qsl.device)
            results = self._meta(qsl, context_lens, kv_start, tokens, offset, has_prior)
        else:
            results = chunk_metadata_torch(
                query_start_loc[: num_chunks + 1],
                context_lens[reqs],
                kv_start[reqs],
                num_tokens,
                req_offset,
                has_prior,
            )
        for dst, src in zip(out, results, strict=True):
            dst[req_offset : req_offset + num_tokens].copy_(src[:num_tokens])
        return has_prior
