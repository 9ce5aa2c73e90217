"""Serving traces: the batches a worker really sees, replayed by ``warmplan verify``.

A trace is JSON Lines, one batch a line::

    # a comment; blank lines are allowed too
    {"decode": 7, "prefill": [{"tokens": 512, "context": 0}, {"tokens": 128, "context": 1024}]}
    {"decode": 32}
    {"prefill": [{"tokens": 300}]}

``decode`` is the number of one-token decode requests (default 0); ``prefill`` the
prefill chunks (default none), each ``tokens`` new tokens (>= 1) after ``context``
tokens already in the KV cache (default 0). A batch must hold at least one token.
Every problem is reported as ``file:line: ...`` naming the field, what was found and
what was expected; nothing of a bad trace is returned.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from warmplan.errors import UserError
from warmplan.workers.base import Batch, Limits, PrefillChunk

BATCH_KEYS = ("decode", "prefill")
CHUNK_KEYS = ("tokens", "context")

_LABEL_RE = re.compile(r"^batch\[(\d+)\]$")


@dataclass(frozen=True, slots=True)
class TraceEntry:
    """One batch and the 1-based line of the trace it was read from."""

    line: int
    batch: Batch


def batch_label(index: int) -> str:
    """The monitor label of trace batch ``index`` (0-based): ``batch[3]``."""
    return f"batch[{index}]"


def batch_index(label: str | None) -> int | None:
    """The batch index in a ``batch[N]`` label; ``None`` for any other label."""
    if label is None:
        return None
    match = _LABEL_RE.match(label)
    return int(match.group(1)) if match else None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _found(value: Any) -> str:
    """``-1``, ``string "7"``, ``array [1, 2]``: what a field held, for messages."""
    kind = _json_type(value)
    text = json.dumps(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return text if kind in ("number", "null") else f"{kind} {text}"


class _Problem(Exception):
    """One problem on the current line (turned into a ``UserError`` with file:line)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Problem(f"duplicate key {key!r}")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise _Problem(f"{name} is not a number here; expected an integer")


def _int_field(value: Any, field: str, *, minimum: int) -> int:
    what = "a positive integer" if minimum == 1 else "a non-negative integer"
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Problem(f"field {field!r}: expected {what}, found {_found(value)}")
    if value < minimum:
        raise _Problem(f"field {field!r}: expected {what}, found {value}")
    return value


def _unknown(keys: Iterable[str], allowed: Sequence[str], where: str) -> None:
    for key in keys:
        if key not in allowed:
            raise _Problem(f"{where}unknown key {key!r}; expected one of {', '.join(allowed)}")


def parse_batch(text: str) -> Batch:
    """One trace line (without its file position) -> ``Batch``; raises ``ValueError``."""
    try:
        return _parse(text)
    except _Problem as exc:
        raise ValueError(str(exc)) from None


def _parse(text: str) -> Batch:
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise _Problem(f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(data, dict):
        raise _Problem(
            'expected a JSON object like {"decode": 4, "prefill": [{"tokens": 128}]}, '
            f"found {_found(data)}"
        )
    _unknown(data, BATCH_KEYS, "")
    decode = _int_field(data.get("decode", 0), "decode", minimum=0)
    raw_chunks = data.get("prefill", [])
    if not isinstance(raw_chunks, list):
        raise _Problem(f"field 'prefill': expected an array of chunks, found {_found(raw_chunks)}")
    chunks = []
    for i, raw in enumerate(raw_chunks):
        where = f"prefill[{i}]"
        if not isinstance(raw, dict):
            raise _Problem(
                f'field {where!r}: expected an object like {{"tokens": 128, "context": 0}}, '
                f"found {_found(raw)}"
            )
        _unknown(raw, CHUNK_KEYS, f"field {where!r}: ")
        if "tokens" not in raw:
            raise _Problem(f"field '{where}.tokens': missing; expected a positive integer")
        tokens = _int_field(raw["tokens"], f"{where}.tokens", minimum=1)
        context = _int_field(raw.get("context", 0), f"{where}.context", minimum=0)
        chunks.append(PrefillChunk(tokens=tokens, context=context))
    if decode == 0 and not chunks:
        raise _Problem("empty batch: expected 'decode' > 0 or at least one 'prefill' chunk")
    return Batch(decode=decode, prefill=tuple(chunks))


def load_trace_entries(path: str | Path) -> list[TraceEntry]:
    """Read a trace, keeping each batch's line; raises ``UserError`` naming file:line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read trace: {exc}") from None
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            entries.append(TraceEntry(line=number, batch=_parse(stripped)))
        except _Problem as exc:
            raise UserError(f"{path}:{number}: {exc}") from None
    if not entries:
        raise UserError(f"{path}: no batches: expected one JSON object a line")
    return entries


def load_trace(path: str | Path) -> list[Batch]:
    """Read a JSON Lines trace into batches; raises ``UserError`` naming file:line."""
    return [entry.batch for entry in load_trace_entries(path)]


def check_fits(entries: Sequence[TraceEntry], limits: Limits, *, path: str | Path) -> None:
    """Raise ``UserError`` at the first batch the worker cannot run at all."""
    for entry in entries:
        batch = entry.batch
        seqs = batch.decode + len(batch.prefill)
        if batch.num_tokens > limits.max_num_batched_tokens:
            raise UserError(
                f"{path}:{entry.line}: batch of {batch.num_tokens} tokens exceeds the worker's "
                f"max_num_batched_tokens {limits.max_num_batched_tokens}"
            )
        if seqs > limits.max_num_seqs:
            raise UserError(
                f"{path}:{entry.line}: batch of {seqs} sequences exceeds the worker's "
                f"max_num_seqs {limits.max_num_seqs}"
            )


def dump_batch(batch: Batch) -> str:
    """One trace line for ``batch`` (the inverse of ``parse_batch``)."""
    data: dict[str, Any] = {}
    if batch.decode:
        data["decode"] = batch.decode
    if batch.prefill:
        data["prefill"] = [
            {"tokens": c.tokens, **({"context": c.context} if c.context else {})}
            for c in batch.prefill
        ]
    return json.dumps(data, separators=(", ", ": "))


def dump_trace(batches: Iterable[Batch]) -> str:
    """A whole trace for ``batches``, one line each."""
    return "".join(dump_batch(b) + "\n" for b in batches)
