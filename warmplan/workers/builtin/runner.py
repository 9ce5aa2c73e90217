"""ModelRunner: buffers, batches, the compiled forward, dummy runs.

``ModelRunner.__init__`` reads as the list of what happens: resolve device and
dtype, build the model (weights from the seed, caches per layer), the block pool,
the metadata kernels, the step buffers, and the two compiled forwards.

Compile sizes work as in vLLM: a batch of ``n`` tokens is padded up to the smallest
compile size ``>= n`` and runs that size's static-shape graph; a batch larger than
the largest compile size runs one dynamic-shape graph. Padding tokens write their
K/V to the null block and attend only to kv entry 0; their logits are dropped.

Longer than ~400 lines on purpose: the runner's step buffers, batch preparation and
the two compiled forwards share one set of buffers whose views must stay in step
(the chunk-metadata kernel reads them whole); split apart they would be one class
behind three modules.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final

import torch

from warmplan.workers.builtin.aot import AotFunction, AotStore
from warmplan.workers.builtin.attention import ATTENTION_IMPLS, DEFAULT_IMPL
from warmplan.workers.builtin.block_table import BlockPool
from warmplan.workers.builtin.config import DECODE_CONTEXT as DECODE_CONTEXT  # home: config
from warmplan.workers.builtin.config import EngineConfig, dummy_specs
from warmplan.workers.builtin.kernels import Kernels, next_power_of_two, slot_mapping_torch
from warmplan.workers.builtin.model import Decoder, flashinfer_gemm_usable

TUNE_REPEATS: Final = 3

_DTYPES: Final = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else CPU; ``cuda`` without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError('"device" is cuda but CUDA is not available here')
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def raise_recompile_limit(needed: int) -> int:
    """Raise dynamo's per-function recompile limit to at least ``needed``.

    Past the limit (default 8) dynamo silently runs the function eagerly.
    """
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    current = int(getattr(cfg, name))
    if current < needed:
        setattr(cfg, name, needed)
    return max(current, needed)


# Distinct functions so the static and the dynamic graphs live in separate dynamo
# caches (one per code object): a dynamic entry must never serve a compile size.
def _forward_static(model: Decoder, *args: torch.Tensor | str) -> torch.Tensor:
    out: torch.Tensor = model(*args)
    return out


def _forward_dynamic(model: Decoder, *args: torch.Tensor | str) -> torch.Tensor:
    out: torch.Tensor = model(*args)
    return out


@dataclass(frozen=True, slots=True)
class Request:
    """One request in a step: ``num_new`` tokens after ``context`` cached ones."""

    num_new: int
    context: int
    blocks: tuple[int, ...]
    decode: bool = False
    token_ids: tuple[int, ...] | None = None

    @property
    def seq_len(self) -> int:
        return self.context + self.num_new


@dataclass(slots=True)
class StepInfo:
    """What the last step did (read by tests and the autotune backend)."""

    num_tokens: int = 0
    padded: int = 0
    graph: str = "none"  # static | dynamic | eager
    impl: str = DEFAULT_IMPL
    has_prior_context: bool | None = None
    kv_len: int = 0


@dataclass(slots=True)
class AttentionTuner:
    """Per power-of-two token bucket, the faster attention implementation."""

    choices: dict[int, str] = field(default_factory=dict)
    tuning: bool = False
    timings: dict[int, dict[str, float]] = field(default_factory=dict)

    def choose(self, padded: int) -> str:
        return self.choices.get(next_power_of_two(padded), DEFAULT_IMPL)


class ModelRunner:
    """The engine: owns the model, the KV caches, the step buffers and the graphs."""

    def __init__(
        self, config: EngineConfig, *, compile: bool = True, aot_root: str | None = None
    ) -> None:
        """``aot_root``: where ahead-of-time compiled functions are loaded from and
        saved to (``warmplan.workers.builtin.aot``); ``None`` compiles just in time."""
        cfg = self.config = config
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.num_slots = cfg.num_blocks * cfg.block_size
        # FlashInfer's mm_bf16 for the MLP where it can run (CUDA, bf16, installed),
        # so that the flashinfer autotune backend tunes an op the engine really calls.
        self.flashinfer_gemm_reason = flashinfer_gemm_usable(self.device, self.dtype)
        if cfg.gemm_backend == "flashinfer" and self.flashinfer_gemm_reason:
            raise ValueError(f'"gemm_backend" is flashinfer, but {self.flashinfer_gemm_reason}')
        if cfg.gemm_backend == "torch":
            self.flashinfer_gemm_reason = "the engine's gemm_backend is torch"
        self.flashinfer_gemm = self.flashinfer_gemm_reason is None
        self.model = Decoder(
            cfg,
            device=self.device,
            dtype=self.dtype,
            num_slots=self.num_slots,
            flashinfer_gemm=self.flashinfer_gemm,
        ).eval()
        self.pool = BlockPool(cfg.num_blocks, cfg.block_size)
        self.compiled = compile
        self.compile_sizes = cfg.effective_compile_sizes
        self.aot: AotStore | None = None
        if compile and aot_root is not None:
            self.aot = AotStore.for_engine(aot_root, self.fingerprint(), self.device)
        self.kernels = Kernels(self.device, compiled=compile, aot=self.aot)
        # topk needs at least index_topk kv entries; padding entries point at slot 0.
        self.min_kv = max(2, cfg.index_topk if cfg.preset == "sparse-mla" else 2)
        self.buffers = self._allocate_buffers()
        self.recompile_limit = raise_recompile_limit(
            len(ATTENTION_IMPLS) * len(self.compile_sizes) + 8
        )
        self.tuner = AttentionTuner()
        self.last = StepInfo()
        self._static = torch.compile(_forward_static, dynamic=False) if compile else _forward_static
        self._dynamic = (
            torch.compile(_forward_dynamic, dynamic=True) if compile else _forward_dynamic
        )
        # The compile sizes ahead of time (one artefact per size and attention impl;
        # kv_slots, argument 4, keeps a dynamic length); any other call runs _static.
        self._static_aot: AotFunction | None = None
        if self.aot is not None:
            sizes = frozenset(self.compile_sizes)

            def key_of(args: Sequence[object]) -> str | None:
                n, impl = getattr(args[1], "shape", (0,))[0], args[-1]
                return f"n{n}-{impl}" if n in sizes and isinstance(impl, str) else None

            self._static_aot = AotFunction(
                self.aot,
                "forward",
                _forward_static,
                self._static,
                key_of,
                dynamic=False,
                mark_dynamic=((4, 0),),
            )

    def fingerprint(self) -> dict[str, object]:
        """What changes the compiled code: the config (less device and seed), the
        resolved dtype and device type, whether the MLP runs FlashInfer's GEMM."""
        out: dict[str, object] = dict(self.config.fingerprint())
        out["dtype"] = str(self.dtype).removeprefix("torch.")
        out["device_type"] = self.device.type
        out["flashinfer_gemm"] = self.flashinfer_gemm
        return out

    def _allocate_buffers(self) -> dict[str, torch.Tensor]:
        cfg, dev = self.config, self.device
        tokens, seqs = cfg.max_num_tokens, cfg.max_num_seqs

        def z(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=torch.int64, device=dev)

        return {
            "input_ids": z(tokens),
            "positions": z(tokens),
            "slot_mapping": z(tokens),
            "req_idx": z(tokens),
            "kv_lo": z(tokens),
            "kv_hi": z(tokens),
            # Row max_num_seqs stays all zeros: the null row padding tokens map to.
            "block_tables": z(seqs + 1, cfg.max_blocks_per_seq),
            "query_start_loc": z(seqs + 1),
            "seq_lens": z(seqs),
            "context_lens": z(seqs),
            "kv_start": z(seqs),
            "kv_slots": z(self.num_slots + self.min_kv),
        }

    # ------------------------------------------------------------------ state

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor a step can write: step buffers and each layer's caches."""
        return {**self.buffers, **self.model.kv_caches()}

    @contextlib.contextmanager
    def preserve_state(self) -> Iterator[None]:
        """Snapshot every state tensor and the block pool; restore on exit, also on error."""
        saved = {name: t.clone() for name, t in self.state_tensors().items()}
        pool = self.pool.snapshot()
        try:
            yield
        finally:
            current = self.state_tensors()
            for name, t in saved.items():
                current[name].copy_(t)
            self.pool.restore(pool)

    # ------------------------------------------------------------------ sizes

    def padded_size(self, num_tokens: int) -> int:
        """The compile size a batch of ``num_tokens`` runs at (itself above the largest)."""
        for size in self.compile_sizes:
            if size >= num_tokens:
                return size
        return num_tokens

    # ------------------------------------------------------------------ step

    def _check(self, reqs: Sequence[Request]) -> None:
        cfg = self.config
        n = sum(r.num_new for r in reqs)
        if not reqs or n == 0:
            raise ValueError("a step needs at least one request with at least one token")
        if len(reqs) > cfg.max_num_seqs:
            raise ValueError(f"{len(reqs)} requests exceed max_num_seqs ({cfg.max_num_seqs})")
        if n > cfg.max_num_tokens:
            raise ValueError(f"{n} tokens exceed max_num_tokens ({cfg.max_num_tokens})")
        seen_prefill = False
        for r in reqs:
            if r.decode and (r.num_new != 1 or seen_prefill):
                raise ValueError("decodes have one token each and come before prefills")
            seen_prefill |= not r.decode
            if r.seq_len > cfg.max_model_len:
                raise ValueError(
                    f"a request of {r.context} cached + {r.num_new} new tokens exceeds "
                    f"max_model_len ({cfg.max_model_len})"
                )
            if len(r.blocks) < self.pool.blocks_for(r.seq_len):
                raise ValueError(
                    f"a request of {r.seq_len} tokens holds only {len(r.blocks)} blocks"
                )

    @torch.no_grad()
    def step(self, reqs: Sequence[Request]) -> torch.Tensor:
        """Run one batch (decodes first, then prefill chunks); logits ``[n, vocab]``."""
        self._check(reqs)
        cfg, b, dev = self.config, self.buffers, self.device
        n = sum(r.num_new for r in reqs)
        padded = self.padded_size(n)
        num_reqs = len(reqs)
        num_dec = sum(r.decode for r in reqs)

        # Per-request metadata (host -> device once).
        seq_lens = [r.seq_len for r in reqs]
        kv_start = [0]
        for s in seq_lens[:-1]:
            kv_start.append(kv_start[-1] + s)
        rows = torch.zeros(num_reqs, cfg.max_blocks_per_seq, dtype=torch.int64)
        for i, r in enumerate(reqs):
            rows[i, : len(r.blocks)] = torch.tensor(r.blocks, dtype=torch.int64)
        b["block_tables"][:num_reqs].copy_(rows)
        b["seq_lens"][:num_reqs].copy_(torch.tensor(seq_lens))
        b["context_lens"][:num_reqs].copy_(torch.tensor([r.context for r in reqs]))
        b["kv_start"][:num_reqs].copy_(torch.tensor(kv_start))
        qsl = [0]
        for r in reqs[num_dec:]:
            qsl.append(qsl[-1] + r.num_new)
        b["query_start_loc"][: len(qsl)].copy_(torch.tensor(qsl))

        # Per-token metadata: decodes directly, prefill chunks through the kernel.
        if num_dec:
            ctx = b["context_lens"][:num_dec]
            b["positions"][:num_dec].copy_(ctx)
            b["req_idx"][:num_dec].copy_(torch.arange(num_dec, device=dev))
            b["kv_lo"][:num_dec].copy_(b["kv_start"][:num_dec])
            b["kv_hi"][:num_dec].copy_(b["kv_start"][:num_dec] + ctx)
        has_prior: bool | None = None
        if num_reqs > num_dec:
            has_prior = self.kernels.chunk_metadata(
                b["query_start_loc"],
                b["context_lens"],
                b["kv_start"],
                num_reqs - num_dec,
                n - num_dec,
                num_dec,
                (b["positions"], b["req_idx"], b["kv_lo"], b["kv_hi"]),
            )
        for name in ("positions", "kv_lo", "kv_hi", "slot_mapping", "input_ids"):
            b[name][n:padded].zero_()
        b["req_idx"][n:padded].fill_(cfg.max_num_seqs)

        self.kernels.slot_mapping(
            b["block_tables"],
            b["req_idx"][:n],
            b["positions"][:n],
            b["slot_mapping"],
            cfg.block_size,
        )

        # Flattened slots of every request's cached + new positions.
        total = sum(seq_lens)
        kv_len = max(total, self.min_kv)
        lens = b["seq_lens"][:num_reqs]
        req_kv = torch.repeat_interleave(
            torch.arange(num_reqs, device=dev), lens, output_size=total
        )
        pos_kv = torch.arange(total, device=dev) - torch.repeat_interleave(
            b["kv_start"][:num_reqs], lens, output_size=total
        )
        b["kv_slots"][:total].copy_(
            slot_mapping_torch(b["block_tables"], req_kv, pos_kv, cfg.block_size)
        )
        b["kv_slots"][total:kv_len].zero_()

        ids: list[int] = []
        for r in reqs:
            ids.extend(
                r.token_ids if r.token_ids is not None else _synthetic_ids(r, cfg.vocab_size)
            )
        b["input_ids"][:n].copy_(torch.tensor(ids, dtype=torch.int64))

        args = (
            b["input_ids"][:padded],
            b["positions"][:padded],
            b["slot_mapping"][:padded],
            b["kv_slots"][:kv_len],
            b["kv_lo"][:padded],
            b["kv_hi"][:padded],
        )
        fn: Callable[..., torch.Tensor]
        if not self.compiled:
            fn, graph = self._static, "eager"
        elif self._static_aot is not None and padded in self.compile_sizes:
            # No runtime dim marking: a loaded artefact's guards refuse a marked tensor.
            fn, graph = self._static_aot, "static"
        elif padded in self.compile_sizes:
            fn, graph = self._static, "static"
            torch._dynamo.maybe_mark_dynamic(args[3], 0)
        else:
            fn, graph = self._dynamic, "dynamic"
        impl = self._tune(fn, args, padded) if self.tuner.tuning else self.tuner.choose(padded)
        logits = fn(self.model, *args, impl)
        self.last = StepInfo(n, padded, graph, impl, has_prior, kv_len)
        return logits[:n]

    def _tune(self, fn: object, args: tuple[torch.Tensor, ...], padded: int) -> str:
        """Time every implementation at this size (after one untimed call) and keep the fastest."""
        assert callable(fn)
        times: dict[str, float] = {}
        for impl in ATTENTION_IMPLS:
            fn(self.model, *args, impl)
            self.synchronize()
            start = time.perf_counter()
            for _ in range(TUNE_REPEATS):
                fn(self.model, *args, impl)
            self.synchronize()
            times[impl] = (time.perf_counter() - start) / TUNE_REPEATS
        bucket = next_power_of_two(padded)
        self.tuner.timings[bucket] = times
        best = min(times, key=lambda k: times[k])
        self.tuner.choices[bucket] = best
        return best

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ slot mapping

    @torch.no_grad()
    def slot_mapping(self, num_tokens: int) -> torch.Tensor:
        """Slots of one request of ``num_tokens`` tokens (a view of the buffer)."""
        cfg, b = self.config, self.buffers
        if num_tokens < 1 or num_tokens > cfg.max_num_tokens:
            raise ValueError(
                f"slot_mapping needs 1 <= num_tokens <= max_num_tokens ({cfg.max_num_tokens}): {num_tokens}"
            )
        if num_tokens > cfg.max_model_len:
            raise ValueError(f"{num_tokens} tokens exceed max_model_len ({cfg.max_model_len})")
        blocks = self.pool.allocate(num_tokens)
        try:
            b["block_tables"][0].zero_()
            b["block_tables"][0, : len(blocks)].copy_(torch.tensor(blocks))
            b["req_idx"][:num_tokens].zero_()
            b["positions"][:num_tokens].copy_(torch.arange(num_tokens))
            self.kernels.slot_mapping(
                b["block_tables"],
                b["req_idx"][:num_tokens],
                b["positions"][:num_tokens],
                b["slot_mapping"],
                cfg.block_size,
            )
        finally:
            self.pool.free(blocks)
        return b["slot_mapping"][:num_tokens]

    # ------------------------------------------------------------------ requests

    def run_requests(self, specs: Sequence[tuple[int, int, bool]]) -> torch.Tensor:
        """Allocate blocks for ``(num_new, context, decode)`` specs, step, free them."""
        reqs: list[Request] = []
        try:
            for num_new, context, decode in specs:
                blocks = self.pool.allocate(context + num_new)
                reqs.append(Request(num_new, context, tuple(blocks), decode))
            return self.step(reqs)
        except ValueError as exc:
            need = sum(self.pool.blocks_for(c + m) for m, c, _ in specs)
            if "pool too small" in str(exc):
                raise ValueError(
                    f"{exc} (this batch needs {need} blocks in all: "
                    f"{sum(m for m, _, _ in specs)} new + {sum(c for _, c, _ in specs)} cached tokens)"
                ) from None
            raise
        finally:
            for r in reqs:
                self.pool.free(list(r.blocks))

    def dummy_specs(
        self, shape: str, num_tokens: int, prior_context: int = 0
    ) -> list[tuple[int, int, bool]]:
        """The synthetic batch of a dummy run (``warmplan.workers.builtin.config.dummy_specs``)."""
        return dummy_specs(self.config, shape, num_tokens, prior_context)

    def dummy_run(self, shape: str, num_tokens: int, prior_context: int = 0) -> torch.Tensor:
        """Run a synthetic batch through the serving path (see ``dummy_specs``)."""
        return self.run_requests(self.dummy_specs(shape, num_tokens, prior_context))


def _synthetic_ids(req: Request, vocab: int) -> list[int]:
    return [(7 * (req.context + i) + 3) % vocab for i in range(req.num_new)]
