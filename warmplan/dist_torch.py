"""Deprecated: ``TorchWorld`` lives in ``warmplan.world.distributed``; kept for
existing imports."""

from __future__ import annotations

from warmplan.world.distributed import TorchWorld

__all__ = ["TorchWorld"]
