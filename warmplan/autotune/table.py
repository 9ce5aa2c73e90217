"""FlashInfer's tuning table, read without FlashInfer: what a file holds, whether
the running stack would accept it, which ops and token buckets it covers, and the
token buckets to tune.

FlashInfer's ``AutoTuner.save_configs`` writes one JSON object: ``_metadata`` (the
versions and GPU the table was tuned on) and one entry per tuned profile, keyed
``str((custom_op, runner_class_name, profile_shapes[, extras]))`` with the value
``[runner_class_name, tactic]``. ``load_configs`` ignores the *whole* table when any
metadata field it collects differs from the running stack (a ``"*"`` in the file
matches anything), logs a warning and returns ``False``; every lookup then silently
falls back to the untuned tactic. warmplan checks the same fields itself before
loading, so that the report can say which field differed.

This module never imports torch or flashinfer.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

METADATA_KEY = "_metadata"
WILDCARD = "*"


@dataclass(frozen=True, slots=True, kw_only=True)
class Table:
    """A parsed FlashInfer tuning table."""

    metadata: dict[str, str] | None  # None: the file has no _metadata (FlashInfer checks nothing)
    entries: int
    coverage: dict[str, list[int]] = field(default_factory=dict)  # op -> tuned token buckets

    def identity(self) -> str:
        """What ranks compare before skipping their tuning forward: the metadata and
        the entry count (as vLLM 0.34 compares them); rank-keyed entries may differ."""
        meta = json.dumps(self.metadata, sort_keys=True)
        return hashlib.sha256(f"{meta}|{self.entries}".encode()).hexdigest()[:16]


class TableError(ValueError):
    """The bytes are not a FlashInfer tuning table."""


def parse_table(payload: bytes) -> Table:
    """Parse a FlashInfer tuning table; ``TableError`` naming what is wrong."""
    try:
        doc = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise TableError(f"not JSON: {str(exc)[:200]}") from None
    if not isinstance(doc, dict):
        raise TableError(f"expected a JSON object, found {type(doc).__name__}")
    raw_meta = doc.pop(METADATA_KEY, None)
    metadata: dict[str, str] | None = None
    if raw_meta is not None:
        if not isinstance(raw_meta, dict):
            raise TableError(f"{METADATA_KEY} is not an object")
        metadata = {str(k): str(v) for k, v in raw_meta.items()}
    coverage: dict[str, set[int]] = {}
    # Other keys with a leading underscore are FlashInfer's bookkeeping (0.7.2 writes
    # ``_generation``), not entries; load_configs skips them too.
    entries = [k for k in doc if not k.startswith("_")]
    for key in entries:
        op, bucket = _op_and_bucket(key)
        coverage.setdefault(op, set())
        if bucket is not None:
            coverage[op].add(bucket)
    return Table(
        metadata=metadata,
        entries=len(entries),
        coverage={op: sorted(b) for op, b in sorted(coverage.items())},
    )


# ``('bf16_gemm', 'CublasltBf16GemmRunner', ((256, 1024), (1024, 2048), ...), (..., torch.bfloat16, 0))``:
# not a Python literal (dtypes appear bare), so read by pattern.
_KEY = re.compile(r"""^\(\s*(['"])(?P<op>.*?)\1\s*,\s*(['"]).*?\3\s*,\s*\(\s*\(\s*(?P<m>-?\d+)""")


def _op_and_bucket(key: str) -> tuple[str, int | None]:
    """The op of an entry key and its token bucket: the first dimension of the
    profile's first input (the M of a GEMM, the token count of a MoE)."""
    match = _KEY.match(key)
    if match is None:
        return key, None
    return match.group("op"), int(match.group("m"))


def foreign_fields(file_meta: Mapping[str, str] | None, running: Mapping[str, str]) -> list[str]:
    """The fields for which FlashInfer's ``load_configs`` would ignore the table, as
    ``<field> differs: file has X, running Y``. FlashInfer's rule: every field of the
    running stack must be equal in the file or ``"*"`` there; a file without metadata
    is accepted."""
    if file_meta is None:
        return []
    out = []
    for key in sorted(running):
        got = file_meta.get(key)
        if got not in (running[key], WILDCARD):
            shown = "absent" if got is None else repr(got)
            out.append(f"{key} differs: file has {shown}, running {running[key]!r}")
    return out


# --------------------------------------------------------------------------- buckets

# FlashInfer's hybrid token buckets (``flashinfer.fused_moe.utils.
# get_hybrid_num_tokens_buckets``, what vLLM 0.34 tunes with): powers of two up to
# 256, then steps of 256 up to 2048, of 512 up to 4096, then powers of two; the
# maximum itself is always a bucket.


def hybrid_buckets(max_tokens: int, min_tokens: int = 1) -> tuple[int, ...]:
    """FlashInfer's hybrid token buckets from ``min_tokens`` up to ``max_tokens``."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1: {max_tokens}")
    out: list[int] = []
    m = max(min_tokens, 1)
    while m <= min(max_tokens, 256):
        out.append(m)
        m *= 2
    for start, stop, step in ((512, 2048, 256), (2560, 4096, 512)):
        m = start
        while m <= min(max_tokens, stop):
            out.append(m)
            m += step
    m = 8192
    while m <= max_tokens:
        out.append(m)
        m *= 2
    if not out or out[-1] != max_tokens:
        out.append(max_tokens)
    return tuple(sorted(set(out)))


def bucket_of(m: int, buckets: tuple[int, ...], *, round_up: bool) -> int:
    """The bucket FlashInfer serves ``m`` from: the largest ``<= m`` (floor), or with
    ``round_up`` the smallest ``>= m``; clamped to the range either way."""
    if not buckets:
        raise ValueError("buckets must not be empty")
    if round_up:
        return next((b for b in buckets if b >= m), buckets[-1])
    return next((b for b in reversed(buckets) if b <= m), buckets[0])
