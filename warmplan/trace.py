"""Serving traces, replayed by ``warmplan verify`` and written by ``warmplan record``.

A trace is JSON Lines and holds either batches (what a worker executed, one batch a
line) or requests (what a server was asked, one request a line; the scheduler model
in ``warmplan.scheduler`` turns them into batches). A batch-level trace::

    # a comment; blank lines are allowed too
    {"decode": 7, "prefill": [{"tokens": 512, "context": 0}, {"tokens": 128, "context": 1024}]}
    {"decode": 32}
    {"prefill": [{"tokens": 300}]}

``decode`` is the number of one-token decode requests (default 0); ``prefill`` the
prefill chunks (default none), each ``tokens`` new tokens (>= 1) after ``context``
tokens already in the KV cache (default 0). A batch must hold at least one token.
A recorded batch may also carry ``step`` (the worker's batch counter when it ran) and
``compiles`` (what the JIT monitor saw while it ran; see ``warmplan.record``).

A request-level trace::

    {"arrival_step": 0, "prompt_tokens": 1800, "cached_tokens": 512, "output_tokens": 120}
    {"arrival_s": 0.35, "prompt_tokens": 90, "output_tokens": 40, "id": "chat-7"}

``arrival_step`` (the scheduler step it arrives at) or ``arrival_s`` (seconds since
the trace began; default: ``arrival_step`` 0), ``prompt_tokens`` (>= 1),
``cached_tokens`` (prefix-cache hit, 0 <= hit <= prompt; default 0), ``output_tokens``
(>= 1), and an optional ``id``. A file holds one kind or the other.

Every problem is reported as ``file:line: ...`` naming the field, what was found and
what was expected; nothing of a bad trace is returned.

Over ~400 lines on purpose: one reader for both trace kinds, each field checked
with its file:line message; the two kinds share the line loop, the header and the
error wording.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from warmplan.errors import UserError
from warmplan.workers.base import Batch, Limits, PrefillChunk

BATCH_KEYS = ("decode", "prefill", "step", "compiles")
CHUNK_KEYS = ("tokens", "context")
REQUEST_KEYS = (
    "id",
    "arrival_step",
    "arrival_s",
    "prompt_tokens",
    "cached_tokens",
    "output_tokens",
)
COMPILE_KEYS = ("kind", "name", "key", "cache_hit", "duration_s")

TraceKind = Literal["batches", "requests"]

_LABEL_RE = re.compile(r"^batch\[(\d+)\]$")


@dataclass(frozen=True, slots=True)
class RecordedCompile:
    """A compilation ``warmplan record`` saw while a batch ran (``CompileEvent`` without
    its label: the batch is the label)."""

    kind: str
    name: str
    key: str
    cache_hit: bool = False
    duration_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "key": self.key,
            "cache_hit": self.cache_hit,
            "duration_s": self.duration_s,
        }


@dataclass(frozen=True, slots=True)
class TraceEntry:
    """One batch and the 1-based line of the trace it was read from.

    ``lines`` are all the trace lines the batch came from when it was scheduled from
    requests or re-chunked (``(line,)`` otherwise); ``compiles`` what a recording saw.
    """

    line: int
    batch: Batch
    compiles: tuple[RecordedCompile, ...] = ()
    step: int | None = None
    lines: tuple[int, ...] = ()

    @property
    def where(self) -> str:
        """``12``, or ``12,15,19`` for a batch scheduled from several requests."""
        lines = self.lines or (self.line,)
        shown = ",".join(str(n) for n in lines[:4])
        return shown + (f" +{len(lines) - 4}" if len(lines) > 4 else "")


@dataclass(frozen=True, slots=True, kw_only=True)
class TraceRequest:
    """One request of a request-level trace (see the module docstring)."""

    line: int
    id: str
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int = 0
    arrival_step: int | None = None
    arrival_s: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Trace:
    """A whole trace file: its kind and its batches or its requests."""

    path: str
    kind: TraceKind
    batches: tuple[TraceEntry, ...] = ()
    requests: tuple[TraceRequest, ...] = ()
    header: Mapping[str, Any] = field(default_factory=dict)

    @property
    def recorded_compiles(self) -> int:
        """Compilations (and disk-cache loads) a recording saw, over all batches."""
        return sum(len(e.compiles) for e in self.batches)

    @property
    def recorded(self) -> bool:
        """Whether any batch carries what ``warmplan record`` writes (``step``)."""
        return any(e.step is not None for e in self.batches)


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
    return _batch(_load_object(text))


def _load_object(text: str) -> dict[str, Any]:
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise _Problem(f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    except ValueError as exc:  # an integer of more digits than Python converts
        raise _Problem(f"invalid JSON: {exc}") from None
    except RecursionError:
        raise _Problem("invalid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise _Problem(
            'expected a JSON object like {"decode": 4, "prefill": [{"tokens": 128}]}, '
            f"found {_found(data)}"
        )
    return data


def _is_request(data: dict[str, Any]) -> bool:
    return any(key in data for key in REQUEST_KEYS) and not any(
        key in data for key in ("decode", "prefill")
    )


def _batch(data: dict[str, Any]) -> Batch:
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


def _compiles(data: dict[str, Any]) -> tuple[RecordedCompile, ...]:
    raw = data.get("compiles", [])
    if not isinstance(raw, list):
        raise _Problem(
            f"field 'compiles': expected an array of compile events, found {_found(raw)}"
        )
    out = []
    for i, item in enumerate(raw):
        where = f"compiles[{i}]"
        if not isinstance(item, dict):
            raise _Problem(
                f'field {where!r}: expected an object like {{"kind": "dynamo", "name": "forward", '
                f'"key": "..."}}, found {_found(item)}'
            )
        _unknown(item, COMPILE_KEYS, f"field {where!r}: ")
        texts = []
        for name in ("kind", "name", "key"):
            value = item.get(name)
            if not isinstance(value, str):
                raise _Problem(f"field '{where}.{name}': expected a string, found {_found(value)}")
            texts.append(value)
        hit = item.get("cache_hit", False)
        if not isinstance(hit, bool):
            raise _Problem(
                f"field '{where}.cache_hit': expected true or false, found {_found(hit)}"
            )
        duration = item.get("duration_s")
        if duration is not None and (
            isinstance(duration, bool) or not isinstance(duration, int | float) or duration < 0
        ):
            raise _Problem(
                f"field '{where}.duration_s': expected a non-negative number or null, found {_found(duration)}"
            )
        out.append(RecordedCompile(texts[0], texts[1], texts[2], hit, duration))
    return tuple(out)


def _entry(number: int, data: dict[str, Any]) -> TraceEntry:
    batch = _batch(data)
    step = data.get("step")
    if step is not None:
        step = _int_field(step, "step", minimum=0)
    return TraceEntry(line=number, batch=batch, compiles=_compiles(data), step=step)


def _request(number: int, data: dict[str, Any]) -> TraceRequest:
    _unknown(data, REQUEST_KEYS, "")
    for name in ("prompt_tokens", "output_tokens"):
        if name not in data:
            raise _Problem(f"field {name!r}: missing; expected a positive integer")
    prompt = _int_field(data["prompt_tokens"], "prompt_tokens", minimum=1)
    output = _int_field(data["output_tokens"], "output_tokens", minimum=1)
    cached = _int_field(data.get("cached_tokens", 0), "cached_tokens", minimum=0)
    if cached > prompt:
        raise _Problem(
            f"field 'cached_tokens': a prefix-cache hit of {cached} tokens is longer than "
            f"the prompt ({prompt} tokens); expected 0 <= cached_tokens <= prompt_tokens"
        )
    if "arrival_step" in data and "arrival_s" in data:
        raise _Problem("fields 'arrival_step' and 'arrival_s': expected one of them, found both")
    step = None
    if "arrival_step" in data:
        step = _int_field(data["arrival_step"], "arrival_step", minimum=0)
    seconds = None
    if "arrival_s" in data:
        value = data["arrival_s"]
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise _Problem(
                f"field 'arrival_s': expected a non-negative number, found {_found(value)}"
            )
        seconds = float(value)
    ident = data.get("id", f"line-{number}")
    if not isinstance(ident, str | int) or isinstance(ident, bool):
        raise _Problem(f"field 'id': expected a string, found {_found(ident)}")
    return TraceRequest(
        line=number,
        id=str(ident),
        prompt_tokens=prompt,
        output_tokens=output,
        cached_tokens=cached,
        arrival_step=step,
        arrival_s=seconds,
    )


# A trace is read whole; one larger than this is refused rather than read forever.
MAX_TRACE_BYTES = 1 << 30


def read_trace(path: str | Path) -> Trace:
    """Read a batch-level or request-level trace; raises ``UserError`` naming file:line."""
    path = Path(path)
    try:
        with path.open("rb") as file:  # bounded: a device (/dev/zero) or a runaway file
            raw = file.read(MAX_TRACE_BYTES + 1)
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read trace: {exc}") from None
    if len(raw) > MAX_TRACE_BYTES:
        raise UserError(
            f"{path}: cannot read trace: larger than {MAX_TRACE_BYTES >> 20} MiB "
            "(split it, or record with WARMPLAN_RECORD_MAX_MB / --max-bytes)"
        )
    entries: list[TraceEntry] = []
    requests: list[TraceRequest] = []
    first: tuple[TraceKind, int] | None = None
    header: dict[str, Any] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            if not header and first is None:
                header = _header(stripped)
            continue
        try:
            data = _load_object(stripped)
            kind: TraceKind = "requests" if _is_request(data) else "batches"
            if first is None:
                first = (kind, number)
            elif kind != first[0]:
                what = "a request" if kind == "requests" else "a batch"
                raise _Problem(
                    f"{what} in a trace of {first[0]} (from line {first[1]}); "
                    "a trace holds batches or requests, not both"
                )
            if kind == "requests":
                requests.append(_request(number, data))
            else:
                entries.append(_entry(number, data))
        except _Problem as exc:
            raise UserError(f"{path}:{number}: {exc}") from None
    if first is None:
        raise UserError(f"{path}: no batches: expected one JSON object a line")
    return Trace(
        path=str(path),
        kind=first[0],
        batches=tuple(entries),
        requests=tuple(requests),
        header=header,
    )


def _header(comment: str) -> dict[str, Any]:
    """The mapping of a ``# {"warmplan_trace": 1, ...}`` line (``warmplan record``'s
    header); ``{}`` for any other comment."""
    text = comment[1:].strip()
    if not text.startswith('{"warmplan_trace"'):
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def load_trace_entries(path: str | Path) -> list[TraceEntry]:
    """Read a batch-level trace, keeping each batch's line; raises ``UserError`` naming
    file:line (a request-level trace too: schedule it with ``warmplan.scheduler``)."""
    trace = read_trace(path)
    if trace.kind == "requests":
        raise UserError(
            f"{path}:{trace.requests[0].line}: a request-level trace; expected batches here "
            "(warmplan.scheduler.replay_batches schedules requests into batches)"
        )
    return list(trace.batches)


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
