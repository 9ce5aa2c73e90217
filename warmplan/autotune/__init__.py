"""Autotuning: the cache file (``cache``), the policies that decide who tunes and how
ranks agree (``policy``), and backends usable by any worker (``flashinfer``). The
step itself is ``warmplan.steps.autotune``.

This module holds the vocabulary the step's schema and the policies share, one
constant each; it imports only the world's default timeout, so the plan layer can use it.
"""

from __future__ import annotations

from typing import Final, Literal

from warmplan.world import DEFAULT_TIMEOUT_S as DEFAULT_TIMEOUT_S

Policy = Literal["leader", "together", "every_rank", "load_only"]
OnMissing = Literal["tune", "skip", "fail"]
Decision = Literal["tune", "load", "skip"]
Identity = Literal["warmplan", "vllm"]

POLICIES: Final[tuple[Policy, ...]] = ("leader", "together", "every_rank", "load_only")
ON_MISSING: Final[tuple[OnMissing, ...]] = ("tune", "skip", "fail")
IDENTITIES: Final[tuple[Identity, ...]] = ("warmplan", "vllm")
DEFAULT_POLICY: Final[Policy] = "leader"
# Backends whose ranks tune together (FlashInfer's timing reduction, rank-keyed entries).
RANKED_BACKENDS: Final[tuple[str, ...]] = ("flashinfer",)


def default_policy(backend: str) -> Policy:
    """The policy a plan gets when its cache block names none: ``together`` for
    FlashInfer (its entries can be rank-keyed, so one rank's table misses on the
    others, and its ranks must pick the same tactics; a warm start then skips the
    tuning forward: docs/benchmarks.md), ``leader`` for the others."""
    return "together" if backend in RANKED_BACKENDS else DEFAULT_POLICY


def default_on_missing(policy: Policy) -> OnMissing:
    """What a missing cache means when the plan does not say: load_only never tunes."""
    return "skip" if policy == "load_only" else "tune"
