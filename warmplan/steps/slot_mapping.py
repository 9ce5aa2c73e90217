"""``slot_mapping``: run the worker's slot-mapping kernel for one request at each
applied token count, so that every specialisation the fan names (Triton compiles
one variant per class of each int argument: ``== 1``, ``% 16 == 0``, other) is
compiled before the first real request.

Its tokens are a list of counts and expansions (``{range: [lo, hi]}``,
``{powers_of_two: [lo, hi]}``), clamped to ``max_num_tokens`` by default.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from warmplan.log import Logger
from warmplan.steps.base import (
    ResolveContext,
    ResolvedStep,
    StepFields,
    StepKind,
    StepResult,
    StepSpec,
)
from warmplan.steps.common import (
    COMMON_FIELDS,
    MAX_TOKENS,
    Path,
    Problems,
    clamp_to,
    count,
    obj,
    pair,
)
from warmplan.workers.base import Worker

NAME: Final = "slot_mapping"
DEFAULT_CLAMP: Final = "max_num_tokens"
# The kernel specialises by class of count (== 1, % 16 == 0, other), so a few dozen
# counts cover it; a list that expands past this is a typo, and would be built, logged
# and reported count by count.
MAX_COUNTS: Final = 65536

_TOKEN_ITEM: dict[str, Any] = {
    "description": "A token count, or an expansion into several.",
    "oneOf": [
        count("One token count."),
        obj(
            {"range": pair("Every count from the first to the last, inclusive.")},
            required=("range",),
            description="An inclusive range of token counts.",
        ),
        obj(
            {
                "powers_of_two": pair(
                    "Every power of two from the first to the last, inclusive (both powers of two)."
                )
            },
            required=("powers_of_two",),
            description="Powers of two between two bounds.",
        ),
    ],
}

SCHEMA: dict[str, Any] = obj(
    {
        **COMMON_FIELDS,
        "kind": {
            "const": NAME,
            "description": "Pre-compile the slot-mapping kernel for each token count.",
        },
        "tokens": {
            "type": "array",
            "items": _TOKEN_ITEM,
            "minItems": 1,
            "description": "Token counts to run the slot mapping at: ints and expansions.",
        },
        "clamp_to": clamp_to(DEFAULT_CLAMP, "the counts are"),
    },
    required=("id", "kind", "tokens"),
    description="Run the slot-mapping kernel for one request at each token count.",
)


@dataclass(frozen=True, slots=True)
class TokenRange:
    """``{range: [lo, hi]}``: every count from lo to hi inclusive."""

    lo: int
    hi: int

    def expand(self) -> list[int]:
        return list(range(self.lo, self.hi + 1))


@dataclass(frozen=True, slots=True)
class PowersOfTwo:
    """``{powers_of_two: [lo, hi]}``: every power of two from lo to hi inclusive."""

    lo: int
    hi: int

    def expand(self) -> list[int]:
        out, n = [], self.lo
        while n <= self.hi:
            out.append(n)
            n *= 2
        return out


TokenItem = int | TokenRange | PowersOfTwo


def expand_tokens(items: Iterable[TokenItem]) -> list[int]:
    """Expand a token list into plain counts, in order."""
    out: list[int] = []
    for item in items:
        out.extend([item] if isinstance(item, int) else item.expand())
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class SlotMappingStep(StepSpec):
    tokens: tuple[TokenItem, ...]
    clamp_to: str = DEFAULT_CLAMP


def _token_item(raw: Any) -> TokenItem:
    if isinstance(raw, int):
        return raw
    ((key, (lo, hi)),) = raw.items()
    return TokenRange(lo, hi) if key == "range" else PowersOfTwo(lo, hi)


def build(raw: Mapping[str, Any], common: StepFields) -> SlotMappingStep:
    return SlotMappingStep(
        **common,
        tokens=tuple(_token_item(t) for t in raw["tokens"]),
        clamp_to=raw.get("clamp_to", DEFAULT_CLAMP),
    )


def check(raw: Mapping[str, Any], path: Path, problems: Problems) -> None:
    """Expansions: first <= last; powers_of_two bounds are powers of two; the whole
    list expands to at most ``MAX_COUNTS`` counts."""
    tokens = raw.get("tokens")
    total = 0
    for j, item in enumerate(tokens if isinstance(tokens, list) else []):
        total += 1
        if not (isinstance(item, dict) and len(item) == 1):
            continue
        ((key, bounds),) = item.items()
        if not isinstance(bounds, list) or len(bounds) != 2:
            continue
        if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in bounds):
            continue
        lo, hi = bounds
        if lo > hi:
            problems.add((*path, "tokens", j, key), f"expected first <= last, found [{lo}, {hi}]")
        elif key == "range" and hi <= MAX_TOKENS:
            total += hi - lo
        if key == "powers_of_two":
            for k, n in enumerate((lo, hi)):
                if n & (n - 1):
                    problems.add(
                        (*path, "tokens", j, key, k), f"expected a power of two, found {n}"
                    )
    if total > MAX_COUNTS:
        problems.add(
            (*path, "tokens"),
            f"expected at most {MAX_COUNTS} token counts in all, found {total}; "
            "the kernel specialises by class of count (== 1, % 16 == 0, other), so a few cover it",
        )


def resolve(step: SlotMappingStep, ctx: ResolveContext) -> ResolvedStep:
    return ResolvedStep(**ctx.fields(step, expand_tokens(step.tokens), step.clamp_to))


def run(rstep: ResolvedStep, worker: Worker, log: Logger) -> StepResult:
    for n in rstep.applied:
        worker.slot_mapping(n)
    return StepResult()


KIND: StepKind[SlotMappingStep, ResolvedStep] = StepKind(
    name=NAME, schema=SCHEMA, build=build, check=check, resolve=resolve, run=run
)
